"""Every method runs (finite loss, gradients reach the student) for RetinaNet, FCOS and GFL students
against a same-arch teacher, and the feature-level methods for a Faster R-CNN student."""

from __future__ import annotations

import pytest
import torch

from stages.config import DistillParams, ModelParams
from stages.data.batching import ViewDataset, collate
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.detectors.build import build_detector
from stages.distill.run import loss_context, run_from_index
from stages.distill.teacher_source import live_records, records_to_targets
from stages.losses.registry import build_kd_losses

ALL = {"mse": 1.0, "cosine": 1.0, "cskd": 1.0, "ssim": 2.0, "crosskd": 1.0, "rm": 4.0, "pfi": 1.5}
FEATURE_LEVEL = {"mse": 1.0, "cosine": 1.0, "ssim": 2.0, "cskd": 1.0}
TARGETS = ["fpn", "cls", "box", "quality", "candidates", "tower_stats"]


@pytest.fixture(scope="module")
def batch(tiny_coco):
    coco = CocoDataset(tiny_coco.train_images, tiny_coco.train_ann)
    return collate([ViewDataset(coco, [View(96, 128)], mode="all")[i] for i in range(2)]), coco.num_classes


def kd_step(teacher, student, losses, batch, num_classes):
    torch.manual_seed(0)
    distill = DistillParams(losses=losses)
    t_arch = {"arch": teacher.arch, "fpn_channels": teacher.fpn_channels}
    ctx = loss_context(student, t_arch, num_classes, teacher.box_dim, teacher.has_quality)
    kd = build_kd_losses(losses, ctx, distill)
    images, sizes, gt = batch["images"], batch["image_sizes"], batch["targets"]
    _, records = live_records(teacher.eval(), images, sizes, gt, TARGETS if teacher.dense else ["fpn"])
    index = run_from_index(distill, teacher.arch, teacher.head_convs)
    tt = records_to_targets(records, tuple(images.shape[-2:]), teacher.strides, getattr(teacher, "head", None), index)
    out = student(images, sizes, targets=gt)
    terms = kd(out, tt, gt)
    (terms["kd_total"] + sum(out.losses.values())).backward()
    return terms


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "gfl"])
def test_every_method_on_dense_students(arch, batch):
    batch, k = batch
    torch.manual_seed(0)
    teacher = build_detector(ModelParams(arch=arch, backbone="resnet18", fpn_channels=16, head_convs=2), k)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_detector(ModelParams(arch=arch, backbone="resnet18", fpn_channels=8, head_convs=2), k)
    terms = kd_step(teacher, student, ALL, batch, k)
    assert {n.split("/")[0] for n in terms if n != "kd_total"} == set(ALL)
    for name, value in terms.items():
        assert torch.isfinite(value), name
    grads = [p.grad for p in student.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters()), "the teacher head stays frozen"


def test_feature_methods_on_faster_rcnn_student(batch):
    batch, k = batch
    torch.manual_seed(0)
    teacher = build_detector(ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=16, head_convs=2), k)
    student = build_detector(ModelParams(arch="faster_rcnn", backbone="resnet18", fpn_channels=8), k)
    terms = kd_step(teacher, student, FEATURE_LEVEL, batch, k)
    assert {n.split("/")[0] for n in terms if n != "kd_total"} == set(FEATURE_LEVEL)
    assert all(torch.isfinite(v) for v in terms.values())


def test_cskd_tower_terms_need_no_per_image_tower_record(batch):
    """CSKD's tower terms run the static teacher head on the cached FPN, so stage 2 must not read the
    per-image `tower_stats` record for it (26 KB per demo record, 187 KB at COCO shape); CrossKD does."""
    from stages.distill.run import targets_for

    batch, k = batch
    torch.manual_seed(0)
    teacher = build_detector(ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=16, head_convs=2), k)
    student = build_detector(ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=8, head_convs=2), k)
    t_arch = {"arch": teacher.arch, "fpn_channels": teacher.fpn_channels, "head_convs": teacher.head_convs}
    ctx = loss_context(student, t_arch, k, teacher.box_dim, teacher.has_quality)
    cskd = build_kd_losses({"cskd": 1.0}, ctx, DistillParams(losses={"cskd": 1.0}))
    crosskd = build_kd_losses({"crosskd": 1.0}, ctx, DistillParams(losses={"crosskd": 1.0}))
    assert "head" in cskd.needs() and "tower_stats" not in targets_for(cskd.needs())
    assert "tower_stats" in targets_for(crosskd.needs())
    # and CSKD (tower terms on) trains from records that hold no tower statistics at all
    images, sizes, gt = batch["images"], batch["image_sizes"], batch["targets"]
    _, records = live_records(teacher.eval(), images, sizes, gt, sorted(targets_for(cskd.needs())))
    assert not any(key.startswith("tower") for key in records[0])
    tt = records_to_targets(records, tuple(images.shape[-2:]), teacher.strides, teacher.head, 0)
    terms = cskd(student(images, sizes, targets=gt), tt, gt)
    assert any("tower" in name for name in terms) and torch.isfinite(terms["kd_total"])
