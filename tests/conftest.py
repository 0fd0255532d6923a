"""Shared fixtures. `tiny_coco`: a tiny synthetic COCO dataset (8 train / 4 val images, 96-128 px)."""

from __future__ import annotations

import os

# Tiny tensors: one thread is faster than two (no sync cost) and makes float results independent of
# the machine's core count; subprocesses (dvc stages, killed cache runs) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path
from typing import NamedTuple

import pytest


class TinyCoco(NamedTuple):
    root: Path
    train_images: Path
    train_ann: Path
    val_images: Path
    val_ann: Path


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> TinyCoco:
    """Generated once per test session; treat as read-only (copy it before corrupting anything)."""
    from stages.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny_coco")
    out = generate(root, seed=0, num_train=8, num_val=4, min_side=96, max_side=128, progress=False)
    return TinyCoco(
        root=root,
        train_images=Path(out["train_images"]),
        train_ann=Path(out["train_ann"]),
        val_images=Path(out["val_images"]),
        val_ann=Path(out["val_ann"]),
    )
