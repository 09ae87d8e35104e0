"""Command line: ``annotator VERB ...``. Every verb calls the same headless function the GUI
calls. Light verbs (init, import, labels, remove, role, relink, status, flags,
export) never import torch."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from annotator import __version__


class _Bar:
    """tqdm progress bar fed by ``on_progress(done, total, message)``; silent with ``quiet``.

    One bar per stretch of work (a new one when the total changes or the count starts again):
    the message only changes its label, so a job that reports "step 5/800, loss 1.03" every step
    keeps one bar with a true rate. Off a terminal (a log file, a pipe) it writes a line at most
    every 10 s instead of one per update.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bar = None
        self.message = None

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.bar is None or (total or None) != self.bar.total or done < self.bar.n:
            self.close()
            self.bar = tqdm(total=total or None, desc=message, unit="it", file=sys.stderr, leave=False,
                            dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
            self.message = message
        elif message != self.message:
            self.bar.set_description_str(message, refresh=False)
            self.message = message
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _open(path: str):
    from annotator.core.store import Project

    return Project.open(path)


# ---------------------------------------------------------------- verbs


def cmd_init(a) -> int:
    from annotator.core.store import Project

    Project.create(a.project).close()
    print(f"created project {a.project}")
    return 0


def cmd_import(a) -> int:
    from annotator.pipeline import project_io

    with _open(a.project) as p:
        if a.mvtec:
            report = project_io.import_mvtec(p, a.mvtec, with_labels=a.with_labels, prefix=a.prefix)
        elif a.folder:
            report = project_io.import_folder(p, a.folder, good=a.good, prefix=a.prefix)
        else:
            raise SystemExit("annotator import: give a folder or --mvtec ROOT")
    _print_json(report) if a.json else print(project_io.format_import_report(report))
    return 0


def cmd_labels(a) -> int:
    from annotator.pipeline import project_io

    with _open(a.project) as p:
        if a.masks:
            report = project_io.import_masks(p, a.masks)
        else:
            report = project_io.import_labels(p, a.coco or a.labelme, "coco" if a.coco else "labelme")
    _print_json(report) if a.json else print(project_io.format_import_report(report))
    return 0


def cmd_prelabel(a) -> int:
    from annotator.ml.prelabel import config_for_scale
    from annotator.pipeline.prelabel import prelabel_project

    bar = _Bar(a.quiet)
    with _open(a.project) as p:
        try:
            # window and blurs follow the magnification
            extra = {} if a.coarse_weight is None else {"coarse_weight": a.coarse_weight}
            cfg = config_for_scale(a.scale, method=a.method, **extra)
            summary = prelabel_project(p, cfg, on_progress=bar)
        finally:
            bar.close()
    _print_json(summary)
    return 0


def cmd_check(a) -> int:
    from annotator.core.flags import FlagRules
    from annotator.pipeline.check import check_project

    bar = _Bar(a.quiet)
    rules = FlagRules(iou_threshold=a.iou_threshold, operation=a.operation, image_support=a.image_evidence,
                      unlabelled_check=a.model1_check)
    checker_config = None
    if a.label_input is not None:
        from annotator.ml.checkers import CheckerConfig

        checker_config = CheckerConfig(label_input=a.label_input)
    with _open(a.project) as p:
        try:
            summary = check_project(p, variant=a.variant, folds=a.folds, scheme=a.scheme, rules=rules,
                                    checker_config=checker_config, on_progress=bar,
                                    resend_overruled=a.resend_overruled, recheck_accepted=a.recheck_accepted)
        finally:
            bar.close()
    _print_json(summary)
    return 0


def cmd_status(a) -> int:
    from annotator.pipeline import project_io

    with _open(a.project) as p:
        status = project_io.status(p)
    _print_json(status) if a.json else print(project_io.format_status(status))
    return 0


def cmd_flags(a) -> int:
    from annotator.pipeline import project_io

    with _open(a.project) as p:
        flags = project_io.flag_list(p, all_rounds=a.all)
    _print_json(flags) if a.json else print(project_io.format_flags(flags))
    return 0


def cmd_export(a) -> int:
    from annotator.pipeline import project_io

    with _open(a.project) as p:
        summary = project_io.export_project(p, a.out, a.format)
    _print_json(summary)
    return 0


def cmd_remove(a) -> int:
    from annotator.pipeline import project_io

    with _open(a.project) as p:
        report = project_io.remove_images(p, a.paths, dry_run=not a.yes)
    if a.json:
        _print_json(report)
    else:
        n, kept = len(report["removed"]), set(report["person_labelled"])
        verb = "would remove" if report["dry_run"] else "removed"
        made = f", {len(kept)} with a label a person made" if kept else ""
        print(f"{verb} {n} image{'' if n == 1 else 's'}{made}")
        for rel in report["removed"]:
            print(f"  {rel}" + ("  (labelled by a person)" if rel in kept else ""))
    if report["dry_run"]:
        print("nothing removed: run again with --yes to remove them (their files stay where they are)",
              file=sys.stderr)
        return 1
    return 0


def cmd_role(a) -> int:
    from annotator.pipeline import project_io

    with _open(a.project) as p:
        report = project_io.set_roles(p, a.paths, "good" if a.good else "label")
    if a.json:
        _print_json(report)
    else:
        n = len(report["changed"])
        what = "defect-free (model 1 trains on them)" if report["role"] == "good" else "to label"
        print(f"{n} image{'' if n == 1 else 's'} now {what}" + (
            f" ({len(report['unchanged'])} already were)" if report["unchanged"] else ""))
        if report["changed"]:
            print("model 1 learns this at its next fit: run `annotator prelabel`")
    return 0


def cmd_relink(a) -> int:
    from annotator.pipeline import project_io

    bar = _Bar(a.quiet)
    with _open(a.project) as p:
        try:
            report = project_io.relink(p, a.folder, every=a.all, on_progress=bar)
        finally:
            bar.close()
    _print_json(report) if a.json else print(project_io.format_relink_report(report))
    return 0


def cmd_demo(a) -> int:
    from annotator.pipeline.demo import run_demo

    bar = _Bar(a.quiet)
    try:
        report = run_demo(a.project, size=a.size, seed=a.seed, headless=a.headless, on_progress=bar,
                          log=print if not (a.headless and a.json) else (lambda s: None))
    finally:
        bar.close()
    if a.headless:
        if a.json:
            _print_json(report)
        else:
            st = report["status"]
            counts = ", ".join(f"{k} {v}" for k, v in st["counts"].items() if v)
            print(f"phase {st['phase']}: {counts}. Next: `annotator flags {a.project}` or open the app with "
                  f"`annotator demo --project {a.project}`")
        return 0
    return _open_gui(a.project)


def _open_gui(project: Optional[str]) -> int:
    from annotator.gui.app import main as gui_main

    return gui_main([project] if project else [])


def cmd_bench(a) -> int:
    import importlib

    module = importlib.import_module(f"annotator.bench.{a.what}")
    kwargs: dict = {"quick": True} if a.quick else {}
    for flag, given in (("--subtle", a.subtle), ("--data", a.data is not None), ("--seed", a.seed is not None)):
        if given and a.what == "ui":
            raise ValueError(f"{flag} applies to the prelabel, checkers and loop benchmarks")
    if a.data is not None:
        if a.subtle or a.quick:
            raise ValueError("--subtle and --quick change the demo data; they do not apply with --data")
        from annotator.bench.data import categories

        categories(a.data)  # one clear line now rather than after minutes of work
        kwargs["data_root"] = a.data
    if a.subtle:
        kwargs["min_visibility"] = 0.0
    if a.seed is not None:
        kwargs["seed"] = a.seed
    if a.scale is not None:
        if a.what not in ("prelabel", "loop"):
            raise ValueError("--scale applies to the prelabel and loop benchmarks (model 1)")
        from annotator.ml.prelabel import config_for_scale

        if a.what == "prelabel":
            kwargs["config"] = config_for_scale(a.scale, seed=a.seed or 0)
        else:
            kwargs["prelabel_config"] = config_for_scale(a.scale)
    result = module.run(**kwargs)
    if a.json:
        _print_json(result)
    else:
        print(module.format_report(result) if hasattr(module, "format_report") else json.dumps(result, indent=2))
    return 0


# ---------------------------------------------------------------- parser


def _number(name: str, lo: float, hi: float, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a number in [lo, hi] (or (lo, hi] with ``lo_open``), else one clear line."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not ((lo < value) if lo_open else (lo <= value)) or not value <= hi:
            raise argparse.ArgumentTypeError(
                f"{name} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {text!r}")
        return value
    return parse


_scale = _number("scale", 0, 4, lo_open=True)
_weight = _number("weight", 0, 10)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="annotator", description="Label fabric defects: pre-label, pre-check, check, export.")
    ap.add_argument("--version", action="version", version=f"annotator {__version__}")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, fn: Callable, help: str, project: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if project:
            p.add_argument("project", help="project folder")
        p.set_defaults(fn=fn)
        return p

    p = verb("demo", cmd_demo, "build the demo fabric project, pre-label it and run a full round", project=False)
    p.add_argument("--project", default="demo-project", help="where to build it (default: ./demo-project)")
    p.add_argument("--headless", action="store_true", help="print a report instead of opening the app")
    p.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="with --headless: the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    verb("init", cmd_init, "create an empty project folder")

    p = verb("import", cmd_import, "import a folder of images, or an MVTec-AD tree")
    p.add_argument("folder", nargs="?", help="folder of images (recursively)")
    p.add_argument("--good", action="store_true", help="the images are defect-free: model 1 trains on them")
    p.add_argument("--mvtec", metavar="ROOT", help="an MVTec-AD tree: train/good -> good, test/** -> to label")
    p.add_argument("--with-labels", action="store_true", help="with --mvtec: also import ground_truth masks as reviewer labels")
    p.add_argument("--prefix", metavar="NAME", help="put the imported paths under this folder name (e.g. batch-02): "
                   "a batch whose file names repeat an earlier one's")
    p.add_argument("--json", action="store_true")

    p = verb("labels", cmd_labels, "set current labels from mask PNGs, COCO or labelme (as reviewer-checked)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--masks", metavar="DIR", help="folder of <rel stem>_mask.png or <rel stem>.png")
    src.add_argument("--coco", metavar="FILE", help="COCO instances JSON with RLE or polygon masks")
    src.add_argument("--labelme", metavar="DIR", help="folder of labelme JSON files")
    p.add_argument("--json", action="store_true")

    p = verb("prelabel", cmd_prelabel, "fit model 1 on the good images and pre-label the others")
    p.add_argument("--method", choices=("patchcore", "padim"), default="patchcore")
    p.add_argument("--scale", type=_scale, default=2.0,
                   help="magnification before the backbone (default 2: small defects; 1: about 4x faster)")
    p.add_argument("--coarse-weight", type=_weight, default=None, metavar="W",
                   help="weight of the coarse memory (deep features: natural textures) added to the fine one "
                        "(threads, knots, thin lines); 0 = fine only (default 0.5)")
    p.add_argument("--quiet", action="store_true")

    p = verb("check", cmd_check, "train the checkers on the pre-checked labels and flag suspicious ones")
    p.add_argument("--variant", choices=("iou", "ensemble", "both"), default="both")
    p.add_argument("--folds", type=int, default=3, help="number of checkers N (default 3)")
    p.add_argument("--scheme", choices=("disjoint", "kfold"), default="disjoint",
                   help="disjoint: the patent's N disjoint subsets; kfold: each checker trains on N-1 folds")
    p.add_argument("--operation", choices=("mean", "sum"), default="mean", help="how the N probabilities combine")
    p.add_argument("--iou-threshold", type=float, default=0.8)
    p.add_argument("--label-input", action=argparse.BooleanOptionalAction, default=None,
                   help="checkers also see the label under check (fewer false flags, fewer caught; default: image only)")
    p.add_argument("--image-evidence", action=argparse.BooleanOptionalAction, default=True,
                   help="IoU rule: label pixels the checkers missed count as matched where the image itself shows "
                        "them unlike the fabric around them (default on; --no-image-evidence: the checkers alone)")
    p.add_argument("--model1-check", action=argparse.BooleanOptionalAction, default=True,
                   help="also flag regions of model 1's pre-label that the label leaves out where the image shows a "
                        "defect (default on)")
    p.add_argument("--resend-overruled", action="store_true",
                   help="send back labels a person already kept against a flag (default: record, do not resend)")
    p.add_argument("--recheck-accepted", action="store_true",
                   help="send back labels an earlier check round accepted, unchanged since, when this round's "
                        "checkers flag them (default: record, do not resend)")
    p.add_argument("--quiet", action="store_true")

    p = verb("status", cmd_status, "round, states and scores of every image")
    p.add_argument("--json", action="store_true")

    p = verb("flags", cmd_flags, "open flags of the latest check round, most suspicious first")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="every flag of every round, resolved ones too")

    p = verb("remove", cmd_remove, "take images out of the project, with their labels and flags (files stay)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image path as `annotator status` lists it, a glob ('batch-02/*') or a folder ('batch-02/')")
    p.add_argument("--yes", action="store_true", help="remove them (without it: only list what would go)")
    p.add_argument("--json", action="store_true")

    p = verb("role", cmd_role, "make images defect-free training images for model 1, or images to label")
    p.add_argument("paths", nargs="+", metavar="PATH", help="as for `remove`: a path, a glob or a folder/")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--good", action="store_true", help="defect-free: model 1 trains on them")
    which.add_argument("--to-label", action="store_true", help="to label: pre-labelled and reviewed")
    p.add_argument("--json", action="store_true")

    p = verb("relink", cmd_relink, "find image files moved since the import and point the project at them")
    p.add_argument("folder", nargs="?", help="where to look, recursively (default: the project folder)")
    p.add_argument("--all", action="store_true",
                   help="also move images whose old file still reads to the copy found here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = verb("export", cmd_export, "export the labels")
    p.add_argument("out", help="output folder (or .json file for coco)")
    p.add_argument("--format", choices=("mvtec", "coco", "labelme", "masks"), required=True)

    p = sub.add_parser("bench", help="benchmarks on demo data or on your own MVTec AD folder")
    p.add_argument("what", choices=("prelabel", "checkers", "loop", "ui"))
    p.add_argument("--data", metavar="DIR", default=None,
                   help="measure on this MVTec AD category (train/good, test/<kind>, ground_truth/<kind>) "
                        "or folder of categories instead of generated demo fabric (loop: one category)")
    p.add_argument("--seed", type=int, default=None, help="draw of the demo data, label errors and fits (default 0)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="small data, for a smoke run")
    p.add_argument("--subtle", action="store_true",
                   help="demo defects as painted, without the visibility floor (harder; see core.demo_fabric)")
    p.add_argument("--scale", type=_scale, default=None,
                   help="model 1's magnification, as `annotator prelabel --scale` (prelabel, loop; default 2; "
                        "1 is 5-7x faster on large images and finds fewer small defects)")
    p.set_defaults(fn=cmd_bench)
    return ap


def _reader_gone() -> int:
    """The reader stopped early (`annotator status P --json | head`): not an error, and nothing to print.
    stdout goes to devnull so that Python's flush at exit does not raise again (Python's own recipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, as a shell reports a command stopped by a closed pipe


def main(argv: Optional[Sequence[str]] = None) -> int:
    from annotator.core.images import ImageError
    from annotator.core.jobs import Cancelled, os_error_line
    from annotator.core.store import ProjectError
    from annotator.pipeline import PipelineError

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # `annotator` / `python -m annotator` alone: the desktop app
        return _open_gui(None)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ProjectError, PipelineError, ImageError, ValueError) as exc:
        print(f"annotator {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return _reader_gone()
    except OSError as exc:  # a file or folder the command cannot create, read or write
        print(f"annotator {args.verb}: error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    except (Cancelled, KeyboardInterrupt):
        print(f"annotator {args.verb}: cancelled; work saved so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
