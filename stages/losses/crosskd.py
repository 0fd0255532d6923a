"""CrossKD (Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object Detection";
official code github jbwang1997/CrossKD).

The student's head-tower PRE-activation maps at layer `teacher.reuse_index` (both branches, every
level) are
  1. adapted to the teacher's head width by a 1x1 conv when the widths differ (owned here),
  2. re-standardised per channel to the teacher's statistics:
       x' = (x - mean_s) / (std_s + 1e-6) * std_t + mean_t
     mean_s / std_s over the batch's valid cells of all levels (the cache's tower statistics
     `teacher.tower_mean/std[branch]` are pooled the same way; population std); padded cells are
     then set to mean_t, so the teacher's 3x3 convs read a neutral value there, never padding,
  3. run through the frozen teacher head's remaining layers: `teacher.head.run_from(index, ...)`.
Gradients reach the student's tower (and adapters); the teacher head is frozen here
(requires_grad_(False)) and is never a submodule of this loss, so no optimiser sees it.
The student's layer is min(index, its tower depth - 1) when its tower is shallower.

The crossed predictions mimic the teacher's, over valid anchors (official per-arch weights):
  cls  KD quality focal loss, BCE(crossed logits, teacher probs) * |sigmoid(crossed) - probs|^1
       (beta 1, KDQualityFocalLoss); RetinaNet 1.0, FCOS 0.4, GFL 1.0
  box  RetinaNet / FCOS: GIoU loss between decoded crossed and teacher boxes
       (`box_coding.decode_boxes`, anchors from `student.anchors`); RetinaNet 1.0, FCOS 0.75
       (the official FCOS config uses IoU loss); GFL: GIoU 2.0
  kl   GFL only: KL(softmax(teacher bins) || softmax(crossed bins)) per box side, T = 1, summed
       over bins, mean over the 4 sides; 3.0
Box terms are weighted per anchor by the teacher's max class probability; the GIoU term skips
anchors whose teacher box is thinner than 0.1 px (FCOS ReLUs sides to 0: such a box has GIoU loss 1
even against itself). Every term is divided by the sum of those weights over valid anchors (at
least 1); the official code divides the class term by the assigner's positive count, which a loss
that runs no assigner does not have.

Index convention: `reuse_index` is the contract's 0-based tower layer whose pre-activation output
the student supplies (`run_from`). The official `reused_teacher_head_idx = k` counts convs: it
replaces the output of conv k-1 and reuses the teacher from conv k on, so the official 3 (2 for
FCOS) is index 2 (1) here. The caller picks the index (`TeacherTargets.reuse_index`).
FCOS centerness is not distilled (as in the official code). Student and teacher must share the
architecture (the registry refuses others).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from stages.detectors.box_coding import decode_boxes
from stages.detectors.contract import DetectorOutput, flatten_levels
from stages.losses.common import (
    check_levels,
    make_adapter,
    masked_sum,
    quality_focal_kd,
    soft_positive_count,
    valid_masks,
)
from stages.losses.targets import TeacherTargets

# (cls, box, kl) weights of the official configs
ARCH_WEIGHTS = {"retinanet": (1.0, 1.0, 0.0), "fcos": (0.4, 0.75, 0.0), "gfl": (1.0, 2.0, 3.0)}
QFL_BETA = 1.0
KL_TEMPERATURE = 1.0
MIN_BOX_SIDE = 0.1  # pixels: thinner teacher boxes are left out of the GIoU term


def _channel_sum(maps: list[Tensor], valid: list[Tensor]) -> Tensor:
    """Per-channel sum over the valid cells of all levels: maps [B, C, H, W], valid [B, 1, H, W] -> [C]."""
    return sum(torch.where(v > 0, m, 0.0).sum(dim=(0, 2, 3)) for m, v in zip(maps, valid))


class CrossKDLoss(nn.Module):
    name = "crosskd"

    def __init__(self, arch: str, num_classes: int, student_head_channels: int, teacher_head_channels: int,
                 reg_max: int = 16):
        super().__init__()
        if arch not in ARCH_WEIGHTS:
            raise ValueError(f"crosskd: no dense head for arch {arch!r}; one of {sorted(ARCH_WEIGHTS)}")
        self.arch = arch
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.adapters = nn.ModuleDict({
            "cls": make_adapter(student_head_channels, teacher_head_channels),
            "reg": make_adapter(student_head_channels, teacher_head_channels),
        })

    def needs(self) -> set[str]:
        return {"cls", "box", "head", "tower_stats"}

    def crossed_inputs(self, student: DetectorOutput, teacher: TeacherTargets,
                       valid: list[Tensor]) -> dict[str, list[Tensor]]:
        """Student tower maps at the reuse index, adapted and re-standardised per branch."""
        index = teacher.reuse_index
        if index < 0 or set(teacher.tower_mean) != {"cls", "reg"}:
            raise ValueError("crosskd needs the teacher's tower statistics at the reuse index "
                             "(cache target 'tower_stats', TeacherTargets.reuse_index >= 0)")
        out = {}
        for branch, tower in (("cls", student.cls_tower), ("reg", student.reg_tower)):
            if not tower.pre:
                raise ValueError("crosskd: the student output has no head-tower maps (dense detector needed)")
            maps = [self.adapters[branch](m.float()) for m in tower.pre[min(index, len(tower.pre) - 1)]]
            count = sum(v.sum() for v in valid)
            mean = _channel_sum(maps, valid) / count
            var = _channel_sum([(m - mean[:, None, None]) ** 2 for m in maps], valid) / count
            t_mean = teacher.tower_mean[branch].float().to(mean.device)
            t_std = teacher.tower_std[branch].float().to(mean.device)
            scale = (t_std / (var.clamp_min(1e-12).sqrt() + 1e-6))[:, None, None]
            out[branch] = [
                torch.where(v > 0, (m - mean[:, None, None]) * scale + t_mean[:, None, None], t_mean[:, None, None])
                for m, v in zip(maps, valid)
            ]
        return out

    def forward(self, student: DetectorOutput, teacher: TeacherTargets, targets: list[dict]) -> dict[str, Tensor]:
        if teacher.head is None:
            raise ValueError("crosskd needs the teacher's dense head (TeacherTargets.head)")
        check_levels(self.name, student.cls_logits, teacher.cls_probs)
        device = student.cls_logits[0].device
        valid = valid_masks(student.image_sizes, [m.shape[-2:] for m in student.cls_logits], student.strides, device)
        inputs = self.crossed_inputs(student, teacher, valid)
        head = teacher.head.requires_grad_(False)
        cls_logits, box_reg, _ = head.run_from(teacher.reuse_index, inputs["cls"], inputs["reg"])
        return self.mimic(cls_logits, box_reg, teacher, valid, student.anchors)

    def mimic(self, cls_logits: list[Tensor], box_reg: list[Tensor], teacher: TeacherTargets,
              valid: list[Tensor], anchors: list[Tensor]) -> dict[str, Tensor]:
        """The crossed predictions (per level, contract layout) vs the teacher's, over valid anchors."""
        k = self.num_classes
        num_anchors = cls_logits[0].shape[1] // k
        crossed = flatten_levels([m.float() for m in cls_logits], k)  # [B, N, K]
        t_probs = flatten_levels([m.float() for m in teacher.cls_probs], k).detach()
        anchor_valid = flatten_levels([v.expand(-1, num_anchors, -1, -1) for v in valid], 1)[..., 0]  # [B, N]
        weight = torch.where(anchor_valid > 0, t_probs.amax(dim=2), 0.0)  # the teacher's max score per valid anchor
        norm = soft_positive_count(weight)
        w_cls, w_box, w_kl = ARCH_WEIGHTS[self.arch]
        qfl = quality_focal_kd(crossed, t_probs, QFL_BETA).sum(dim=2)
        parts = {"cls": w_cls * masked_sum(qfl, anchor_valid) / norm}

        box_dim = box_reg[0].shape[1] // num_anchors
        s_box = flatten_levels([m.float() for m in box_reg], box_dim)  # [B, N, R]
        t_box = flatten_levels([m.float() for m in teacher.box_reg], box_dim).detach()
        b, n, _ = s_box.shape
        flat_anchors = torch.cat(anchors).to(s_box.device).float().repeat(b, 1)  # [B*N, 4]
        s_xyxy = decode_boxes(self.arch, s_box.reshape(b * n, -1), flat_anchors, self.reg_max)
        t_xyxy = decode_boxes(self.arch, t_box.reshape(b * n, -1), flat_anchors, self.reg_max)
        giou = generalized_box_iou_loss(s_xyxy, t_xyxy, reduction="none").view(b, n)
        # a degenerate teacher box (a side ReLU'd to 0) has GIoU loss 1 even against itself: skip it
        sides = (t_xyxy[:, 2:] - t_xyxy[:, :2]).amin(dim=1).view(b, n)
        parts["box"] = w_box * masked_sum(giou, weight * (sides >= MIN_BOX_SIDE)) / norm
        if w_kl > 0:
            bins = self.reg_max + 1
            t_dist = F.softmax(t_box.view(b, n, 4, bins) / KL_TEMPERATURE, dim=3)
            s_logp = F.log_softmax(s_box.view(b, n, 4, bins) / KL_TEMPERATURE, dim=3)
            kl = F.kl_div(s_logp, t_dist, reduction="none").sum(dim=3).mean(dim=2) * KL_TEMPERATURE**2
            parts["kl"] = w_kl * masked_sum(kl, weight) / norm
        return parts
