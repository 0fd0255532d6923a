"""CSKD's assistant prediction branch (official `assis_*` convs of cskd_head_{retina,fcos,gfl}.py).

Training-only convs on the student's head-tower OUTPUT (the last tower layer after its activation:
`student.cls_tower.post[-1]`, `reg_tower.post[-1]`), predicting in the student's own format; the
targets are the teacher's dense predictions. Normalisers come from the STUDENT's assigner
(`matched`: per image [N] GT index, -1 background, -2 ignored), as in the official heads:
num_pos = sum over images of max(positives, 1) for RetinaNet / GFL (mmdet's anchor/ATSS
get_targets), max(total positives, 1) for FCOS. Under DDP (torchrun), as the official heads: FCOS's and
GFL's normalisers (num_pos, the centerness sum, the assistant score sum) are the mean over the ranks of
each rank's value (mmdet `reduce_mean`, clamped after it); RetinaNet's num_pos stays per rank.

| official term          | here          | loss form                                                  | weight | normaliser            |
|------------------------|---------------|------------------------------------------------------------|--------|-----------------------|
| retina loss_assis_cls  | assist_cls    | soft focal (a .25, g 2) vs teacher prob inside GT cells, 0 elsewhere; x label weight (ignore band 0) | 1 | num_pos (per rank) |
| retina loss_assis_bbox | assist_box    | L1 vs the teacher's deltas at positives                    | 1      | num_pos (per rank)    |
| fcos loss_assis_cls    | assist_cls    | soft focal vs teacher prob inside GT cells, all points     | 1      | num_pos (rank mean)   |
| fcos loss_assis_bbox   | assist_box    | GIoU (decoded) vs teacher boxes at positives, x centerness target | 1 | sum centerness targets (rank mean, >= 1e-6) |
| fcos loss_assis_cnt    | assist_ctr    | BCE(logit, teacher centerness prob) at positives           | 1      | num_pos (rank mean)   |
| gfl loss_assis_cls     | assist_cls    | QFL (beta 2), target IoU(assistant box (detached), teacher box) at positives | 1 | num_pos (rank mean) |
| gfl loss_assis_bbox    | assist_box    | GIoU vs teacher boxes at positives x assistant max score   | 2      | sum of those scores (rank mean, >= 1) |
| gfl loss_assis_dfl     | assist_dfl    | DFL to the teacher's expected sides (clamped to reg_max - 0.1), / 4 | 0.25 | same |
FCOS: per-level Scale, clamp(min 0) on boxes, centerness from the cls tower (official config:
centerness_on_reg False). GFL: per-level Scale on the distribution logits. Cells outside the
images' valid region never count (official: the padded map counts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from stages.detectors.box_coding import decode_boxes, integral
from stages.detectors.contract import flatten_levels
from stages.detectors.gfl import aligned_iou, distribution_focal_loss, quality_focal_loss
from stages.detectors.heads import Scale
from stages.distributed import reduce_mean
from stages.losses.common import wide

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
GFL_W_BOX, GFL_W_DFL = 2.0, 0.25
DFL_EPS = 0.1
IGNORED = -2  # torchvision Matcher.BETWEEN_THRESHOLDS


def soft_focal(logits: Tensor, target: Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> Tensor:
    """Elementwise sigmoid focal loss with soft targets (mmdet's py_sigmoid_focal_loss)."""
    p = logits.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight


def centerness_target(points: Tensor, boxes: Tensor) -> Tensor:
    """FCOS centerness of points [M, 2] inside their GT boxes [M, 4]."""
    lr = torch.stack([points[:, 0] - boxes[:, 0], boxes[:, 2] - points[:, 0]], 1)
    tb = torch.stack([points[:, 1] - boxes[:, 1], boxes[:, 3] - points[:, 1]], 1)
    ratio = (lr.amin(1) / lr.amax(1).clamp_min(1e-12)) * (tb.amin(1) / tb.amax(1).clamp_min(1e-12))
    return ratio.clamp_min(0).sqrt()


def num_positives(arch: str, matched: Tensor) -> Tensor:
    """The official heads' num_pos: FCOS max(reduce_mean(positives), 1), GFL max(reduce_mean(sum_i
    max(positives_i, 1)), 1) (both mean over the ranks under DDP), RetinaNet sum_i max(positives_i, 1)
    per rank (cskd_head_retina does not reduce it)."""
    pos = (matched >= 0).sum(dim=1).float()
    if arch == "fcos":
        return reduce_mean(pos.sum()).clamp_min(1.0)
    if arch == "gfl":
        return reduce_mean(pos.clamp_min(1.0).sum()).clamp_min(1.0)
    return pos.clamp_min(1.0).sum()


class AssistantHead(nn.Module):
    """The assistant output convs (3x3, N(0, 0.01), class bias prior 0.01) in the student's format."""

    def __init__(self, arch: str, channels: int, num_anchors: int, num_classes: int, box_dim: int, num_levels: int):
        super().__init__()
        if arch not in ("retinanet", "fcos", "gfl"):
            raise ValueError(f"cskd assistant: no dense head for arch {arch!r}")
        self.arch = arch
        self.cls = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.reg = nn.Conv2d(channels, num_anchors * box_dim, 3, padding=1)
        convs = [self.cls, self.reg]
        if arch == "fcos":
            self.ctr = nn.Conv2d(channels, num_anchors, 3, padding=1)
            convs.append(self.ctr)
        if arch in ("fcos", "gfl"):
            self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for conv in convs:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, level: int, cls_feat: Tensor, reg_feat: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        box = self.reg(reg_feat)
        ctr = None
        if self.arch == "fcos":
            box = self.scales[level](box).clamp(min=0)
            ctr = self.ctr(cls_feat)
        elif self.arch == "gfl":
            box = self.scales[level](box)
        return self.cls(cls_feat), box, ctr


def assistant_losses(head: AssistantHead, student, teacher, targets, matched: list[Tensor], valid: list[Tensor],
                     fg: list[Tensor], num_classes: int, reg_max: int) -> dict[str, Tensor]:
    if not student.cls_tower.post or not student.reg_tower.post:
        raise ValueError("cskd assistant: the student output has no head-tower maps (dense detector needed)")
    k, arch = num_classes, head.arch
    outs = [head(lv, wide(c), wide(r))
            for lv, (c, r) in enumerate(zip(student.cls_tower.post[-1], student.reg_tower.post[-1]))]
    a = outs[0][0].shape[1] // k
    box_dim = outs[0][1].shape[1] // a
    a_cls = flatten_levels([o[0] for o in outs], k)  # [B, N, K]
    a_box = flatten_levels([o[1] for o in outs], box_dim)  # [B, N, R]
    t_prob = flatten_levels([wide(m) for m in teacher.cls_probs], k).detach()
    t_box = flatten_levels([wide(m) for m in teacher.box_reg], box_dim).detach()
    if t_prob.shape != a_cls.shape or t_box.shape != a_box.shape:
        raise ValueError(f"cskd assistant: teacher maps {tuple(t_prob.shape)}/{tuple(t_box.shape)} do not match the "
                         f"student's {tuple(a_cls.shape)}/{tuple(a_box.shape)}: same architecture needed")
    in_img = flatten_levels([v.expand(-1, a, -1, -1) for v in valid], 1)[..., 0] > 0  # [B, N]
    in_box = flatten_levels([f.expand(-1, a, -1, -1) for f in fg], 1)[..., 0]  # [B, N]
    matched = torch.stack([m.to(a_cls.device) for m in matched])  # [B, N]
    pos = matched >= 0
    num_pos = num_positives(arch, matched)
    b, n, _ = a_cls.shape
    anchors = torch.cat(student.anchors).to(a_cls.device, a_cls.dtype)[None].expand(b, n, 4)
    if arch in ("retinanet", "fcos"):
        target = t_prob * in_box[..., None]  # teacher probabilities inside GT cells, 0 elsewhere
        weight = in_img & (matched != IGNORED) if arch == "retinanet" else in_img
        focal = soft_focal(a_cls, target).sum(dim=2)
        parts = {"assist_cls": torch.where(weight, focal, 0.0).sum() / num_pos}
    if arch == "retinanet":
        l1 = (a_box - t_box).abs().sum(dim=2)
        parts["assist_box"] = torch.where(pos, l1, 0.0).sum() / num_pos
        return parts
    a_dec = decode_boxes(arch, a_box[pos], anchors[pos], reg_max)
    t_dec = decode_boxes(arch, t_box[pos], anchors[pos], reg_max)
    if arch == "fcos":
        img, idx = torch.nonzero(pos, as_tuple=True)
        gt = torch.stack([targets[i]["boxes"].to(a_cls.device, a_cls.dtype)[matched[i, j]] for i, j in
                          zip(img.tolist(), idx.tolist())]) if len(img) else t_dec.new_zeros(0, 4)
        points = (anchors[pos][:, :2] + anchors[pos][:, 2:]) / 2
        ctr_t = centerness_target(points, gt)
        giou = generalized_box_iou_loss(a_dec, t_dec, reduction="none")
        parts["assist_box"] = (giou * ctr_t).sum() / reduce_mean(ctr_t.sum()).clamp_min(1e-6)
        a_ctr = flatten_levels([o[2] for o in outs], 1)[..., 0]
        t_ctr = flatten_levels([wide(m) for m in teacher.quality], 1)[..., 0].detach()
        bce = F.binary_cross_entropy_with_logits(a_ctr[pos], t_ctr[pos], reduction="sum")
        parts["assist_ctr"] = bce / num_pos
        return parts
    # GFL
    labels = torch.full((b, n), -1, dtype=torch.int64, device=a_cls.device)
    for i in range(b):
        if pos[i].any():
            labels[i, pos[i]] = targets[i]["labels"].to(a_cls.device).long()[matched[i, pos[i]]]
    scores = torch.zeros(b, n, device=a_cls.device, dtype=a_cls.dtype)
    scores[pos] = aligned_iou(a_dec.detach(), t_dec).to(scores.dtype)
    qfl = quality_focal_loss(a_cls.reshape(-1, k), labels.reshape(-1), scores.reshape(-1)).view(b, n)
    parts = {"assist_cls": torch.where(in_img, qfl, 0.0).sum() / num_pos}
    w = a_cls.detach().sigmoid().amax(dim=2)[pos]
    norm = reduce_mean(w.sum()).clamp_min(1.0)  # official assis_avg_factor: reduce_mean, then clamp 1
    giou = generalized_box_iou_loss(a_dec, t_dec, reduction="none")
    parts["assist_box"] = GFL_W_BOX * (giou * w).sum() / norm
    sides = integral(t_box[pos], reg_max).clamp(0, reg_max - DFL_EPS)
    dfl = distribution_focal_loss(a_box[pos].reshape(-1, reg_max + 1), sides.reshape(-1))
    parts["assist_dfl"] = GFL_W_DFL * (dfl * w.repeat_interleave(4)).sum() / 4 / norm
    return parts
