"""Stage 1 planning: what a cache holds (fingerprint, manifest, record plan) and opening its stores.

Everything here runs on the driver before any teacher work, so bad params fail in seconds.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from stages.cache.basis import CPCA_FAMILIES, ensure_bases
from stages.cache.fingerprint import (
    block_fingerprints,
    check_blocks_current,
    dataset_identity,
    grew_from,
    keep_cached_plan,
    stale_blocks,
)
from stages.cache.targets import ALL_TARGETS, DENSE_TARGETS
from stages.config import Params
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.detectors.base import Detector
from stages.detectors.resolved_teacher import ResolvedTeacher, resolve_teacher
from stages.run_record import require_images
from stores import READERS, WRITERS
from stores.codecs import parse_chain, require_libraries
from stores.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    check_cache_folder,
    check_compatible,
    remove_store,
    sha256_file,
    version_path,
)
from stores.url import as_path, probe
from stores.verify import invalidate_blocks
from stores.zarr_grow import grow_zarr_store


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
            parsed = parse_chain(chain)
            require_libraries(parsed)  # zfp / sz / '+pco' need their packages: say so before any work
        except ValueError as err:
            raise ValueError(f"cache.codecs.{family}: {err}") from None
        if parsed.transform == "cpca" and family not in CPCA_FAMILIES:
            raise ValueError(f"cache.codecs.{family}: {parsed.spec} codes feature maps against one basis per "
                             f"level: use it for {', '.join(CPCA_FAMILIES)}")
        if parsed.transform == "cpca" and params.cache.basis_images < 1:
            raise ValueError(f"cache.basis_images is {params.cache.basis_images}: cache.codecs.{family} "
                             f"({parsed.spec}) fits its basis on these images; set it >= 1 (e.g. 16)")
        if parsed.transform == "topk" and family != "cls":  # per-anchor classes: class maps only
            raise ValueError(f"cache.codecs.{family}: {parsed.spec} is for class maps (cls) only")
        if parsed.transform == "mask" and (family not in ("box", "quality") or "cls" not in params.cache.targets):
            raise ValueError(f"cache.codecs.{family}: {parsed.spec} masks box/quality maps by the class map: "
                             "use it for box or quality, with cls in cache.targets")
        out[family] = parsed.spec
    return out

def resolve_train_teacher(params: Params, dataset: CocoDataset | None = None) -> ResolvedTeacher:
    """params' teacher, read once and mapped onto the training set's categories (refused, naming
    both files, if it cannot predict them): what an entry point resolves and passes down."""
    dataset = dataset or CocoDataset.from_params(params.data, "train")
    return resolve_teacher(params.teacher.checkpoint, params.teacher.model, dataset.categories, params.data.train_ann)


def teacher_num_classes(params: Params, dataset: CocoDataset) -> int:
    return params.teacher.model.num_classes or dataset.num_classes


def expected_fingerprint(params: Params, dataset: CocoDataset | None = None,
                         teacher: ResolvedTeacher | None = None) -> dict[str, Any]:
    """The fingerprint a cache built from `params` must carry (what stage 2 checks). `teacher`:
    params' teacher as the entry point resolved it (else it is resolved here)."""
    targets = validate_targets(params.cache.targets)  # cheap checks first: fail before any loading
    codecs = codec_spec(params)
    dataset = dataset or CocoDataset.from_params(params.data, "train")
    # the teacher's outputs mapped onto the dataset's categories (refused there, before any work)
    teacher = teacher or resolve_train_teacher(params, dataset)
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher_weights": teacher.sha256,
        "teacher_arch": teacher.arch,
        "dataset": dataset_identity(dataset),
        "label_map": teacher.label_map.to_dict(),
        **({"exif_transpose": True} if params.data.exif_transpose else {}),  # other pixels, other targets
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
    exif_transpose: bool = False  # data.exif_transpose: the worker must decode images as the driver does


def build_manifest(params: Params, dataset: CocoDataset | None = None, teacher: Detector | None = None,
                   resolved: ResolvedTeacher | None = None) -> Manifest:
    """The manifest of params' cache; `teacher` is `resolved`'s detector, built from it when None."""
    dataset = dataset or CocoDataset.from_params(params.data, "train")
    resolved = resolved or resolve_train_teacher(params, dataset)
    fingerprint = expected_fingerprint(params, dataset, resolved)
    plan = plan_records(dataset.image_ids, cache_views(params), params.cache.views_per_image, params.cache.seed)
    if teacher is None:
        teacher = resolved.build()
    if not teacher.dense:
        dense = [t for t in fingerprint["targets"] if t not in ("fpn", "detections")]
        if dense:
            raise ValueError(
                f"cache.targets {dense} need a dense teacher; a {teacher.arch} teacher provides fpn and detections only"
            )
    meta = {
        "num_classes": teacher.num_classes,
        "categories": dataset.categories,
        "teacher_label_space": resolved.label_space.to_dict(),
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
        block_fingerprints=block_fingerprints(plan, params.cache.block_size, dataset),
    )


def prepare_store(params: Params, overwrite: bool = False,
                  teacher: ResolvedTeacher | None = None) -> tuple[CacheJob, Manifest]:
    """Create (or reopen, checking the manifest) every configured store; write the static head.
    `teacher`: params' teacher as the entry point resolved it (else it is resolved here).

    A store built from other params raises CacheMismatchError naming the field (unless `overwrite`).
    """
    if params.cache.block_size < 1 or params.cache.batch_size < 1:
        raise ValueError(f"cache.block_size and cache.batch_size must be >= 1, got "
                         f"{params.cache.block_size} and {params.cache.batch_size}")
    root = as_path(params.cache.path)
    probe(root)  # an object store that cannot be listed / written: one line, before any teacher work
    check_cache_folder(root, overwrite=overwrite)  # before any work: never write into / delete foreign files
    dataset = CocoDataset.from_params(params.data, "train")
    require_images(dataset, "data.train_ann")
    resolved = teacher or resolve_train_teacher(params, dataset)
    teacher = resolved.build()
    manifest = build_manifest(params, dataset, teacher, resolved)
    if overwrite:
        remove_store(root)  # only a recognised store, entry by entry
    manifest = _refresh_blocks(root, manifest, dataset)
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
        exif_transpose=params.data.exif_transpose,
    )
    writers = [WRITERS[f](root, manifest) for f in job.formats]
    manifest = ensure_bases(root, manifest, manifest.fingerprint["codecs"], teacher, dataset,
                            params.cache.basis_images, params.cache.device, writers[0])
    if "head" in manifest.fingerprint["targets"]:
        manifest = _ensure_head(root, manifest, teacher, writers[0])
    if manifest.versions and not version_path(root, manifest.version).exists():
        manifest.publish(root)  # a new cache's first version, statics included
    return job, manifest


def _refresh_blocks(root: Path, manifest: Manifest, dataset: CocoDataset) -> Manifest:
    """Reopening a cache: refuse other params (naming the field), keep the cached plan when the json
    only lost or gained images (new images: new blocks at the end), make the blocks whose images
    changed incomplete so this run recomputes them (and only them), keep the recorded statics, and
    record a new dataset version when what the cache holds changed (`Manifest.publish`)."""
    path = root / MANIFEST_NAME
    dataset_sha256 = sha256_file(dataset.ann_file)
    if not path.exists():
        return manifest.with_new_version(dataset_sha256)  # published once the statics are written
    cached = Manifest.load(path)
    manifest = keep_cached_plan(cached, manifest, dataset)  # dropped images: no other block moves
    want = manifest.comparable()
    if grew_from(cached, manifest):  # appended records: the cached plan must be its prefix
        want["plan"] = want["plan"][: len(cached.plan)]
    check_compatible(cached, want, root)
    prior = cached
    if not cached.versions:  # no history in manifest.json (rewritten by --repair): the version files hold it
        prior = Manifest.latest_version(root) or cached
    manifest = replace(manifest, statics=cached.statics, versions=prior.versions)
    held = (manifest.plan, manifest.dropped, manifest.block_fingerprints)
    new_version = not prior.versions or held != (prior.plan, prior.dropped, prior.block_fingerprints)
    if new_version:
        manifest = manifest.with_new_version(dataset_sha256)
    stale = stale_blocks(cached, manifest.block_fingerprints)
    old = [b for b in stale if b < cached.num_blocks()]
    if old:
        invalidate_blocks(root, old)  # first: a kill after this leaves them missing, never stale-but-done
    if len(manifest.plan) > len(cached.plan) and (root / "zarr" / "zarr.json").exists():
        grow_zarr_store(root / "zarr", manifest)  # before the manifest: a killed grow is redone by the rerun
    if new_version:
        manifest.publish(root)
    elif manifest.versions != cached.versions:
        manifest.save(path)  # the history restored from the version files
    return manifest


def _ensure_head(root: Path, manifest: Manifest, teacher: Detector, writer) -> Manifest:
    """static/head.npz, recorded (sha256) in the manifest; an intact head is left untouched (a rerun
    on a complete cache touches no file), a missing or damaged one is rewritten."""
    path = root / "static" / "head.npz"
    want = manifest.statics.get("head")
    if want and path.exists() and sha256_file(path) == want:
        return manifest
    writer.write_static("head", {k: v.detach().float().cpu().numpy() for k, v in teacher.head.state_dict().items()})
    manifest = replace(manifest, statics={**manifest.statics, "head": sha256_file(path)})
    manifest.save(root / MANIFEST_NAME)
    return manifest


def open_reader(root: str | Path, fmt: str):
    root = as_path(root)
    if fmt not in READERS:
        raise ValueError(f"unknown cache format {fmt!r}: expected one of {', '.join(READERS)}")
    if not (root / "manifest.json").exists():
        raise FileNotFoundError(f"no cache at {root} (manifest.json missing): build it with python -m pipeline.cache_teacher")
    return READERS[fmt](root)



def pin_dataset_version(reader, dataset: CocoDataset) -> int:
    """Stage 2: make `reader` read the newest dataset version of its cache that holds exactly
    `dataset`'s images, when the latest one does not (a student whose json predates an append, or
    that starts while a writer appends): an older version is taken only when none of its blocks was
    rewritten since (their content fingerprints are the latest's) and all are complete. Returns the
    version read; the latest is kept (and refused later, naming the difference) when none fits."""
    latest = reader.manifest
    if _holds_exactly(latest, dataset):
        return latest.version
    for entry in reversed(latest.versions[:-1]):
        try:
            older = Manifest.load_version(reader.root, int(entry["version"]))
        except (FileNotFoundError, ValueError):
            continue
        kept = older.block_fingerprints == latest.block_fingerprints[: older.num_blocks()]
        if kept and _holds_exactly(older, dataset):
            reader.pin(older)
            if len(reader.completed_blocks()) == older.num_blocks():
                return older.version
            reader.pin(latest)
            break
    return latest.version


def _holds_exactly(manifest: Manifest, dataset: CocoDataset) -> bool:
    held = {i for i, _ in manifest.plan} - set(manifest.dropped)
    return held == set(dataset.image_ids)


def check_cache(reader, params: Params, teacher: ResolvedTeacher | None = None) -> None:
    """Stage 2: the cache was built from these params (fields) and this image content (per block).
    `teacher`: params' teacher as the run resolved it (else it is resolved here)."""
    dataset = CocoDataset.from_params(params.data, "train")
    check_compatible(reader.manifest, expected_fingerprint(params, dataset, teacher), reader.root)
    from stages import distributed

    if distributed.is_main():  # every image is read once, not once per rank (torchrun stops all if it fails)
        check_blocks_current(reader.manifest, dataset, reader.root)
