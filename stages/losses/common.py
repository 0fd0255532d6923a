"""Pieces every distillation loss shares: valid-region masks, masked reductions, adapters.

Conventions (all losses):
- Teacher and student saw the same padded batch, so level l has the same [H_l, W_l] on both
  sides. Image b's valid cells at stride s are the top-left ceil(h_b / s) x ceil(w_b / s) block
  (the same rule the cache uses to crop); every other cell is padding and never counts: masked
  reductions select with `torch.where`, so even inf/NaN in padded cells cannot leak in.
- Masks are float32 0/1 maps [B, 1, H, W] (multiplicative weights, broadcast over channels).
- Losses compute in float32 whatever the autocast / cache dtype (`.float()` at entry).
- Normalisers: sums are divided by `clamp_min(1)` counts, so an empty selection gives 0, not NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def valid_masks(
    image_sizes: Sequence[tuple[int, int]],
    shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Per level a float 0/1 map [B, 1, H_l, W_l]: 1 on image b's valid cells, 0 on padding."""
    masks = []
    for (height, width), stride in zip(shapes, strides):
        rows = torch.tensor([math.ceil(h / stride) for h, _ in image_sizes], device=device)
        cols = torch.tensor([math.ceil(w / stride) for _, w in image_sizes], device=device)
        ys = torch.arange(height, device=device)
        xs = torch.arange(width, device=device)
        m = (ys[None, :, None] < rows[:, None, None]) & (xs[None, None, :] < cols[:, None, None])
        masks.append(m[:, None].float())
    return masks


def box_masks(
    boxes: Sequence[Tensor],
    shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Per level a float 0/1 map [B, 1, H_l, W_l]: 1 on cells a GT box of image b covers.

    boxes: per image [N, 4] xyxy in input pixels. Box [x1, x2) covers cells
    floor(x1/s) .. ceil(x2/s) - 1 (at least one cell, so tiny boxes still count).
    """
    masks = []
    for (height, width), stride in zip(shapes, strides):
        ys = torch.arange(height, device=device)
        xs = torch.arange(width, device=device)
        level = []
        for b in boxes:
            b = b.to(device=device, dtype=torch.float32).reshape(-1, 4)
            x1 = torch.floor(b[:, 0] / stride)
            y1 = torch.floor(b[:, 1] / stride)
            x2 = torch.maximum(torch.ceil(b[:, 2] / stride) - 1, x1)
            y2 = torch.maximum(torch.ceil(b[:, 3] / stride) - 1, y1)
            in_y = (ys[None, :] >= y1[:, None]) & (ys[None, :] <= y2[:, None])  # [N, H]
            in_x = (xs[None, :] >= x1[:, None]) & (xs[None, :] <= x2[:, None])  # [N, W]
            level.append((in_y[:, :, None] & in_x[:, None, :]).any(dim=0))
        masks.append(torch.stack(level)[:, None].float())
    return masks


def wide(x: Tensor) -> Tensor:
    """x in float32, or float64 when it already is (conformance tests run the losses in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum of x over the cells where mask > 0 (mask broadcasts against x)."""
    return torch.where(mask > 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the selected elements, each weighted by mask; 0 when nothing is selected.

    x [B, C, H, W] (or anything mask broadcasts to), mask [B, 1, H, W]: every channel of a valid
    cell counts once.
    """
    return masked_sum(x, mask) / mask.expand_as(x).sum().clamp_min(1.0)


def crop_valid(x: Tensor, b: int, image_size: tuple[int, int], stride: int) -> Tensor:
    """Image b's valid block of level map x [B, C, H, W] -> [C, h, w]."""
    return x[b, :, : math.ceil(image_size[0] / stride), : math.ceil(image_size[1] / stride)]


def make_adapter(in_channels: int, out_channels: int) -> nn.Module:
    """1x1 conv student -> teacher channels, or identity when the widths already match.

    One adapter is shared by all FPN levels (they share one channel space: one head runs on all).
    """
    if in_channels == out_channels:
        return nn.Identity()
    return nn.Conv2d(in_channels, out_channels, kernel_size=1)


def check_levels(name: str, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
    """Same number of levels and same spatial size per level, or a ValueError saying why it matters."""
    if len(student) != len(teacher):
        raise ValueError(f"{name}: student has {len(student)} levels, teacher {len(teacher)}")
    for lv, (s, t) in enumerate(zip(student, teacher)):
        if s.shape[0] != t.shape[0] or s.shape[-2:] != t.shape[-2:]:
            raise ValueError(
                f"{name}: level {lv} student {tuple(s.shape)} vs teacher {tuple(t.shape)}: teacher and "
                "student must see the same padded batch (same views, same padding)"
            )


def match_class_maps(student_probs: Tensor, teacher_probs: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Class maps [B, A*K, H, W] made comparable: as they are when A matches, else the max over
    each side's anchors ([B, K, H, W]), e.g. a 9-anchor RetinaNet teacher for a 1-point FCOS student."""
    if student_probs.shape[1] == teacher_probs.shape[1]:
        return student_probs, teacher_probs

    def per_location(p: Tensor) -> Tensor:
        b, ak, h, w = p.shape
        return p.view(b, ak // num_classes, num_classes, h, w).amax(dim=1)

    return per_location(student_probs), per_location(teacher_probs)


def soft_positive_count(weights: Tensor) -> Tensor:
    """Normaliser for losses weighted by teacher scores: their sum, at least 1.

    Stands in for the official codes' 'number of positive anchors' (we run no assigner here)."""
    return weights.sum().clamp_min(1.0)


def quality_focal_kd(logits: Tensor, target: Tensor, beta: float) -> Tensor:
    """Elementwise QFL-style KD: BCE(logits, soft target) * |sigmoid(logits) - target|^beta.

    target: teacher probabilities in [0, 1] (detached here). beta 1 is CrossKD's KDQualityFocalLoss,
    beta 2 the GFL paper's QFL.
    """
    target = target.detach()
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce * (logits.sigmoid() - target).abs().pow(beta)
