"""Box regression <-> boxes, per architecture, on flattened predictions.

Layouts of `box_reg` (R values per anchor, as `contract.flatten_levels(out.box_reg, R)` gives them):
  retinanet  R = 4: (dx, dy, dw, dh) w.r.t. the anchor, torchvision `BoxCoder` weights (1, 1, 1, 1)
  fcos       R = 4: (l, t, r, b) >= 0 distances from the anchor centre in anchor-size (= stride) units
  gfl        R = 4*(reg_max+1): logits of a distribution over 0..reg_max per side, side-major
             (l, t, r, b); the distance is its expectation, in stride (= anchor width) units
Boxes are xyxy in input pixels. Anchors are the contract's (RetinaNet: anchor boxes; FCOS/GFL:
stride-sized boxes centred on the points).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection import _utils as det_utils

RETINANET_CODER = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
FCOS_CODER = det_utils.BoxLinearCoder(normalize_by_size=True)


def box_dim(arch: str, reg_max: int = 16) -> int:
    """R: regression values per anchor."""
    if arch in ("retinanet", "fcos"):
        return 4
    if arch == "gfl":
        return 4 * (reg_max + 1)
    raise ValueError(f"arch {arch!r} has no dense box regression (dense archs: retinanet, fcos, gfl)")


def integral(logits: Tensor, reg_max: int) -> Tensor:
    """[..., 4*(reg_max+1)] distribution logits -> [..., 4] expected distances (bins 0..reg_max)."""
    probs = torch.softmax(logits.float().reshape(*logits.shape[:-1], 4, reg_max + 1), dim=-1)
    project = torch.arange(reg_max + 1, dtype=probs.dtype, device=probs.device)
    return probs @ project


def centers(anchors: Tensor) -> Tensor:
    return (anchors[..., :2] + anchors[..., 2:]) / 2


def distance_to_box(points: Tensor, distances: Tensor) -> Tensor:
    """Points [..., 2] and (l, t, r, b) [..., 4] in the same units -> xyxy [..., 4]."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def box_to_distance(points: Tensor, boxes: Tensor, max_dist: float | None = None) -> Tensor:
    """Inverse of `distance_to_box`; optionally clamped to [0, max_dist]."""
    d = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
    return d.clamp(min=0, max=max_dist) if max_dist is not None else d


def decode_boxes(arch: str, box_reg: Tensor, anchors: Tensor, reg_max: int = 16) -> Tensor:
    """box_reg [N, R] + anchors [N, 4] -> boxes [N, 4] xyxy (extra leading dims are allowed)."""
    r = box_dim(arch, reg_max)
    if box_reg.shape[-1] != r:
        raise ValueError(f"{arch}: box_reg has {box_reg.shape[-1]} values per anchor, expected {r}")
    if box_reg.shape[:-1] != anchors.shape[:-1]:
        raise ValueError(f"box_reg {list(box_reg.shape)} and anchors {list(anchors.shape)} disagree")
    if arch == "fcos":
        return FCOS_CODER.decode(box_reg, anchors)
    if arch == "gfl":
        stride = (anchors[..., 2] - anchors[..., 0]).unsqueeze(-1).float()
        return distance_to_box(centers(anchors).float(), integral(box_reg, reg_max) * stride)
    flat = RETINANET_CODER.decode_single(box_reg.reshape(-1, 4), anchors.reshape(-1, 4))
    return flat.reshape(box_reg.shape)
