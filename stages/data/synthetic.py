"""A small, deterministic, COCO-format synthetic detection dataset that is hard but learnable.

This module is the dataset's public API; the work is in three modules below it:
`synthetic_classes` (what each class looks like), `synthetic_render` (one image and its boxes)
and `synthetic_dataset` (the PNG + COCO json files of a split).

Six classes, each told apart by its shape AND its texture (colour is only a weak cue: every class
has a hue family with wide jitter, and 20% of objects get a random hue):

    id  name      shape                         texture (in the object's own rotated frame)
    1   disc      filled ellipse                concentric bands
    2   square    rotated rectangle             checkerboard
    3   triangle  rotated triangle              parallel stripes
    5   ring      annulus (ellipse with a hole) per-pixel speckle
    7   cross     plus sign                     dots
    8   star      five-pointed star             smooth two-colour gradient

(category ids are COCO-like: start at 1 and are non-contiguous, to exercise the label mapping).

More classes (`textures`, `colours`; the defaults 1, 1 give exactly the six above, byte for byte):
a class is then a shape x texture x colour family. Each shape gets `textures` of the six textures
(its own first, then spread evenly: textures=2 gives the disc bands or speckle), and with
`colours` >= 2 each class also has a hue family (hues 1/colours apart, small jitter, no random hue,
the second texture colour a darker shade of the same hue) so colour becomes a reliable cue. Example:
textures=2, colours=2 gives 24 classes named like "disc-speckle-cyan"; see `class_specs`.

Each image (sides drawn independently from [min_side, max_side], so aspect ratios vary) has a
gradient + low-frequency-noise + faint-texture background, un-annotated clutter (fragments of class
shapes cut by a straight edge, irregular blobs, texture patches, thin lines, some drawn over the
objects), 2-12 objects from ~8 px up to ~60% of the shorter side (biased towards small ones),
objects partially occluding each other (each keeps >= 45% of its area visible) or cut by the image
border (>= 55% inside), and Gaussian pixel noise. Boxes are the tight extent of the whole
(amodal) shape clipped to the image, pixel-edge aligned; all annotations have iscrowd=0.

Determinism: image k of split s is drawn from `np.random.default_rng([seed, s, k])`, independent of
generation order; PNGs are written with a fixed compression level and no metadata, JSON with sorted
keys, so the same seed gives byte-identical files (on the same numpy / Pillow versions).
"""

from __future__ import annotations

from stages.data.synthetic_classes import CATEGORY_IDS, CLASSES, ClassSpec, class_specs
from stages.data.synthetic_dataset import generate
from stages.data.synthetic_render import render_image

__all__ = ["CATEGORY_IDS", "CLASSES", "ClassSpec", "class_specs", "generate", "render_image"]
