"""Tiny hand-made DetectorOutput / TeacherTargets for the loss tests (no detector needed)."""

from __future__ import annotations

import torch
from torch import Tensor

from stages.detectors.contract import DetectorOutput, TowerFeatures
from stages.losses.targets import TeacherTargets

STRIDES = [8, 16, 32]
PADDED = (32, 64)  # padded batch (H, W): level maps 4x8, 2x4, 1x2
IMAGE_SIZES = [(32, 64), (20, 36)]  # image 1 leaves padding on every level but the last row/col of P5
SHAPES = [(PADDED[0] // s, PADDED[1] // s) for s in STRIDES]


def maps(b: int, c: int, seed: int, scale: float = 1.0, grad: bool = False) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(b, c, h, w, generator=g) * scale for h, w in SHAPES]
    return [m.requires_grad_(grad) for m in out]


def anchors(num_anchors: int) -> list[Tensor]:
    """Stride-sized boxes at the cell centres, A copies per cell (order y, x, anchor)."""
    out = []
    for (h, w), s in zip(SHAPES, STRIDES):
        ys, xs = torch.meshgrid(torch.arange(h) * s + s / 2, torch.arange(w) * s + s / 2, indexing="ij")
        centres = torch.stack([xs, ys], -1).reshape(-1, 1, 2).expand(-1, num_anchors, 2).reshape(-1, 2).float()
        out.append(torch.cat([centres - s / 2, centres + s / 2], dim=1))
    return out


def student_output(b: int = 2, c: int = 4, k: int = 3, a: int = 1, r: int = 4, seed: int = 0,
                   towers: int = 0, grad: bool = True) -> DetectorOutput:
    cls_tower, reg_tower = TowerFeatures(), TowerFeatures()
    for i in range(towers):
        cls_tower.pre.append(maps(b, c, seed + 10 + i, grad=grad))
        reg_tower.pre.append(maps(b, c, seed + 20 + i, grad=grad))
        cls_tower.post.append([m.relu() for m in cls_tower.pre[-1]])
        reg_tower.post.append([m.relu() for m in reg_tower.pre[-1]])
    return DetectorOutput(
        fpn=maps(b, c, seed, grad=grad),
        strides=list(STRIDES),
        image_sizes=list(IMAGE_SIZES[:b]),
        cls_tower=cls_tower,
        reg_tower=reg_tower,
        cls_logits=maps(b, a * k, seed + 1, scale=2.0, grad=grad),
        box_reg=maps(b, a * r, seed + 2, grad=grad),
        anchors=anchors(a),
    )


def teacher_targets(b: int = 2, c: int = 4, k: int = 3, a: int = 1, r: int = 4, seed: int = 100) -> TeacherTargets:
    return TeacherTargets(
        fpn=maps(b, c, seed),
        cls_probs=[m.sigmoid() for m in maps(b, a * k, seed + 1, scale=2.0)],
        box_reg=maps(b, a * r, seed + 2),
    )


def teacher_from_student(out: DetectorOutput) -> TeacherTargets:
    """Teacher targets equal to the student's own outputs (detached)."""
    return TeacherTargets(
        fpn=[m.detach().clone() for m in out.fpn],
        cls_probs=[m.detach().sigmoid() for m in out.cls_logits],
        box_reg=[m.detach().clone() for m in out.box_reg],
    )


def gt_targets() -> list[dict]:
    return [
        {"boxes": torch.tensor([[4.0, 2.0, 30.0, 20.0], [40.0, 8.0, 60.0, 30.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[2.0, 3.0, 17.0, 14.0]]), "labels": torch.tensor([1])},
    ]


def padded_cells(image_size: tuple[int, int], stride: int, shape: tuple[int, int]) -> Tensor:
    """Bool [H, W]: the cells outside the image."""
    h, w = -(-image_size[0] // stride), -(-image_size[1] // stride)
    m = torch.ones(shape, dtype=torch.bool)
    m[:h, :w] = False
    return m


def scramble_padding(level_maps: list[Tensor], value: float = 1e3, b: int = 1) -> list[Tensor]:
    """Copies of per-level maps with image b's padded cells overwritten."""
    out = []
    for m, s in zip(level_maps, STRIDES):
        m = m.detach().clone()
        pad = padded_cells(IMAGE_SIZES[b], s, tuple(m.shape[-2:]))
        m[b][:, pad] = value
        out.append(m)
    return out


def grads_finite(tensors: list[Tensor]) -> bool:
    got = [t.grad for t in tensors if t.grad is not None]
    return bool(got) and all(torch.isfinite(g).all() for g in got)
