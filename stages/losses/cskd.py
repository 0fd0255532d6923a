"""CSKD: cosine-similarity-guided KD (Park et al., "Cosine Similarity-guided Knowledge
Distillation for Robust Object Detectors"; official code github swkdn16/CSKD).

The core term on a student map s and teacher map t ([B, C, H, W], over a cell selection M):
  cos_ch[b, c]    cosine over the selected cells between s[b, c] and t[b, c]  (one per channel)
  cos_sp[b, h, w] cosine over channels between s[b, :, h, w] and t[b, :, h, w] (one per cell)
  G = (1 - cos_ch) * (1 - cos_sp)                      guidance, large where both disagree
  term = w_mse * mean_M(G * (s - t)^2) + w_cos * (mean(1 - cos_ch) + mean_M(1 - cos_sp))
Paper / official values: w_mse 1, w_cos 0.5 (`DistillParams.cskd`). As in the official code the
guidance is not detached (the student is also pulled towards a smaller G).

Parts returned (each averaged over FPN levels; the caller's weight multiplies all of them):
  neck        the term on adapter(student FPN) vs teacher FPN over each image's valid cells
  roi         the term on 7x7 RoIAlign crops of both maps at the GT boxes (aligned=True,
              sampling 2, spatial scale 1/stride); padded cells are zeroed first so bilinear
              samples at an image's border cannot read padding
  fg / bg     the term over the cells GT boxes cover / the other valid cells
  pred        the term on sigmoid(student class logits) vs teacher probabilities (valid cells);
              when student and teacher differ in anchors per location, on the per-location max
              over anchors
  assist_cls  assistant prediction branch (training only, owned here: 3x3 conv + ReLU on the
  assist_box  student FPN, then 3x3 convs to the teacher's A*K class and A*R box channels):
              classes learn the teacher probabilities inside GT boxes (0 elsewhere, as the
              official code masks them) with a QFL-style soft focal loss (beta 2) summed over
              valid anchors / number of anchors inside GT boxes; boxes learn the teacher's
              regression with L1 (GFL teachers: on the expected side distances of the bin
              distributions), weighted per anchor by (inside a GT box) x (teacher max score).
Faster R-CNN (student or teacher) has no dense predictions: only neck / roi / fg / bg apply.
Deviations from the official code: the head-tower branch terms are left out (the cache holds no
tower maps), the assistant reads the student FPN (not its tower output) and is weighted by GT boxes
and teacher scores instead of the student assigner's positives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from stages.detectors.contract import DetectorOutput
from stages.losses.common import (
    box_masks,
    check_levels,
    make_adapter,
    masked_mean,
    masked_sum,
    match_class_maps,
    quality_focal_kd,
    soft_positive_count,
    valid_masks,
)
from stages.losses.targets import TeacherTargets

ROI_SIZE = 7


def cskd_term(s: Tensor, t: Tensor, mask: Tensor, w_mse: float, w_cos: float) -> Tensor:
    """The guided MSE + cosine term on s, t [B, C, H, W] over the cells where mask [B, 1, H, W] > 0."""
    t = t.detach()
    sel = mask > 0
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    s0, t0 = torch.where(sel, s, zero), torch.where(sel, t, zero)
    cos_ch = F.cosine_similarity(s0.flatten(2), t0.flatten(2), dim=2, eps=1e-6)  # [B, C]
    cos_sp = F.cosine_similarity(s0, t0, dim=1, eps=1e-6)[:, None]  # [B, 1, H, W]
    guidance = (1 - cos_ch)[:, :, None, None] * (1 - cos_sp)
    mse = masked_mean(guidance * (s0 - t0) ** 2, mask)
    has_cells = sel.flatten(1).any(dim=1).to(s.dtype)[:, None]  # [B, 1]: images with a selected cell
    ch_term = ((1 - cos_ch) * has_cells).sum() / (has_cells.sum() * s.shape[1]).clamp_min(1.0)
    return w_mse * mse + w_cos * (ch_term + masked_mean(1 - cos_sp, mask))


class AssistantHead(nn.Module):
    """Training-only dense predictor on student FPN maps, in the teacher's output format."""

    def __init__(self, channels: int, num_anchors: int, num_classes: int, box_dim: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.cls = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.box = nn.Conv2d(channels, num_anchors * box_dim, 3, padding=1)
        for conv in (self.trunk[0], self.cls, self.box):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls.bias, -math.log((1 - 0.01) / 0.01))  # prior probability 0.01

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        return self.cls(h), self.box(h)


def expected_sides(box_reg: Tensor, reg_max: int) -> Tensor:
    """GFL distribution logits [B, A*4*(n+1), H, W] -> expected side distances [B, A, 4, H, W]."""
    b, _, h, w = box_reg.shape
    probs = box_reg.view(b, -1, 4, reg_max + 1, h, w).softmax(dim=3)
    bins = torch.arange(reg_max + 1, dtype=probs.dtype, device=probs.device)
    return (probs * bins[:, None, None]).sum(dim=3)


class CSKDLoss(nn.Module):
    name = "cskd"

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        w_mse: float = 1.0,
        w_cos: float = 0.5,
        predictions: bool = True,
        assistant: bool = True,
        teacher_num_anchors: int = 1,
        teacher_box_dim: int = 4,
        teacher_reg_max: int = 0,
    ):
        """predictions: student and teacher are dense (pred + assistant terms possible).
        teacher_reg_max > 0: the teacher's box_reg are GFL distribution logits."""
        super().__init__()
        self.adapter = make_adapter(student_channels, teacher_channels)
        self.num_classes = num_classes
        self.w_mse, self.w_cos = w_mse, w_cos
        self.predictions = predictions
        self.teacher_num_anchors = teacher_num_anchors
        self.teacher_reg_max = teacher_reg_max
        self.assistant = (
            AssistantHead(student_channels, teacher_num_anchors, num_classes, teacher_box_dim)
            if predictions and assistant
            else None
        )

    def needs(self) -> set[str]:
        need = {"fpn"}
        if self.predictions:
            need.add("cls")
        if self.assistant is not None:
            need |= {"cls", "box"}
        return need

    def term(self, s: Tensor, t: Tensor, mask: Tensor) -> Tensor:
        return cskd_term(s, t, mask, self.w_mse, self.w_cos)

    def forward(self, student: DetectorOutput, teacher: TeacherTargets, targets: list[dict]) -> dict[str, Tensor]:
        check_levels(self.name, student.fpn, teacher.fpn)
        device = student.fpn[0].device
        shapes = [f.shape[-2:] for f in student.fpn]
        valid = valid_masks(student.image_sizes, shapes, student.strides, device)
        gt_boxes = [t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4) for t in targets]
        fg = [m * v for m, v in zip(box_masks(gt_boxes, shapes, student.strides, device), valid)]
        has_gt = sum(len(b) for b in gt_boxes) > 0
        per_level: dict[str, list[Tensor]] = {"neck": [], "roi": [], "fg": [], "bg": []}
        for s_map, t_map, stride, v, f in zip(student.fpn, teacher.fpn, student.strides, valid, fg):
            s, t = self.adapter(s_map.float()), t_map.float().detach()
            per_level["neck"].append(self.term(s, t, v))
            per_level["fg"].append(self.term(s, t, f))
            per_level["bg"].append(self.term(s, t, v - f))
            if has_gt:
                # zero padding first: bilinear samples at an image's border must not read it
                s_roi, t_roi = (self._roi(torch.where(v > 0, x, 0.0), gt_boxes, stride) for x in (s, t))
                per_level["roi"].append(self.term(s_roi, t_roi, torch.ones_like(s_roi[:, :1])))
            else:
                per_level["roi"].append(s.new_zeros(()))
        if self.predictions:
            check_levels(self.name, student.cls_logits, teacher.cls_probs)
            per_level["pred"] = [
                self.term(*match_class_maps(logits.float().sigmoid(), probs.float(), self.num_classes), v)
                for logits, probs, v in zip(student.cls_logits, teacher.cls_probs, valid)
            ]
        parts = {key: torch.stack(values).mean() for key, values in per_level.items()}
        if self.assistant is not None:
            parts.update(self._assistant_losses(student, teacher, valid, fg))
        return parts

    @staticmethod
    def _roi(x: Tensor, boxes: list[Tensor], stride: int) -> Tensor:
        return roi_align(x, boxes, output_size=ROI_SIZE, spatial_scale=1.0 / stride, sampling_ratio=2, aligned=True)

    def _assistant_losses(self, student, teacher, valid, fg) -> dict[str, Tensor]:
        """Soft focal class loss and score-weighted L1 box loss, each normalised over all levels."""
        a, k = self.teacher_num_anchors, self.num_classes
        cls_sum = cls_count = box_sum = box_weight = 0.0
        for feat, t_probs, t_box, v, f in zip(student.fpn, teacher.cls_probs, teacher.box_reg, valid, fg):
            t_probs, t_box = t_probs.float().detach(), t_box.float().detach()
            if t_probs.shape[1] != a * k:
                raise ValueError(
                    f"cskd assistant: teacher class map has {t_probs.shape[1]} channels, expected "
                    f"{a} anchors x {k} classes; check teacher_arch / num_classes"
                )
            logits, box = self.assistant(torch.where(v > 0, feat.float(), 0.0))
            b, _, h, w = logits.shape
            t_fg = torch.where(f > 0, t_probs, 0.0)  # teacher probabilities inside GT boxes, 0 elsewhere
            cls_sum = cls_sum + masked_sum(quality_focal_kd(logits, t_fg, beta=2.0), v)
            cls_count = cls_count + f.sum() * a
            if self.teacher_reg_max > 0:
                pred_sides = expected_sides(box, self.teacher_reg_max)
                t_sides = expected_sides(t_box, self.teacher_reg_max)
            else:
                pred_sides, t_sides = box.view(b, a, -1, h, w), t_box.view(b, a, -1, h, w)
            l1 = (pred_sides - t_sides).abs().mean(dim=2)  # [B, A, H, W]
            weight = t_fg.view(b, a, k, h, w).amax(dim=2)  # inside a GT box x teacher max score
            box_sum = box_sum + masked_sum(l1, weight)
            box_weight = box_weight + weight.sum()
        return {
            "assist_cls": cls_sum / torch.as_tensor(cls_count).clamp_min(1.0),
            "assist_box": box_sum / soft_positive_count(torch.as_tensor(box_weight)),
        }
