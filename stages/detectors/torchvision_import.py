"""Recognise a torchvision-style detection state_dict from its key names and shapes.

torchvision's COCO checkpoints (and raw state_dicts of our own zoo, whose keys are torchvision's)
carry no architecture: it is read off the weights, so `teacher.model` need not describe them.

  retinanet_resnet50_fpn      head.classification_head.conv.N.0.weight, cls_logits [A*K, ...], P6 from P5
  retinanet_resnet50_fpn_v2   the same towers with GroupNorm (conv.N.1.weight), P6 from C5 (p6 in = 2048)
  fcos_resnet50_fpn           head.regression_head.bbox_ctrness (GN towers)
  fasterrcnn_resnet50_fpn     rpn.head.*, roi_heads.box_head.fc6/fc7, FPN on C2..C5 (4 inner blocks)
  fasterrcnn_resnet50_fpn_v2  roi_heads.box_head.N.0 (4 convs + fc), two-conv RPN head, BN in the FPN
  our GFL                     head.scales.N.scale
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from stages.detectors.label_space import LabelSpace, torchvision_coco, unnamed

DEPTHS = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}


@dataclass(frozen=True)
class Recognised:
    """What a state_dict holds: zoo architecture fields, class outputs, label space, a display name."""

    fields: dict  # ModelParams fields: arch, backbone, fpn_channels, head_convs, reg_max, variant
    num_outputs: int  # classes in the zoo's numbering (Faster R-CNN: without background)
    label_space: LabelSpace
    name: str  # e.g. 'torchvision retinanet_resnet50_fpn_v2'


def _count(weights: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in weights if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def resnet_name(weights: dict, prefix: str) -> str:
    """resnet18/34/50/101 from the block counts under `prefix` (e.g. 'backbone.body.')."""
    bottleneck = f"{prefix}layer1.0.conv3.weight" in weights
    blocks = _count(weights, rf"{re.escape(prefix)}layer3\.(\d+)\.")
    name = DEPTHS.get((bottleneck, blocks))
    if name is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise ValueError(f"a ResNet with {blocks} {kind} blocks in layer3 is not one of {', '.join(DEPTHS.values())}")
    return name


def _shape(weights: dict, key: str) -> tuple[int, ...]:
    if key not in weights:
        raise ValueError(f"lacks {key}: a partial or damaged file")
    value = weights[key]
    return tuple(value.shape) if isinstance(value, Tensor) else ()


OLD_LAYOUT = [  # torchvision < 0.13 files (the v1 COCO downloads): plain convs, before Conv2dNormActivation
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), lambda m: f"{m[1]}.0.{m[2]}"),
    (re.compile(r"^(rpn\.head\.conv)\.(weight|bias)$"), lambda m: f"{m[1]}.0.0.{m[2]}"),
    (re.compile(r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)$"),
     lambda m: f"{m[1]}.{int(m[2]) // 2}.0.{m[3]}"),  # (conv, ReLU) pairs -> one block per conv
]


def upgrade_keys(weights: dict) -> dict:
    """Rename the pre-0.13 layout of torchvision's detection keys to the current one (what its own
    `_load_from_state_dict` version hooks do; we do it by name, since a plain dict has no versions)."""
    if any(".conv.0.0." in k or ".inner_blocks.0.0." in k for k in weights):
        return weights  # already current (and FCOS's flat GN towers must not be renamed)
    out = {}
    for key, value in weights.items():
        for rx, fn in OLD_LAYOUT:
            if m := rx.match(key):
                key = fn(m)
                break
        out[key] = value
    return out


def recognise(weights: dict) -> Recognised | None:
    """The architecture of a torchvision-style state_dict (already `upgrade_keys`'d), or None if the
    keys are not torchvision's. Raises ValueError (one line, naming the key) for an incomplete file.
    """
    if "backbone.body.conv1.weight" not in weights:
        return None
    backbone = resnet_name(weights, "backbone.body.")
    inner = _count(weights, r"backbone\.fpn\.inner_blocks\.(\d+)\.")
    key = "backbone.fpn.inner_blocks.0.0.weight"
    if key not in weights:
        key = "backbone.fpn.inner_blocks.0.weight"  # torchvision < 0.13 layout (converted on load)
    if key not in weights:
        raise ValueError("torchvision-style backbone without an FPN (backbone.fpn.inner_blocks.0.*)")
    fpn = _shape(weights, key)[0]
    c5 = 2048 if backbone in ("resnet50", "resnet101") else 512
    fields = {"backbone": backbone, "fpn_channels": fpn, "head_convs": 4, "reg_max": 16, "variant": ""}
    if "roi_heads.box_predictor.cls_score.weight" in weights:
        outputs = _shape(weights, "roi_heads.box_predictor.cls_score.weight")[0] - 1  # background is not a class
        v2 = "roi_heads.box_head.0.0.weight" in weights
        variant = ("tv_v2" if v2 else "tv_v1") if inner == 4 else ""
        if v2 and inner != 4:
            raise ValueError("a 4conv1fc box head (roi_heads.box_head.0.0.weight) needs torchvision's C2..C5 FPN")
        fields.update(arch="faster_rcnn", variant=variant)  # head_convs: unused
        name = f"fasterrcnn_{backbone}_fpn" + ("_v2" if v2 else "") if variant else "kdcache faster_rcnn (P3..P7)"
        space = torchvision_coco(faster_rcnn=True) if outputs == 90 else unnamed(outputs)
        return Recognised(fields, outputs, space, f"torchvision {name}" if variant else name)
    if "head.classification_head.cls_logits.weight" not in weights:
        raise ValueError("torchvision-style backbone but no known head (head.classification_head.cls_logits or "
                         "roi_heads.box_predictor): not a RetinaNet, FCOS, GFL or Faster R-CNN state_dict")
    cls_rows = _shape(weights, "head.classification_head.cls_logits.weight")[0]
    fcos = "head.regression_head.bbox_ctrness.weight" in weights
    if "head.scales.0.scale" in weights and not fcos:  # our GFL: GN towers of conv, GN, ReLU
        convs = _count(weights, r"head\.classification_head\.conv\.(\d+)\.weight")
        reg_max = _shape(weights, "head.regression_head.bbox_reg.weight")[0] // 4 - 1
        fields.update(arch="gfl", head_convs=(convs + 2) // 3, reg_max=reg_max)
        return Recognised(fields, cls_rows, unnamed(cls_rows), "kdcache gfl")
    convs = _count(weights, r"head\.classification_head\.conv\.(\d+)\.")
    fields["head_convs"] = convs
    if fcos:  # flat towers: conv, GN, ReLU per layer; per-level scales: the zoo's mmdet FCOS head
        fields.update(arch="fcos", head_convs=(convs + 1) // 3, variant="mmdet" if "head.scales.0.scale" in weights else "")
        space = torchvision_coco() if cls_rows == 91 else unnamed(cls_rows)
        return Recognised(fields, cls_rows, space, f"torchvision fcos_{backbone}_fpn")
    anchors = _shape(weights, "head.regression_head.bbox_reg.weight")[0] // 4
    if anchors != 9 or cls_rows % anchors:
        raise ValueError(f"RetinaNet head with {anchors} anchors per location (bbox_reg rows / 4); expected 9")
    outputs = cls_rows // anchors
    gn = "head.classification_head.conv.0.1.weight" in weights
    p6_in = _shape(weights, "backbone.fpn.extra_blocks.p6.weight")[1] if "backbone.fpn.extra_blocks.p6.weight" in weights else fpn
    if gn != (p6_in == c5 and c5 != fpn):
        raise ValueError("RetinaNet with a GN head but P6 from P5 (or the reverse): neither torchvision v1 nor v2")
    fields.update(arch="retinanet", variant="tv_v2" if gn else "")
    space = torchvision_coco() if outputs == 91 else unnamed(outputs)
    return Recognised(fields, outputs, space, f"torchvision retinanet_{backbone}_fpn" + ("_v2" if gn else ""))
