"""Benchmark of model 1 (the pre-labeller) against anomalib's own PatchCore.

``run()`` builds demo fabrics (``annotator.core.demo_fabric``, one MVTec-style tree per
style in a temporary folder) unless it is given an MVTec root, fits our pre-labeller on
the good training images, and reports per data set:

* image AUROC (max-of-map score), pixel AUROC over every test pixel,
* mean IoU of the thresholded masks on the defective test images (an image judged good
  has an empty mask, IoU 0), recall per defect kind,
* the share of good test images that got a non-empty mask (false alarms),
* "kept": the share of defective test images whose mask a reviewer can keep as it is (tolerant
  IoU to the truth at or above the checkers' threshold: the simulated reviewer's rule), the
  work model 1 saves,
* fit time (s) and prediction speed (images/s),

and the same numbers for anomalib's ``PatchcoreModel`` on the same data and backbone
weights (:mod:`annotator.ml.anomalib_ref`), with ratios ours / anomalib. anomalib's model
is fitted on the same fit part of the good images and gets thresholds by the same
held-out-good rule, so its IoU and false alarms are comparable.

anomalib's ``KCenterGreedy`` needs ~0.1 s per selected point on 2 CPU cores (16 384
points for 160 images), so by default its selection is *timed* on a prefix of
``anomalib_coreset_steps`` steps and extrapolated, and its bank is filled by our exact
blocked greedy k-center (the same selection rule, without anomalib's random projection).
``anomalib_coreset_steps=None`` runs anomalib's own selection to the end.

``coreset_study()`` times anomalib's coreset against ours on 60 and 200 good images and
compares the bank's coverage radius; ``compare_full_bank`` scores one style with every
collected patch in the bank instead of the coreset.

Run: ``python -m annotator.bench.prelabel [--styles plain,twill] [--n-good 200] [--no-anomalib]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from annotator.bench.data import categories, load_category, skipped_line
from annotator.bench.reviewer import label_is_right
from annotator.core.demo_fabric import DEFECT_KINDS, STYLES, write_demo_mvtec
from annotator.core.masks import iou

# ----------------------------------------------------------------------------- metrics


def score_maps(test: Sequence[tuple[str, np.ndarray, np.ndarray]], scores: Sequence[float],
               maps: Sequence[np.ndarray], masks: Optional[Sequence[np.ndarray]] = None,
               is_defect: Optional[Sequence[bool]] = None) -> dict:
    """Image / pixel AUROC from scores and maps; IoU, recall and false alarms from masks."""
    from annotator.ml.prelabel import auroc

    bad = np.array([kind != "good" for kind, _, _ in test])
    out = {
        "image_auroc": round(auroc(bad, np.asarray(scores, np.float64)), 4),
        "pixel_auroc": round(auroc(np.concatenate([m.ravel() for _, _, m in test]),
                                   np.concatenate([np.asarray(a, np.float32).ravel() for a in maps])), 4),
    }
    if masks is not None:
        # each defective image's IoU and whether a reviewer keeps its mask, computed once: overall and per kind
        kind_of = [kind for kind, _, _ in test]
        per_image = {i: (iou(pred, gt), label_is_right(pred, gt))
                     for i, (pred, (kind, _, gt)) in enumerate(zip(masks, test)) if kind != "good"}
        ious = [v[0] for v in per_image.values()]
        right = [v[1] for v in per_image.values()]
        flags = np.asarray(is_defect, bool)
        out["mean_iou"] = round(float(np.mean(ious)), 4) if ious else float("nan")
        out["good_with_mask"] = round(float(np.mean([p.any() for p, k in zip(masks, kind_of) if k == "good"])), 4)
        out["recall"] = round(float(flags[bad].mean()), 4) if bad.any() else float("nan")
        out["kept"] = round(float(np.mean(right)), 4) if right else float("nan")
        out["per_kind"] = {}
        for k in sorted(set(kind_of) - {"good"}):
            idx = [i for i, kk in enumerate(kind_of) if kk == k]
            out["per_kind"][k] = {"recall": round(float(np.mean(flags[idx])), 3),
                                  "mean_iou": round(float(np.mean([per_image[i][0] for i in idx])), 3),
                                  "kept": round(float(np.mean([per_image[i][1] for i in idx])), 3)}
    return out


def evaluate_ours(model, test) -> dict:
    images = [img for _, img, _ in test]
    t0 = time.perf_counter()
    results = model.predict(images)
    dt = time.perf_counter() - t0
    maps = [r.heatmap for r in results]  # normalised maps rank like the raw ones
    out = score_maps(test, [r.score for r in results], maps, [r.mask for r in results],
                     [r.is_defect for r in results])
    out["images_per_s"] = round(len(images) / dt, 2)
    return out


def _anomalib_side(good, test, fit_idx, hold_idx, ours_cfg, steps: Optional[int], layers: Sequence[str]) -> dict:
    """anomalib's PatchCore on the same fit part, thresholds by our rule on the same holdout."""
    from annotator.ml.anomalib_ref import AnomalibPatchcore
    from annotator.ml.prelabel import Prelabeller, calibrate

    ref = AnomalibPatchcore(layers=tuple(layers), coreset_max_iters=steps)
    t0 = time.perf_counter()
    ref.fit([good[i] for i in fit_idx])
    hold = [good[i] for i in hold_idx]
    _, hold_maps = ref.predict(hold)
    cfg = replace(ours_cfg, layers=tuple(layers))
    thresholds, _ = calibrate(hold_maps, None, cfg)
    calib_s = time.perf_counter() - t0 - ref.timings["features"] - ref.timings["coreset"]["wall_seconds"]
    images = [img for _, img, _ in test]
    t1 = time.perf_counter()
    scores, maps = ref.predict(images)
    dt = time.perf_counter() - t1
    # masks by our rule on anomalib's maps (score = max of map, as for ours)
    shim = Prelabeller.__new__(Prelabeller)
    shim.config, shim.thresholds = cfg, thresholds
    results = [shim._result(m) for m in maps]
    out = score_maps(test, scores, maps, [r.mask for r in results], [r.is_defect for r in results])
    out["image_auroc_max_of_map"] = score_maps(test, [m.max() for m in maps], maps)["image_auroc"]
    out["images_per_s"] = round(len(images) / dt, 2)
    # features + anomalib's coreset selection (extrapolated when timed on a prefix) + our calibration
    out["fit_seconds"] = round(ref.timings["fit_seconds"] + calib_s, 2)
    out["timings"] = ref.timings
    out["layers"] = list(layers)
    return out


def _ratios(ours: dict, ref: dict) -> dict:
    keys = ("image_auroc", "pixel_auroc", "mean_iou", "images_per_s")
    out = {k: round(ours[k] / ref[k], 3) for k in keys if ref.get(k)}
    if ref.get("fit_seconds"):
        out["fit_speedup"] = round(ref["fit_seconds"] / max(1e-9, ours["fit_seconds"]), 2)
    return out


# ------------------------------------------------------------------------------- runs


def bench_dataset(good, test, config=None, *, with_anomalib: bool = True, anomalib_steps: Optional[int] = 200,
                  anomalib_layers: Sequence[str] = ("blocks.2", "blocks.4"), extra_configs: Optional[dict] = None,
                  compare_full_bank: bool = False) -> dict:
    from annotator.ml.prelabel import PrelabelConfig, fit_prelabeller

    cfg = config or PrelabelConfig()
    t0 = time.perf_counter()
    model = fit_prelabeller(good, cfg)
    fit_s = time.perf_counter() - t0
    ours = evaluate_ours(model, test)
    ours.update(fit_seconds=round(fit_s, 2), bank_size=model.metrics.get("bank_size"),
                thresholds={k: round(v, 4) for k, v in model.thresholds.items()}, seconds=model.metrics["seconds"])
    out = {"n_good": len(good), "n_test": len(test), "ours": ours}
    for name, extra in (extra_configs or {}).items():
        t0 = time.perf_counter()
        m2 = fit_prelabeller(good, extra)
        f2 = time.perf_counter() - t0
        out[name] = {**evaluate_ours(m2, test), "fit_seconds": round(f2, 2), "bank_size": m2.metrics.get("bank_size")}
    if compare_full_bank and cfg.method == "patchcore":
        full = replace(cfg, coreset_ratio=1.0, coreset_max=10 ** 9)
        t0 = time.perf_counter()
        m3 = fit_prelabeller(good, full)
        f3 = time.perf_counter() - t0
        out["ours_full_bank"] = {**evaluate_ours(m3, test), "fit_seconds": round(f3, 2),
                                 "bank_size": m3.metrics.get("bank_size")}
    if with_anomalib:
        ref = _anomalib_side(good, test, model.metrics["fit_indices"], model.metrics["holdout_indices"], cfg,
                             anomalib_steps, anomalib_layers)
        out["anomalib"] = ref
        out["ours_vs_anomalib"] = _ratios(ours, ref)
        same = [k for k, c in (extra_configs or {}).items() if tuple(c.layers) == tuple(anomalib_layers)]
        if same:
            out[f"{same[0]}_vs_anomalib"] = _ratios(out[same[0]], ref)
    return out


def coreset_study(n_images: Sequence[int] = (60, 200), size: int = 256, seed: int = 0, style: str = "twill",
                  layers: Sequence[str] = ("blocks.2", "blocks.4"), ratio: float = 0.1,
                  anomalib_steps: Optional[dict] = None, root: Optional[os.PathLike] = None) -> dict:
    """anomalib's KCenterGreedy vs our blocked exact greedy on the patch features of n good images.

    ``anomalib_steps``: {n: steps to time before extrapolating} (default: all for 60, 300 for more).
    Reports seconds, bank size and the coverage radius (largest distance of any patch to
    its nearest bank patch, full feature width): the quantity k-center greedy minimises.
    """
    import torch

    from annotator.ml.anomalib_ref import time_anomalib_coreset
    from annotator.ml.backbone import pick_device
    from annotator.ml.prelabel import PatchEmbedder, PrelabelConfig, _collect, _nn_sqdist, greedy_coreset

    steps = anomalib_steps or {}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(root) if root else Path(tmp) / style
        if not root:
            write_demo_mvtec(base, style=style, n_train_good=max(n_images), n_test_good=0, n_per_defect=0,
                             size=size, seed=seed)
        good = load_category(base, max_good=max(n_images), need_test=False).good
    cfg = PrelabelConfig(layers=tuple(layers), grid_stride=0)
    emb = PatchEmbedder(cfg.layers, None, pick_device("auto"), 0, cfg.pool)
    for n in n_images:
        with torch.inference_mode():
            feats = _collect(emb, good[:n], cfg, 10 ** 9, torch.Generator().manual_seed(seed), lambda k: None, None)
            k = int(feats.shape[0] * ratio)
            t0 = time.perf_counter()
            idx = greedy_coreset(feats, k, seed=seed)
            ours_s = time.perf_counter() - t0
            bank = feats[idx]
            radius = float(_nn_sqdist(feats, bank, (bank ** 2).sum(1)).max().sqrt())
            t1 = time.perf_counter()
            sub = feats[torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(seed))[: cfg.coreset_presample]]
            idx2 = greedy_coreset(sub, min(cfg.coreset_max, int(sub.shape[0] * ratio)), seed=seed)
            capped_s = time.perf_counter() - t1
            bank2 = sub[idx2]
            radius2 = float(_nn_sqdist(feats, bank2, (bank2 ** 2).sum(1)).max().sqrt())
            ref = time_anomalib_coreset(feats, ratio, steps.get(n, None if n <= 60 else 300))
        out[str(n)] = {"patches": int(feats.shape[0]), "dim": int(feats.shape[1]), "anomalib": ref,
                       "ours_exact": {"seconds": round(ours_s, 3), "bank": int(k), "coverage_radius": round(radius, 4)},
                       "ours_default_caps": {"seconds": round(capped_s, 3), "bank": int(bank2.shape[0]),
                                             "presample": int(sub.shape[0]), "coverage_radius": round(radius2, 4)},
                       "speedup_exact": round(ref["seconds_estimated_total"] / max(1e-9, ours_s), 1)}
    return out


def run(data_root: Optional[os.PathLike] = None, *, n_good: int = 200, size: int = 256, seed: int = 0,
        with_anomalib: bool = True, styles: Sequence[str] = STYLES, config=None,
        anomalib_steps: Optional[int] = 200, with_b24: bool = True, compare_full_bank: bool = True,
        with_coreset_study: bool = False, n_test_good: int = 20, n_per_defect: int = 6,
        min_visibility: Optional[float] = None, quick: bool = False) -> dict:
    """Benchmark on demo fabrics (one per style) or on the MVTec-style category at ``data_root``.

    ``quick``: one small style at 128 px without the anomalib side, for a smoke run.
    """
    import torch

    if quick:
        styles, n_good, n_test_good, n_per_defect, size = tuple(styles)[:1], 20, 4, 1, 128
        with_anomalib = with_b24 = compare_full_bank = with_coreset_study = False

    from annotator.ml.prelabel import PrelabelConfig

    cfg = config or PrelabelConfig(seed=seed)
    b24 = replace(cfg, layers=("blocks.2", "blocks.4"), grid_stride=0, coarse_layers=())  # the deep stages alone
    extra = {"ours_b24": b24} if with_b24 else {}
    report: dict = {"config": cfg.to_dict(), "n_good": n_good, "size": size, "seed": seed,
                    "data_root": None if data_root is None else str(data_root),
                    "min_visibility": min_visibility,
                    "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "cuda": torch.cuda.is_available(), "python": platform.python_version()},
                    "datasets": {}}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if data_root is not None:
            sets = categories(data_root)
        else:
            sets = {}
            for st in styles:
                root = Path(tmp) / st
                write_demo_mvtec(root, style=st, n_train_good=n_good, n_test_good=n_test_good,
                                 n_per_defect=n_per_defect, size=size, seed=seed, kinds=DEFECT_KINDS,
                                 min_visibility=min_visibility)
                sets[st] = root
        for i, (name, root) in enumerate(sets.items()):
            cat = load_category(root, max_good=n_good)
            test = [(kind, img, mask) for kind, _, img, mask in cat.test]
            report["datasets"][name] = bench_dataset(cat.good, test, cfg, with_anomalib=with_anomalib,
                                                     anomalib_steps=anomalib_steps, extra_configs=extra,
                                                     compare_full_bank=compare_full_bank and i == 0)
            report["datasets"][name]["skipped"] = dict(cat.skipped)
            print(name, json.dumps(_short(report["datasets"][name])), file=sys.stderr, flush=True)
    report["summary"] = _summary(report["datasets"])
    if with_coreset_study:
        report["coreset_study"] = coreset_study(size=size, seed=seed)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def _short(d: dict) -> dict:
    keys = ("image_auroc", "pixel_auroc", "mean_iou", "kept", "good_with_mask", "recall", "fit_seconds", "images_per_s")
    return {side: {k: v[k] for k in keys if k in v} for side, v in d.items() if _is_side(side, v)}


def _is_side(name: str, value) -> bool:
    return isinstance(value, dict) and "image_auroc" in value and not name.endswith("_vs_anomalib")


def _summary(datasets: dict) -> dict:
    sides = sorted({s for d in datasets.values() for s, v in d.items() if _is_side(s, v)})
    out = {}
    for s in sides:
        rows = [d[s] for d in datasets.values() if s in d]
        out[s] = {k: round(float(np.mean([r[k] for r in rows])), 4)
                  for k in ("image_auroc", "pixel_auroc", "mean_iou", "kept", "good_with_mask", "fit_seconds",
                            "images_per_s")
                  if all(k in r for r in rows)}
        out[s]["min_image_auroc"] = round(float(min(r["image_auroc"] for r in rows)), 4)
        out[s]["min_pixel_auroc"] = round(float(min(r["pixel_auroc"] for r in rows)), 4)
    ratios = [d["ours_vs_anomalib"] for d in datasets.values() if "ours_vs_anomalib" in d]
    if ratios:
        # a ratio is missing where anomalib's side is 0 (no mask drawn): average what every data set has
        keys = [k for k in ratios[0] if all(k in r for r in ratios)]
        out["ours_vs_anomalib"] = {k: round(float(np.mean([r[k] for r in ratios])), 3) for k in keys}
    return out


def format_report(r: dict) -> str:
    """The report as a table: one row per data set and side (ours, anomalib, variants), then the means."""
    src = r.get("data_root") or f"demo fabric, seed {r['seed']}, {r['size']} px"
    lines = [f"pre-labeller benchmark on {src}: {r['seconds']} s",
             f"{'data set':<14} {'side':<16} {'image AUROC':>11} {'pixel AUROC':>11} {'mean IoU':>8} {'kept':>5} "
             f"{'good w/ mask':>12} {'recall':>6} {'fit s':>7} {'img/s':>6}"]

    def row(name: str, side: str, v: dict) -> str:
        def f(key: str, fmt: str = "{:.3f}") -> str:
            x = v.get(key)
            return "-" if x is None or x != x else fmt.format(x)
        return (f"{name:<14} {side:<16} {f('image_auroc'):>11} {f('pixel_auroc'):>11} {f('mean_iou'):>8} "
                f"{f('kept', '{:.0%}'):>5} "
                f"{f('good_with_mask', '{:.0%}'):>12} {f('recall', '{:.2f}'):>6} {f('fit_seconds', '{:.1f}'):>7} "
                f"{f('images_per_s', '{:.1f}'):>6}")

    for name, ds in r["datasets"].items():
        for side, v in ds.items():
            if _is_side(side, v):
                lines.append(row(name, side, v))
        if ds.get("ours_vs_anomalib"):
            lines.append(f"{'':<14} ours / anomalib: " + ", ".join(f"{k} {x}" for k, x in ds["ours_vs_anomalib"].items()))
        if ds.get("skipped"):
            lines.append(f"{'':<14} " + skipped_line(ds["skipped"]))
    for side, v in r["summary"].items():
        if side != "ours_vs_anomalib" and len(r["datasets"]) > 1:
            lines.append(row("mean", side, v))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--styles", default=",".join(STYLES))
    ap.add_argument("--n-good", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-anomalib", action="store_true")
    ap.add_argument("--no-b24", action="store_true")
    ap.add_argument("--no-full-bank", action="store_true")
    ap.add_argument("--anomalib-steps", type=int, default=200, help="0: run anomalib's coreset selection to the end")
    ap.add_argument("--coreset-study", action="store_true")
    ap.add_argument("--out", default=None, help="write the JSON report here")
    a = ap.parse_args(argv)
    report = run(a.data_root, n_good=a.n_good, size=a.size, seed=a.seed, with_anomalib=not a.no_anomalib,
                 styles=[s for s in a.styles.split(",") if s], anomalib_steps=a.anomalib_steps or None,
                 with_b24=not a.no_b24, compare_full_bank=not a.no_full_bank, with_coreset_study=a.coreset_study)
    text = json.dumps(report, indent=2, default=float)
    if a.out:
        Path(a.out).write_text(text, encoding="utf-8")
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
