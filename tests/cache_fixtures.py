"""Session-scoped pytest fixtures for stage 1 and 2 tests: ONE tiny teacher checkpoint and ONE tiny cache. PYTEST_DONT_REWRITE

Use them from a test module with
    pytest_plugins = ["tests.cache_fixtures"]
(one registration: a session-scoped fixture imported by name into several modules would be built once
per module, and trips ruff's F811). The helpers below may be imported as usual; this module is
not assertion-rewritten (PYTEST_DONT_REWRITE), so importing it before pytest registers it as a
plugin is fine, and its asserts carry their own messages.

- `tiny_teacher` -> Path of a random-init RetinaNet checkpoint (resnet18, FPN 16, 2 tower convs,
  `tiny_coco`'s 6 classes) written by the real checkpoint code (`checkpoint_dict`,
  `save_checkpoint`); its score threshold is low so the untrained head still yields detections.
- `tiny_params(tiny_coco, checkpoint, root, **cache)` -> Params over tiny_coco, that teacher and
  `root / "cache"` (any CacheParams field can be overridden, e.g. `block_size=8`).
- `tiny_cache` -> Params of a complete cache (Zarr + WebDataset, every target, the default lossy
  codecs, 2 views x 8 images = 16 records in 4 blocks of 4). Read-only: `copy_cache` it first
  to damage or extend it.

Every cache in these tests is built with ONE torch thread (`torch_threads(1)`, and
`ONE_THREAD_ENV` for subprocesses; dask workers have one thread too): CPU float results depend
on the intra-op thread count, and "value-identical to an uninterrupted run" must compare like
with like. One thread is also the fastest setting on a small shared machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages.config import (
    CacheParams,
    DataParams,
    ModelParams,
    Params,
    StudentParams,
    TeacherParams,
    TrainParams,
)
from stages.config import ViewParams as VP

TEACHER_MODEL = ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=16, head_convs=2, score_thresh=0.005)
STUDENT_MODEL = ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=8, head_convs=2)
# the second view is larger and flipped: its non-square images pad to 128x256 / 256x128, so the
# blocks hold batches of several padded sizes
VIEWS = [VP(96, 128, False), VP(112, 160, True)]
# explicit lossy chains (not the project defaults): the fidelity tests check each one's known error
# bound, sparse's exactly
TINY_CODECS = {"fpn": "int8c+zstd", "cls": "sparse0.01+zstd", "box": "fp16+zstd"}
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def tiny_params(tiny_coco, checkpoint: str | Path, root: str | Path, **cache) -> Params:
    """Params over `tiny_coco`, teacher `checkpoint` and cache folder `root / "cache"`."""
    root = Path(root)
    cache.setdefault("codecs", TINY_CODECS)
    train = TrainParams(steps=2, batch_size=2, warmup_steps=1, log_every=1, ckpt_every=1, lr=0.001, optimizer="adamw")
    cache_cfg = replace(
        CacheParams(path=str(root / "cache"), format="both", views=list(VIEWS), batch_size=4, block_size=4,
                    n_workers=1, device="cpu"),
        **cache,
    )
    return Params(
        data=DataParams(
            train_images=str(tiny_coco.train_images), train_ann=str(tiny_coco.train_ann),
            val_images=str(tiny_coco.val_images), val_ann=str(tiny_coco.val_ann), min_size=96, max_size=128,
        ),
        teacher=TeacherParams(model=TEACHER_MODEL, checkpoint=str(checkpoint), train=train),
        student=StudentParams(model=STUDENT_MODEL, out_dir=str(root / "students")),
        cache=cache_cfg,
        train=train,
    )


def write_params(params: Params, path: str | Path) -> Path:
    """params as a YAML file for the `python -m pipeline.*` entry points."""
    from stages.config import to_dict

    path = Path(path)
    path.write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    return path


def copy_cache(params: Params, root: Path) -> Params:
    """A private copy of params' cache under `root` (to damage or resume); params pointing at it."""
    dst = root / "cache"
    shutil.copytree(params.cache.path, dst)
    return replace(params, cache=replace(params.cache, path=str(dst)))


def build_cache(params: Params, **kw) -> dict:
    from stages.cache.run import run_cache

    with torch_threads(1):
        return run_cache(params, progress=False, **kw)


def make_teacher(path: Path, num_classes: int, seed: int = 0, model: ModelParams = TEACHER_MODEL) -> Path:
    from stages.detectors.build import build_detector, checkpoint_dict
    from stages.training import save_checkpoint

    torch.manual_seed(seed)
    detector = build_detector(model, num_classes)
    save_checkpoint(path, checkpoint_dict(detector, model) | {"step": 0, "params": {}})
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_coco) -> Path:
    from stages.data.coco import CocoDataset

    num_classes = CocoDataset(tiny_coco.train_images, tiny_coco.train_ann).num_classes
    return make_teacher(tmp_path_factory.mktemp("tiny_teacher") / "model.pt", num_classes)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_coco, tiny_teacher) -> Params:
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path_factory.mktemp("tiny_cache"))
    build_cache(params)
    return params


def all_records(root: str | Path, fmt: str) -> dict[tuple[int, str], dict]:
    """{(image_id, view): {"meta": ..., "arrays": {name: array}}} of every record, failing on a
    duplicated key (WebDataset records are streamed shard by shard, so duplicates would show)."""
    from stores.wds_store import WdsCacheReader
    from stores.zarr_store import ZarrCacheReader

    out: dict[tuple[int, str], dict] = {}
    if fmt == "zarr":
        reader = ZarrCacheReader(root)
        records = (reader.get(i, v) for i, v in reader.keys())
    else:
        records = WdsCacheReader(root).iter_records()
    for rec in records:
        key = (rec.image_id, rec.view)
        assert key not in out, f"record {key} stored twice in {fmt}"
        out[key] = {"meta": rec.meta, "arrays": rec.arrays}
    return out


def assert_same_records(a: dict, b: dict, what: str) -> None:
    """Same keys, metas, array names, dtypes and values (bit for bit)."""
    assert sorted(a) == sorted(b), f"{what}: different record keys"
    for key in a:
        ra, rb = a[key], b[key]
        assert ra["meta"] == rb["meta"], f"{what}: meta of {key}"
        assert sorted(ra["arrays"]) == sorted(rb["arrays"]), f"{what}: array names of {key}"
        for name, x in ra["arrays"].items():
            y = rb["arrays"][name]
            assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {key} {name} {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
            assert np.array_equal(x, y, equal_nan=True), f"{what}: values of {key} {name}"


def file_mtimes(root: str | Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in Path(root).rglob("*")}


def subprocess_env() -> dict[str, str]:
    return {**os.environ, **ONE_THREAD_ENV, "PYTHONUNBUFFERED": "1"}

def run_main(params, tmp_path, *extra) -> str:
    """cache_teacher's CLI in-process; returns the SystemExit message ('' on success)."""
    path = write_params(params, tmp_path / "params.yaml")
    try:
        with torch_threads(1):
            _cache_teacher_main()(["--params", str(path), *extra])
    except SystemExit as stop:
        return str(stop.code)
    return ""


def _cache_teacher_main():
    from pipeline import cache_teacher  # tests may import pipeline; stages-only fixtures stay importable

    return cache_teacher.main
