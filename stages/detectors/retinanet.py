"""RetinaNet (Lin et al. 2017) from torchvision's pieces, driven on our padded batch.

Head, anchors (3 scales x 3 ratios, 32..512 px on P3..P7, A = 9), IoU matcher (fg 0.5, bg 0.4,
plus each GT's best anchors), focal + L1 losses and post-processing are torchvision's; the
state_dict is key-for-key that of `torchvision.models.detection.retinanet_resnet50_fpn`
(with fpn_channels 256, head_convs 4); `variant` 'tv_v2' is `retinanet_resnet50_fpn_v2` (GN head,
P6 from C5, GIoU loss) and 'mmdet' mmdetection's RetinaNet (P6 from C5, no ReLU before P7, unrounded
anchors, same head and box coder).
Normalisers (torchvision's): each image's loss over its own foreground count (at least 1), averaged
over the batch's images; under DDP nothing is reduced across processes (as torchvision, and as
mmdetection's RetinaHead, whose batch avg_factor is per rank too). Per-image normalisation makes
DDP's gradient average equal the global batch's loss when every rank has the same batch size.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNet as TVRetinaNet
from torchvision.ops import boxes as box_ops

from stages.config import ModelParams
from stages.detectors.base import DenseDetector
from stages.detectors.box_coding import RETINANET_CODER
from stages.detectors.contract import DetectorOutput
from stages.detectors.heads import RetinaNetDenseHead


class ExactAnchorGenerator(AnchorGenerator):
    """mmdetection's anchors: the same boxes as torchvision's, but neither the octave sizes
    (32 * 2^(1/3) = 40.32, not 40) nor the corners are rounded (torchvision rounds both)."""

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)  # ratio-major, scale-minor: both libraries
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


def retinanet_anchors(base: int = 32, exact: bool = False) -> AnchorGenerator:
    """torchvision's RetinaNet anchors: sizes base..16*base on P3..P7 (3 octave scales each) x ratios
    0.5, 1, 2; base 32 is torchvision's (and what its checkpoints were trained with). `exact`:
    mmdetection's unrounded sizes (octave_base_scale 4 x stride, scales_per_octave 3)."""
    if exact:
        sizes = tuple(tuple(base * 2**i * 2 ** (j / 3) for j in range(3)) for i in range(5))
        return ExactAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [base * 2**i for i in range(5)])
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def anchor_layout(params: dict) -> tuple | None:
    """The per-level anchor sizes (px, rounded to 0.01) of a RetinaNet built from these model params (a
    ModelParams dict, e.g. a cache's teacher_arch); None for other archs or without `anchor_size`.
    Per-anchor targets (class and box maps, candidates) mean the same boxes only between detectors of
    (nearly) equal layouts (`stages.losses.registry` checks)."""
    if params.get("arch") != "retinanet" or "anchor_size" not in params:  # not RetinaNet, or not said
        return None
    gen = retinanet_anchors(int(params.get("anchor_size", 32)), exact=params.get("variant") in ("mmdet", "mmdet_caffe"))
    return tuple(tuple(round(float(x), 2) for x in level) for level in gen.sizes)


class RetinaNetDetector(DenseDetector):
    arch = "retinanet"

    def __init__(self, cfg: ModelParams, num_classes: int):
        super().__init__(cfg, num_classes, cfg.head_convs, reuse_index=3)
        self.anchor_size = cfg.anchor_size
        self.anchor_generator = retinanet_anchors(cfg.anchor_size, exact=cfg.variant in ("mmdet", "mmdet_caffe"))
        self.num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        self.box_dim, self.reg_max = 4, 0
        self.head = build_retinanet_head(cfg, num_classes)
        self.proposal_matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
        self.box_coder = RETINANET_CODER

    def match(self, anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor) -> Tensor:
        if gt_boxes.numel() == 0:
            return anchors.new_full((len(anchors),), -1, dtype=torch.int64)
        return self.proposal_matcher(box_ops.box_iou(gt_boxes, anchors))

    def compute_losses(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        anchors, matched = self.matches(out, targets)
        losses = self.head.compute_loss(targets, self.head_outputs(out), [anchors] * len(targets), matched)
        return {"cls": losses["classification"], "box": losses["bbox_regression"]}

    def tv_postprocess(self, head_outputs, anchors, image_sizes):
        return TVRetinaNet.postprocess_detections(self, head_outputs, anchors, image_sizes)


def build_retinanet_head(cfg: ModelParams, num_classes: int) -> RetinaNetDenseHead:
    return RetinaNetDenseHead(
        cfg.fpn_channels, retinanet_anchors().num_anchors_per_location()[0], num_classes, cfg.head_convs,
        group_norm=cfg.variant == "tv_v2",
    )
