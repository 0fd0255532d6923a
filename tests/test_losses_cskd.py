import math

import pytest
import torch

from stages.losses.cskd import CSKDLoss, cskd_term, expected_sides
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


def reference_term(s, t, mask, w_mse, w_cos):
    """cskd_term by explicit loops (s, t [B, C, H, W] float64; mask [B, 1, H, W])."""
    b_n, c_n, h_n, w_n = s.shape
    cells = [[(y, x) for y in range(h_n) for x in range(w_n) if mask[b, 0, y, x] > 0] for b in range(b_n)]

    def cos(u, v):
        nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(a * a for a in v))
        return sum(a * b for a, b in zip(u, v)) / max(nu * nv, 1e-12)

    mse = sp = ch = 0.0
    n_cells = sum(len(c) for c in cells)
    n_ch = 0
    for b in range(b_n):
        if not cells[b]:
            continue
        cos_ch = [cos([s[b, c, y, x].item() for y, x in cells[b]], [t[b, c, y, x].item() for y, x in cells[b]])
                  for c in range(c_n)]
        ch += sum(1 - v for v in cos_ch)
        n_ch += c_n
        for y, x in cells[b]:
            cos_sp = cos(s[b, :, y, x].tolist(), t[b, :, y, x].tolist())
            sp += 1 - cos_sp
            for c in range(c_n):
                mse += (1 - cos_ch[c]) * (1 - cos_sp) * (s[b, c, y, x].item() - t[b, c, y, x].item()) ** 2
    mse /= max(n_cells * c_n, 1)
    return w_mse * mse + w_cos * (ch / max(n_ch, 1) + sp / max(n_cells, 1))


def test_term_by_hand():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 3, 4, generator=g).double(), torch.randn(2, 3, 3, 4, generator=g).double()
    mask = (torch.rand(2, 1, 3, 4, generator=g) > 0.4).double()
    mask[1] = 0  # an image with no selected cell counts nowhere
    got = cskd_term(s, t, mask, 1.0, 0.5).item()
    assert math.isclose(got, reference_term(s, t, mask, 1.0, 0.5), rel_tol=1e-9)
    assert cskd_term(s, t, torch.zeros_like(mask), 1.0, 0.5).item() == 0.0


def hand_masks(boxes_per_image):
    """Valid and GT-box masks per level, by loops."""
    valid, fg = [], []
    for (h, w), stride in zip(SHAPES, STRIDES):
        v = torch.zeros(len(IMAGE_SIZES), 1, h, w, dtype=torch.float64)
        f = torch.zeros_like(v)
        for b, (ih, iw) in enumerate(IMAGE_SIZES):
            for y in range(h):
                for x in range(w):
                    v[b, 0, y, x] = float(y < math.ceil(ih / stride) and x < math.ceil(iw / stride))
                    for x1, y1, x2, y2 in boxes_per_image[b].tolist():
                        cx = math.floor(x1 / stride) <= x <= max(math.ceil(x2 / stride) - 1, math.floor(x1 / stride))
                        cy = math.floor(y1 / stride) <= y <= max(math.ceil(y2 / stride) - 1, math.floor(y1 / stride))
                        if cx and cy:
                            f[b, 0, y, x] = v[b, 0, y, x]
        valid.append(v)
        fg.append(f)
    return valid, fg


def test_parts_by_hand():
    student, teacher, targets = student_output(), teacher_targets(), gt_targets()
    parts = CSKDLoss(4, 4, 3, assistant=False)(student, teacher, targets)
    assert set(parts) == {"neck", "roi", "fg", "bg", "pred"}
    valid, fg = hand_masks([t["boxes"] for t in targets])
    pairs = list(zip(student.fpn, teacher.fpn))
    for key, masks in (("neck", valid), ("fg", fg), ("bg", [v - f for v, f in zip(valid, fg)])):
        expect = sum(reference_term(s.detach().double(), t.double(), m, 1.0, 0.5)
                     for (s, t), m in zip(pairs, masks)) / len(masks)
        assert math.isclose(parts[key].item(), expect, rel_tol=1e-4), key
    expect = sum(reference_term(s.detach().double().sigmoid(), t.double(), m, 1.0, 0.5)
                 for s, t, m in zip(student.cls_logits, teacher.cls_probs, valid)) / len(valid)
    assert math.isclose(parts["pred"].item(), expect, rel_tol=1e-4)


def test_zero_when_student_equals_teacher():
    student = student_output()
    parts = CSKDLoss(4, 4, 3, assistant=False)(student, teacher_from_student(student), gt_targets())
    for key, value in parts.items():
        assert abs(value.item()) < 1e-5, key


def test_gradients_reach_student_and_assistant():
    student = student_output()
    loss = CSKDLoss(4, 4, 3)
    parts = loss(student, teacher_targets(), gt_targets())
    assert set(parts) == {"neck", "roi", "fg", "bg", "pred", "assist_cls", "assist_box"}
    sum(parts.values()).backward()
    assert grads_finite(student.fpn) and grads_finite(student.cls_logits)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in loss.assistant.parameters())


def test_padding_changes_nothing():
    student, teacher, targets = student_output(grad=False), teacher_targets(), gt_targets()
    loss = CSKDLoss(4, 4, 3)
    before = loss(student, teacher, targets)
    student.fpn = scramble_padding(student.fpn)
    student.cls_logits = scramble_padding(student.cls_logits, value=-50.0)
    teacher.fpn = scramble_padding(teacher.fpn, value=float("nan"))
    teacher.cls_probs = scramble_padding(teacher.cls_probs, value=float("nan"))
    teacher.box_reg = scramble_padding(teacher.box_reg, value=77.0)
    after = loss(student, teacher, targets)
    for key in before:
        assert torch.allclose(after[key], before[key], rtol=1e-6, atol=1e-7), key


def test_no_gt_batch():
    student = student_output()
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in range(2)]
    parts = CSKDLoss(4, 4, 3)(student, teacher_targets(), targets)
    assert parts["roi"].item() == 0 and parts["fg"].item() == 0 and parts["assist_box"].item() == 0
    assert all(torch.isfinite(v) for v in parts.values())
    sum(parts.values()).backward()
    assert grads_finite(student.fpn)


def test_faster_rcnn_keeps_fpn_terms_only():
    loss = CSKDLoss(4, 8, 3, predictions=False)
    assert loss.needs() == {"fpn"} and loss.assistant is None
    student = student_output(c=4)
    student.cls_logits, student.box_reg = [], []
    parts = loss(student, teacher_targets(c=8), gt_targets())
    assert set(parts) == {"neck", "roi", "fg", "bg"}


def test_teacher_with_more_anchors():
    """RetinaNet teacher (A=9) for an FCOS-like student (A=1): per-location max for pred, assistant in A=9."""
    student = student_output(a=1)
    loss = CSKDLoss(4, 4, 3, teacher_num_anchors=9, teacher_box_dim=4)
    parts = loss(student, teacher_targets(a=9), gt_targets())
    sum(parts.values()).backward()
    assert grads_finite(student.fpn)
    with pytest.raises(ValueError, match="anchors"):
        loss(student_output(a=1), teacher_targets(a=1), gt_targets())


def test_expected_sides_by_hand():
    reg_max = 2
    logits = torch.zeros(1, 4 * (reg_max + 1), 1, 1)
    logits[0, 0:3, 0, 0] = torch.tensor([0.0, math.log(3.0), -100.0])  # side 0: p = (1/4, 3/4, 0)
    sides = expected_sides(logits, reg_max)
    assert sides.shape == (1, 1, 4, 1, 1)
    assert math.isclose(sides[0, 0, 0, 0, 0].item(), 0.75, rel_tol=1e-5)
    assert math.isclose(sides[0, 0, 1, 0, 0].item(), 1.0, rel_tol=1e-5)  # uniform over 0, 1, 2


def test_gfl_teacher_assistant():
    reg_max = 4
    student = student_output(a=1, r=4 * (reg_max + 1))
    teacher = teacher_targets(a=1, r=4 * (reg_max + 1))
    loss = CSKDLoss(4, 4, 3, teacher_box_dim=4 * (reg_max + 1), teacher_reg_max=reg_max)
    parts = loss(student, teacher, gt_targets())
    parts["assist_box"].backward()
    assert parts["assist_box"].item() > 0
    assert all(torch.isfinite(p.grad).all() for p in loss.assistant.box.parameters())
