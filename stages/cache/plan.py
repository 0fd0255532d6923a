"""Stage 1 planning: what a cache holds (fingerprint, manifest, record plan) and opening its stores.

Everything here runs on the driver before any teacher work, so bad params fail in seconds.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.cache.targets import ALL_TARGETS, DENSE_TARGETS
from stages.config import Params
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.detectors.base import Detector
from stages.detectors.checkpoint import load_teacher, teacher_model_params
from stores.codecs import parse_chain
from stores.manifest import SCHEMA_VERSION, Manifest, check_compatible, sha256_file
from stores.wds_store import WdsCacheReader, WdsCacheWriter
from stores.zarr_store import ZarrCacheReader, ZarrCacheWriter

WRITERS = {"zarr": ZarrCacheWriter, "wds": WdsCacheWriter}
READERS = {"zarr": ZarrCacheReader, "wds": WdsCacheReader}


def formats_of(fmt: str) -> tuple[str, ...]:
    return ("zarr", "wds") if fmt == "both" else (fmt,)


def cache_views(params: Params) -> list[View]:
    return [View(v.min_size, v.max_size, v.flip) for v in params.cache.views]


def plan_records(image_ids: list[int], views: list[View], views_per_image: int, seed: int) -> list[tuple[int, str]]:
    """(image_id, view key) pairs in cache order: every view, or a seeded subset of k per image."""
    plan = []
    for image_id in sorted(image_ids):
        chosen = views
        if 0 < views_per_image < len(views):
            g = np.random.default_rng([seed, image_id])  # per image: independent of dataset order
            chosen = [views[i] for i in sorted(g.choice(len(views), views_per_image, replace=False))]
        plan.extend((image_id, v.key) for v in chosen)
    return plan


def validate_targets(targets: list[str]) -> list[str]:
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown:
        raise ValueError(f"cache.targets: unknown target {unknown[0]!r}; valid: {', '.join(ALL_TARGETS)}")
    if not targets:
        raise ValueError(f"cache.targets is empty; list what your KD methods need from: {', '.join(ALL_TARGETS)}")
    return sorted(set(targets))


def codec_spec(params: Params) -> dict[str, str]:
    """Canonical chain per dense family that is cached (validated here, before any teacher work)."""
    out = {}
    for family, chain in sorted(params.cache.codecs.items()):
        if family not in DENSE_TARGETS:
            raise ValueError(f"cache.codecs: {family!r} is not a dense target family ({', '.join(DENSE_TARGETS)})")
        try:
            out[family] = parse_chain(chain).spec
        except ValueError as err:
            raise ValueError(f"cache.codecs.{family}: {err}") from None
    return out

def teacher_num_classes(params: Params, dataset: CocoDataset) -> int:
    return params.teacher.model.num_classes or dataset.num_classes


def expected_fingerprint(params: Params, dataset: CocoDataset | None = None) -> dict[str, Any]:
    """The fingerprint a cache built from `params` must carry (what stage 2 checks)."""
    targets = validate_targets(params.cache.targets)  # cheap checks first: fail before any loading
    codecs = codec_spec(params)
    ckpt = Path(params.teacher.checkpoint)
    arch = teacher_model_params(ckpt, params.teacher.model)
    dataset = dataset or CocoDataset(params.data.train_images, params.data.train_ann)
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher_weights": sha256_file(ckpt),
        "teacher_arch": arch,
        "dataset": dataset.fingerprint(),
        "views": [v.to_dict() for v in cache_views(params)],
        "views_per_image": params.cache.views_per_image,
        "targets": targets,
        "codecs": codecs,
    }


@dataclass(frozen=True)
class CacheJob:
    """Everything a worker process needs to compute blocks (plain data: it travels to dask workers).

    `digest` is the manifest's fingerprint digest: a worker reloads its teacher and writers when
    it changes (a rebuilt cache at the same path, a retrained checkpoint at the same file name).
    """

    root: str
    checkpoint: str
    images_dir: str
    ann_file: str
    formats: tuple[str, ...]
    batch_size: int
    loader_workers: int
    device: str
    digest: str = ""
    num_classes: int = 0
    run_id: str = ""  # one per run_cache call: workers reopen the stores for each run


def build_manifest(params: Params, dataset: CocoDataset | None = None, teacher: Detector | None = None) -> Manifest:
    dataset = dataset or CocoDataset(params.data.train_images, params.data.train_ann)
    fingerprint = expected_fingerprint(params, dataset)
    plan = plan_records(dataset.image_ids, cache_views(params), params.cache.views_per_image, params.cache.seed)
    if teacher is None:
        teacher = load_teacher(params.teacher.checkpoint, fingerprint["teacher_arch"], teacher_num_classes(params, dataset))
    if not teacher.dense:
        dense = [t for t in fingerprint["targets"] if t not in ("fpn", "detections")]
        if dense:
            raise ValueError(
                f"cache.targets {dense} need a dense teacher; a {teacher.arch} teacher provides fpn and detections only"
            )
    meta = {
        "num_classes": teacher.num_classes,
        "categories": dataset.categories,
        "strides": list(teacher.strides),
        "box_dim": teacher.box_dim,
        "has_quality": teacher.has_quality,
        "num_anchors": teacher.num_anchors,
        "default_reuse_index": teacher.default_reuse_index,
        "dense": teacher.dense,
    }
    return Manifest(
        schema_version=SCHEMA_VERSION,
        fingerprint=fingerprint,
        plan=plan,
        block_size=params.cache.block_size,
        levels=len(teacher.strides),
        meta=meta,
    )


def prepare_store(params: Params, overwrite: bool = False) -> tuple[CacheJob, Manifest]:
    """Create (or reopen, checking the manifest) every configured store; write the static head.

    A store built from other params raises CacheMismatchError naming the field (unless `overwrite`).
    """
    if params.cache.block_size < 1 or params.cache.batch_size < 1:
        raise ValueError(f"cache.block_size and cache.batch_size must be >= 1, got "
                         f"{params.cache.block_size} and {params.cache.batch_size}")
    dataset = CocoDataset(params.data.train_images, params.data.train_ann)
    arch = teacher_model_params(params.teacher.checkpoint, params.teacher.model)
    teacher = load_teacher(params.teacher.checkpoint, arch, teacher_num_classes(params, dataset))
    manifest = build_manifest(params, dataset, teacher)
    root = Path(params.cache.path)
    if overwrite and root.exists():
        import shutil

        shutil.rmtree(root)
    job = CacheJob(
        root=str(root),
        checkpoint=params.teacher.checkpoint,
        images_dir=params.data.train_images,
        ann_file=params.data.train_ann,
        formats=formats_of(params.cache.format),
        batch_size=params.cache.batch_size,
        loader_workers=params.cache.loader_workers,
        device=params.cache.device,
        digest=manifest.fingerprint_digest(),
        num_classes=teacher.num_classes,
        run_id=uuid.uuid4().hex,
    )
    writers = [WRITERS[f](root, manifest) for f in job.formats]
    if "head" in manifest.fingerprint["targets"]:
        # the fingerprint pins the teacher weights, so an existing head file is this head: keep
        # it (a rerun on a complete cache must not touch any file)
        names = [] if not (root / "static").exists() else [p.stem for p in (root / "static").glob("*.npz")]
        if "head" not in names:
            head = {k: v.detach().float().numpy() for k, v in teacher.head.state_dict().items()}
            writers[0].write_static("head", head)
    return job, manifest


def open_reader(root: str | Path, fmt: str):
    root = Path(root)
    if fmt not in READERS:
        raise ValueError(f"unknown cache format {fmt!r}: expected one of {', '.join(READERS)}")
    if not (root / "manifest.json").exists():
        raise FileNotFoundError(f"no cache at {root} (manifest.json missing): build it with python -m pipeline.cache_teacher")
    return READERS[fmt](root)



def check_cache(reader, params: Params) -> None:
    check_compatible(reader.manifest, expected_fingerprint(params), reader.root)
