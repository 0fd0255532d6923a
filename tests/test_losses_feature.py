import math

import pytest
import torch

from stages.losses.feature import CosineFeatureLoss, MSEFeatureLoss
from stages.losses.ssim import SSIMLoss
from tests.losses_fakes import (
    IMAGE_SIZES,
    STRIDES,
    grads_finite,
    scramble_padding,
    student_output,
    teacher_from_student,
    teacher_targets,
)


def explicit(student, teacher, cell_loss):
    """Mean over levels of the mean over valid (image, cell) of cell_loss(s_vec, t_vec), by loops."""
    levels = []
    for s, t, stride in zip(student.fpn, teacher.fpn, STRIDES):
        total, count = 0.0, 0
        for b, (h, w) in enumerate(IMAGE_SIZES):
            for y in range(math.ceil(h / stride)):
                for x in range(math.ceil(w / stride)):
                    value, n = cell_loss(s[b, :, y, x].tolist(), t[b, :, y, x].tolist())
                    total, count = total + value, count + n
        levels.append(total / count)
    return sum(levels) / len(levels)


def sq(s, t):
    return sum((a - b) ** 2 for a, b in zip(s, t)), len(s)


def one_minus_cos(s, t):
    dot = sum(a * b for a, b in zip(s, t))
    norm = math.sqrt(sum(a * a for a in s)) * math.sqrt(sum(b * b for b in t))
    return 1 - dot / norm, 1


@pytest.mark.parametrize("cls, cell", [(MSEFeatureLoss, sq), (CosineFeatureLoss, one_minus_cos)])
def test_by_hand(cls, cell):
    student, teacher = student_output(), teacher_targets()
    value = cls(4, 4)(student, teacher, [])["fpn"]
    assert math.isclose(value.item(), explicit(student, teacher, cell), rel_tol=1e-5)


FPN_LOSSES = [MSEFeatureLoss, CosineFeatureLoss, SSIMLoss]


@pytest.mark.parametrize("cls", FPN_LOSSES)
def test_zero_when_equal_and_grads(cls):
    student = student_output()
    loss = cls(4, 4)
    assert loss(student, teacher_from_student(student), [])["fpn"].item() < 1e-6
    value = loss(student, teacher_targets(), [])["fpn"]
    value.backward()
    assert grads_finite(student.fpn)


@pytest.mark.parametrize("cls", FPN_LOSSES)
def test_padding_changes_nothing(cls):
    student, teacher = student_output(grad=False), teacher_targets()
    loss = cls(4, 4)
    before = loss(student, teacher, [])["fpn"]
    student.fpn = scramble_padding(student.fpn)
    teacher.fpn = scramble_padding(teacher.fpn, value=float("nan"))
    assert torch.equal(loss(student, teacher, [])["fpn"], before)


def test_adapter_for_other_widths():
    student, teacher = student_output(c=4), teacher_targets(c=8)
    loss = MSEFeatureLoss(4, 8)
    loss(student, teacher, [])["fpn"].backward()
    assert loss.adapter.weight.grad is not None and grads_finite(student.fpn)
