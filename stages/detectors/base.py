"""What every detector in the zoo shares: input handling, the backbone, and the dense-detector flow.

Inputs are already resized (by our View) and padded: [B, 3, H, W] floats in [0, 1] with H, W
multiples of 128, plus each image's valid (h, w). Nothing is resized here (no torchvision
`GeneralizedRCNNTransform`); ImageNet normalisation happens inside and zeroes the padding.
Targets are per image {'boxes': [N, 4] xyxy input pixels, 'labels': [N] int64, 0-based}.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator

from stages.config import ModelParams
from stages.detectors.backbone import IMAGENET_MEAN, IMAGENET_STD, STRIDES, build_backbone, normalize_batch
from stages.detectors.contract import DetectorOutput, flatten_levels
from stages.detectors.heads import TowerHead

CAFFE_MEAN = (103.530 / 255, 116.280 / 255, 123.675 / 255)  # BGR, in [0, 1] units
CAFFE_STD = (1 / 255, 1 / 255, 1 / 255)  # x / (1/255) - mean = 255 x - mean: caffe's 0-255 input
TOPK_CANDIDATES = 1000  # per level, before NMS (torchvision's RetinaNet/FCOS default)
CROWD_IOF = 0.5  # a negative anchor covered more than this by an iscrowd region is ignored
IGNORE = -2  # `match` value of an ignored anchor (torchvision's Matcher.BETWEEN_THRESHOLDS)


class Detector(nn.Module):
    """Base class: backbone + normalisation + the attributes the rest of the project reads.

    Attributes: arch, num_classes, strides, fpn_channels, head_convs, reg_max, num_anchors (A per
    location), box_dim (R), has_quality, dense, default_reuse_index (CrossKD), score_thresh,
    nms_thresh, detections_per_img.
    """

    arch: str = ""
    dense: bool = True
    has_quality: bool = False

    def __init__(self, cfg: ModelParams, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.fpn_channels = cfg.fpn_channels
        self.strides = list(STRIDES)
        self.score_thresh = cfg.score_thresh
        self.nms_thresh = cfg.nms_thresh
        self.detections_per_img = cfg.detections_per_img
        self.topk_candidates = TOPK_CANDIDATES
        self.variant = cfg.variant
        self.backbone = self.make_backbone(cfg)
        # not persistent: state_dicts stay key-for-key torchvision's
        # caffe-style weights (mmdet style='caffe') see BGR in 0-255 minus the mean, std 1
        self.bgr = cfg.variant == "mmdet_caffe"
        mean, std = (CAFFE_MEAN, CAFFE_STD) if self.bgr else (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("image_mean", torch.tensor(mean), persistent=False)
        self.register_buffer("image_std", torch.tensor(std), persistent=False)

    def make_backbone(self, cfg: ModelParams) -> nn.Module:
        return build_backbone(cfg.backbone, cfg.fpn_channels, cfg.pretrained_backbone, cfg.variant, self.arch)

    def extract(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> OrderedDict[str, Tensor]:
        """Normalised padded batch -> FPN {'0': P3, '1': P4, '2': P5, 'p6': P6, 'p7': P7}."""
        if self.bgr:
            images = images.flip(1)
        return self.backbone(normalize_batch(images, image_sizes, self.image_mean, self.image_std))

    def prepare_targets(
        self, targets: list[dict[str, Tensor]], device: torch.device
    ) -> list[dict[str, Tensor]]:
        """GT on the model's device: boxes float32 [N, 4], labels int64 [N] checked against K."""
        out = []
        for i, t in enumerate(targets):
            boxes = torch.as_tensor(t["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
            labels = torch.as_tensor(t["labels"], dtype=torch.int64, device=device).reshape(-1)
            if len(boxes) != len(labels):
                raise ValueError(f"target {i}: {len(boxes)} boxes but {len(labels)} labels")
            target = {"boxes": boxes, "labels": labels}
            if "crowd_boxes" in t:  # iscrowd regions: ignored by the assignment, never positives
                target["crowd_boxes"] = torch.as_tensor(t["crowd_boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
            out.append(target)
        labels = torch.cat([t["labels"] for t in out]) if out else torch.zeros(0)
        if len(labels) and not bool(
            ((labels >= 0) & (labels < self.num_classes)).all()
        ):  # one sync per batch
            raise ValueError(f"target labels must be 0-based class indices < {self.num_classes}")
        return out

    def postprocess(self, out: DetectorOutput) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def candidates(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> list[list[Tensor]]:
        raise TypeError(f"{self.arch} is not a dense detector: it has no per-anchor candidates")


def ignore_crowd(anchors: Tensor, matched: Tensor, crowd: Tensor | None, thresh: float = CROWD_IOF) -> Tensor:
    """Mark negatives whose intersection with an iscrowd region exceeds `thresh` of the anchor's own
    area (IoF, mmdet's `ignore_iof_thr`) as IGNORE: they are neither positives nor negatives."""
    if crowd is None or crowd.numel() == 0:
        return matched
    lt = torch.maximum(anchors[:, None, :2], crowd[None, :, :2])
    rb = torch.minimum(anchors[:, None, 2:], crowd[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)  # [N, M]
    area = (anchors[:, 2:] - anchors[:, :2]).clamp(min=1e-6).prod(dim=1)
    covered = (inter / area[:, None]).amax(dim=1) > thresh
    return torch.where((matched < 0) & covered, torch.full_like(matched, IGNORE), matched)


def crosskd_run_from_index(paper_index: int, head_convs: int) -> int:
    """CrossKD's reuse index in the paper's numbering -> the 0-based `head.run_from` layer.

    The official `reused_teacher_head_idx = k` hands the pre-activation output of the student's
    k-th tower conv to the teacher head, which continues from there: `run_from(k - 1, ...)`,
    clamped to the tower depth.
    """
    return max(0, min(paper_index, head_convs) - 1)


def as_sizes(image_sizes) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in image_sizes]


class DenseDetector(Detector):
    """Backbone + a `TowerHead` + anchors; subclasses give the anchor generator, matching and losses.

    `self` also carries what torchvision's `postprocess_detections` reads (box_coder, score_thresh,
    nms_thresh, detections_per_img, topk_candidates), so subclasses reuse it unbound.
    """

    head: TowerHead
    anchor_generator: AnchorGenerator

    def __init__(self, cfg: ModelParams, num_classes: int, head_convs: int, reuse_index: int):
        super().__init__(cfg, num_classes)
        self.head_convs = head_convs
        self.paper_reuse_index = reuse_index  # CrossKD's `reused_teacher_head_idx` default (3; FCOS 2)
        self.default_reuse_index = crosskd_run_from_index(reuse_index, head_convs)

    def anchors(self, fpn: list[Tensor]) -> list[Tensor]:
        """Per level [H_l*W_l*A, 4] xyxy, (y, x, anchor) order: the contract's flattened index space."""
        device = fpn[0].device
        grids = [list(f.shape[-2:]) for f in fpn]
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        self.anchor_generator.set_cell_anchors(torch.float32, device)
        return self.anchor_generator.grid_anchors(grids, strides)

    def forward(
        self,
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        with_detections: bool = False,
    ) -> DetectorOutput:
        image_sizes = as_sizes(image_sizes)
        fpn = list(self.extract(images, image_sizes).values())
        if len(fpn) != len(self.strides):
            raise RuntimeError(f"backbone gave {len(fpn)} levels, expected {len(self.strides)}")
        h = self.head(fpn)
        out = DetectorOutput(
            fpn=fpn,
            strides=list(self.strides),
            image_sizes=image_sizes,
            cls_tower=h.cls_tower,
            reg_tower=h.reg_tower,
            cls_logits=h.cls_logits,
            box_reg=h.box_reg,
            quality=h.quality,
            anchors=self.anchors(fpn),
        )
        if targets is not None:
            if len(targets) != images.shape[0]:
                raise ValueError(f"{len(targets)} targets for a batch of {images.shape[0]}")
            out.losses = self.compute_losses(out, self.prepare_targets(targets, images.device))
        if with_detections:
            out.detections = self.postprocess(out)
        return out

    def match(self, anchors: Tensor, num_per_level: list[int], gt_boxes: Tensor) -> Tensor:
        """The assigner: [N] int64 per anchor, the index of its GT if positive, else < 0."""
        raise NotImplementedError

    def compute_losses(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        raise NotImplementedError

    def matches(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> tuple[Tensor, list[Tensor]]:
        """Flattened anchors [N, 4] and each image's `match` result."""
        anchors = torch.cat(out.anchors)
        per_level = [len(a) for a in out.anchors]
        return anchors, [ignore_crowd(anchors, self.match(anchors, per_level, t["boxes"]), t.get("crowd_boxes"))
                         for t in targets]

    def candidates(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> list[list[Tensor]]:
        """Per image, per GT: indices into the flattened anchors the assigner makes positive for it."""
        device = out.anchors[0].device
        targets = self.prepare_targets(targets, device)
        _, matched = self.matches(out, targets)
        return [
            [torch.nonzero(m == g).flatten() for g in range(len(t["boxes"]))]
            for m, t in zip(matched, targets)
        ]

    def head_outputs(self, out: DetectorOutput, per_level: bool = False) -> dict:
        """torchvision's head-output dict ([B, HWA, X] float32), whole or split per level."""
        maps = {
            "cls_logits": (out.cls_logits, self.num_classes),
            "bbox_regression": (out.box_reg, self.box_dim),
        }
        if out.quality:
            maps["bbox_ctrness"] = (out.quality, 1)
        if per_level:
            return {k: [flatten_levels([m], x).float() for m in ms] for k, (ms, x) in maps.items()}
        return {k: flatten_levels(ms, x).float() for k, (ms, x) in maps.items()}

    @torch.no_grad()
    def postprocess(self, out: DetectorOutput) -> list[dict[str, Tensor]]:
        """Threshold, top-k per level, decode, clip to each image, class-wise NMS, keep the best."""
        anchors = [list(out.anchors)] * len(out.image_sizes)
        dets = self.tv_postprocess(self.head_outputs(out, per_level=True), anchors, out.image_sizes)
        return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"].long()} for d in dets]

    def tv_postprocess(self, head_outputs: dict, anchors: list[list[Tensor]], image_sizes) -> list[dict]:
        raise NotImplementedError
