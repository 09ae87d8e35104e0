"""Headless verbs over a project: import/export, pre-label, check, status, demo.

One verb, one entry point: the CLI, the GUI and the benchmarks call these functions, each
taking ``on_progress`` and ``cancel``. Heavy ML modules are imported inside the verbs that
need them, so light verbs (status, flags, export) start without torch.
"""


class PipelineError(Exception):
    """A verb cannot run; the message says why and what to do, in one line."""


def load_readable(project, records, unreadable: list) -> list:
    """``(record, image)`` for each record whose file still reads. The others (moved, deleted or damaged
    since the import) go to ``unreadable`` as one line each, naming the file and the reason, and the work
    goes on without them: one lost file out of thousands must not stop a pre-label or check run
    (``annotator relink`` finds moved ones again, ``annotator remove`` takes lost ones out)."""
    from annotator.core.store import ProjectError

    out = []
    for rec in records:
        try:
            out.append((rec, project.load_image(rec.id)))
        except ProjectError as exc:
            unreadable.append(str(exc))
    return out


def current_mask(image, label):
    """``label.mask`` (None without a label), or a :class:`PipelineError` naming the image when its file was
    damaged or deleted: the desktop app shows such an image with the last version that reads, to save again."""
    from annotator.core.store import ProjectError

    if label is None:
        return None
    try:
        return label.mask
    except ProjectError as exc:
        raise PipelineError(f"{image.rel_path}: its label cannot be read ({exc}); open the image in the app, "
                            "which shows the last version that reads, and accept it to save it again") from None
