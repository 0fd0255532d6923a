"""Build, save and load detectors of the zoo (`ModelParams.arch`: retinanet | fcos | gfl | faster_rcnn).

Checkpoints are plain dicts (`torch.load(weights_only=True)`, no pickle of classes):
{'model': state_dict, 'model_params': ModelParams as a dict, 'num_classes': K, ...anything else}.
`load_detector` also takes a raw torchvision-style state_dict (with `cfg` and `num_classes`):
key names are torchvision's, `FrozenBatchNorm2d` checkpoints (no `num_batches_tracked`) included.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.config import ModelParams, from_dict, to_dict
from stages.detectors.base import Detector
from stages.detectors.faster_rcnn import FasterRCNNDetector
from stages.detectors.fcos import FCOSDetector, build_fcos_head
from stages.detectors.gfl import GFLDetector, build_gfl_head
from stages.detectors.retinanet import RetinaNetDetector, build_retinanet_head

DETECTORS = {
    "retinanet": RetinaNetDetector,
    "fcos": FCOSDetector,
    "gfl": GFLDetector,
    "faster_rcnn": FasterRCNNDetector,
}
HEADS = {"retinanet": build_retinanet_head, "fcos": build_fcos_head, "gfl": build_gfl_head}
# ModelParams fields that change the weights' shapes or meaning (the rest are inference knobs)
ARCH_FIELDS = ("arch", "backbone", "fpn_channels", "head_convs", "reg_max")
FIX = "check arch/backbone/fpn_channels/head_convs/num_classes (and reg_max for gfl) against the checkpoint"


def build_detector(cfg: ModelParams, num_classes: int) -> Detector:
    """A freshly initialised detector (`cfg.pretrained_backbone` loads local ResNet weights)."""
    if cfg.arch not in DETECTORS:
        raise ValueError(f"unknown arch {cfg.arch!r}; valid: {', '.join(DETECTORS)}")
    return DETECTORS[cfg.arch](cfg, num_classes)


def build_to_load(cfg: ModelParams, num_classes: int) -> Detector:
    """A detector about to receive a checkpoint's weights: `cfg.pretrained_backbone` is not loaded, since
    the checkpoint holds every weight and the file training started from may be gone."""
    return build_detector(replace(cfg, pretrained_backbone=""), num_classes)


def build_head(cfg: ModelParams, num_classes: int) -> nn.Module:
    """The dense head alone, same class and state_dict keys as `build_detector(cfg, K).head`."""
    if cfg.arch not in HEADS:
        raise ValueError(f"arch {cfg.arch!r} has no dense head; dense archs: {', '.join(HEADS)}")
    return HEADS[cfg.arch](cfg, num_classes)


def checkpoint_dict(model: Detector, cfg: ModelParams) -> dict[str, Any]:
    return {"model": model.state_dict(), "model_params": to_dict(cfg), "num_classes": model.num_classes}


def load_detector(
    path: str | Path, cfg: ModelParams | None = None, num_classes: int | None = None
) -> Detector:
    """A detector with the weights of `path` (on the CPU, in train mode as built).

    (a) our checkpoint: the architecture comes from its 'model_params'; a `cfg` given too must
        agree on the architecture fields and supplies the inference knobs (thresholds);
    (b) a raw state_dict (e.g. of a torchvision detector): needs `cfg` and `num_classes`.
    Any mismatch raises ValueError naming the file, the first offending keys and the fix.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a checkpoint dict or a state_dict, got {type(state).__name__}")
    if "model" in state and "model_params" in state:
        saved = from_dict(ModelParams, state["model_params"], "model_params")
        if cfg is not None:
            differ = [f for f in ARCH_FIELDS if getattr(cfg, f) != getattr(saved, f)]
            if differ:
                f = differ[0]
                raise ValueError(
                    f"{path}: checkpoint has {f}={getattr(saved, f)!r} but cfg says {getattr(cfg, f)!r}"
                )
        else:
            cfg = saved
        stored_k = int(state["num_classes"])
        if num_classes is not None and num_classes != stored_k:
            raise ValueError(f"{path}: checkpoint has {stored_k} classes but {num_classes} were asked for")
        num_classes, weights = stored_k, state["model"]
    else:
        if cfg is None or num_classes is None:
            raise ValueError(
                f"{path}: a raw state_dict (no 'model'/'model_params' keys) needs cfg and num_classes to load"
            )
        weights = state
    model = build_to_load(cfg, num_classes)
    load_weights(model, weights, f"{path} ({_describe(cfg, num_classes)})")
    return model


def _describe(cfg: ModelParams, num_classes: int) -> str:
    fields = [f for f in ARCH_FIELDS if f != "reg_max" or cfg.arch == "gfl"]
    return ", ".join(f"{f}={getattr(cfg, f)}" for f in fields) + f", num_classes={num_classes}"


def load_weights(model: nn.Module, weights: dict, where: str) -> None:
    """Strict load, except that BN counters absent from the file (FrozenBatchNorm2d) are kept."""
    own = model.state_dict()
    meta = getattr(weights, "_metadata", None)
    weights = OrderedDict(weights)
    if meta is not None:  # per-module versions: torchvision heads convert old layouts by them
        weights._metadata = meta
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in weights:
            weights[key] = value
    shapes = [
        f"{k}: file {list(weights[k].shape)} vs model {list(v.shape)}"
        for k, v in own.items()
        if k in weights and hasattr(weights[k], "shape") and weights[k].shape != v.shape
    ]
    if shapes:  # load_state_dict would stop at the first; list the key differences too
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
    else:
        result = model.load_state_dict(weights, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    problems = [
        f"{len(found)} {what} {found[:3]}"
        for what, found in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", shapes),
        )
        if found
    ]
    if problems:
        raise ValueError(f"{where}: checkpoint does not fit the model: {'; '.join(problems)}; {FIX}")
