"""Light verbs: import, labels, status, flags, export. No torch here (checked by a test)."""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Optional

from annotator.core import formats as F
from annotator.core.flag_text import flag_reason
from annotator.core.images import ImageError, load_mask, sha256_file
from annotator.core.jobs import CancelToken, ProgressFn, no_progress
from annotator.core.review import Review
from annotator.core.store import Project, ProjectError

from . import PipelineError, current_mask


def _prefixed(prefix: Optional[str]):
    """``rel -> prefix/rel`` for an import's ``prefix`` (a relative folder, e.g. ``batch-02``), or the identity
    (also for AUTO, which is settled later, by :func:`_add_items`)."""
    if not prefix or prefix == AUTO:
        return lambda rel: rel
    parts = [q for q in str(prefix).replace("\\", "/").split("/") if q not in ("", ".")]
    if not parts or ".." in parts or str(prefix).startswith(("/", "\\")) or ":" in parts[0]:
        raise PipelineError(f"--prefix must be a relative folder name such as batch-02, got {prefix!r}")
    head = "/".join(parts)
    return lambda rel: f"{head}/{rel}"


def _add_items(project: Project, items, role_of, report: dict, prefix: Optional[str] = None) -> dict[str, int]:
    """Add scanned items in one transaction (their paths under ``prefix``); an existing path is kept, never
    replaced. ``prefix`` AUTO: under the batch folder's name only when another image already holds one of its
    paths (report ``prefix``). Returns {scanned rel_path: image id} of the images added."""
    if prefix == AUTO:
        prefix = _auto_prefix(project, items, report)
    path_of = _prefixed(prefix)
    added: dict[str, int] = {}
    with project.transaction():
        for it in items:
            rel = path_of(it.rel_path)
            known = project.image_by_path(rel)
            if known is None and prefix and report.get("prefix") == prefix:
                unprefixed = project.image_by_path(it.rel_path)
                if unprefixed is not None and unprefixed.sha256 == it.sha256:
                    known = unprefixed  # this very file came in with an earlier batch: not again
                    rel = it.rel_path
            if known is not None:
                same = known.sha256 == it.sha256
                report["skipped"].append([rel, "already in the project" if same else
                                          "a different image with this path is already in the project (import "
                                          "the folder with --prefix NAME to keep both)"])
                continue
            added[it.rel_path] = project.add_image(it.abs_path, rel, role_of(it), width=it.width,
                                                   height=it.height, sha256=it.sha256)
    report["added"] += len(added)
    return added


#: ``prefix=AUTO``: a batch goes under its folder's name when its paths are taken (the app's imports)
AUTO = "<auto>"


def _auto_prefix(project: Project, items, report: dict) -> Optional[str]:
    """The folder name a batch goes under because other images hold some of its paths (``day2`` for
    ``/data/day2/001.png`` when an earlier ``001.png`` differs), or None when no path is taken by another
    image. ``day2-2``, ``day2-3``... when that name holds other images of the same paths."""
    def clashes(head: str) -> int:
        return sum(1 for it in items if (k := project.image_by_path(head + it.rel_path)) is not None
                   and k.sha256 != it.sha256)

    taken = clashes("")
    if not taken:
        return None
    base = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(report["root"]).name).strip(".") or "batch"
    used = {i.rel_path.split("/", 1)[0] for i in project.images() if "/" in i.rel_path}

    def fits(name: str) -> bool:  # a name in use is taken again only by that very batch, imported again
        same = any((k := project.image_by_path(f"{name}/{it.rel_path}")) is not None and k.sha256 == it.sha256
                   for it in items)
        return not clashes(name + "/") and (name not in used or same)

    name, n = base, 1
    while not fits(name):
        n += 1
        name = f"{base}-{n}"
    report["prefix"] = name
    report["prefix_reason"] = (f"{taken} of its file paths were taken by other images, so the batch went under "
                               f"{name}/")
    return name


def _new_report(root) -> dict:
    return {"root": str(Path(root).resolve()), "added": 0, "labels": 0, "skipped": [], "duplicates": []}


def import_folder(project: Project, root, good: bool = False, on_progress: ProgressFn = no_progress,
                  cancel: Optional[CancelToken] = None, prefix: Optional[str] = None) -> dict:
    """Add every readable image under ``root`` (its path relative to ``root``, under ``prefix`` when given:
    a second batch whose file names repeat the first's); unreadable ones are listed with the reason."""
    if not Path(root).is_dir():
        raise PipelineError(f"no folder at {root}")
    _prefixed(prefix)  # a bad prefix fails before the scan
    scan = F.scan_folder(str(root), on_progress=on_progress, cancel=cancel)
    report = _new_report(root)
    report["skipped"] += [list(s) for s in scan.skipped]
    report["duplicates"] = scan.duplicates
    _add_items(project, scan.items, lambda it: F.ROLE_GOOD if good else F.ROLE_LABEL, report, prefix)
    report["role"] = F.ROLE_GOOD if good else F.ROLE_LABEL
    return report


def import_mvtec(project: Project, root, with_labels: bool = False, on_progress: ProgressFn = no_progress,
                 cancel: Optional[CancelToken] = None, prefix: Optional[str] = None) -> dict:
    """train/good -> good; test/** -> to label; ground truth as reviewer-checked labels when asked; every
    path under ``prefix`` when given."""
    _prefixed(prefix)  # a bad prefix fails before the scan
    try:
        scan = F.scan_mvtec(str(root), with_labels=with_labels, on_progress=on_progress, cancel=cancel)
    except F.NotMvtecError as exc:
        raise PipelineError(str(exc)) from exc
    report = _new_report(root)
    report["skipped"] += [list(s) for s in scan.skipped]
    report["duplicates"] = scan.duplicates
    report["missing_masks"] = scan.missing_masks
    added = _add_items(project, scan.items, lambda it: it.role, report, prefix)
    path_of = _prefixed(report.get("prefix") or prefix)
    if with_labels:
        review = Review(project)
        for it in scan.items:
            if it.rel_path in added and it.labelled:
                try:
                    mask, classes = it.load_label()
                except ImageError as exc:
                    report["skipped"].append([path_of(it.rel_path), f"label not imported: {exc.reason}"])
                    continue
                review.import_label(added[it.rel_path], mask, classes)
                report["labels"] += 1
    return report


def import_masks(project: Project, mask_dir) -> dict:
    """Set current labels from mask PNGs matched by relative path (taken as reviewer-checked)."""
    if not Path(mask_dir).is_dir():
        raise PipelineError(f"no mask folder at {mask_dir}")
    images = {i.rel_path: i for i in project.images()}
    match = F.match_masks(str(mask_dir), list(images))
    report = _new_report(mask_dir)
    report["unmatched_masks"] = match.unmatched
    report["skipped"] += [[m, f"mask could belong to several images: {', '.join(r)}"] for m, r in match.ambiguous.items()]

    def loader(rel: str):
        img = images[rel]
        return lambda: (load_mask(match.matched[rel], (img.width, img.height)), match.region_classes.get(rel) or None)

    _set_labels(project, images, {rel: loader(rel) for rel in sorted(match.matched)}, report)
    return report


def import_labels(project: Project, source, fmt: str) -> dict:
    """Set current labels from a COCO JSON (``fmt="coco"``) or a labelme folder."""
    if fmt not in ("coco", "labelme"):
        raise PipelineError(f"label format must be coco or labelme, got {fmt!r}")
    if not Path(source).exists():
        raise PipelineError(f"no {fmt} labels at {source}")
    labels = F.import_coco(str(source)) if fmt == "coco" else F.import_labelme(str(source))
    images = {i.rel_path: i for i in project.images()}
    report = _new_report(source)
    report["skipped"] += [[rel, "no image with this path in the project"] for rel in labels if rel not in images]
    _set_labels(project, images, {rel: (lambda v=v: v) for rel, v in labels.items() if rel in images}, report)
    return report


def _set_labels(project: Project, images: dict, loaders: dict, report: dict) -> None:
    review = Review(project)
    for rel, load in loaders.items():
        img = images[rel]
        try:
            mask, classes = load()
            if img.role == F.ROLE_GOOD:
                # a good image takes no label; an empty one agrees with it (a COCO or labelme export lists the
                # good images too) and is counted, not listed
                if mask is not None and mask.any():
                    report["skipped"].append([rel, f"a good (defect-free) training image takes no label, but this one "
                                                   f"marks {int(mask.sum())} px as a defect"])
                else:
                    report["good_agreed"] = report.get("good_agreed", 0) + 1
                continue
            review.import_label(img.id, mask, classes)
        except (ImageError, ProjectError, ValueError) as exc:
            report["skipped"].append([rel, str(exc)])
            continue
        report["labels"] += 1


def format_import_report(report: dict) -> str:
    lines = [f"{report['added']} images added, {report['labels']} labels set from {report['root']}"]
    if report.get("prefix_reason"):
        lines.append(f"  {report['prefix_reason']}")
    for rel, why in report["skipped"]:
        lines.append(f"  skipped {rel}: {why}")
    for group in report.get("duplicates", []):
        lines.append(f"  identical files: {', '.join(group)}")
    for rel in report.get("unmatched_masks", []):
        lines.append(f"  mask matches no image: {rel}")
    return "\n".join(lines)


# ---------------------------------------------------------------- choosing images: remove, role


def select_images(project: Project, patterns) -> list:
    """The images whose path matches one of ``patterns``: an exact path (``test/hole/003.png``), a glob
    (``batch-02/*``, ``*/stain/*``; ``*`` also crosses ``/``) or a folder (``batch-02/``: everything under
    it). A pattern that matches nothing is an error, so a typing slip does not pass silently."""
    images = project.images()
    chosen: dict[int, object] = {}
    by_path = {i.rel_path: i for i in images}
    for pat in map(str, patterns):
        if pat in by_path:  # first, so that a file named 'a[1].png' is itself, not a glob
            hits = [by_path[pat]]
        elif pat.endswith("/"):
            hits = [i for i in images if i.rel_path.startswith(pat)]
        else:
            hits = [i for i in images if fnmatch.fnmatchcase(i.rel_path, pat)]
        if not hits:
            raise PipelineError(f"no image in the project matches {pat!r} (paths as `annotator status` lists them)")
        chosen.update((i.id, i) for i in hits)
    return sorted(chosen.values(), key=lambda i: i.id)


def _person_labelled(project: Project, img) -> bool:
    label = project.current_label(img.id)
    return label is not None and label.source != "model1"


def remove_images(project: Project, patterns, dry_run: bool = False) -> dict:
    """Take the matching images out of the project with their labels, flags and heat maps (the image files
    stay where they are). ``dry_run``: only say what would go. Returns ``{"removed": [path],
    "person_labelled": [path], "dry_run"}``; ``person_labelled`` are those whose current label a person drew,
    kept or imported: work that goes with them."""
    chosen = select_images(project, patterns)
    report = {"removed": [i.rel_path for i in chosen], "dry_run": dry_run,
              "person_labelled": [i.rel_path for i in chosen if _person_labelled(project, i)]}
    if not dry_run:
        project.remove_images([i.id for i in chosen])
    return report


def set_roles(project: Project, patterns, role: str) -> dict:
    """Make the matching images good training images (``role`` "good") or images to label ("label"), in one
    transaction: if one is refused (a label that marks a defect cannot become good fabric), none changes.
    Returns ``{"role", "changed": [path], "unchanged": [path]}``. Model 1 learns the new roles at its next
    fit (``annotator prelabel``)."""
    if role not in (F.ROLE_GOOD, F.ROLE_LABEL):
        raise PipelineError(f"role must be {F.ROLE_GOOD!r} or {F.ROLE_LABEL!r}, got {role!r}")
    chosen = select_images(project, patterns)
    review = Review(project)
    refused = [why for why in (review.why_not_good(i.id) for i in chosen if role == F.ROLE_GOOD) if why]
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise PipelineError(f"nothing changed: {refused[0]}{more}")
    report: dict = {"role": role, "changed": [], "unchanged": []}
    with project.transaction():
        for img in chosen:
            if img.role == role:
                report["unchanged"].append(img.rel_path)
                continue
            review.set_role(img.id, role)
            report["changed"].append(img.rel_path)
    return report


# ---------------------------------------------------------------- images moved since the import


def relink(project: Project, folder=None, every: bool = False, on_progress: ProgressFn = no_progress,
           cancel: Optional[CancelToken] = None) -> dict:
    """Find image files moved since the import under ``folder`` (default: the project folder) and point
    the project at them. Only files with the imported content count (SHA-256), so a file of the same name
    is never taken for another. Candidates, best first: ``folder/<rel_path>``, then files of the same name
    whose folders match more of the old path. ``every``: also images whose old file still reads (a copy
    moved to a new disk). Returns ``{"folder", "looked_for", "relinked": [[path, file]], "missing": [path],
    "different": [[path, file]]}``."""
    folder = Path(folder if folder is not None else project.path).resolve()
    if not folder.is_dir():
        raise PipelineError(f"no folder at {folder}")
    wanted = [img for img in project.images() if every or not Path(img.source).is_file()]
    report: dict = {"folder": str(folder), "looked_for": len(wanted), "relinked": [], "missing": [],
                    "different": []}
    if not wanted:
        return report
    names = {Path(img.source).name for img in wanted} | {Path(img.rel_path).name for img in wanted}
    by_name: dict[str, list[Path]] = {}
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if f in names:
                by_name.setdefault(f, []).append(Path(dirpath) / f)
        if cancel is not None:
            cancel.raise_if_cancelled()
    digests: dict[Path, Optional[str]] = {}

    def digest(path: Path) -> Optional[str]:
        if path not in digests:
            try:
                digests[path] = sha256_file(path)
            except OSError:
                digests[path] = None
        return digests[path]

    for n, img in enumerate(wanted):
        if cancel is not None:
            cancel.raise_if_cancelled()
        on_progress(n, len(wanted), "looking for moved images")
        old = Path(img.source)
        candidates = [folder / img.rel_path] if (folder / img.rel_path).is_file() else []
        for name in dict.fromkeys((old.name, Path(img.rel_path).name)):
            same = sorted(by_name.get(name, []), key=lambda c: (-_common_tail(c, old), str(c)))
            candidates += [c for c in same if c not in candidates]
        found = next((c for c in candidates if digest(c) == img.sha256), None)
        if found is None:
            report["missing"].append(img.rel_path)
            if candidates:
                report["different"].append([img.rel_path, str(candidates[0])])
        elif found != old:
            project.set_source(img.id, found, sha256=img.sha256)
            report["relinked"].append([img.rel_path, str(found)])
    on_progress(len(wanted), len(wanted), "looking for moved images")
    return report


def _common_tail(a: Path, b: Path) -> int:
    """How many trailing path parts (file name included) ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(reversed(a.parts), reversed(b.parts)):
        if x != y:
            break
        n += 1
    return n


def format_relink_report(report: dict) -> str:
    n, moved, missing = report["looked_for"], report["relinked"], report["missing"]
    if not n:
        return "every image file is where the project expects it"
    lines = [f"{len(moved)} of {n} images found under {report['folder']}"]
    lines += [f"  {rel} -> {path}" for rel, path in moved]
    different = dict(map(tuple, report["different"]))
    for rel in missing:
        why = f" ({different[rel]} has the name but other content)" if rel in different else ""
        lines.append(f"  still missing: {rel}{why}")
    return "\n".join(lines)


# ---------------------------------------------------------------- status and flags


def status_counts(project: Project) -> dict:
    review = Review(project)
    return {"phase": review.phase(), "loop_finished": review.loop_finished(), "counts": review.counts()}


def status(project: Project) -> dict:
    rounds = project.rounds()
    open_flags: dict[int, list[str]] = {}
    for f in project.flags(unresolved_only=True):
        open_flags.setdefault(f.image_id, []).append(f.rule)
    images = []
    for img in project.images():
        label = project.current_label(img.id)
        images.append({
            "path": img.rel_path, "role": img.role, "state": img.state, "anomaly_score": img.anomaly_score,
            "label_area": None if label is None else label.area, "flags": open_flags.get(img.id, []),
        })
    return {"round": rounds[-1].number if rounds else 0, **status_counts(project),
            "missing_files": missing_files(project), "images": images}


def missing_files(project: Project) -> list[str]:
    """Paths of the images whose file is no longer where the project expects it (``annotator relink``)."""
    return [img.rel_path for img in project.images() if not os.path.isfile(img.source)]


def format_status(st: dict) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in st["counts"].items() if v)
    head = f"round {st['round']} · phase {st['phase']} · {counts}"
    if st["loop_finished"]:
        head += " · loop finished: ready to export"
    missing = st.get("missing_files") or []
    if missing:
        what = "1 image file is not where it was" if len(missing) == 1 else \
            f"{len(missing)} image files are not where they were"
        head += f"\n{what} imported from (first: {missing[0]}); `annotator relink P FOLDER` finds moved ones"
    rows = [f"{i['state']:<12} {_fmt(i['anomaly_score']):>7} {str(i['label_area'] or ''):>7}  {i['path']}"
            + (f"  [{', '.join(i['flags'])}]" if i["flags"] else "") for i in st["images"]]
    return "\n".join([head, f"{'state':<12} {'score':>7} {'area':>7}  path", *rows])


def _fmt(x) -> str:
    return "" if x is None else f"{x:.3f}"


def flag_list(project: Project, all_rounds: bool = False) -> list[dict]:
    """Open flags (or every flag), most suspicious first, with their numbers."""
    paths = {i.id: i.rel_path for i in project.images()}
    return [{"path": paths[f.image_id], "rule": f.rule, "suspicion": f.suspicion, "round": f.round, "id": f.id,
             "resolved": f.resolved, **f.numbers}
            for f in project.flags(unresolved_only=not all_rounds)]


_FLAG_FIELDS = ("path", "rule", "suspicion", "round", "id", "resolved")  # flag_list's own keys; the rest are numbers


def format_flags(flags: list[dict]) -> str:
    """One line per flag of :func:`flag_list`: suspicion, rule, path and the reason the desktop app gives."""
    if not flags:
        return "no open flags"
    out = []
    for f in flags:
        why, _ = flag_reason(f["rule"], {k: v for k, v in f.items() if k not in _FLAG_FIELDS})
        out.append(f"{f['suspicion']:.2f}  {f['rule']:<18} {f['path']}: {why}")
    return "\n".join(out)


# ---------------------------------------------------------------- export

EXPORTERS = {"masks": F.export_masks, "mvtec": F.export_mvtec, "labelme": F.export_labelme, "coco": F.export_coco}


def export_records(project: Project) -> list[F.ExportRecord]:
    records = []
    for img in project.images():
        label = project.current_label(img.id)
        records.append(F.ExportRecord(
            img.rel_path, img.source, img.width, img.height, img.role,
            mask=current_mask(img, label),
            region_classes=() if label is None else [c or F.DEFAULT_CLASS for c in label.classes],
        ))
    return records


def export_project(project: Project, out, fmt: str, on_progress: ProgressFn = no_progress,
                   cancel: Optional[CancelToken] = None) -> dict:
    """Export every image's current label. Accepted labels are written unchanged."""
    if fmt not in EXPORTERS:
        raise PipelineError(f"format must be one of {', '.join(EXPORTERS)}, got {fmt!r}")
    records = export_records(project)
    kwargs = {"on_progress": on_progress, "cancel": cancel}
    if fmt == "coco":
        out = Path(out)
        out = out if out.suffix == ".json" else out / "annotations.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        kwargs["class_names"] = [c.name for c in project.classes()]
    summary = EXPORTERS[fmt](records, str(out), **kwargs)
    result = dict(vars(summary))
    result["loop_finished"] = Review(project).loop_finished()
    return result
