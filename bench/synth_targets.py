"""Synthetic teacher targets shaped and distributed like a trained RetinaNet's, for figures a
randomly initialised teacher cannot give (its class maps all sit at the 0.01 prior).

Per record (one image under one view), levels P3..P7 (strides 8..128) cropped to the image:
  fpn.{l}  [C, h_l, w_l] float32  spatially smooth Gaussian features: 4x4-cell blocks of N(0, 1)
           plus 0.3 N(0, 1) per cell, times a log-normal per-channel scale (sigma 0.5)
  cls.{l}  [A*K, h_l, w_l] float32  sigmoid(N(-7, 1.2)) i.i.d.: background-dominated class
           probabilities, ~2.3% >= 0.01 and ~0.04% >= 0.05 (an assumption about a trained
           detector; i.i.d. positions are a pessimistic case for the sparse index stream)
  box.{l}  [A*4, h_l, w_l] float32  smooth Gaussian, std ~0.5 (normalised box deltas)
Seeded: the same generator state gives the same arrays.
"""

from __future__ import annotations

import math

import numpy as np

STRIDES = (8, 16, 32, 64, 128)
CLS_LOGIT_MEAN, CLS_LOGIT_STD = -7.0, 1.2


def level_sizes(h: int, w: int, strides=STRIDES) -> list[tuple[int, int]]:
    """Valid cells per level of an h x w image (as `stages.cache.targets.valid_cells`)."""
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


def smooth_maps(rng: np.random.Generator, c: int, h: int, w: int, std: float = 1.0, block: int = 4) -> np.ndarray:
    """[c, h, w] float32: blocky low-frequency Gaussian field plus cell noise, per-channel scaled."""
    low = rng.standard_normal((c, -(-h // block), -(-w // block)), dtype=np.float32)
    out = np.repeat(np.repeat(low, block, axis=1), block, axis=2)[:, :h, :w]
    out += np.float32(0.3) * rng.standard_normal((c, h, w), dtype=np.float32)
    scale = np.exp(0.5 * rng.standard_normal(c)).astype(np.float32) * np.float32(std)
    return np.ascontiguousarray(out * scale[:, None, None])


def class_probs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 probabilities sigmoid(N(CLS_LOGIT_MEAN, CLS_LOGIT_STD))."""
    logits = rng.standard_normal(shape, dtype=np.float32) * np.float32(CLS_LOGIT_STD) + np.float32(CLS_LOGIT_MEAN)
    np.negative(logits, out=logits)
    np.exp(logits, out=logits)
    logits += np.float32(1.0)
    return np.reciprocal(logits, out=logits)


def retinanet_record(rng: np.random.Generator, image_hw: tuple[int, int], fpn_channels: int = 256,
                     num_anchors: int = 9, num_classes: int = 80) -> dict[str, np.ndarray]:
    """fpn/cls/box arrays of one record of an image of size image_hw (RetinaNet COCO shapes by default)."""
    out: dict[str, np.ndarray] = {}
    for lv, (h, w) in enumerate(level_sizes(*image_hw)):
        out[f"fpn.{lv}"] = smooth_maps(rng, fpn_channels, h, w)
        out[f"cls.{lv}"] = class_probs(rng, (num_anchors * num_classes, h, w))
        out[f"box.{lv}"] = smooth_maps(rng, num_anchors * 4, h, w, std=0.5)
    return out
