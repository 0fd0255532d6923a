"""The value constraints of params fields, checked when params are loaded (`stages.config.from_dict`),
and `ConfigError`, the error every params check raises.

Every number / list a run depends on is checked here, so an impossible setting stops in one line
naming the field instead of "training" 0 steps. Rules are keyed by the section's class name; a
rule returns an error text (the field's constraint) or None. A rule keyed "" checks the whole
section (fields that constrain each other).
"""

from __future__ import annotations

import re
from typing import Any


class ConfigError(ValueError):
    """A params value or key is invalid; the message names the key path."""


def _num(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    def check(v: Any) -> str | None:
        if not isinstance(v, int | float) or v != v or v in (float("inf"), float("-inf")):
            return "must be a finite number"
        if low is not None and (v <= low if low_open else v < low):
            return f"must be {'>' if low_open else '>='} {low:g}"
        if high is not None and (v >= high if high_open else v > high):
            return f"must be {'<' if high_open else '<='} {high:g}"
        return None
    return check


_POS, _NONNEG, _ONE = _num(0, low_open=True), _num(0), _num(1)
_UNIT = _num(0, 1)


def _views(obj: Any) -> str | None:
    if not obj.views:
        return "views: the list is empty; cache at least one view (min_size, max_size, flip)"
    keys = [(v.min_size, v.max_size, v.flip) for v in obj.views]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup is not None:
        return f"views: view {list(dup)} is listed twice"
    if obj.views_per_image > len(obj.views):
        return f"views_per_image: {obj.views_per_image} is more than the {len(obj.views)} views listed"
    return None


def _sizes(obj: Any) -> str | None:
    if obj.max_size < obj.min_size:
        return f"max_size: {obj.max_size} is smaller than min_size {obj.min_size}"
    return None


def _sides(obj: Any) -> str | None:
    if obj.max_side < obj.min_side:
        return f"max_side: {obj.max_side} is smaller than min_side {obj.min_side}"
    return None


def _weights(obj: Any) -> str | None:
    for name, w in obj.losses.items():
        err = _NONNEG(w)
        if err:
            return f"losses.{name}: {err}, got {w!r}"
    return None


def _odd(v: Any) -> str | None:
    return None if isinstance(v, int) and v >= 1 and v % 2 == 1 else "must be an odd integer >= 1"


def _device(v: Any) -> str | None:
    # the spelling only: whether this machine has that device is checked when a stage resolves it
    # (stages.devices), so a CPU machine can still read params written for a GPU one
    if re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", v):
        return None
    return "must be auto, cpu, cuda, cuda:N or mps"


def _reuse(v: Any) -> str | None:
    return None if v == -1 or v >= 1 else "must be -1 (the paper's default) or >= 1"


VALUE_RULES: dict[str, dict[str, Any]] = {
    "SyntheticParams": {"num_train": _ONE, "num_val": _ONE, "min_side": _ONE, "max_side": _ONE,
                        "min_object": _POS, "seed": _NONNEG, "textures": _ONE, "colours": _ONE, "": _sides},
    "DataParams": {"min_size": _ONE, "max_size": _ONE, "": _sizes},
    "ModelParams": {"fpn_channels": _ONE, "head_convs": _ONE, "reg_max": _ONE, "anchor_size": _ONE,
                    "num_classes": _NONNEG, "score_thresh": _UNIT, "nms_thresh": _num(0, 1, low_open=True),
                    "detections_per_img": _ONE},
    "TrainParams": {"lr": _POS, "momentum": _num(0, 1, high_open=True), "weight_decay": _NONNEG, "steps": _ONE,
                    "batch_size": _ONE, "warmup_steps": _NONNEG, "clip_grad": _NONNEG, "seed": _NONNEG,
                    "workers": _NONNEG, "ckpt_every": _ONE, "log_every": _ONE, "dist_timeout_s": _ONE,
                    "threads": _NONNEG, "device": _device},
    "ViewParams": {"min_size": _ONE, "max_size": _ONE, "": _sizes},
    "CacheParams": {"views_per_image": _NONNEG, "batch_size": _ONE, "loader_workers": _NONNEG,
                    "block_size": _ONE, "n_workers": _ONE, "seed": _NONNEG, "device": _device, "": _views},
    "LocalCacheParams": {"max_gb": _POS},
    "CSKDParams": {"w_mse": _NONNEG, "w_cos": _NONNEG},
    "SSIMParams": {"window": _odd, "sigma": _POS},
    "CrossKDParams": {"reuse_index": _reuse},
    "RMParams": {"temperature": _POS},
    "DistillParams": {"": _weights},
    "EvalParams": {"batch_size": _ONE},
}


def check_values(obj: Any, path: str = "") -> None:
    """Raise ConfigError naming `path.field` for the first value of `obj` its VALUE_RULES reject
    (nested sections are checked when they are built, by from_dict)."""
    where = f"{path}." if path else ""
    for name, rule in VALUE_RULES.get(type(obj).__name__, {}).items():
        if not name:
            err = rule(obj)
            if err:
                raise ConfigError(f"{where}{err}")
            continue
        if not hasattr(obj, name):
            continue
        value = getattr(obj, name)
        err = rule(value)
        if err:
            raise ConfigError(f"{where}{name}: {err}, got {value!r}")
