"""Faster R-CNN (Ren et al. 2015) from torchvision's `rpn` and `roi_heads`, driven on our padded batch.

Same P3..P7 backbone as the dense detectors, so feature-level KD lines up across the zoo. The
RPN runs on all five levels (anchors 32..512 px, ratios 0.5/1/2, A = 3); RoIAlign pools from
P3..P5. Labels are 0-based for us; torchvision's box predictor has K + 1 outputs with 0 =
background, so labels are shifted by one on the way in and out. State_dict keys are
torchvision's (`backbone.*`, `rpn.*`, `roi_heads.*`), so a `torchvision.models.detection.FasterRCNN`
built on this backbone layout (returned layers 2-4 + `LastLevelP6P7`) loads as is; torchvision's
`fasterrcnn_resnet50_fpn` uses P2..P6 instead and does not.

`variant` 'tv_v1' / 'tv_v2' is torchvision's own layout, so `fasterrcnn_resnet50_fpn(_v2)` COCO
checkpoints load key for key: FPN on C2..C5 plus a max-pooled P6 (strides 4..64), RoIAlign on
P2..P5; v2 adds BatchNorm in the FPN, a two-conv RPN head and the 4conv1fc box head. Its contract
`fpn` is P3..P7 like every other detector (P3..P6 as computed, P7 = P6 subsampled by 2, as
torchvision's `LastLevelMaxPool` makes P6 from P5), so feature KD lines up with any student; P2
is used by the RPN and RoI heads but not cached.

Dense contract fields stay empty; `detections` is filled with `with_detections=True`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from stages.config import ModelParams
from stages.detectors.base import Detector, as_sizes
from stages.detectors.contract import DetectorOutput

LEVEL_NAMES = ["0", "1", "2", "p6", "p7"]  # BackboneWithFPN's keys for P3..P7
ROI_LEVELS = ["0", "1", "2"]  # P3..P5
REPRESENTATION = 1024  # torchvision's TwoMLPHead width
TV_LEVELS = ["0", "1", "2", "3", "pool"]  # torchvision's layout: P2..P6
TV_ROI_LEVELS = ["0", "1", "2", "3"]  # P2..P5


def tv_backbone(name: str, fpn_channels: int, v2: bool) -> BackboneWithFPN:
    """torchvision's `_resnet_fpn_extractor` layout for Faster R-CNN: C2..C5 + max-pooled P6."""
    net = getattr(resnet, name)(weights=None)
    c5 = net.fc.in_features
    return BackboneWithFPN(
        net,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[c5 // 8, c5 // 4, c5 // 2, c5],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=nn.BatchNorm2d if v2 else None,
    )


class FasterRCNNDetector(Detector):
    arch = "faster_rcnn"
    dense = False

    def __init__(self, cfg: ModelParams, num_classes: int):
        super().__init__(cfg, num_classes)
        self.head = None  # no dense head: CrossKD / candidates do not apply
        self.head_convs, self.reg_max, self.num_anchors, self.box_dim = 0, 0, 0, 0
        self.default_reuse_index = -1
        c = cfg.fpn_channels
        v2 = cfg.variant == "tv_v2"
        self.level_names = TV_LEVELS if self.tv_layout else LEVEL_NAMES
        self.first_stride = 4 if self.tv_layout else self.strides[0]
        anchor_gen = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        self.rpn = RegionProposalNetwork(
            anchor_gen,
            RPNHead(c, anchor_gen.num_anchors_per_location()[0], conv_depth=2 if v2 else 1),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n={"training": 2000, "testing": 1000},
            post_nms_top_n={"training": 2000, "testing": 1000},
            nms_thresh=0.7,
        )
        pool = MultiScaleRoIAlign(
            featmap_names=TV_ROI_LEVELS if self.tv_layout else ROI_LEVELS, output_size=7, sampling_ratio=2
        )
        box_head = (
            FastRCNNConvFCHead((c, 7, 7), [256] * 4, [REPRESENTATION], norm_layer=nn.BatchNorm2d)
            if v2
            else TwoMLPHead(c * 7 * 7, REPRESENTATION)
        )
        self.roi_heads = RoIHeads(
            pool,
            box_head,
            FastRCNNPredictor(REPRESENTATION, num_classes + 1),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=512,
            positive_fraction=0.25,
            bbox_reg_weights=None,
            score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_thresh,
            detections_per_img=cfg.detections_per_img,
        )

    @property
    def tv_layout(self) -> bool:
        return self.variant in ("tv_v1", "tv_v2")

    def make_backbone(self, cfg: ModelParams) -> nn.Module:
        if cfg.variant in ("tv_v1", "tv_v2"):
            return tv_backbone(cfg.backbone, cfg.fpn_channels, v2=cfg.variant == "tv_v2")
        return super().make_backbone(cfg)

    def contract_fpn(self, features: OrderedDict[str, Tensor]) -> list[Tensor]:
        """P3..P7 for the contract (see the module docstring for the torchvision layout)."""
        levels = list(features.values())
        if not self.tv_layout:
            return levels
        return levels[1:] + [F.max_pool2d(levels[-1], 1, 2, 0)]

    def forward(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        with_detections: bool = False,
    ) -> DetectorOutput:
        image_sizes = as_sizes(image_sizes)
        features = self.extract(images, image_sizes)
        out = DetectorOutput(fpn=self.contract_fpn(features), strides=list(self.strides), image_sizes=image_sizes)
        objectness, deltas, anchors, per_level, proposals = self._propose(features, image_sizes)
        if targets is not None:
            if len(targets) != images.shape[0]:
                raise ValueError(f"{len(targets)} targets for a batch of {images.shape[0]}")
            tv_targets = [
                {"boxes": t["boxes"], "labels": t["labels"] + 1}
                for t in self.prepare_targets(targets, images.device)
            ]
            out.losses = self._losses(features, objectness, deltas, anchors, proposals, tv_targets)
        if with_detections:
            with torch.no_grad():
                out.detections = self._detect(features, proposals, image_sizes)
        return out

    @torch.no_grad()
    def postprocess(self, out: DetectorOutput) -> list[dict[str, Tensor]]:
        """Detections from `out.fpn` alone (reruns the RPN and the box head)."""
        if self.tv_layout:
            raise ValueError("a torchvision-layout Faster R-CNN needs P2, which out.fpn lacks: "
                             "call forward(..., with_detections=True)")
        features = OrderedDict(zip(LEVEL_NAMES, out.fpn))
        proposals = self._propose(features, out.image_sizes)[-1]
        return self._detect(features, proposals, out.image_sizes)

    def _padded(self, features: OrderedDict[str, Tensor], n: int) -> list[tuple[int, int]]:
        h, w = next(iter(features.values())).shape[-2:]
        return [(h * self.first_stride, w * self.first_stride)] * n

    def _propose(self, features: OrderedDict[str, Tensor], image_sizes: list[tuple[int, int]]):
        """RPN forward (torchvision's `RegionProposalNetwork.forward` minus its training gate)."""
        rpn, levels = self.rpn, list(features.values())
        # the anchor generator reads only the padded size and the batch size from the ImageList
        padded = self._padded(features, len(image_sizes))[0]
        shape_only = levels[0].new_empty((len(image_sizes), 0, *padded))
        objectness, deltas = rpn.head(levels)
        anchors = rpn.anchor_generator(ImageList(shape_only, image_sizes), levels)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness, image_sizes, per_level)
        return objectness, deltas, anchors, per_level, boxes

    def _box_head(self, features, proposals: list[Tensor]) -> tuple[Tensor, Tensor]:
        heads = self.roi_heads
        # RoIAlign infers each level's scale from the feature size / the largest image size: give it
        # the padded size, since image_sizes may be smaller than the batch (scales would round wrong)
        x = heads.box_roi_pool(features, proposals, self._padded(features, len(proposals)))
        return heads.box_predictor(heads.box_head(x))

    def _losses(self, features, objectness, deltas, anchors, proposals, tv_targets) -> dict[str, Tensor]:
        rpn, heads = self.rpn, self.roi_heads
        labels, matched_boxes = rpn.assign_targets_to_anchors(anchors, tv_targets)
        reg_targets = rpn.box_coder.encode(matched_boxes, anchors)
        rpn_cls, rpn_box = rpn.compute_loss(objectness, deltas, labels, reg_targets)
        sampled, _, roi_labels, roi_targets = heads.select_training_samples(list(proposals), tv_targets)
        class_logits, box_regression = self._box_head(features, sampled)
        cls, box = fastrcnn_loss(class_logits, box_regression, roi_labels, roi_targets)
        return {"rpn_cls": rpn_cls, "rpn_box": rpn_box, "cls": cls, "box": box}

    def _detect(self, features, proposals: list[Tensor], image_sizes) -> list[dict[str, Tensor]]:
        class_logits, box_regression = self._box_head(features, proposals)
        boxes, scores, labels = self.roi_heads.postprocess_detections(
            class_logits.float(), box_regression.float(), proposals, image_sizes
        )
        return [{"boxes": b, "scores": s, "labels": lab - 1} for b, s, lab in zip(boxes, scores, labels)]
