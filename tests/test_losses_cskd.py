"""CSKD behaviour: the term's three official forms, padding, degenerate batches, arch mixes.
Term-by-term agreement with the official formulas (value and gradient) is tests/test_losses_conformance.py."""

import torch

from stages.losses.cskd import CSKDLoss, box_cells, guided_term
from tests import losses_reference as ref
from tests.losses_fakes import (
    IMAGE_SIZES,
    SHAPES,
    STRIDES,
    grads_finite,
    gt_targets,
    scramble_padding,
    student_output,
    teacher_from_student,
    teacher_targets,
)
from tests.test_losses_crosskd import assign_inside

W = (1.0, 0.5)


def test_term_forms_match_the_official_function():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5, generator=g).double(), torch.randn(2, 3, 4, 5, generator=g).double()
    ones = torch.ones(2, 1, 4, 5)
    mask = (torch.rand(2, 4, 5, generator=g) > 0.5).double()
    torch.testing.assert_close(guided_term(s, t, ones, *W), ref.mse_cos(s, t, W))
    f = mask.sum() * 3
    torch.testing.assert_close(guided_term(s, t, ones, *W, mask[:, None], f),
                               ref.mse_cos(s * mask[:, None], t * mask[:, None], W, mask, f))
    torch.testing.assert_close(guided_term(s, t, ones, *W, None, f), ref.mse_cos(s, t, W, None, f))


def test_term_ignores_padding():
    """Over a valid block the term equals the official term on the cropped map (one image)."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 3, 4, 5, generator=g).double(), torch.randn(1, 3, 4, 5, generator=g).double()
    valid = torch.zeros(1, 1, 4, 5)
    valid[..., :3, :4] = 1
    s_pad = s.clone()
    s_pad[..., 3:, :] = 1e6
    s_pad[..., :, 4:] = float("nan")
    torch.testing.assert_close(guided_term(s_pad, t, valid, *W), ref.mse_cos(s[..., :3, :4], t[..., :3, :4], W))


def loss_for(student, teacher, **kw):
    kw = {"predictions": True, "assistant": True, "num_levels": 3, "arch": "fcos", "same_arch": True,
          "head_channels": 4, "num_anchors": 1, "box_dim": 4, "assign": assign_inside} | kw
    return CSKDLoss(4, 4, 3, **kw)


def fcos_pair(seed=0):
    student = student_output(towers=1, seed=seed)
    student.box_reg = [m.detach().abs().requires_grad_(True) for m in student.box_reg]
    student.quality = [torch.randn(2, 1, h, w, requires_grad=True) for h, w in SHAPES]
    teacher = teacher_targets()
    teacher.box_reg = [m.abs() + 0.1 for m in teacher.box_reg]
    teacher.quality = [torch.rand(2, 1, h, w) for h, w in SHAPES]
    return student, teacher


def test_parts_and_gradients():
    student, teacher = fcos_pair()
    loss = loss_for(student, teacher)
    parts = loss(student, teacher, gt_targets())
    assert set(parts) == {"neck", "roi", "fg", "bg", "pred_cls", "pred_box", "pred_ctr",
                          "assist_cls", "assist_box", "assist_ctr"}
    assert all(torch.isfinite(v) for v in parts.values())
    sum(parts.values()).backward()
    assert grads_finite(student.fpn) and grads_finite(student.cls_logits) and grads_finite(student.cls_tower.pre[0])
    assert all(c.weight.grad is not None for c in loss.mimic)  # one 1x1 conv per level, always
    assert loss.assistant.cls.weight.grad is not None and loss.assistant.ctr.weight.grad is not None


def test_zero_when_student_equals_teacher():
    student = student_output()
    teacher = teacher_from_student(student)
    loss = CSKDLoss(4, 4, 3, predictions=True, assistant=False, num_levels=3)
    for conv in loss.mimic:  # identity mimic convs
        conv.weight.data = torch.eye(4)[:, :, None, None]
        conv.bias.data.zero_()
    parts = loss(student, teacher, gt_targets())
    for key in ("neck", "roi", "pred_cls"):
        assert abs(parts[key].item()) < 1e-5, key


def test_padding_changes_nothing():
    student, teacher = fcos_pair()
    loss = loss_for(student, teacher)
    before = loss(student, teacher, gt_targets())
    teacher.fpn = scramble_padding(teacher.fpn, value=float("nan"))
    teacher.cls_probs = scramble_padding(teacher.cls_probs, value=float("nan"))
    student.fpn = scramble_padding(student.fpn, value=1e4)
    after = loss(student, teacher, gt_targets())
    for key in ("neck", "roi", "fg", "bg", "pred_cls"):
        torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-6, msg=key)


def test_no_gt_batch():
    student, teacher = fcos_pair()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in range(2)]
    parts = loss_for(student, teacher)(student, teacher, empty)
    assert parts["roi"].item() == 0 and parts["fg"].item() == 0
    assert all(torch.isfinite(v) for v in parts.values())


def test_faster_rcnn_keeps_fpn_terms_only():
    student = student_output()
    loss = CSKDLoss(4, 8, 3, predictions=False, num_levels=3)
    parts = loss(student, teacher_targets(c=8), gt_targets())
    assert set(parts) == {"neck", "roi", "fg", "bg"} and loss.needs() == {"fpn"}


def test_teacher_with_more_anchors():
    """A 9-anchor teacher for a 1-point student: class maps compared per location; no box / assistant terms."""
    student = student_output(a=1)
    teacher = teacher_targets(a=9)
    loss = CSKDLoss(4, 4, 3, predictions=True, assistant=True, num_levels=3, arch="fcos", same_arch=False)
    parts = loss(student, teacher, gt_targets())
    assert set(parts) == {"neck", "roi", "fg", "bg", "pred_cls"} and loss.assistant is None


def test_box_cells_official_rounding_and_scaling():
    boxes = [torch.tensor([[4.0, 2.0, 30.0, 20.0]]), torch.tensor([[2.0, 3.0, 17.0, 14.0]])]
    cells = box_cells(boxes, IMAGE_SIZES, SHAPES, STRIDES, official=False, device="cpu")
    want = torch.zeros(4, 8)
    want[0:3, 0:4] = 1  # int(2/8)..int(20/8) rows, int(4/8)..int(30/8) cols, inclusive
    assert torch.equal(cells[0][0, 0], want)
    # official scaling stretches image 1's box by (padded width / image width) = 64 / 36 on P3
    official = box_cells(boxes, IMAGE_SIZES, SHAPES, STRIDES, official=True, device="cpu")
    assert official[0][1, 0].sum() > cells[0][1, 0].sum()
