"""Build the configured distillation losses (`distill.losses: {name: weight}`) as one module.

`KDLosses` holds each configured loss with its trainable parts (adapters, CSKD's assistant head),
so the training loop optimises and checkpoints them with the student. Its forward returns
{"<name>/<part>": weight * value} plus "kd_total", their sum. A weight of 0 leaves a loss out.

Default weights belong to params.yaml; the papers use: cskd 1 (w_mse 1, w_cos 0.5 inside),
ssim 2-4, rm 4, pfi 1.5, crosskd 1 (per-part weights inside, from the official configs).
CSKD's assistant and CrossKD normalise by the student assigner's positives: `LossContext.assign`
(built by stage 2 from the student detector); without it CSKD leaves the assistant out (its
docstring says so) and CrossKD refuses at its first step.

Faster R-CNN has no dense predictions. For a faster_rcnn student (or teacher) the registry refuses
crosskd, rm and pfi (pfi's weights come from dense class maps; with uniform weights it would be mse)
and builds cskd with its FPN terms only (neck, roi, fg, bg).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stages.config import ConfigError, DistillParams
from stages.detectors.contract import DetectorOutput
from stages.losses.crosskd import CrossKDLoss
from stages.losses.cskd import CSKDLoss
from stages.losses.feature import CosineFeatureLoss, MSEFeatureLoss
from stages.losses.rank_mimic import PFILoss, RankMimicLoss
from stages.losses.ssim import SSIMLoss
from stages.losses.targets import TeacherTargets


@dataclass(frozen=True)
class LossContext:
    student_arch: str
    teacher_arch: str
    num_classes: int
    num_levels: int
    strides: list[int]
    student_channels: int  # FPN widths
    teacher_channels: int
    student_head_channels: int  # head tower widths (= FPN widths in our zoo)
    teacher_head_channels: int
    num_anchors: int  # the student's anchors per location
    box_dim: int  # the student's R
    teacher_box_dim: int
    reg_max: int
    student_dense: bool
    teacher_has_quality: bool
    # the student's assigner, (student output, targets) -> per image [N] matched GT index (-1 background,
    # -2 ignored); CSKD's assistant and CrossKD normalise by its positives (None: those losses refuse)
    assign: Callable | None = None
    student_head_convs: int = 0  # tower layers per branch (CSKD's tower terms pair them up)
    teacher_head_convs: int = 0
    # per-level anchor sizes of a RetinaNet teacher and student (`stages.detectors.retinanet.anchor_layout`;
    # None: not RetinaNet): when they differ, the teacher's per-anchor class / box maps and candidates
    # describe other boxes than the student's anchors
    teacher_anchors: tuple | None = None
    student_anchors: tuple | None = None


LOSS_NAMES = ("mse", "cosine", "cskd", "ssim", "crosskd", "rm", "pfi")
DENSE_ONLY = ("crosskd", "rm", "pfi")
FASTER_RCNN_LOSSES = "mse, cosine, ssim, cskd (its FPN terms)"
# Anchors per location of the zoo's dense heads: needed for a teacher of another arch than the student.
ANCHORS_PER_LOCATION = {"retinanet": 9, "fcos": 1, "gfl": 1}

# `needs()` names -> the TeacherTargets field that carries them
_FIELDS = {"fpn": "fpn", "cls": "cls_probs", "box": "box_reg", "quality": "quality", "candidates": "candidates",
           "head": "head", "tower_stats": "tower_mean"}


class KDLosses(nn.Module):
    """The configured losses with their weights; trainable parts are submodules."""

    def __init__(self, losses: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.weights = {name: float(weights[name]) for name in losses}

    def needs(self) -> set[str]:
        """Teacher fields the configured losses read."""
        return set().union(*(loss.needs() for loss in self.losses.values()))

    def forward(self, student: DetectorOutput, teacher: TeacherTargets, targets: list[dict]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, loss in self.losses.items():
            for need in sorted(loss.needs()):
                value = getattr(teacher, _FIELDS[need])
                if value is None or (not isinstance(value, nn.Module) and len(value) == 0):
                    raise ValueError(f"{name} needs the teacher's '{need}' but the TeacherTargets have none: "
                                     f"add '{need}' to cache.targets (or use the online teacher)")
            for part, value in loss(student, teacher, targets).items():
                out[f"{name}/{part}"] = self.weights[name] * value
        out["kd_total"] = sum(out.values()) if out else torch.zeros((), device=student.fpn[0].device)
        return out


def _teacher_anchors(ctx: LossContext) -> int:
    if ctx.teacher_arch == ctx.student_arch:
        return ctx.num_anchors
    return ANCHORS_PER_LOCATION[ctx.teacher_arch]


def _anchors_differ(teacher: tuple | None, student: tuple | None) -> bool:
    """True if two RetinaNet anchor layouts differ by more than 5 % in some size. torchvision rounds the
    octave sizes down to whole px (40, 50) where mmdetection keeps 40.32, 50.80: that 1.6 % moves the
    box-regression targets by log(1.016) = 0.016 at most, no reason to refuse; 16 against 32 px is."""
    if teacher is None or student is None:
        return False
    if len(teacher) != len(student) or any(len(a) != len(b) for a, b in zip(teacher, student)):
        return True
    return any(abs(a - b) > 0.05 * max(a, b) for ta, sa in zip(teacher, student) for a, b in zip(ta, sa))


def _check(name: str, ctx: LossContext) -> None:
    teacher_dense = ctx.teacher_arch != "faster_rcnn"
    if name in DENSE_ONLY and not ctx.student_dense:
        raise ConfigError(f"distill.losses.{name}: needs dense predictions, which the {ctx.student_arch} student "
                          f"does not have; losses that apply to it: {FASTER_RCNN_LOSSES}")
    if name in DENSE_ONLY and not teacher_dense:
        raise ConfigError(f"distill.losses.{name}: needs the teacher's dense predictions, which a "
                          f"{ctx.teacher_arch} teacher does not have; losses that apply: {FASTER_RCNN_LOSSES}")
    if name == "crosskd":
        if ctx.student_arch != ctx.teacher_arch:
            raise ConfigError(f"distill.losses.crosskd: student ({ctx.student_arch}) and teacher "
                              f"({ctx.teacher_arch}) must share the architecture (the student's tower runs "
                              "through the teacher's head)")
        if ctx.box_dim != ctx.teacher_box_dim:
            raise ConfigError(f"distill.losses.crosskd: student box_dim {ctx.box_dim} != teacher "
                              f"{ctx.teacher_box_dim}: use the same reg_max for both")
    if (name in DENSE_ONLY or name == "cskd") and _anchors_differ(ctx.teacher_anchors, ctx.student_anchors):
        t, s = ctx.teacher_anchors[0], ctx.student_anchors[0]
        raise ConfigError(f"distill.losses.{name}: the teacher's RetinaNet anchors on P3 are {t} px, the student's "
                          f"{s} px, so the teacher's per-anchor class and box targets describe other boxes; give "
                          "student.model the teacher's anchor_size and variant")
    if name == "rm" and _teacher_anchors(ctx) != ctx.num_anchors:
        raise ConfigError(f"distill.losses.rm: the {ctx.teacher_arch} teacher's candidate anchors do not index "
                          f"the {ctx.student_arch} student's anchors (anchors per location differ)")


def _build_one(name: str, ctx: LossContext, distill: DistillParams) -> nn.Module:
    dense = ctx.student_dense and ctx.teacher_arch != "faster_rcnn"
    if name == "mse":
        return MSEFeatureLoss(ctx.student_channels, ctx.teacher_channels)
    if name == "cosine":
        return CosineFeatureLoss(ctx.student_channels, ctx.teacher_channels)
    if name == "ssim":
        p = distill.ssim
        return SSIMLoss(ctx.student_channels, ctx.teacher_channels, p.window, p.sigma, p.adapter,
                        minmax=p.minmax, levels=p.levels, half=p.half, short_side=p.short_side)
    if name == "cskd":
        p = distill.cskd
        same = dense and ctx.student_arch == ctx.teacher_arch and ctx.box_dim == ctx.teacher_box_dim
        return CSKDLoss(
            ctx.student_channels, ctx.teacher_channels, ctx.num_classes, w_mse=p.w_mse, w_cos=p.w_cos,
            predictions=dense, assistant=p.assistant and ctx.assign is not None, num_levels=ctx.num_levels,
            arch=ctx.student_arch, same_arch=same, head_channels=ctx.student_head_channels,
            num_anchors=ctx.num_anchors, box_dim=ctx.box_dim, reg_max=ctx.reg_max,
            official_box_scaling=p.official_box_scaling, assign=ctx.assign, tower=p.tower,
            tower_layers=min(ctx.student_head_convs, ctx.teacher_head_convs),
            teacher_head_channels=ctx.teacher_head_channels,
        )
    if name == "crosskd":
        return CrossKDLoss(ctx.student_arch, ctx.num_classes, ctx.student_head_channels,
                           ctx.teacher_head_channels, ctx.reg_max, gfl_giou=distill.crosskd.gfl_giou,
                           assign=ctx.assign)
    if name == "rm":
        return RankMimicLoss(ctx.num_classes, distill.rm.scores, distill.rm.temperature, distill.rm.mean_over)
    if name == "pfi":
        return PFILoss(ctx.student_channels, ctx.teacher_channels, ctx.num_classes)
    raise AssertionError(name)


def build_kd_losses(weights: dict[str, float], ctx: LossContext, distill: DistillParams) -> KDLosses:
    """KDLosses for `distill.losses`; ConfigError names a bad loss and what would apply instead."""
    losses = {}
    for name, weight in weights.items():
        if name not in LOSS_NAMES:
            raise ConfigError(f"distill.losses: unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(f"distill.losses.{name}: weight must be a number >= 0, got {weight!r}")
        if weight == 0:
            continue
        _check(name, ctx)
        losses[name] = _build_one(name, ctx, distill)
    return KDLosses(losses, weights)
