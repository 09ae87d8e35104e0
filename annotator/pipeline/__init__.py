"""Headless verbs over a project: import/export, pre-label, check, status, demo.

One verb, one entry point: the CLI, the GUI and the benchmarks call these functions, each
taking ``on_progress`` and ``cancel``. Heavy ML modules are imported inside the verbs that
need them, so light verbs (status, flags, export) start without torch.
"""


class PipelineError(Exception):
    """A verb cannot run; the message says why and what to do, in one line."""
