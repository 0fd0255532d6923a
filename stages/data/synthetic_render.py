"""One synthetic image and its boxes (`render_image`): background, clutter, objects, noise.

The classes come from `stages.data.synthetic_classes`; the dataset the images make (and what is
hard about it) is described in `stages.data.synthetic`, the files are written by
`stages.data.synthetic_dataset`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from stages.data.synthetic_classes import (
    CLASSES,
    ClassSpec,
    _family_colours,
    _hsv,
    _object_colours,
    _shape_sd,
    _shape_spec,
    _texture,
    class_specs,
)

MIN_OBJECT = 8.0  # smallest object extent in pixels
MAX_OBJECT_FRAC = 0.6  # largest object extent as a fraction of the shorter image side


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    c0 = _hsv(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.15, 0.95))
    c1 = _hsv(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.15, 0.95))
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx * math.cos(ang) + yy * math.sin(ang)) / max(h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    # low-frequency colour noise
    gh, gw = int(rng.integers(3, 8)), int(rng.integers(3, 8))
    for c in range(3):
        small = Image.fromarray(rng.normal(0, 22, (gh, gw)).astype(np.float32))
        img[..., c] += np.asarray(small.resize((w, h), Image.BILINEAR))
    # faint full-image texture (stripes or grain)
    if rng.random() < 0.5:
        a = rng.uniform(0, math.pi)
        per = rng.uniform(4, 16)
        img += (rng.uniform(4, 14) * np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / per))[
            ..., None
        ]
    else:
        grain = Image.fromarray(rng.normal(0, 1, (h // 3 + 1, w // 3 + 1)).astype(np.float32))
        img += (rng.uniform(4, 12) * np.asarray(grain.resize((w, h), Image.BILINEAR)))[..., None]
    return img


# ---------------------------------------------------------------------------------------- drawing
class _Obj:
    __slots__ = ("cls", "cx", "cy", "radius", "theta", "ax", "ay")

    def __init__(self, cls, cx, cy, radius, theta, ax, ay):
        self.cls, self.cx, self.cy, self.radius, self.theta, self.ax, self.ay = (
            cls,
            cx,
            cy,
            radius,
            theta,
            ax,
            ay,
        )


def _frame(o: _Obj, h: int, w: int):
    """Patch window (clipped to the image) and normalised / pixel coordinates in the object frame."""
    ext = o.radius * max(o.ax, o.ay) * 1.25 + 2
    x0, x1 = int(math.floor(o.cx - ext)), int(math.ceil(o.cx + ext)) + 1
    y0, y1 = int(math.floor(o.cy - ext)), int(math.ceil(o.cy + ext)) + 1
    full = (x1 - x0) * (y1 - y0)
    x0c, x1c, y0c, y1c = max(x0, 0), min(x1, w), max(y0, 0), min(y1, h)
    if x1c <= x0c or y1c <= y0c:
        return None
    ys, xs = np.mgrid[y0c:y1c, x0c:x1c].astype(np.float32)
    dx, dy = xs + 0.5 - o.cx, ys + 0.5 - o.cy  # pixel centres
    c, s = math.cos(o.theta), math.sin(o.theta)
    pu = dx * c + dy * s
    pv = -dx * s + dy * c
    u = pu / (o.radius * o.ax)
    v = pv / (o.radius * o.ay)
    return (y0c, y1c, x0c, x1c), u, v, pu, pv, (x0, x1, y0, y1, full)


def _alpha_from_sd(sd: np.ndarray, o: _Obj) -> np.ndarray:
    px = sd * o.radius * min(o.ax, o.ay)  # approx. pixels
    return np.clip(0.5 - px, 0.0, 1.0)


def _full_area(o: _Obj) -> float:
    """Mask area (alpha >= 0.5) of the whole shape, ignoring the image border."""
    ext = o.radius * max(o.ax, o.ay) * 1.25 + 2
    n = int(2 * ext) + 2
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    dx, dy = xs + 0.5 - n / 2, ys + 0.5 - n / 2
    c, s = math.cos(o.theta), math.sin(o.theta)
    u = (dx * c + dy * s) / (o.radius * o.ax)
    v = (-dx * s + dy * c) / (o.radius * o.ay)
    return float((_alpha_from_sd(_shape_sd(o.cls, u, v), o) >= 0.5).sum())


def _paint(img: np.ndarray, win, alpha: np.ndarray, colour: np.ndarray) -> None:
    y0, y1, x0, x1 = win
    region = img[y0:y1, x0:x1]
    a = alpha[..., None]
    region *= 1 - a
    region += colour * a


def _object_colour_field(spec: ClassSpec, o: _Obj, pu, pv, rng, n_colours: int = 1) -> np.ndarray:
    if spec.colour < 0:
        a, b = _object_colours(spec.shape, rng)
    else:
        a, b = _family_colours(spec.colour, n_colours, rng)
    t = _texture(spec.texture, pu, pv, o.radius * max(o.ax, o.ay), rng)
    col = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    # soft shading across the object and per-object colour noise
    ang = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + rng.uniform(0, 0.25) * (pu * math.cos(ang) + pv * math.sin(ang)) / max(o.radius, 1.0)
    col *= np.clip(shade, 0.6, 1.4)[..., None]
    col += rng.normal(0, rng.uniform(2, 10), col.shape).astype(np.float32)
    return col


def _random_obj(
    cls: int, h: int, w: int, rng: np.random.Generator, small_bias: bool = True, min_object: float = MIN_OBJECT
) -> _Obj:
    short = min(h, w)
    hi = max(min_object + 1, MAX_OBJECT_FRAC * short)
    if small_bias and rng.random() < 0.4:
        size = rng.uniform(min_object, min(max(26.0, 2 * min_object), hi))
    else:
        size = math.exp(rng.uniform(math.log(min_object), math.log(hi)))
    aspect = math.exp(rng.uniform(-0.3, 0.3))
    ax, ay = math.sqrt(aspect), 1 / math.sqrt(aspect)
    radius = size / 2 / max(ax, ay)  # the longer axis spans ~size
    margin = 0.15 * size
    cx = rng.uniform(-margin, w + margin)
    cy = rng.uniform(-margin, h + margin)
    return _Obj(cls, cx, cy, radius, rng.uniform(0, 2 * math.pi), ax, ay)


def _draw_distractors(
    img: np.ndarray, rng: np.random.Generator, n_frag: int, n_blob: int, n_patch: int, n_line: int
):
    h, w = img.shape[:2]
    # texture patches: parallelograms with object-like textures, semi-transparent
    for _ in range(n_patch):
        o = _random_obj(int(rng.integers(len(CLASSES))), h, w, rng, small_bias=False)
        fr = _frame(o, h, w)
        if fr is None:
            continue
        win, u, v, pu, pv, _ = fr
        sd = np.maximum(np.abs(u) - 1.0, np.abs(v + 0.4 * u) - rng.uniform(0.3, 0.9))
        alpha = _alpha_from_sd(sd, o) * rng.uniform(0.25, 0.6)
        tex_cls = int(rng.choice([0, 1, 2, 4]))
        a, b = _object_colours(int(rng.integers(len(CLASSES))), rng)
        t = _texture(tex_cls, pu, pv, o.radius, rng)
        _paint(img, win, alpha, a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None])
    # irregular blobs (low-order radial harmonics: never star- or cross-like)
    for _ in range(n_blob):
        o = _random_obj(0, h, w, rng)
        fr = _frame(o, h, w)
        if fr is None:
            continue
        win, u, v, pu, pv, _ = fr
        r = np.sqrt(u * u + v * v)
        phi = np.arctan2(v, u)
        k = int(rng.integers(2, 4))
        boundary = 0.8 + rng.uniform(0.05, 0.2) * np.sin(k * phi + rng.uniform(0, 6.3))
        alpha = _alpha_from_sd(r - boundary, o)
        a, b = _object_colours(int(rng.integers(len(CLASSES))), rng)
        t = 0.5 + 0.5 * np.tanh(rng.normal(0, 1.0) * u)
        _paint(img, win, alpha, a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None])
    # fragments: a class shape + its texture cut by a straight edge, 20-45% of it left
    for _ in range(n_frag):
        cls = int(rng.integers(len(CLASSES)))
        o = _random_obj(cls, h, w, rng)
        fr = _frame(o, h, w)
        if fr is None:
            continue
        win, u, v, pu, pv, _ = fr
        ang = rng.uniform(0, 2 * math.pi)
        cut = u * math.cos(ang) + v * math.sin(ang) - rng.uniform(-0.55, -0.1)
        alpha = _alpha_from_sd(np.maximum(_shape_sd(cls, u, v), cut), o)
        _paint(img, win, alpha, _object_colour_field(_shape_spec(cls), o, pu, pv, rng))
    _draw_lines(img, rng, n_line)


def _draw_lines(img: np.ndarray, rng: np.random.Generator, n: int) -> None:
    h, w = img.shape[:2]
    for _ in range(n):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        length = rng.uniform(10, 0.8 * max(h, w))
        ang = rng.uniform(0, 2 * math.pi)
        x1, y1 = x0 + length * math.cos(ang), y0 + length * math.sin(ang)
        half = rng.uniform(0.4, 1.6)
        bx0, bx1 = int(max(min(x0, x1) - 3, 0)), int(min(max(x0, x1) + 4, w))
        by0, by1 = int(max(min(y0, y1) - 3, 0)), int(min(max(y0, y1) + 4, h))
        if bx1 <= bx0 or by1 <= by0:
            continue
        ys, xs = np.mgrid[by0:by1, bx0:bx1].astype(np.float32) + 0.5
        ex, ey = x1 - x0, y1 - y0
        tt = np.clip(((xs - x0) * ex + (ys - y0) * ey) / (ex * ex + ey * ey), 0, 1)
        dist = np.hypot(xs - (x0 + tt * ex), ys - (y0 + tt * ey))
        alpha = np.clip(half + 0.5 - dist, 0, 1) * rng.uniform(0.5, 1.0)
        colour = _hsv(rng.random(), rng.uniform(0, 1), rng.uniform(0.05, 1.0))
        _paint(img, (by0, by1, bx0, bx1), alpha, colour[None, None])


def render_image(
    h: int,
    w: int,
    rng: np.random.Generator,
    min_object: float = MIN_OBJECT,
    classes: list[ClassSpec] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """One image [h, w, 3] uint8 and its objects [{'category_id', 'bbox' [x,y,w,h], 'area'}].

    `min_object`: smallest annotated object extent in px (the difficulty knob: 8 is hard, 16 is
    what a short CPU demo can learn). `classes`: from `class_specs` (default: the six shapes)."""
    classes = classes or class_specs()
    n_colours = 1 + max(spec.colour for spec in classes)
    img = _background(h, w, rng)
    _draw_distractors(
        img,
        rng,
        n_frag=int(rng.integers(0, 4)),
        n_blob=int(rng.integers(1, 5)),
        n_patch=int(rng.integers(0, 3)),
        n_line=int(rng.integers(1, 5)),
    )
    owner = np.full((h, w), -1, dtype=np.int32)  # top-most object per pixel (alpha >= 0.5)
    visible: list[int] = []  # visible pixel count per placed object
    full_areas: list[float] = []
    objects: list[dict] = []
    n_target = int(rng.integers(2, 13))
    for _ in range(n_target):
        spec = classes[int(rng.integers(len(classes)))]
        for _attempt in range(12):
            o = _random_obj(spec.shape, h, w, rng, min_object=min_object)
            fr = _frame(o, h, w)
            if fr is None:
                continue
            win, u, v, pu, pv, _ = fr
            alpha = _alpha_from_sd(_shape_sd(spec.shape, u, v), o)
            mask = alpha >= 0.5
            n_in = int(mask.sum())
            if n_in == 0:
                continue
            full = _full_area(o)
            if n_in < 0.55 * full:  # too much outside the image
                continue
            ys, xs = np.nonzero(mask)
            y0, _, x0, _ = win
            bx0, bx1 = x0 + int(xs.min()), x0 + int(xs.max()) + 1
            by0, by1 = y0 + int(ys.min()), y0 + int(ys.max()) + 1
            if bx1 - bx0 < 5 or by1 - by0 < 5:
                continue
            # occlusion: every earlier object must keep >= 45% of its full area visible
            under = owner[win[0] : win[1], win[2] : win[3]][mask]
            under = under[under >= 0]
            ok = True
            if under.size:
                covered = np.bincount(under, minlength=len(visible))
                for j, cov in enumerate(covered):
                    if cov and visible[j] - cov < 0.45 * full_areas[j]:
                        ok = False
                        break
            if not ok:
                continue
            if under.size:
                for j, cov in enumerate(np.bincount(under, minlength=len(visible))):
                    visible[j] -= int(cov)
            owner[win[0] : win[1], win[2] : win[3]][mask] = len(visible)
            visible.append(n_in)
            full_areas.append(full)
            _paint(img, win, alpha, _object_colour_field(spec, o, pu, pv, rng, n_colours))
            objects.append(
                {
                    "category_id": spec.category_id,
                    "bbox": [float(bx0), float(by0), float(bx1 - bx0), float(by1 - by0)],
                    "area": float(n_in),
                }
            )
            break
    # a little clutter over the objects, then sensor noise
    _draw_lines(img, rng, int(rng.integers(0, 3)))
    img += rng.normal(0, rng.uniform(2.0, 8.0), img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), objects

