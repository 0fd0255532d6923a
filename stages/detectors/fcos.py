"""FCOS (Tian et al. 2019) from torchvision's pieces, driven on our padded batch.

One point per location (contract anchors: stride-sized boxes whose centres are the points),
centre sampling (radius 1.5 strides) inside the GT, per-level scale ranges (0-64-128-256-512-inf
on the largest regression distance), ambiguity -> the smallest GT; focal + GIoU + centerness BCE
losses and post-processing (score = sqrt(cls * centerness)) are torchvision's. The state_dict is
key-for-key that of `torchvision.models.detection.fcos_resnet50_fpn`.
Normalisers: the batch's foreground count (at least 1) for all three losses, as torchvision's
`FCOSHead.compute_loss`; under DDP it stays per rank, as in torchvision (nothing there reduces it
across processes). mmdetection's FCOSHead, whose loss differs anyway (centerness-weighted GIoU over
the centerness sum), takes the mean over ranks of num_pos and of the centerness sum instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS as TVFCOS

from stages.config import ModelParams
from stages.detectors.backbone import STRIDES
from stages.detectors.base import IGNORE, DenseDetector
from stages.detectors.box_coding import FCOS_CODER
from stages.detectors.contract import DetectorOutput
from stages.detectors.heads import FCOSDenseHead, Scale


def point_anchors() -> AnchorGenerator:
    """One stride-sized square per location (FCOS points, also GFL's contract anchors)."""
    return AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))


def fcos_match(anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor, radius: float = 1.5) -> Tensor:
    """torchvision's FCOS assignment (in `FCOS.compute_loss`), as a function: [N] GT index or -1."""
    if gt_boxes.numel() == 0:
        return torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device)
    gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    anchor_sizes = anchors[:, 2] - anchors[:, 0]
    # centre sampling: the point is within radius * stride of the GT centre ...
    match = (anchor_centers[:, None, :] - gt_centers[None, :, :]).abs_().max(
        dim=2
    ).values < radius * anchor_sizes[:, None]
    x, y = anchor_centers.unsqueeze(dim=2).unbind(dim=1)
    x0, y0, x1, y1 = gt_boxes.unsqueeze(dim=0).unbind(dim=2)
    dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)  # [N, G, 4]
    # ... and inside the GT ...
    match &= dist.min(dim=2).values > 0
    # ... and the GT's extent suits the level
    lower = anchor_sizes * 4
    lower[: num_per_level[0]] = 0
    upper = anchor_sizes * 8
    upper[-num_per_level[-1] :] = float("inf")
    extent = dist.max(dim=2).values
    match &= (extent > lower[:, None]) & (extent < upper[:, None])
    # several GTs: the smallest wins
    areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    ranked = match.to(torch.float32) * (1e8 - areas[None, :])
    best, matched = ranked.max(dim=1)
    matched[best < 1e-5] = -1
    return matched


class FCOSDetector(DenseDetector):
    arch = "fcos"
    has_quality = True

    def __init__(self, cfg: ModelParams, num_classes: int):
        super().__init__(cfg, num_classes, cfg.head_convs, reuse_index=2)
        self.anchor_generator = point_anchors()
        self.num_anchors, self.box_dim, self.reg_max = 1, 4, 0
        self.head = build_fcos_head(cfg, num_classes)
        self.center_sampling_radius = 1.5
        self.box_coder = FCOS_CODER

    def match(self, anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor) -> Tensor:
        return fcos_match(anchors, num_per_level, gt_boxes, self.center_sampling_radius)

    def compute_losses(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        anchors, matched = self.matches(out, targets)
        heads = self.head_outputs(out)
        ignored = torch.stack(matched) == IGNORE  # [B, N]: crowd regions
        if bool(ignored.any()):
            # torchvision's FCOS loss has no ignore: a constant very negative logit there has zero
            # focal loss and no gradient, which is what leaving those points out means
            heads["cls_logits"] = torch.where(ignored[..., None], torch.full_like(heads["cls_logits"], -1e4),
                                              heads["cls_logits"])
        losses = self.head.compute_loss(targets, heads, [anchors] * len(targets), matched)
        return {
            "cls": losses["classification"],
            "box": losses["bbox_regression"],
            "ctrness": losses["bbox_ctrness"],
        }

    def tv_postprocess(self, head_outputs, anchors, image_sizes):
        return TVFCOS.postprocess_detections(self, head_outputs, anchors, image_sizes)


class MMDetFCOSHead(FCOSDenseHead):
    """mmdetection's FCOSHead with `norm_on_bbox` and `centerness_on_reg` (the 'center-normbbox-
    centeronreg' configs): torchvision's head plus a learnable `Scale` per level on the regression,
    relu(scale * conv) in stride units. (mmdet's convs before GN have no bias: imported as zero.)"""

    def __init__(self, in_channels: int, num_classes: int, num_convs: int = 4, num_levels: int = 5):
        super().__init__(in_channels, 1, num_classes, num_convs)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

    def predict(self, level: int, cls_feat: Tensor, reg_feat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        reg = self.regression_head
        return (
            self.classification_head.cls_logits(cls_feat),
            F.relu(self.scales[level](reg.bbox_reg(reg_feat))),
            reg.bbox_ctrness(reg_feat),
        )


def build_fcos_head(cfg: ModelParams, num_classes: int) -> FCOSDenseHead:
    if cfg.variant in ("mmdet", "mmdet_caffe"):
        return MMDetFCOSHead(cfg.fpn_channels, num_classes, cfg.head_convs)
    return FCOSDenseHead(cfg.fpn_channels, 1, num_classes, cfg.head_convs)
