"""SSIM by hand; its zero / gradient / padding checks run with the other FPN losses in test_losses_feature."""

import math

import pytest
import torch

from stages.losses.ssim import C1, C2, SSIMLoss, gaussian_window, minmax, ssim_map
from tests.losses_fakes import IMAGE_SIZES, STRIDES, grads_finite, student_output, teacher_targets


def reference_ssim_loss(x, y, size, sigma, short_side="skip"):
    """mean (1 - SSIM)/2 of one map pair [h, w] by loops: Gaussian window at every valid position
    (Wang et al.). A side shorter than the window: "skip" takes a 1-tap window along it (pytorch-msssim
    leaves it unfiltered), "pad" first replicate-pads it to the window size."""
    g = [math.exp(-((i - (size - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(size)]
    g = [v / sum(g) for v in g]
    h, w = len(x), len(x[0])
    ph, pw = max(0, size - h), max(0, size - w)
    gy, gx = g, g
    if short_side == "skip":
        gy, gx = (g if h >= size else [1.0]), (g if w >= size else [1.0])
        ph = pw = 0
    top, left = ph // 2, pw // 2

    def at(m, i, j):  # padded coordinates -> replicate
        return m[min(max(i - top, 0), h - 1)][min(max(j - left, 0), w - 1)]

    total, count = 0.0, 0
    for i in range(h + ph - len(gy) + 1):
        for j in range(w + pw - len(gx) + 1):
            mx = my = xx = yy = xy = 0.0
            for di in range(len(gy)):
                for dj in range(len(gx)):
                    wt = gy[di] * gx[dj]
                    a, b = at(x, i + di, j + dj), at(y, i + di, j + dj)
                    mx, my, xx, yy, xy = mx + wt * a, my + wt * b, xx + wt * a * a, yy + wt * b * b, xy + wt * a * b
            vx, vy, cov = xx - mx * mx, yy - my * my, xy - mx * my
            s = (2 * mx * my + C1) * (2 * cov + C2) / ((mx * mx + my * my + C1) * (vx + vy + C2))
            total += (1 - s) / 2
            count += 1
    return total / count


def norm01(maps):
    """Min-max over a whole map (all channels): the paper's phi on one level of one image."""
    lo = min(min(min(r) for r in m) for m in maps)
    hi = max(max(max(r) for r in m) for m in maps)
    return [[[(v - lo) / (hi - lo + 1e-6) for v in r] for r in m] for m in maps]


@pytest.mark.parametrize("short_side", ["skip", "pad"])
@pytest.mark.parametrize("shape, size, sigma", [((4, 5), 3, 1.0), ((1, 2), 11, 1.5), ((3, 3), 5, 1.5), ((6, 2), 5, 1.5)])
def test_ssim_map_by_hand(shape, size, sigma, short_side):
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, *shape, generator=g).double(), torch.rand(1, *shape, generator=g).double()
    got = ((1 - ssim_map(x, y, gaussian_window(size, sigma).double(), short_side)) / 2).mean().item()
    want = reference_ssim_loss(x[0].tolist(), y[0].tolist(), size, sigma, short_side)
    assert math.isclose(got, want, rel_tol=1e-6)


def test_short_side_is_a_named_choice():
    assert SSIMLoss(2, 2).short_side == "skip"  # the oracle's behaviour is the default
    with pytest.raises(ValueError, match="short_side"):
        SSIMLoss(2, 2, short_side="crop")


def test_loss_by_hand():
    student, teacher = student_output(c=2), teacher_targets(c=2)
    got = SSIMLoss(2, 2, window=3, sigma=1.0)(student, teacher, [])["fpn"].item()
    levels = []
    for s, t, stride in zip(student.fpn, teacher.fpn, STRIDES):
        images = []
        for b, (h, w) in enumerate(IMAGE_SIZES):
            hh, ww = math.ceil(h / stride), math.ceil(w / stride)
            xs, ys = norm01(s[b, :, :hh, :ww].tolist()), norm01(t[b, :, :hh, :ww].tolist())
            per_channel = [reference_ssim_loss(xs[c], ys[c], 3, 1.0) for c in range(2)]
            images.append(sum(per_channel) / 2)  # every channel of an image has the same number of cells
        levels.append(sum(images) / len(images))
    assert math.isclose(got, sum(levels), rel_tol=1e-4)  # paper: sum over levels
    mean = SSIMLoss(2, 2, window=3, sigma=1.0, levels="mean")(student, teacher, [])["fpn"].item()
    assert math.isclose(mean, sum(levels) / len(levels), rel_tol=1e-4)
    full = SSIMLoss(2, 2, window=3, sigma=1.0, half=False)(student, teacher, [])["fpn"].item()
    assert math.isclose(full, 2 * sum(levels), rel_tol=1e-4)


def test_minmax():
    x = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    out = minmax(x, per_channel=True)
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]), atol=1e-5)
    assert torch.equal(out[1], torch.zeros(2, 2))  # a constant channel maps to 0, no NaN
    whole = minmax(x)  # per map: the channels keep their relative scale
    assert torch.allclose(whole[0], (x[0] + 1) / 6, atol=1e-5) and torch.allclose(whole[1], torch.zeros(2, 2))


def test_adapter():
    assert isinstance(SSIMLoss(4, 4).adapter, torch.nn.Identity)
    assert isinstance(SSIMLoss(4, 4, adapter=True).adapter, torch.nn.Conv2d)
    loss = SSIMLoss(4, 8)  # other widths need the adapter whatever the flag says
    student = student_output(c=4)
    loss(student, teacher_targets(c=8), [])["fpn"].backward()
    assert loss.adapter.weight.grad is not None and grads_finite(student.fpn)
    with pytest.raises(ValueError, match="odd"):
        SSIMLoss(4, 4, window=4)
