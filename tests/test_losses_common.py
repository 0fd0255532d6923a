import math

import torch

from stages.losses.common import (
    box_masks,
    crop_valid,
    make_adapter,
    masked_mean,
    match_class_maps,
    quality_focal_kd,
    valid_masks,
)


def test_valid_masks_by_hand():
    masks = valid_masks([(20, 30), (16, 16)], [(4, 4), (2, 2)], [8, 16])
    assert [tuple(m.shape) for m in masks] == [(2, 1, 4, 4), (2, 1, 2, 2)]
    expect0 = torch.zeros(4, 4)
    expect0[:3, :4] = 1  # ceil(20/8)=3 rows, ceil(30/8)=4 cols
    assert torch.equal(masks[0][0, 0], expect0)
    expect1 = torch.zeros(4, 4)
    expect1[:2, :2] = 1
    assert torch.equal(masks[0][1, 0], expect1)
    assert torch.equal(masks[1][0, 0], torch.ones(2, 2))  # ceil(20/16)=2, ceil(30/16)=2
    assert torch.equal(masks[1][1, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_box_masks_by_hand():
    boxes = [torch.tensor([[8.0, 8.0, 17.0, 9.0]]), torch.zeros(0, 4)]
    (m,) = box_masks(boxes, [(4, 4)], [8])
    expect = torch.zeros(4, 4)
    expect[1, 1:3] = 1  # x: floor(8/8)=1 .. ceil(17/8)-1=2; y: 1 .. max(ceil(9/8)-1, 1)=1
    assert torch.equal(m[0, 0], expect)
    assert m[1].sum() == 0


def test_masked_mean_ignores_masked_cells_even_nan():
    x = torch.tensor([[[[1.0, 2.0], [3.0, float("nan")]]], [[[5.0, float("inf")], [7.0, 8.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    assert masked_mean(x, mask).item() == (1 + 2 + 3 + 5) / 4
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    two_channels = torch.cat([x, 2 * x], dim=1)
    assert math.isclose(masked_mean(two_channels, mask).item(), (11 + 22) / 8)


def test_crop_valid():
    x = torch.arange(2 * 3 * 4 * 4.0).view(2, 3, 4, 4)
    assert crop_valid(x, 1, (20, 9), 8).shape == (3, 3, 2)


def test_adapter_identity_when_widths_match():
    assert isinstance(make_adapter(8, 8), torch.nn.Identity)
    conv = make_adapter(4, 8)
    assert conv(torch.zeros(1, 4, 2, 2)).shape == (1, 8, 2, 2)


def test_match_class_maps_per_location_max_when_anchors_differ():
    s = torch.rand(2, 3, 2, 2)  # A=1, K=3
    t = torch.rand(2, 9 * 3, 2, 2)  # A=9
    s2, t2 = match_class_maps(s, t, 3)
    assert torch.equal(s2, s)
    assert torch.equal(t2[:, 1], t.view(2, 9, 3, 2, 2)[:, :, 1].amax(dim=1))
    same = match_class_maps(s, s, 3)
    assert same[0] is s and same[1] is s


def test_quality_focal_kd_by_hand():
    logit, target = torch.tensor([0.3]), torch.tensor([0.8])
    p = 1 / (1 + math.exp(-0.3))
    bce = -(0.8 * math.log(p) + 0.2 * math.log(1 - p))
    assert math.isclose(quality_focal_kd(logit, target, 1.0).item(), bce * abs(p - 0.8), rel_tol=1e-5)
    assert math.isclose(quality_focal_kd(logit, target, 2.0).item(), bce * (p - 0.8) ** 2, rel_tol=1e-5)
