"""View: key round trip, torchvision-style sizing, box maths of resize + flip, inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.data.views import View


def test_key_round_trip():
    for v in (View(160, 256), View(160, 256, True), View(800, 1333, False), View(1, 2, True)):
        assert "." not in v.key and "_" not in v.key
        assert View.from_key(v.key) == v
        assert View.from_dict(v.to_dict()) == v
    assert View(160, 256, False).key == "s160m256f0"
    assert View(160, 256, True).key == "s160m256f1"
    for bad in ("s160m256", "s160m256f2", "x160m256f0", "s-1m256f0", ""):
        with pytest.raises(ValueError):
            View.from_key(bad)
    with pytest.raises(ValueError):
        View(0, 256)
    with pytest.raises(ValueError):
        View.from_dict({"min_size": 1, "max_size": 2, "flop": True})


def test_from_dict_accepts_params_object():
    from stages.config import ViewParams

    assert View.from_dict(ViewParams(128, 200, True)) == View(128, 200, True)


def test_scale_and_output_size():
    v = View(160, 256)
    assert v.scale(100, 200) == pytest.approx(1.28)  # 160/100 = 1.6 capped by 256/200 = 1.28
    assert v.output_size(100, 200) == (128, 256)
    assert v.output_size(200, 100) == (256, 128)
    assert v.scale(128, 150) == pytest.approx(1.25)
    assert v.output_size(128, 150) == (160, 188)  # round(187.5) = 188 (half to even)
    assert v.output_size(320, 320) == (160, 160)  # downscale


def test_apply_resize_boxes_follow_image():
    v = View(64, 200)
    img = np.zeros((30, 50, 3), np.uint8)
    img[10:20, 5:15] = 255  # white square at x 5..15, y 10..20
    out, boxes = v.apply(img, np.array([[5, 10, 15, 20]], np.float32))
    nh, nw = v.output_size(30, 50)
    assert out.shape == (nh, nw, 3) and out.dtype == np.uint8 and boxes.dtype == np.float32
    sx, sy = nw / 50, nh / 30
    np.testing.assert_allclose(boxes, [[5 * sx, 10 * sy, 15 * sx, 20 * sy]], rtol=1e-6)
    # the bright region sits where the box says (within a pixel of bilinear blur)
    ys, xs = np.nonzero(out[..., 0] > 127)
    x1, y1, x2, y2 = boxes[0]
    assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1
    assert abs(ys.min() - y1) <= 1 and abs(ys.max() + 1 - y2) <= 1


def test_flip_maths():
    v = View(20, 40, flip=True)  # 20x30 image -> same size, so only the flip acts
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, 0:4] = 200
    out, boxes = v.apply(img, np.array([[0, 2, 4, 18], [10, 0, 25, 5]], np.float32))
    assert out.shape == img.shape
    np.testing.assert_array_equal(out, img[:, ::-1])
    np.testing.assert_allclose(boxes, [[26, 2, 30, 18], [5, 0, 20, 5]])
    assert (out[:, 26:30] == 200).all() and (out[:, :26] == 0).all()


def test_flip_of_resized_equals_resized_then_mirrored():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    a, _ = View(50, 90, False).apply(img, np.zeros((0, 4), np.float32))
    b, _ = View(50, 90, True).apply(img, np.zeros((0, 4), np.float32))
    np.testing.assert_array_equal(b, a[:, ::-1])


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("hw", [(100, 150), (223, 131), (128, 128), (400, 90)])
def test_inverse_round_trip(flip, hw):
    rng = np.random.default_rng(1)
    h, w = hw
    xy = rng.uniform(0, 1, (20, 2)) * [w, h]
    wh = rng.uniform(0.02, 0.5, (20, 2)) * [w, h]
    boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)
    v = View(160, 256, flip)
    img = np.zeros((h, w, 3), np.uint8)
    _, vb = v.apply(img, boxes)
    np.testing.assert_allclose(v.boxes_to_view(boxes, (h, w)), vb, rtol=1e-5)
    back = v.boxes_to_original(vb, (h, w))
    np.testing.assert_allclose(back, boxes, rtol=1e-5, atol=1e-3)
    # torch tensors go through the same maths
    back_t = v.boxes_to_original(torch.from_numpy(vb), (h, w))
    assert isinstance(back_t, torch.Tensor)
    np.testing.assert_allclose(back_t.numpy(), boxes, rtol=1e-5, atol=1e-3)


def test_boxes_to_original_clips():
    v = View(100, 100)
    out = v.boxes_to_original(np.array([[-10, -10, 300, 300]], np.float32), (50, 50))
    np.testing.assert_allclose(out, [[0, 0, 50, 50]])
    raw = v.boxes_to_original(np.array([[-10, -10, 300, 300]], np.float32), (50, 50), clip=False)
    np.testing.assert_allclose(raw, [[-5, -5, 150, 150]])


def test_apply_is_deterministic_and_rejects_bad_images():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    v = View(160, 256, True)
    a, _ = v.apply(img, np.zeros((0, 4)))
    b, _ = v.apply(img.copy(), np.zeros((0, 4)))
    np.testing.assert_array_equal(a, b)
    assert a.flags["C_CONTIGUOUS"]
    with pytest.raises(ValueError):
        v.apply(img.astype(np.float32), np.zeros((0, 4)))
