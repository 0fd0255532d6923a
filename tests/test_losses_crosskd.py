import math

import pytest
import torch

from stages.config import ModelParams
from stages.detectors.build import build_head
from stages.detectors.contract import DetectorOutput
from stages.losses.common import valid_masks
from stages.losses.crosskd import CrossKDLoss
from stages.losses.targets import TeacherTargets
from tests.losses_fakes import (
    IMAGE_SIZES,
    SHAPES,
    STRIDES,
    anchors,
    grads_finite,
    maps,
    scramble_padding,
)

K = 3


def head(arch: str, channels: int, convs: int, seed: int, reg_max: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    h = build_head(ModelParams(arch=arch, fpn_channels=channels, head_convs=convs, reg_max=reg_max), K)
    for p in h.parameters():  # livelier than the 0.01-std init, so predictions vary across cells
        torch.nn.init.normal_(p, std=0.3)
    return h


def run(h, fpn, image_sizes, num_anchors) -> DetectorOutput:
    o = h(fpn)
    return DetectorOutput(fpn=fpn, strides=list(STRIDES), image_sizes=list(image_sizes), cls_tower=o.cls_tower,
                          reg_tower=o.reg_tower, cls_logits=o.cls_logits, box_reg=o.box_reg, quality=o.quality,
                          anchors=anchors(num_anchors))


def teacher_side(t_head, fpn, image_sizes, index, num_anchors) -> TeacherTargets:
    """What stage 2 hands the loss: teacher predictions, frozen head, tower stats over valid cells."""
    t_head.requires_grad_(False)
    with torch.no_grad():
        out = run(t_head, fpn, image_sizes, num_anchors)
    valid = valid_masks(image_sizes, SHAPES, STRIDES)
    mean, std = {}, {}
    for branch, tower in (("cls", out.cls_tower), ("reg", out.reg_tower)):
        cells = torch.cat([m.permute(1, 0, 2, 3)[:, v[:, 0] > 0] for m, v in zip(tower.pre[index], valid)], dim=1)
        mean[branch], std[branch] = cells.mean(dim=1), cells.std(dim=1, unbiased=False)
    return TeacherTargets(cls_probs=[m.sigmoid() for m in out.cls_logits], box_reg=out.box_reg, head=t_head,
                          tower_mean=mean, tower_std=std, reuse_index=index)


ARCHS = [("retinanet", 9, 4, 0), ("fcos", 1, 4, 0), ("gfl", 1, 20, 4)]


@pytest.mark.parametrize("arch, a, r, reg_max", ARCHS)
def test_zero_when_student_is_the_teacher(arch, a, r, reg_max):
    sizes = [(32, 64), (32, 64)]  # no padding: the crossed head sees exactly the teacher's maps
    t_head = head(arch, 8, 3, seed=0, reg_max=reg_max)
    fpn = maps(2, 8, seed=5)
    teacher = teacher_side(t_head, fpn, sizes, index=1, num_anchors=a)
    student = run(t_head, fpn, sizes, a)
    parts = CrossKDLoss(arch, K, 8, 8, reg_max=reg_max)(student, teacher, [])
    assert set(parts) == ({"cls", "box", "kl"} if arch == "gfl" else {"cls", "box"})
    for key, value in parts.items():
        assert abs(value.item()) < 1e-4, (key, value.item())


@pytest.mark.parametrize("arch, a, r, reg_max", ARCHS)
def test_gradients_reach_the_student_only(arch, a, r, reg_max):
    t_head = head(arch, 8, 3, seed=0, reg_max=reg_max)
    s_head = head(arch, 4, 2, seed=1, reg_max=reg_max)  # narrower and shallower than the teacher
    teacher = teacher_side(t_head, maps(2, 8, seed=5), IMAGE_SIZES, index=2, num_anchors=a)
    student = run(s_head, maps(2, 4, seed=6, grad=True), IMAGE_SIZES, a)
    loss = CrossKDLoss(arch, K, 4, 8, reg_max=reg_max)
    parts = loss(student, teacher, [])
    assert all(torch.isfinite(v) and v.item() > 0 for v in parts.values())
    sum(parts.values()).backward()
    assert grads_finite(student.fpn)  # through the student's tower up to its reuse layer
    assert next(s_head.classification_head.conv.parameters()).grad is not None
    assert all(p.grad is None and not p.requires_grad for p in t_head.parameters())
    assert loss.adapters["cls"].weight.grad is not None and loss.adapters["reg"].weight.grad is not None


def test_padding_changes_nothing():
    arch, a = "fcos", 1
    t_head = head(arch, 8, 3, seed=0)
    teacher = teacher_side(t_head, maps(2, 8, seed=5), IMAGE_SIZES, index=1, num_anchors=a)
    student = run(head(arch, 8, 3, seed=1), maps(2, 8, seed=6), IMAGE_SIZES, a)
    loss = CrossKDLoss(arch, K, 8, 8)
    before = loss(student, teacher, [])
    for tower in (student.cls_tower, student.reg_tower):
        tower.pre[1] = scramble_padding(tower.pre[1])
    teacher.cls_probs = scramble_padding(teacher.cls_probs, value=float("nan"))
    teacher.box_reg = scramble_padding(teacher.box_reg, value=float("nan"))
    after = loss(student, teacher, [])
    for key in before:
        assert torch.allclose(after[key], before[key], rtol=1e-5), key


def test_missing_inputs():
    loss = CrossKDLoss("fcos", K, 8, 8)
    t_head = head("fcos", 8, 3, seed=0)
    teacher = teacher_side(t_head, maps(2, 8, seed=5), IMAGE_SIZES, index=1, num_anchors=1)
    student = run(head("fcos", 8, 3, seed=1), maps(2, 8, seed=6), IMAGE_SIZES, 1)
    teacher.head = None
    with pytest.raises(ValueError, match="head"):
        loss(student, teacher, [])
    teacher.head, teacher.reuse_index = t_head, -1
    with pytest.raises(ValueError, match="tower statistics"):
        loss(student, teacher, [])


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def giou_loss(p, q):
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    hull = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
    return 1 - (inter / union - (hull - union) / hull)


def softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def reference_mimic(arch, cls_logits, box_reg, t_probs, t_box, reg_max, weights):
    """CrossKD's three terms by loops over images, levels, cells (A = 1)."""
    cls = box = kl = norm = 0.0
    for b, (h, w) in enumerate(IMAGE_SIZES):
        for lv, stride in enumerate(STRIDES):
            for y in range(math.ceil(h / stride)):
                for x in range(math.ceil(w / stride)):
                    tp = t_probs[lv][b, :, y, x].tolist()
                    wt = max(tp)
                    norm += wt
                    for z, t in zip(cls_logits[lv][b, :, y, x].tolist(), tp):
                        p = sigmoid(z)
                        cls += -(t * math.log(p) + (1 - t) * math.log(1 - p)) * abs(p - t)
                    cx, cy = x * stride + stride / 2, y * stride + stride / 2
                    sides = []
                    for reg in (box_reg[lv][b, :, y, x].tolist(), t_box[lv][b, :, y, x].tolist()):
                        if arch == "gfl":
                            d = [sum(i * p for i, p in enumerate(softmax(reg[s * (reg_max + 1):(s + 1) * (reg_max + 1)])))
                                 for s in range(4)]
                        else:
                            d = reg
                        sides.append([cx - d[0] * stride, cy - d[1] * stride, cx + d[2] * stride, cy + d[3] * stride])
                    box += wt * giou_loss(*sides)
                    if arch == "gfl":
                        s_reg, t_reg = box_reg[lv][b, :, y, x].tolist(), t_box[lv][b, :, y, x].tolist()
                        per_side = []
                        for s in range(4):
                            sl = slice(s * (reg_max + 1), (s + 1) * (reg_max + 1))
                            p, q = softmax(t_reg[sl]), softmax(s_reg[sl])
                            per_side.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
                        kl += wt * sum(per_side) / 4
    norm = max(norm, 1.0)
    out = {"cls": weights[0] * cls / norm, "box": weights[1] * box / norm}
    if arch == "gfl":
        out["kl"] = weights[2] * kl / norm
    return out


@pytest.mark.parametrize("arch, r, reg_max, weights", [("fcos", 4, 0, (0.4, 0.75)), ("gfl", 12, 2, (1.0, 2.0, 3.0))])
def test_mimic_terms_by_hand(arch, r, reg_max, weights):
    crossed = maps(2, K, seed=1, scale=2.0)
    t_probs = [m.sigmoid() for m in maps(2, K, seed=2, scale=2.0)]
    s_box, t_box = maps(2, r, seed=3), maps(2, r, seed=4)
    if arch == "fcos":  # distances are >= 0
        s_box, t_box = [m.abs() + 0.5 for m in s_box], [m.abs() + 0.5 for m in t_box]
    teacher = TeacherTargets(cls_probs=t_probs, box_reg=t_box)
    loss = CrossKDLoss(arch, K, 4, 4, reg_max=reg_max)
    got = loss.mimic(crossed, s_box, teacher, valid_masks(IMAGE_SIZES, SHAPES, STRIDES), anchors(1))
    expect = reference_mimic(arch, crossed, s_box, t_probs, t_box, reg_max, weights)
    assert set(got) == set(expect)
    for key in expect:
        assert math.isclose(got[key].item(), expect[key], rel_tol=1e-4), key
