"""GFL: Generalized Focal Loss (Li et al., NeurIPS 2020), written here (torchvision has none).

- Head: GN towers, joint class-IoU logits (no separate quality branch), per-level `Scale` on the
  regression output, 4 x (reg_max+1) distribution logits whose expectation is the side distance
  in stride units (see `box_coding`).
- Assignment: ATSS (Zhang et al. 2020). Per GT and level, the `topk` = 9 points nearest to the GT
  centre are candidates; positives are candidates whose anchor IoU >= mean + std of the
  candidates' IoUs and whose point lies inside the GT; an anchor claimed by several GTs goes to
  the one with the highest IoU. As in the paper (mmdet's `octave_base_scale=8`), the IoU is taken
  with an 8-stride square at the point; the contract's anchors stay stride-sized squares.
- Losses (paper weights): Quality Focal Loss (beta 2) on the joint score with the IoU of the
  predicted (detached) box as the positive target, 1.0, normalised by the positives;
  GIoU 2.0 and Distribution Focal Loss 0.25, each weighted per positive by its max predicted
  class score and normalised by the sum of those weights (at least 1).
- Under DDP both normalisers are the mean over the ranks of each rank's count / weight sum, clamped
  after the mean, as mmdet's GFLHead.loss_by_feat (`reduce_mean` of avg_factor and of the summed
  weight_targets): DDP's gradient average is then the global batch's loss. Single process: unchanged.
  (mmdet 3.x counts sum_i max(positives_i, 1) over images; here max(sum_i positives_i, 1): the same
  whenever every image has a positive.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.retinanet import RetinaNet as TVRetinaNet
from torchvision.ops import box_iou, generalized_box_iou_loss

from stages.config import ModelParams
from stages.detectors.base import IGNORE, DenseDetector
from stages.detectors.box_coding import box_to_distance, centers, decode_boxes, distance_to_box, integral
from stages.detectors.contract import DetectorOutput, flatten_levels
from stages.detectors.fcos import point_anchors
from stages.detectors.heads import GFLDenseHead
from stages.distributed import reduce_mean

QFL_BETA = 2.0
W_QFL, W_GIOU, W_DFL = 1.0, 2.0, 0.25
ATSS_TOPK = 9
ATSS_ANCHOR_SCALE = 8.0  # the square used for ATSS IoUs is this many strides wide
DFL_EPS = 0.1  # targets are clamped to reg_max - eps so the right bin exists


def quality_focal_loss(logits: Tensor, labels: Tensor, scores: Tensor, beta: float = QFL_BETA) -> Tensor:
    """QFL per sample, summed over classes: logits [M, K], labels [M] (-1 = background), scores [M].

    Every class is a negative with target 0, BCE scaled by sigmoid^beta; the labelled class of a
    positive has soft target `score` (the IoU), BCE scaled by |score - sigmoid|^beta.
    """
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * prob.pow(
        beta
    )
    pos = torch.nonzero(labels >= 0).flatten()
    if len(pos):
        lab = labels[pos]
        logit, target = logits[pos, lab], scores[pos].to(logits.dtype)
        pos_loss = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
        loss = loss.index_put((pos, lab), pos_loss * (target - prob[pos, lab]).abs().pow(beta))
    return loss.sum(dim=1)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL per sample: logits [M, n+1] over bins 0..n, continuous target [M] in [0, n).

    Cross-entropy to the two bins around the target, weighted by linear interpolation.
    """
    left = target.long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = target - left.to(target.dtype)
    return (
        F.cross_entropy(logits, left, reduction="none") * w_left
        + F.cross_entropy(logits, right, reduction="none") * w_right
    )


def aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of a[i] with b[i], both [M, 4] xyxy."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


def atss_match(
    anchors: Tensor,
    num_per_level: list[int],
    gt_boxes: Tensor,
    topk: int = ATSS_TOPK,
    anchor_scale: float = ATSS_ANCHOR_SCALE,
) -> Tensor:
    """ATSS assignment for point anchors (stride-sized squares): [N] GT index or -1."""
    n, g = len(anchors), len(gt_boxes)
    matched = torch.full((n,), -1, dtype=torch.int64, device=anchors.device)
    if g == 0:
        return matched
    points = centers(anchors)
    half = (anchors[:, 2] - anchors[:, 0])[:, None] * anchor_scale / 2
    ious = box_iou(torch.cat([points - half, points + half], dim=1), gt_boxes)  # [N, G]
    dist = torch.cdist(points, centers(gt_boxes))  # [N, G]
    cands, start = [], 0
    for count in num_per_level:
        k = min(topk, count)
        cands.append(dist[start : start + count].topk(k, dim=0, largest=False).indices + start)
        start += count
    cand = torch.cat(cands)  # [C, G]
    cand_ious = ious.gather(0, cand)
    threshold = cand_ious.mean(0) + cand_ious.std(0)
    px, py = points[cand, 0], points[cand, 1]  # [C, G]
    inside = (
        torch.stack(
            [px - gt_boxes[:, 0], py - gt_boxes[:, 1], gt_boxes[:, 2] - px, gt_boxes[:, 3] - py], dim=-1
        ).amin(dim=-1)
        > 0.01
    )
    pos = (cand_ious >= threshold) & inside
    gt_of = torch.arange(g, device=anchors.device).expand_as(cand)
    claimed = torch.full_like(ious, -float("inf"))
    claimed[cand[pos], gt_of[pos]] = ious[cand[pos], gt_of[pos]]
    best, arg = claimed.max(dim=1)
    return torch.where(best > -float("inf"), arg, matched)


class GFLBoxCoder:
    """`decode_single` for torchvision's post-processing."""

    def __init__(self, reg_max: int):
        self.reg_max = reg_max

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        return decode_boxes("gfl", rel_codes, boxes, self.reg_max)


class GFLDetector(DenseDetector):
    arch = "gfl"

    def __init__(self, cfg: ModelParams, num_classes: int):
        super().__init__(cfg, num_classes, cfg.head_convs, reuse_index=3)
        self.anchor_generator = point_anchors()
        self.num_anchors, self.reg_max = 1, cfg.reg_max
        self.box_dim = 4 * (cfg.reg_max + 1)
        self.head = build_gfl_head(cfg, num_classes)
        self.box_coder = GFLBoxCoder(cfg.reg_max)

    def match(self, anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor) -> Tensor:
        return atss_match(anchors, num_per_level, gt_boxes)

    def compute_losses(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        k, m = self.num_classes, self.reg_max
        anchors, matched = self.matches(out, targets)
        cls = flatten_levels(out.cls_logits, k).float()  # [B, N, K]
        reg = flatten_levels(out.box_reg, self.box_dim).float()  # [B, N, 4*(m+1)]
        matched = torch.stack(matched)  # [B, N]
        img, idx = torch.nonzero(matched >= 0, as_tuple=True)
        counts = torch.tensor([0] + [len(t["boxes"]) for t in targets], device=cls.device)
        gt = (torch.cumsum(counts, 0)[:-1])[img] + matched[img, idx]  # into the batch's GT list
        gt_boxes = torch.cat([t["boxes"] for t in targets])[gt]
        gt_labels = torch.cat([t["labels"] for t in targets])[gt]

        # everything in stride units (IoU, GIoU and distances are what the paper uses there)
        stride = (anchors[idx, 2] - anchors[idx, 0])[:, None]
        points = centers(anchors[idx]) / stride
        target_boxes = gt_boxes / stride
        pos_reg = reg[img, idx]  # [P, 4*(m+1)]
        pred_boxes = distance_to_box(points, integral(pos_reg, m))
        weight = cls[img, idx].detach().sigmoid().amax(dim=1)  # [P]

        labels = torch.full(matched.shape, -1, dtype=torch.int64, device=cls.device)
        labels[img, idx] = gt_labels
        scores = torch.zeros(matched.shape, dtype=cls.dtype, device=cls.device)
        scores[img, idx] = aligned_iou(pred_boxes.detach(), target_boxes)
        # normalisers: means over the ranks under DDP (mmdet's reduce_mean), before the clamp; both
        # collectives run on every rank, positives or not
        num_pos = max(reduce_mean(len(idx), cls.device), 1)
        qfl = quality_focal_loss(cls.reshape(-1, k), labels.reshape(-1), scores.reshape(-1))
        qfl = (qfl * (matched.reshape(-1) != IGNORE)).sum() / num_pos  # crowd regions: not negatives either

        norm = reduce_mean(weight.sum()).clamp(min=1.0)
        giou = (generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none") * weight).sum() / norm
        target_dist = box_to_distance(points, target_boxes, max_dist=m - DFL_EPS)
        dfl = distribution_focal_loss(pos_reg.reshape(-1, m + 1), target_dist.reshape(-1))
        dfl = (dfl * weight.repeat_interleave(4)).sum() / 4 / norm
        return {"cls": W_QFL * qfl, "box": W_GIOU * giou, "dfl": W_DFL * dfl}

    def tv_postprocess(self, head_outputs, anchors, image_sizes):
        # sigmoid scores, threshold, top-k, decode, clip, class-wise NMS: RetinaNet's recipe
        return TVRetinaNet.postprocess_detections(self, head_outputs, anchors, image_sizes)


def build_gfl_head(cfg: ModelParams, num_classes: int) -> GFLDenseHead:
    return GFLDenseHead(cfg.fpn_channels, num_classes, cfg.head_convs, cfg.reg_max)
