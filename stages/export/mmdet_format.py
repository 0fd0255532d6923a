"""The student as an mmdetection 3.x checkpoint: {'meta': {'dataset_meta': {'classes'}, 'cfg'}, 'state_dict'}.

The inverse of `stages.detectors.mmdet_import`: the same key map (`to_mmdet`), the class names in
`meta.dataset_meta.classes`, and the config text (`meta.cfg`, mmengine's place for it) with the
settings the weights need: ResNet depth and style, FPN width and extra levels, head depth, GN
groups, anchors and test thresholds. mmdetection's layouts are what the import reads, so:

  retinanet / gfl  only the zoo's 'mmdet' / 'mmdet_caffe' variants map (mmdetection's RetinaNet
                   takes P6 from C5, neither has a ReLU before P7, anchors are unrounded); the
                   torchvision-style zoo layout is refused in one line naming the difference;
  fcos             torchvision's layout is mmdetection's 'center-normbbox-centeronreg' FCOS with
                   per-level scales 1.0 and biased tower convs (`conv_bias=True`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.detectors.backbone import gn_groups
from stages.detectors.mmdet_import import to_mmdet
from stages.export.ownership import MARK, write_whole
from stages.export.student import Student

MMDET_VERSION = "3.3.0"  # the checkpoint layout written (mmengine runner checkpoints of mmdet 3.x)
HEAD_TYPE = {"retinanet": "RetinaHead", "gfl": "GFLHead", "fcos": "FCOSHead"}
DETECTOR_TYPE = {"retinanet": "RetinaNet", "gfl": "GFL", "fcos": "FCOS"}
DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


def mmdet_mismatch(student: Student) -> str | None:
    m = student.cfg
    if m.arch not in HEAD_TYPE:
        return f"{m.arch}: mmdetection export covers retinanet, gfl and fcos"
    if m.variant == "tv_v2":
        return ("retinanet variant tv_v2 (torchvision's v2: GroupNorm head, a ReLU before P7, rounded anchors) is "
                "not mmdetection's RetinaNet; train the student with student.model.variant=mmdet")
    if m.arch in ("retinanet", "gfl") and m.variant not in ("mmdet", "mmdet_caffe"):
        p6 = "P6 from P5 and " if m.arch == "retinanet" else ""
        anchors = " and torchvision's rounded anchors" if m.arch == "retinanet" else ""
        return (f"{m.arch} variant {m.variant or 'zoo'} has {p6}a ReLU before P7{anchors}, which mmdetection's "
                f"{DETECTOR_TYPE[m.arch]} does not; train the student with student.model.variant=mmdet")
    return None


def mmdet_state_dict(student: Student) -> dict[str, torch.Tensor]:
    m, det = student.cfg, student.detector
    own = det.state_dict()
    out = to_mmdet(own, m.arch)
    if m.arch == "fcos":
        for key, value in own.items():  # torchvision's FCOS towers have conv biases: conv_bias=True keeps them
            parts = key.split(".")
            if len(parts) == 5 and parts[2] == "conv" and parts[4] == "bias" and int(parts[3]) % 3 == 0:
                branch = "cls" if parts[1] == "classification_head" else "reg"
                out[f"bbox_head.{branch}_convs.{int(parts[3]) // 3}.conv.bias"] = value
        for level in range(len(det.strides)):  # no per-level scales in torchvision's FCOS: 1.0 is its map
            out.setdefault(f"bbox_head.scales.{level}.scale", torch.tensor(1.0))
    mapped = sum(1 for k in own if not k.endswith("num_batches_tracked") or k.startswith("backbone.body."))
    if len(out) < mapped:
        raise ValueError(f"{student.checkpoint}: {mapped - len(out)} weights have no mmdetection name; "
                         "this student's layout is not one the mmdet export knows")
    return out


def config_text(student: Student) -> str:
    """An mmdetection 3.x model config for these weights (also what kdcache's import reads flags from)."""
    m, det = student.cfg, student.detector
    c5 = 512 if m.backbone in ("resnet18", "resnet34") else 2048
    caffe = m.variant == "mmdet_caffe"
    mean, std = ([103.53, 116.28, 123.675], [1.0, 1.0, 1.0]) if caffe else ([123.675, 116.28, 103.53],
                                                                            [58.395, 57.12, 57.375])
    gn = f"dict(type='GN', num_groups={gn_groups(m.fpn_channels)}, requires_grad=True)"
    extra = "'on_input'" if m.arch == "retinanet" else "'on_output'"
    head = f"type='{HEAD_TYPE[m.arch]}', num_classes={det.num_classes}, in_channels={m.fpn_channels}, " \
           f"stacked_convs={m.head_convs}, feat_channels={m.fpn_channels}"
    if m.arch == "retinanet":
        head += (", anchor_generator=dict(type='AnchorGenerator', octave_base_scale="
                 f"{m.anchor_size / 8:g}, scales_per_octave=3, ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),"
                 " bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0], "
                 "target_stds=[1.0, 1.0, 1.0, 1.0])")
    elif m.arch == "gfl":
        head += (f", norm_cfg={gn}, reg_max={m.reg_max}, anchor_generator=dict(type='AnchorGenerator', "
                 "ratios=[1.0], octave_base_scale=8, scales_per_octave=1, strides=[8, 16, 32, 64, 128])")
    else:
        head += (f", norm_cfg={gn}, strides=[8, 16, 32, 64, 128], norm_on_bbox=True, centerness_on_reg=True, "
                 "center_sampling=True, conv_bias=True, dcn_on_last_conv=False")
    relu = ", relu_before_extra_convs=True" if m.arch == "fcos" else ""
    return (
        f"model = dict(\n    type='{DETECTOR_TYPE[m.arch]}',\n"
        f"    data_preprocessor=dict(type='DetDataPreprocessor', mean={mean}, std={std}, "
        f"bgr_to_rgb={not caffe}, pad_size_divisor=128),\n"
        f"    backbone=dict(type='ResNet', depth={DEPTH[m.backbone]}, num_stages=4, out_indices=(1, 2, 3), "
        f"frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False, "
        f"style='{'caffe' if caffe else 'pytorch'}'),\n"
        f"    neck=dict(type='FPN', in_channels={[c5 // 4, c5 // 2, c5]}, out_channels={m.fpn_channels}, "
        f"start_level=0, add_extra_convs={extra}, num_outs=5{relu}),\n"
        f"    bbox_head=dict({head}),\n"
        f"    test_cfg=dict(nms_pre={det.topk_candidates}, min_bbox_size=0, score_thr={det.score_thresh}, "
        f"nms=dict(type='nms', iou_threshold={det.nms_thresh}), max_per_img={det.detections_per_img}))\n"
        f"test_pipeline = [dict(type='Resize', scale=({student.max_size}, {student.min_size}), keep_ratio=True)]\n"
    )


def export_mmdet(student: Student, out: Path, meta: dict) -> None:
    why = mmdet_mismatch(student)
    if why:
        raise ValueError(f"{student.checkpoint} does not map onto mmdetection's layout: {why}")
    payload = {
        "meta": {"dataset_meta": {"classes": tuple(student.class_names)}, "mmdet_version": MMDET_VERSION,
                 "cfg": config_text(student), MARK: meta},
        "state_dict": mmdet_state_dict(student),
    }
    write_whole(out, lambda tmp: torch.save(payload, tmp))
