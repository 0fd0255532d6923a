"""The student as torchvision's own detector: a state_dict plus a module of constructor code.

`export_torchvision` writes FILE (torch.save of {'state_dict', 'categories', ...}: tensors, lists,
strings; loads with weights_only=True) and FILE with suffix .py: `build_model()` calls torchvision's
`RetinaNet` / `FCOS` with its `BackboneWithFPN`, `AnchorGenerator` and heads, and `load(FILE)`
returns the model in eval mode. The module imports only torch and torchvision.

torchvision's transform resizes and normalises inside the model: it is given the eval view's
min_size / max_size and pads to 128 (the zoo's coarsest stride), so an image already resized by
the eval view (what `Deployable` takes) passes its resize at scale 1.0, an exact copy. Its boxes
are then in that resized image's pixels, labels 0-based indices into CATEGORY_IDS.

What maps exactly is checked, and anything else refused in one line (`torchvision_mismatch`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.detectors.backbone import gn_groups
from stages.export.ownership import MARK, PY_HEADER, write_whole
from stages.export.student import Student

TV_RETINANET_CONVS = 4  # torchvision's RetinaNetHead towers have 4 convs (no parameter for it)
TV_FCOS_GROUPS = 32  # torchvision's FCOSHead builds GroupNorm(32, C) (no parameter for it)
C5 = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def torchvision_mismatch(student: Student) -> str | None:
    """Why torchvision's classes cannot hold this student exactly, or None when they can."""
    m = student.cfg
    if m.arch == "gfl":
        return "gfl: torchvision has no GFL head (distribution box regression, joint class-IoU score)"
    if m.arch not in ("retinanet", "fcos"):
        return f"{m.arch}: the zoo's {m.arch} (P3-P7 FPN) is not one of torchvision's RetinaNet / FCOS layouts"
    if m.variant in ("mmdet", "mmdet_caffe"):
        return (f"variant {m.variant}: mmdetection's layout (P7 from P6 without a ReLU, unrounded anchors, "
                "per-level FCOS scales) is not torchvision's; export --format mmdet instead")
    if m.arch == "retinanet" and m.head_convs != TV_RETINANET_CONVS:
        return (f"head_convs={m.head_convs}: torchvision's RetinaNetHead has {TV_RETINANET_CONVS} convs per "
                "tower; train the student with student.model.head_convs=4, or export onnx/torchscript")
    needs_gn = m.arch == "fcos" or m.variant == "tv_v2"
    if needs_gn and gn_groups(m.fpn_channels) != TV_FCOS_GROUPS:
        return (f"fpn_channels={m.fpn_channels}: the student's head GroupNorm has {gn_groups(m.fpn_channels)} groups, "
                f"torchvision's has {TV_FCOS_GROUPS}; use an FPN width that is a multiple of 64")
    return None


def constructor_source(student: Student) -> str:
    """The .py module text: torchvision classes only, every number written out."""
    m, det = student.cfg, student.detector
    c, k = m.fpn_channels, det.num_classes
    c5 = C5[m.backbone]
    v2 = m.variant == "tv_v2"
    p6_in = c5 if v2 else c
    sizes = tuple(tuple(int(s) for s in level) for level in det.anchor_generator.sizes)
    ratios = tuple(tuple(float(r) for r in level) for level in det.anchor_generator.aspect_ratios)
    common = (f"min_size={student.min_size}, max_size={student.max_size}, image_mean={list(map(float, det.image_mean))}, "
              f"image_std={list(map(float, det.image_std))}, size_divisible=128,\n        "
              f"anchor_generator=AnchorGenerator({sizes}, {ratios}),\n        "
              f"score_thresh={det.score_thresh}, nms_thresh={det.nms_thresh}, "
              f"detections_per_img={det.detections_per_img}, topk_candidates={det.topk_candidates}")
    if m.arch == "retinanet":
        norm = ", norm_layer=partial(nn.GroupNorm, 32)" if v2 else ""
        head = f"RetinaNetHead({c}, {det.num_anchors}, {k}{norm})"
        model = f"RetinaNet(backbone, num_classes={k}, {common},\n        head={head})"
        imports = "from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead"
    else:
        head = f"FCOSHead({c}, 1, {k}, num_convs={m.head_convs})"
        model = f"FCOS(backbone, num_classes={k}, {common},\n        head={head})"
        imports = "from torchvision.models.detection.fcos import FCOS, FCOSHead"
    return f'''{PY_HEADER}
"""{student.describe()}, rebuilt with torchvision's own classes (torch and torchvision only).

Input: a list of [3, h, w] float32 RGB images in [0, 1], each resized so that its shorter side is
{student.min_size} and its longer side at most {student.max_size} (PIL bilinear: the size kdcache evaluated
the student at); the model's own resize is then an exact copy. Output: torchvision's dicts; boxes xyxy in
the resized image's pixels, labels 0-based: CATEGORY_IDS[label] is the json category id.
Source checkpoint sha256 {student.sha256}.
"""
from functools import partial  # noqa: F401  (used by GroupNorm heads)

import torch
from torch import nn  # noqa: F401
from torchvision.models import {m.backbone}
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
{imports}
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

CATEGORY_IDS = {student.category_ids!r}
CLASS_NAMES = {student.class_names!r}


def build_model():
    backbone = BackboneWithFPN(
        {m.backbone}(weights=None), return_layers={{"layer2": "0", "layer3": "1", "layer4": "2"}},
        in_channels_list={[c5 // 4, c5 // 2, c5]}, out_channels={c}, extra_blocks=LastLevelP6P7({p6_in}, {c}))
    return {model}


def load(path):
    """The student in eval mode, with the weights of the .pt file next to this module."""
    model = build_model()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    return model.eval()
'''


def export_torchvision(student: Student, out: Path, meta: dict) -> Path:
    """Write `out` (weights) and `out` with suffix .py (constructor); return the .py path."""
    why = torchvision_mismatch(student)
    if why:
        raise ValueError(f"{student.checkpoint} does not map onto torchvision's classes: {why}")
    state = {k: v for k, v in student.detector.state_dict().items()}
    payload = {"state_dict": state, "categories": student.categories, MARK: meta}
    module = out.with_suffix(".py")
    write_whole(out, lambda tmp: torch.save(payload, tmp))
    write_whole(module, lambda tmp: tmp.write_text(constructor_source(student)))
    return module
