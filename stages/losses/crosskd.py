"""CrossKD (Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object Detection";
official code github jbwang1997/CrossKD, `mmdet/models/detectors/crosskd_{retinanet,fcos,gfl}.py`,
`mmdet/models/losses/kd_loss.py`, `configs/crosskd/*`).

The student's head-tower PRE-activation maps at layer `teacher.reuse_index` (both branches, every
level) are
  1. adapted to the teacher's head width by a 1x1 conv when the widths differ (owned here; the
     official students share the teacher's width),
  2. re-standardised PER FPN LEVEL and channel (official `align_scale`, called level by level):
       x' = (x - mean_s) / (std_s + 1e-6) * std_t + mean_t
     mean / unbiased std over the batch's valid cells of that level (official: N*H*W of the padded
     level); the teacher's per-level statistics come from the cache (`tower_mean/std[branch]`
     [L, C]; a legacy cache with pooled [C] statistics is broadcast to every level). Padded cells
     are then set to mean_t so the teacher's 3x3 convs read a neutral value there,
  3. run through the frozen teacher head's remaining layers (`teacher.head.run_from`).
The teacher head is frozen here and never a submodule of this loss.

| official term (config)            | here  | form                                                  | weight        | normaliser |
|-----------------------------------|-------|-------------------------------------------------------|---------------|------------|
| retina loss_cls_kd KDQualityFocal | cls   | BCE(crossed, t_prob) * |sigmoid - t_prob|^1, x label weight | 1.0   | num_pos (assigner positives, ignore band excluded; per rank) |
| retina loss_reg_kd GIoULoss       | box   | GIoU(decoded crossed, decoded teacher) x t max prob x label weight | 1.0 | num_pos (per rank) |
| fcos loss_cls_kd KDQualityFocal   | cls   | as above, every point                                 | 0.4           | sum of centerness targets of the positives, mean over ranks (>= 1e-6) |
| fcos loss_reg_kd IoULoss          | box   | -log(max(IoU, 1e-6)) x t max prob, every point        | 0.75          | same (mean over ranks) |
| gfl loss_cls_kd KDQualityFocal    | cls   | as above, x label weight                              | 1.0           | num_pos, mean over ranks |
| gfl loss_reg_kd KL (T=1, sum)     | kl    | KL(softmax t || softmax crossed) summed over bins, per side x t max prob, / 4 | 4.0 (3.0 with gfl_giou) | raw sum of t max prob (per rank) |
| gfl loss_bbox_kd GIoULoss         | box   | GIoU x t max prob (only with gfl_giou, later config)  | 2.0           | same (per rank) |
num_pos = sum over images of max(positives, 1) (mmdet get_targets), from the student's assigner
(`assign`); label weight = 0 on RetinaNet's ignore band (IoU 0.4-0.5), 1 elsewhere. Only valid cells
count (official: the padded map). FCOS centerness is not distilled (as official).
Under DDP (torchrun), as the official detectors: GFL's num_pos (cls) and FCOS's centerness sum (cls,
box) are the mean over the ranks of each rank's value (mmdet `reduce_mean`; FCOS clamps to 1e-6 after
it); RetinaNet's num_pos and GFL's sum of t max prob (kl, box) stay per rank (crosskd_retinanet uses
get_targets' avg_factor as is; crosskd_gfl divides by the raw per-rank kd_avg_factor).

Index convention: `reuse_index` is the contract's 0-based tower layer whose pre-activation output
the student supplies (`run_from`); the official `reused_teacher_head_idx = k` is index k - 1 here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from stages.detectors.box_coding import decode_boxes
from stages.detectors.contract import DetectorOutput, flatten_levels
from stages.detectors.gfl import aligned_iou
from stages.distributed import reduce_mean
from stages.losses.common import make_adapter, quality_focal_kd, valid_masks, wide
from stages.losses.cskd_assistant import IGNORED, centerness_target
from stages.losses.targets import TeacherTargets

QFL_BETA = 1.0
KL_TEMPERATURE = 1.0
IOU_EPS = 1e-6
STD_EPS = 1e-6


def arch_weights(arch: str, gfl_giou: bool = False) -> dict[str, float]:
    """Per-part weights of the official configs."""
    if arch == "retinanet":
        return {"cls": 1.0, "box": 1.0}
    if arch == "fcos":
        return {"cls": 0.4, "box": 0.75}
    if arch == "gfl":
        return {"cls": 1.0, "kl": 3.0, "box": 2.0} if gfl_giou else {"cls": 1.0, "kl": 4.0}
    raise ValueError(f"crosskd: no dense head for arch {arch!r}; one of fcos, gfl, retinanet")


def level_stats(x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased std of x [B, C, H, W] over the cells where valid [B, 1, H, W] > 0."""
    keep = valid > 0
    n = keep.sum().clamp_min(2)
    mean = torch.where(keep, x, 0.0).sum(dim=(0, 2, 3)) / n
    var = torch.where(keep, (x - mean[:, None, None]) ** 2, 0.0).sum(dim=(0, 2, 3)) / (n - 1)
    return mean, var.clamp_min(0).sqrt()


class CrossKDLoss(nn.Module):
    name = "crosskd"

    def __init__(self, arch: str, num_classes: int, student_head_channels: int, teacher_head_channels: int,
                 reg_max: int = 16, gfl_giou: bool = False, assign=None):
        super().__init__()
        self.weights = arch_weights(arch, gfl_giou)
        self.arch = arch
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.assign = assign
        self.adapters = nn.ModuleDict({
            "cls": make_adapter(student_head_channels, teacher_head_channels),
            "reg": make_adapter(student_head_channels, teacher_head_channels),
        })

    def needs(self) -> set[str]:
        return {"cls", "box", "head", "tower_stats"}

    def crossed_inputs(self, student: DetectorOutput, teacher: TeacherTargets,
                       valid: list[Tensor]) -> dict[str, list[Tensor]]:
        """Student tower maps at the reuse index, adapted and re-standardised per branch and level."""
        index = teacher.reuse_index
        if index < 0 or set(teacher.tower_mean) != {"cls", "reg"}:
            raise ValueError("crosskd needs the teacher's tower statistics at the reuse index "
                             "(cache target 'tower_stats', TeacherTargets.reuse_index >= 0)")
        out = {}
        for branch, tower in (("cls", student.cls_tower), ("reg", student.reg_tower)):
            if not tower.pre:
                raise ValueError("crosskd: the student output has no head-tower maps (dense detector needed)")
            maps = [self.adapters[branch](wide(m)) for m in tower.pre[min(index, len(tower.pre) - 1)]]
            t_mean = teacher.tower_mean[branch].to(maps[0].device, maps[0].dtype)
            t_std = teacher.tower_std[branch].to(maps[0].device, maps[0].dtype)
            if t_mean.ndim == 1:  # legacy cache: statistics pooled over levels
                t_mean, t_std = t_mean.expand(len(maps), -1), t_std.expand(len(maps), -1)
            if t_mean.shape[0] != len(maps):
                raise ValueError(f"crosskd: teacher tower statistics for {t_mean.shape[0]} levels, "
                                 f"student has {len(maps)}")
            crossed = []
            for lv, (m, v) in enumerate(zip(maps, valid)):
                mean, std = level_stats(m, v)
                tm, ts = t_mean[lv][:, None, None], t_std[lv][:, None, None]
                x = (m - mean[:, None, None]) / (std[:, None, None] + STD_EPS) * ts + tm
                crossed.append(torch.where(v > 0, x, tm))
            out[branch] = crossed
        return out

    def forward(self, student: DetectorOutput, teacher: TeacherTargets, targets: list[dict]) -> dict[str, Tensor]:
        if teacher.head is None:
            raise ValueError("crosskd needs the teacher's dense head (TeacherTargets.head)")
        if self.assign is None:
            raise ValueError("crosskd needs the student's assigner for its normalisers (LossContext.assign)")
        device = student.cls_logits[0].device
        valid = valid_masks(student.image_sizes, [m.shape[-2:] for m in student.cls_logits], student.strides, device)
        inputs = self.crossed_inputs(student, teacher, valid)
        head = teacher.head.requires_grad_(False)
        cls_logits, box_reg, _ = head.run_from(teacher.reuse_index, inputs["cls"], inputs["reg"])
        matched = torch.stack([m.to(device) for m in self.assign(student, targets)])
        return self.mimic(cls_logits, box_reg, teacher, valid, student.anchors, matched, targets)

    def mimic(self, cls_logits: list[Tensor], box_reg: list[Tensor], teacher: TeacherTargets,
              valid: list[Tensor], anchors: list[Tensor], matched: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        """The crossed predictions (per level, contract layout) vs the teacher's. matched [B, N]: the
        student assigner's GT index per anchor (-1 background, -2 ignored)."""
        k, w = self.num_classes, self.weights
        a = cls_logits[0].shape[1] // k
        crossed = flatten_levels([wide(m) for m in cls_logits], k)  # [B, N, K]
        t_probs = flatten_levels([wide(m) for m in teacher.cls_probs], k).detach()
        if t_probs.shape != crossed.shape:
            raise ValueError(f"crosskd: teacher class maps {tuple(t_probs.shape)} vs crossed {tuple(crossed.shape)}")
        in_img = flatten_levels([v.expand(-1, a, -1, -1) for v in valid], 1)[..., 0] > 0  # [B, N]
        label_w = in_img & (matched != IGNORED)
        t_max = torch.where(label_w, t_probs.amax(dim=2), 0.0)  # sigmoid(max teacher logit)
        b, n, _ = crossed.shape
        box_dim = box_reg[0].shape[1] // a
        s_box = flatten_levels([wide(m) for m in box_reg], box_dim)  # [B, N, R]
        t_box = flatten_levels([wide(m) for m in teacher.box_reg], box_dim).detach()
        flat_anchors = torch.cat(anchors).to(s_box.device, s_box.dtype)[None].expand(b, n, 4)
        qfl = quality_focal_kd(crossed, t_probs, QFL_BETA).sum(dim=2)  # [B, N]
        if self.arch == "fcos":
            norm = self._centerness_sum(matched, flat_anchors, targets)
        else:
            norm = (matched >= 0).sum(dim=1).float().clamp_min(1.0).sum()
            if self.arch == "gfl":  # official crosskd_gfl reduces avg_factor over the ranks; crosskd_retinanet does not
                norm = reduce_mean(norm)
        parts = {"cls": w["cls"] * torch.where(label_w, qfl, 0.0).sum() / norm}
        if self.arch in ("retinanet", "fcos"):
            s_xyxy = decode_boxes(self.arch, s_box, flat_anchors, self.reg_max)
            t_xyxy = decode_boxes(self.arch, t_box, flat_anchors, self.reg_max)
            if self.arch == "retinanet":
                box = generalized_box_iou_loss(s_xyxy.reshape(-1, 4), t_xyxy.reshape(-1, 4), reduction="none")
            else:
                box = -aligned_iou(s_xyxy.reshape(-1, 4), t_xyxy.reshape(-1, 4)).clamp_min(IOU_EPS).log()
            parts["box"] = w["box"] * torch.where(label_w, box.view(b, n) * t_max, 0.0).sum() / norm
            return parts
        bins = self.reg_max + 1
        kd_norm = t_max.sum()
        kd_norm = torch.where(kd_norm > 0, kd_norm, torch.ones_like(kd_norm))  # all-zero weights: every term is 0
        t_dist = F.softmax(t_box.view(b, n, 4, bins) / KL_TEMPERATURE, dim=3)
        s_logp = F.log_softmax(s_box.view(b, n, 4, bins) / KL_TEMPERATURE, dim=3)
        kl = F.kl_div(s_logp, t_dist, reduction="none").sum(dim=3) * KL_TEMPERATURE**2  # [B, N, 4]
        parts["kl"] = w["kl"] * torch.where(label_w[..., None], kl * t_max[..., None], 0.0).sum() / 4.0 / kd_norm
        if "box" in w:
            s_xyxy = decode_boxes("gfl", s_box, flat_anchors, self.reg_max).reshape(-1, 4)
            t_xyxy = decode_boxes("gfl", t_box, flat_anchors, self.reg_max).reshape(-1, 4)
            giou = generalized_box_iou_loss(s_xyxy, t_xyxy, reduction="none").view(b, n)
            parts["box"] = w["box"] * torch.where(label_w, giou * t_max, 0.0).sum() / kd_norm
        return parts

    @staticmethod
    def _centerness_sum(matched: Tensor, anchors: Tensor, targets: list[dict]) -> Tensor:
        """Sum of the FCOS centerness targets of the positives (official pos_centerness_denorm)."""
        total = anchors.new_zeros(())
        for i, t in enumerate(targets):
            pos = matched[i] >= 0
            if pos.any():
                boxes = t["boxes"].to(anchors.device, anchors.dtype)[matched[i, pos]]
                points = (anchors[i, pos, :2] + anchors[i, pos, 2:]) / 2
                total = total + centerness_target(points, boxes).sum()
        return reduce_mean(total).clamp_min(1e-6)  # official: max(reduce_mean(sum), 1e-6)
