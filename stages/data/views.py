"""Deterministic image views: resize (torchvision-style min/max size) then optional horizontal flip.

A `View` is the unit the teacher cache is keyed by: the same image under the same view always gives
the same pixels, so a cached teacher output can be replayed for the student. `View.key` is a short
stable id ("s160m256f0": min_size 160, max_size 256, no flip) used in record keys and file names.

Geometry (all in pixels, xyxy boxes, origin at the top-left corner of the top-left pixel):
    s = min(min_size / min(h, w), max_size / max(h, w))
    (new_h, new_w) = (round(h * s), round(w * s))        # Python round (half to even), at least 1
    sx, sy = new_w / w, new_h / h                         # per-axis, exactly like the resized image
    x' = x * sx, y' = y * sy; then if flip: x1' = new_w - x2, x2' = new_w - x1
`boxes_to_original` inverts this (for evaluation in the original image frame).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["View"]

_KEY_RE = re.compile(r"^s(\d+)m(\d+)f([01])$")


def _stack_cols(boxes: Any, cols: list) -> Any:
    if isinstance(boxes, np.ndarray):
        return np.stack(cols, axis=-1)
    import torch

    return torch.stack(cols, dim=-1)


@dataclass(frozen=True)
class View:
    min_size: int  # shorter side target
    max_size: int  # longer side cap
    flip: bool = False

    def __post_init__(self) -> None:
        for name in ("min_size", "max_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v <= 0:
                raise ValueError(f"View.{name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        if not isinstance(self.flip, bool | np.bool_):
            raise ValueError(f"View.flip must be a bool, got {self.flip!r}")
        object.__setattr__(self, "flip", bool(self.flip))

    # ------------------------------------------------------------------ identity
    @property
    def key(self) -> str:
        return f"s{self.min_size}m{self.max_size}f{int(self.flip)}"

    def to_dict(self) -> dict:
        return {"min_size": self.min_size, "max_size": self.max_size, "flip": self.flip}

    @classmethod
    def from_dict(cls, d: Mapping | Any) -> View:
        """From a mapping (or any object with min_size/max_size/flip attributes, e.g. ViewParams)."""
        if not isinstance(d, Mapping):
            d = {k: getattr(d, k) for k in ("min_size", "max_size", "flip") if hasattr(d, k)}
        unknown = set(d) - {"min_size", "max_size", "flip"}
        if unknown:
            raise ValueError(f"unknown View field(s) {sorted(unknown)}; valid: min_size, max_size, flip")
        return cls(int(d["min_size"]), int(d["max_size"]), bool(d.get("flip", False)))

    @classmethod
    def from_key(cls, key: str) -> View:
        m = _KEY_RE.match(key)
        if not m:
            raise ValueError(f"not a view key: {key!r} (expected e.g. 's160m256f0')")
        return cls(int(m.group(1)), int(m.group(2)), m.group(3) == "1")

    def __str__(self) -> str:
        return self.key

    # ------------------------------------------------------------------ geometry
    def scale(self, h: int, w: int) -> float:
        return min(self.min_size / min(h, w), self.max_size / max(h, w))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        s = self.scale(h, w)
        return max(1, int(round(h * s))), max(1, int(round(w * s)))

    def apply(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Resize (PIL bilinear) then flip; boxes [N,4] xyxy follow exactly. Returns (uint8 image, float32 boxes)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"View.apply expects an [H, W, 3] uint8 image, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        nh, nw = self.output_size(h, w)
        if (nh, nw) != (h, w):
            out = np.array(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        else:
            out = image
        if self.flip:
            out = out[:, ::-1]
        out = np.ascontiguousarray(out) if out is not image else out.copy()
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        return out, self._forward_boxes(boxes, h, w).astype(np.float32, copy=False)

    def boxes_to_view(self, boxes: Any, orig_hw: tuple[int, int]) -> Any:
        """Boxes from the original frame into this view's frame (numpy or torch, same type back)."""
        h, w = orig_hw
        return self._forward_boxes(boxes, h, w)

    def _forward_boxes(self, boxes: Any, h: int, w: int) -> Any:
        nh, nw = self.output_size(h, w)
        sx, sy = nw / w, nh / h
        x1, y1, x2, y2 = boxes[..., 0] * sx, boxes[..., 1] * sy, boxes[..., 2] * sx, boxes[..., 3] * sy
        if self.flip:
            x1, x2 = nw - x2, nw - x1
        return _stack_cols(boxes, [x1, y1, x2, y2])

    def boxes_to_original(self, boxes: Any, orig_hw: tuple[int, int], clip: bool = True) -> Any:
        """Inverse of the box mapping: view-frame boxes -> original image frame (numpy or torch).

        With clip=True (default) the result is clipped to the original image.
        """
        h, w = orig_hw
        nh, nw = self.output_size(h, w)
        sx, sy = nw / w, nh / h
        x1, y1, x2, y2 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
        if self.flip:
            x1, x2 = nw - x2, nw - x1
        x1, x2, y1, y2 = x1 / sx, x2 / sx, y1 / sy, y2 / sy
        if clip:
            x1, x2 = x1.clip(0, w), x2.clip(0, w)
            y1, y2 = y1.clip(0, h), y2.clip(0, h)
        return _stack_cols(boxes, [x1, y1, x2, y2])
