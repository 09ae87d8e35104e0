"""anomalib's own PatchCore, as a yardstick for :mod:`annotator.ml.prelabel`.

Only the benchmark imports this module (importing ``anomalib.models`` costs ~9 s).
It builds ``anomalib.models.image.patchcore.torch_model.PatchcoreModel`` on the same
backbone (timm ``efficientnet_lite0``, created with ``pre_trained=False`` and then
given our offline ImageNet weights, so nothing is downloaded) and the same layers,
fits it on the same good images (anomalib's memory bank + ``KCenterGreedy`` coreset
at ratio 0.1) and scores images the way anomalib does: nearest-neighbour distance of
each patch, re-weighted image score (``num_neighbors=9``), anomaly map upsampled to
the input and blurred with sigma 4. Images are resized to ``size`` x ``size`` as
anomalib's pre-processor would.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from annotator.core.jobs import CancelToken, ProgressFn, check_cancel, no_progress
from annotator.ml.backbone import create_lite0_features, normalise, pick_device


def _patchcore_cls():
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # slow import, on purpose here

    return PatchcoreModel


def build_anomalib_patchcore(layers: Sequence[str] = ("blocks.2", "blocks.4"), num_neighbors: int = 9,
                             weights: Optional[str] = None) -> torch.nn.Module:
    """anomalib's ``PatchcoreModel`` on Lite0 with our offline weights injected."""
    model = _patchcore_cls()(layers=list(layers), backbone="efficientnet_lite0", pre_trained=False,
                             num_neighbors=num_neighbors)
    ours = create_lite0_features(tuple(layers), weights=weights).state_dict()
    model.feature_extractor.feature_extractor.load_state_dict(ours, strict=True)  # same timm module tree
    return model


def time_anomalib_coreset(embedding: torch.Tensor, ratio: float = 0.1, max_iters: Optional[int] = None) -> dict:
    """Time anomalib's ``KCenterGreedy`` on ``embedding`` (N x D).

    ``max_iters``: stop after that many greedy steps and extrapolate linearly (every
    step costs the same: one distance pass over all N points in the projected space).
    """
    from anomalib.models.components import KCenterGreedy
    from anomalib.models.components.dimensionality_reduction import SparseRandomProjection

    sampler = KCenterGreedy(embedding=embedding, sampling_ratio=ratio)
    k = sampler.coreset_size
    t0 = time.perf_counter()
    sampler.model = SparseRandomProjection(eps=0.9)
    sampler.model.fit(embedding)
    sampler.features = sampler.model.transform(embedding)
    sampler.reset_distances()
    t_proj = time.perf_counter() - t0
    steps = k if max_iters is None else min(k, max_iters)
    idx = torch.randint(high=embedding.shape[0], size=(1,)).squeeze()
    t1 = time.perf_counter()
    for _ in range(steps - 1):  # the loop body of KCenterGreedy.select_coreset_idxs, without tqdm
        sampler.update_distances(cluster_center=idx)
        idx = sampler.get_new_idx()
        sampler.min_distances.scatter_(0, idx.unsqueeze(0).unsqueeze(1), 0.0)
    t_loop = time.perf_counter() - t1
    per_step = t_loop / max(1, steps - 1)
    return {"n": int(embedding.shape[0]), "dim": int(embedding.shape[1]),
            "projected_dim": int(sampler.features.shape[1]), "coreset_size": int(k), "steps_timed": int(steps),
            "seconds_timed": round(t_proj + t_loop, 3),
            "seconds_estimated_total": round(t_proj + per_step * (k - 1), 3), "extrapolated": steps < k}


@dataclass
class AnomalibPatchcore:
    """anomalib's PatchCore, fitted with :meth:`fit`; :meth:`predict` gives (scores, maps)."""

    layers: Sequence[str] = ("blocks.2", "blocks.4")
    size: int = 256
    coreset_ratio: float = 0.1
    batch_size: int = 16
    device: str = "auto"
    coreset_max_iters: Optional[int] = None  # None: the full KCenterGreedy (slow on CPU)
    timings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._device = pick_device(self.device)
        self.model = build_anomalib_patchcore(self.layers).to(self._device)

    def _batches(self, images: Sequence[np.ndarray]):
        for s in range(0, len(images), self.batch_size):
            chunk = [cv2.resize(im, (self.size, self.size), interpolation=cv2.INTER_AREA)
                     if im.shape[:2] != (self.size, self.size) else im for im in images[s:s + self.batch_size]]
            yield s, normalise(torch.from_numpy(np.stack(chunk)).to(self._device))

    def fit(self, good_images: Sequence[np.ndarray], on_progress: Optional[ProgressFn] = None,
            cancel: Optional[CancelToken] = None) -> "AnomalibPatchcore":
        progress = on_progress or no_progress
        t0 = time.perf_counter()
        self.model.train()
        with torch.no_grad():
            for s, x in self._batches(good_images):
                check_cancel(cancel)
                self.model(x)
                progress(min(s + self.batch_size, len(good_images)), len(good_images), "anomalib: features")
        t1 = time.perf_counter()
        embedding = torch.vstack(self.model.embedding_store)
        self.model.embedding_store.clear()
        if self.coreset_max_iters is None:
            from anomalib.models.components import KCenterGreedy

            sampler = KCenterGreedy(embedding=embedding, sampling_ratio=self.coreset_ratio)
            bank = sampler.sample_coreset()
            wall = time.perf_counter() - t1
            coreset = {"n": int(embedding.shape[0]), "coreset_size": int(bank.shape[0]), "extrapolated": False,
                       "seconds_timed": round(wall, 3), "seconds_estimated_total": round(wall, 3)}
        else:
            # time anomalib's own loop on a prefix and extrapolate; fill the bank with our exact
            # blocked greedy k-center (the same selection rule, minus anomalib's random projection)
            from annotator.ml.prelabel import greedy_coreset

            coreset = time_anomalib_coreset(embedding, self.coreset_ratio, self.coreset_max_iters)
            with torch.inference_mode():
                idx = greedy_coreset(embedding, coreset["coreset_size"], seed=0, cancel=cancel)
            bank = embedding[idx].clone()
            wall = time.perf_counter() - t1
            coreset["bank_by"] = "annotator greedy_coreset (exact k-center, full width)"
        coreset["wall_seconds"] = round(wall, 3)
        self.model.memory_bank = bank
        self.model.eval()
        self.timings = {"features": round(t1 - t0, 3), "coreset": coreset,
                        "fit_seconds": round(t1 - t0 + coreset["seconds_estimated_total"], 3)}
        return self

    def predict(self, images: Sequence[np.ndarray], on_progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image scores and anomaly maps (resized back to each image's size)."""
        progress = on_progress or no_progress
        scores, maps = [], []
        with torch.no_grad():
            for s, x in self._batches(images):
                check_cancel(cancel)
                out = self.model(x)
                scores.extend(out.pred_score.detach().cpu().numpy().ravel().tolist())
                for j, amap in enumerate(out.anomaly_map.detach().cpu().numpy()):
                    h, w = images[s + j].shape[:2]
                    amap = amap.reshape(amap.shape[-2:])
                    if amap.shape != (h, w):
                        amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
                    maps.append(amap.astype(np.float32))
                progress(min(s + self.batch_size, len(images)), len(images), "anomalib: predicting")
        return np.asarray(scores, np.float64), maps
