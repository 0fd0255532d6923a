"""The whole detector as one function a runtime can hold: image -> (boxes, scores, labels).

`Deployable` wraps a zoo detector and computes, for ONE image:

  inputs   image          float32 [1, 3, h, w], RGB in [0, 1], already resized by the eval view
                          (shorter side min_size, longer side <= max_size, PIL bilinear: what
                          `stages.data.views.View.apply` does; the caller does this resize);
           original_size  int64 [2], (H, W) of the image before that resize
  outputs  boxes          float32 [N, 4] xyxy in the ORIGINAL image's pixels, clipped to it
           scores         float32 [N], descending
           labels         int64 [N], the user's json category ids (not the 0-based indices)

Inside: zero padding to the coarsest stride, the detector's own normalisation, backbone, head,
anchors, box decoding, score threshold, per-level top-k, class-wise NMS (torchvision's ops, which
export), then the map back to the original frame (`View.boxes_to_original`) and to category ids.
It runs the detector's modules, not a copy of them, so its detections are kdcache's eval-mode
detections of a batch holding that one image.

Written to trace: every size is read off a tensor's shape, so `torch.jit.trace` (and the
TorchScript-based ONNX exporter built on it) record them as graph operations and the result
holds for any input size, not only the example's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.detectors.backbone import PAD_MULTIPLE
from stages.detectors.base import DenseDetector
from stages.detectors.contract import DetectorOutput

INPUT_NAMES = ("image", "original_size")
OUTPUT_NAMES = ("boxes", "scores", "labels")
NO_CLIP = 1 << 30  # an image size no box reaches


class Deployable(nn.Module):
    """A dense zoo detector (RetinaNet, FCOS, GFL) as image -> boxes, scores, category ids."""

    def __init__(self, detector: DenseDetector, category_ids: list[int]):
        super().__init__()
        if not isinstance(detector, DenseDetector):
            raise ValueError(f"{getattr(detector, 'arch', type(detector).__name__)} is not a dense detector; "
                             "whole-graph export covers retinanet, fcos and gfl")
        if len(category_ids) != detector.num_classes:
            raise ValueError(f"{len(category_ids)} category ids for a detector of {detector.num_classes} classes")
        self.detector = detector.eval()
        self.register_buffer("category_ids", torch.tensor([int(c) for c in category_ids], dtype=torch.int64))

    def forward(self, image: Tensor, original_size: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        det = self.detector
        h, w = image.shape[-2], image.shape[-1]
        x = image.flip(1) if det.bgr else image
        # normalise, then pad with zeros: the zoo's normalize_batch result (padding exactly 0)
        x = (x - det.image_mean[:, None, None]) / det.image_std[:, None, None]
        x = F.pad(x, (0, (w + PAD_MULTIPLE - 1) // PAD_MULTIPLE * PAD_MULTIPLE - w,
                      0, (h + PAD_MULTIPLE - 1) // PAD_MULTIPLE * PAD_MULTIPLE - h))
        fpn = list(det.backbone(x).values())
        out = det.head(fpn)
        view_hw = torch._shape_as_tensor(image)[2:].to(torch.float32)  # (h, w), a graph value under tracing
        # torchvision's post-processing clips decoded boxes to the image before NMS, but would record the
        # example's size as a constant in a trace: its clip gets a size no box reaches, and the decoder
        # clips first, to the size read off the tensor (the same clamp, so the same values)
        dense = DetectorOutput(fpn=fpn, strides=list(det.strides), image_sizes=[(NO_CLIP, NO_CLIP)],
                               cls_logits=out.cls_logits, box_reg=out.box_reg, quality=out.quality,
                               anchors=det.anchors(fpn))
        coder = det.box_coder
        det.box_coder = ClippingCoder(coder, view_hw.flip(0).repeat(2))
        try:
            found = det.postprocess(dense)[0]
        finally:
            det.box_coder = coder
        # view frame -> original frame and clip there: View.boxes_to_original (no flip at eval)
        orig_hw = original_size.to(torch.float32)
        boxes = found["boxes"] * (orig_hw / view_hw).flip(0).repeat(2)
        boxes = torch.minimum(boxes.clamp(min=0), orig_hw.flip(0).repeat(2))
        return boxes, found["scores"], self.category_ids[found["labels"]]


class ClippingCoder:
    """A detector's box coder whose decoded boxes are clipped to `limit` ([w, h, w, h]) as
    torchvision's `clip_boxes_to_image` does (clamp to [0, w] / [0, h])."""

    def __init__(self, coder, limit: Tensor):
        self.coder, self.limit = coder, limit

    def _clip(self, boxes: Tensor) -> Tensor:
        return torch.minimum(boxes.clamp(min=0), self.limit.to(boxes.dtype))

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        return self._clip(self.coder.decode_single(rel_codes, boxes))

    def decode(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        return self._clip(self.coder.decode(rel_codes, boxes))
