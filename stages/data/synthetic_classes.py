"""The synthetic dataset's classes: shape x texture x colour families, and how each is drawn.

`stages.data.synthetic` renders images from these; the class list is its own module so the
dataset's generator reads as one job (see that module's docstring for the classes' table).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np

CLASSES: list[str] = ["disc", "square", "triangle", "ring", "cross", "star"]  # the default set = the shapes
CATEGORY_IDS: list[int] = [1, 2, 3, 5, 7, 8]
TEXTURES: list[str] = ["bands", "checker", "stripes", "speckle", "dots", "gradient"]  # index = _texture's cls
_HUE_NAMES = ["red", "yellow", "green", "cyan", "blue", "magenta"]  # hue k/6
MAX_TEXTURES = len(TEXTURES)
MAX_COLOURS = len(_HUE_NAMES)  # more hue families than this are too close to tell apart under jitter


@dataclass(frozen=True)
class ClassSpec:
    """One class: its name, COCO category id, shape index, texture index and colour family.

    colour -1 is the default set's weak cue (hue family by shape, wide jitter, 20% random hue)."""

    name: str
    category_id: int
    shape: int
    texture: int
    colour: int = -1


def class_specs(textures: int = 1, colours: int = 1) -> list[ClassSpec]:
    """The classes for `textures` textures per shape x `colours` hue families (6 x textures x colours).

    Order: colour, then texture, then shape, so the first six are always the default set's shapes
    with their own textures; ids continue non-contiguously after the default set's (a gap every 5)."""
    if not (isinstance(textures, int) and 1 <= textures <= MAX_TEXTURES):
        raise ValueError(f"need 1 <= textures <= {MAX_TEXTURES}, got textures={textures}")
    if not (isinstance(colours, int) and 1 <= colours <= MAX_COLOURS):
        raise ValueError(f"need 1 <= colours <= {MAX_COLOURS}, got colours={colours}")
    if textures == 1 and colours == 1:
        return [ClassSpec(CLASSES[s], CATEGORY_IDS[s], s, s) for s in range(len(CLASSES))]
    step = max(1, MAX_TEXTURES // textures)  # spread a shape's textures over the six
    specs = []
    for c in range(colours):
        for t in range(textures):
            for s in range(len(CLASSES)):
                k = len(specs)
                cid = CATEGORY_IDS[k] if k < len(CATEGORY_IDS) else CATEGORY_IDS[-1] + 1 + (k - 6) + (k - 6) // 5
                tex = (s + t * step) % MAX_TEXTURES
                colour = c if colours > 1 else -1
                name = f"{CLASSES[s]}-{TEXTURES[tex]}"
                if colour >= 0:
                    name += "-" + _HUE_NAMES[round(6 * c / colours) % 6]
                specs.append(ClassSpec(name, cid, s, tex, colour))
    return specs


def _shape_spec(shape: int) -> ClassSpec:
    """A default-set class for distractors: shape with its own texture and the weak colour cue."""
    return ClassSpec(CLASSES[shape], CATEGORY_IDS[shape], shape, shape)


# ---------------------------------------------------------------------------------------- geometry
def _convex_sd(u: np.ndarray, v: np.ndarray, verts: list[tuple[float, float]]) -> np.ndarray:
    """Approximate signed distance (negative inside) to a convex CCW polygon: max over edge half-planes."""
    d = None
    n = len(verts)
    for i in range(n):
        (x0, y0), (x1, y1) = verts[i], verts[(i + 1) % n]
        ex, ey = x1 - x0, y1 - y0
        ln = math.hypot(ex, ey)
        nx, ny = ey / ln, -ex / ln  # outward normal of a CCW polygon
        di = (u - x0) * nx + (v - y0) * ny
        d = di if d is None else np.maximum(d, di)
    return d


def _regular(n: int, r: float, phase: float) -> list[tuple[float, float]]:
    return [
        (r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _ccw(p: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The polygon in counter-clockwise order (positive shoelace area)."""
    a = sum(p[i][0] * p[(i + 1) % len(p)][1] - p[(i + 1) % len(p)][0] * p[i][1] for i in range(len(p)))
    return p if a > 0 else p[::-1]


_TRI = _ccw(_regular(3, 1.0, -math.pi / 2))
_STAR_OUT = _regular(5, 1.0, -math.pi / 2)
_STAR_IN = _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
# a star = its inner pentagon + five spike triangles (each convex): signed distance = min over parts
_STAR_PARTS = [
    _ccw(p) for p in [_STAR_IN] + [[_STAR_OUT[k], _STAR_IN[(k - 1) % 5], _STAR_IN[k]] for k in range(5)]
]
_SQUARE = _ccw([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)])
_CROSS_A = _ccw([(-1.0, -0.3), (1.0, -0.3), (1.0, 0.3), (-1.0, 0.3)])
_CROSS_B = _ccw([(-0.3, -1.0), (0.3, -1.0), (0.3, 1.0), (-0.3, 1.0)])


def _shape_sd(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (normalised units, negative inside) of class `cls` in its unit frame (extent ~[-1, 1])."""
    if cls == 0:  # disc
        return np.sqrt(u * u + v * v) - 1.0
    if cls == 1:  # square
        return _convex_sd(u, v, _SQUARE)
    if cls == 2:  # triangle (centroid at the origin)
        return _convex_sd(u, v, _TRI)
    if cls == 3:  # ring
        return np.abs(np.sqrt(u * u + v * v) - 0.74) - 0.26
    if cls == 4:  # cross
        return np.minimum(_convex_sd(u, v, _CROSS_A), _convex_sd(u, v, _CROSS_B))
    if cls == 5:  # star
        d = _convex_sd(u, v, _STAR_PARTS[0])
        for part in _STAR_PARTS[1:]:
            d = np.minimum(d, _convex_sd(u, v, part))
        return d
    raise ValueError(cls)


def _texture(cls: int, pu: np.ndarray, pv: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Texture mix t in [0, 1] for class `cls`; pu, pv are pixel offsets in the object's rotated frame."""
    period = rng.uniform(3.5, 7.0)
    w = 2 * math.pi / period
    ph = rng.uniform(0, 2 * math.pi)
    if cls == 0:  # concentric bands
        return 0.5 + 0.5 * np.sin(w * np.sqrt(pu * pu + pv * pv) + ph)
    if cls == 1:  # checkerboard
        return (np.sin(w * pu + ph) * np.sin(w * pv + ph) > 0).astype(np.float32)
    if cls == 2:  # stripes
        return np.clip(0.5 + 1.5 * np.sin(w * pu + ph), 0, 1)
    if cls == 3:  # speckle
        return (rng.random(pu.shape) < 0.5).astype(np.float32)
    if cls == 4:  # dots
        return (np.cos(w * pu + ph) + np.cos(w * pv + ph) > 0.9).astype(np.float32)
    if cls == 5:  # gradient along the object's u axis
        return np.clip(0.5 + pu / (2.0 * radius), 0, 1)
    raise ValueError(cls)


# ---------------------------------------------------------------------------------------- colour
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return (
        np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1)), dtype=np.float32) * 255
    )


def _object_colours(cls: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if rng.random() < 0.2:
        hue = rng.random()
    else:
        hue = cls / len(CLASSES) + rng.normal(0, 0.09)
    a = _hsv(hue, rng.uniform(0.35, 1.0), rng.uniform(0.45, 1.0))
    if rng.random() < 0.5:  # darker / lighter version of the same hue
        b = _hsv(hue + rng.normal(0, 0.03), rng.uniform(0.2, 1.0), rng.uniform(0.1, 0.5))
    else:  # a contrasting hue
        b = _hsv(hue + 0.5 + rng.normal(0, 0.12), rng.uniform(0.2, 0.9), rng.uniform(0.3, 1.0))
    return a, b


def _family_colours(colour: int, n_colours: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Colours of a class with a hue family: saturated, jitter well inside the family's 1/n band, and a
    darker shade of the same hue for the texture (a contrasting hue would cross into another family)."""
    hue = colour / n_colours + rng.normal(0, 0.12 / n_colours)
    a = _hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    b = _hsv(hue + rng.normal(0, 0.02), rng.uniform(0.4, 1.0), rng.uniform(0.15, 0.45))
    return a, b
