"""Stage 1: run the teacher once over (image, view) records and write them to the cache stores.

Work is split into blocks of `cache.block_size` consecutive records of the manifest's plan. A
block is computed and written whole by one process (so no two writers touch one shard), its
done marker last: a killed run resumes with only the missing blocks. Blocks run in-process
(`n_workers: 1`), on a local dask cluster (`n_workers > 1`, one process each; on GPU machines one
worker per GPU) or on an existing cluster (`scheduler: ADDRESS`); every worker process loads the
teacher once.

Inside a block the teacher is the bottleneck by design: DataLoader workers decode images,
batches hold one padded size (the student will see exactly that input), targets are cropped,
quantised and sparsified on the device, copied to pinned host memory asynchronously, and framed
+ compressed by a background thread while the next batch runs on the teacher.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stores.wds_store import WdsCacheReader, WdsCacheWriter
from stores.zarr_store import ZarrCacheReader, ZarrCacheWriter
from tqdm import tqdm

from stages.cache_targets import ALL_TARGETS, device_prepare, extract_records, parts_to_numpy, record_meta
from stages.config import ModelParams, Params, from_dict, to_dict
from stages.data.batching import ViewDataset, collate
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.detectors.build import build_head, load_detector
from stages.student_data import image_hw, view_padded_size
from stages.training import resolve_device
from stores.base import EncodedRecord
from stores.codecs import effective_chain, pack, parse_chain
from stores.manifest import SCHEMA_VERSION, Manifest, check_compatible, sha256_file

WRITERS = {"zarr": ZarrCacheWriter, "wds": WdsCacheWriter}
READERS = {"zarr": ZarrCacheReader, "wds": WdsCacheReader}
DEFAULT_CHAIN = parse_chain("raw+zstd")  # families without a codec entry (detections, candidates, stats) stay exact


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
    return sorted(set(targets))


def codec_spec(params: Params) -> dict[str, str]:
    """Canonical chain per dense family that is cached (validated here, before any teacher work)."""
    out = {}
    for family, chain in sorted(params.cache.codecs.items()):
        if family not in ("fpn", "cls", "box", "quality"):
            raise ValueError(f"cache.codecs: {family!r} is not a dense target family (fpn, cls, box, quality)")
        try:
            out[family] = parse_chain(chain).spec
        except ValueError as err:
            raise ValueError(f"cache.codecs.{family}: {err}") from None
    return out


def teacher_model_params(checkpoint: str | Path) -> dict[str, Any]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return to_dict(from_dict(ModelParams, state["model_params"]))


def expected_fingerprint(params: Params) -> dict[str, Any]:
    """The fingerprint a cache built from `params` must carry (what stage 2 checks)."""
    ckpt = Path(params.teacher.checkpoint)
    if not ckpt.exists():
        raise FileNotFoundError(
            f"teacher checkpoint {ckpt} not found: train it (python -m pipeline.train_teacher) or set teacher.checkpoint"
        )
    dataset = CocoDataset(params.data.train_images, params.data.train_ann)
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher_weights": sha256_file(ckpt),
        "teacher_arch": teacher_model_params(ckpt),
        "dataset": dataset.fingerprint(),
        "views": [v.to_dict() for v in cache_views(params)],
        "views_per_image": params.cache.views_per_image,
        "targets": validate_targets(params.cache.targets),
        "codecs": codec_spec(params),
    }


@dataclass(frozen=True)
class CacheJob:
    """Everything a worker process needs to compute blocks (plain data: it travels to dask workers)."""

    root: str
    checkpoint: str
    images_dir: str
    ann_file: str
    formats: tuple[str, ...]
    batch_size: int
    loader_workers: int
    device: str


def build_manifest(params: Params) -> Manifest:
    fingerprint = expected_fingerprint(params)
    dataset = CocoDataset(params.data.train_images, params.data.train_ann)
    plan = plan_records(dataset.image_ids, cache_views(params), params.cache.views_per_image, params.cache.seed)
    teacher = load_detector(params.teacher.checkpoint)
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
    if not teacher.dense:
        dense = [t for t in fingerprint["targets"] if t not in ("fpn", "detections")]
        if dense:
            raise ValueError(
                f"cache.targets {dense} need a dense teacher; a {teacher.arch} teacher provides fpn and detections only"
            )
    return Manifest(
        schema_version=SCHEMA_VERSION,
        fingerprint=fingerprint,
        plan=plan,
        block_size=params.cache.block_size,
        levels=len(teacher.strides),
        meta=meta,
    )


def prepare_store(params: Params, overwrite: bool = False) -> tuple[CacheJob, Manifest]:
    """Create (or reopen, checking the manifest) every configured store; write the static head."""
    manifest = build_manifest(params)
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
    )
    writers = [WRITERS[f](root, manifest) for f in job.formats]
    if "head" in manifest.fingerprint["targets"]:
        teacher = load_detector(params.teacher.checkpoint)
        head = {k: v.detach().float().numpy() for k, v in teacher.head.state_dict().items()}
        for w in writers:
            w.write_static("head", head)
    return job, manifest


def open_reader(root: str | Path, fmt: str):
    root = Path(root)
    if not (root / "manifest.json").exists():
        raise FileNotFoundError(f"no cache at {root} (manifest.json missing): build it with python -m pipeline.cache_teacher")
    return READERS[fmt](root)


def teacher_head_from_cache(reader, arch: dict, num_classes: int) -> torch.nn.Module:
    """The frozen teacher dense head rebuilt from the cache's static weights (no backbone needed)."""
    head = build_head(from_dict(ModelParams, arch), num_classes)
    state = {k: torch.from_numpy(np.array(v)) for k, v in reader.read_static("head").items()}
    head.load_state_dict(state)
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return head


# ---------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _worker_state(job: CacheJob) -> dict[str, Any]:
    """Per process: the teacher (loaded once), dataset, manifest and writers."""
    if _WORKER.get("job") != job:
        device = _worker_device(job.device)
        teacher = load_detector(job.checkpoint).to(device).eval()
        manifest = Manifest.load(Path(job.root) / "manifest.json")
        _WORKER.clear()
        _WORKER.update(
            job=job,
            device=device,
            teacher=teacher,
            manifest=manifest,
            dataset=CocoDataset(job.images_dir, job.ann_file),
            writers=[WRITERS[f](job.root, manifest) for f in job.formats],
        )
    return _WORKER


def _worker_device(spec: str) -> torch.device:
    device = resolve_device(spec)
    if device.type == "cuda" and device.index is None:
        try:  # one dask worker per GPU: worker names are 0..n-1 on a LocalCluster
            from distributed import get_worker

            name = get_worker().name
            index = int(name) % torch.cuda.device_count() if str(name).isdigit() else 0
        except (ImportError, ValueError):
            index = 0
        device = torch.device("cuda", index)
    return device


def block_batches(keys, views: dict[str, View], dataset: CocoDataset, batch_size: int) -> list[list[int]]:
    """Positions in the block's key list, grouped into batches of one padded input size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for pos, (image_id, key) in enumerate(keys):
        if image_id not in dataset.coco.imgs:
            raise ValueError(f"cache plan has image {image_id}, which is not in {dataset.ann_file}: dataset changed?")
        groups.setdefault(view_padded_size(views[key], *image_hw(dataset, image_id)), []).append(pos)
    return [g[i : i + batch_size] for _, g in sorted(groups.items()) for i in range(0, len(g), batch_size)]


def _encode(host_records: list[tuple[int, str, dict, dict]], codecs: dict[str, str], event) -> list[EncodedRecord]:
    if event is not None:
        event.synchronize()  # the async device-to-host copies have landed
    out = []
    for image_id, view, meta, arrays in host_records:
        blobs = {}
        for name, (parts, chain, shape, dtype) in arrays.items():
            blobs[name] = pack(parts_to_numpy(parts), chain, shape, dtype)
        out.append(EncodedRecord(image_id=image_id, view=view, meta=meta, blobs=blobs))
    return out


def cache_block(job: CacheJob, block: int) -> dict[str, Any]:
    """Compute and write one block (skipped if already complete). Returns timing and size stats."""
    state = _worker_state(job)
    manifest: Manifest = state["manifest"]
    writers = [w for w in state["writers"] if block not in w.completed_blocks()]
    if not writers:
        return {"block": block, "records": 0, "skipped": True}
    t0 = time.perf_counter()
    device, teacher, dataset = state["device"], state["teacher"], state["dataset"]
    fp = manifest.fingerprint
    targets = fp["targets"]
    views = {View.from_dict(v).key: View.from_dict(v) for v in fp["views"]}
    keys = manifest.block_records(block)
    codecs = {f: parse_chain(c) for f, c in fp["codecs"].items()}
    batches = block_batches(keys, views, dataset, job.batch_size)
    loader = torch.utils.data.DataLoader(
        ViewDataset.from_pairs(dataset, [(image_id, views[key]) for image_id, key in keys]),
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=job.loader_workers,
        pin_memory=device.type == "cuda",
    )
    pending, encoded, teacher_s = [], [], 0.0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for batch in loader:
            t1 = time.perf_counter()
            images = batch["images"].to(device, non_blocking=True)
            gt = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = teacher(images, batch["image_sizes"], with_detections="detections" in targets)
                cands = teacher.candidates(out, gt) if "candidates" in targets else None
                records = extract_records(out, targets, gt, cands, teacher.num_classes)
            host = []
            for b, rec in enumerate(records):
                arrays = {n: _prepare_array(t, codecs.get(n.split(".")[0], DEFAULT_CHAIN)) for n, t in rec.items()}
                meta = record_meta(batch["image_ids"][b], batch["views"][b], batch["image_sizes"][b],
                                   tuple(images.shape[-2:]), teacher.strides)
                host.append((int(batch["image_ids"][b]), batch["views"][b], meta, arrays))
            event = None
            if device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            teacher_s += time.perf_counter() - t1
            pending.append(pool.submit(_encode, host, fp["codecs"], event))
        for f in pending:
            encoded.extend(f.result())
    by_key = {(r.image_id, r.view): r for r in encoded}
    ordered = [by_key[tuple(k)] for k in keys]
    nbytes = sum(len(b) for r in ordered for b in r.blobs.values())
    for w in writers:
        w.write_block(block, ordered)
    return {"block": block, "records": len(ordered), "bytes": nbytes, "seconds": time.perf_counter() - t0,
            "teacher_seconds": teacher_s, "skipped": False, "pid": os.getpid()}


def _prepare_array(tensor: torch.Tensor, chain) -> tuple[dict, Any, tuple, np.dtype]:
    """Device-side transform of one record array, with its host copy already under way."""
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        tensor = tensor.float()  # autocast's bf16/fp16 maps are stored from float32
    dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
    chain = effective_chain(np.empty(0, dtype), chain)
    parts = {k: _to_host(v) for k, v in device_prepare(tensor, chain).items()}
    return parts, chain, tuple(tensor.shape), dtype


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t.detach()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t.detach(), non_blocking=True)


# ---------------------------------------------------------------- driver side


def run_cache(
    params: Params, *, n_workers: int | None = None, scheduler: str = "", overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Build or resume the cache described by params; returns a summary with per-block stats."""
    job, manifest = prepare_store(params, overwrite=overwrite)
    done = set.intersection(*[WRITERS[f](job.root, manifest).completed_blocks() for f in job.formats])
    todo = [b for b in range(manifest.num_blocks()) if b not in done]
    t0 = time.perf_counter()
    stats: list[dict[str, Any]] = []
    scheduler = scheduler or params.cache.scheduler
    n_workers = n_workers or _default_workers(params)
    bar = tqdm(total=len(todo), desc="cache blocks", unit="block", disable=not progress)
    if todo and (scheduler or n_workers > 1):
        from distributed import Client, LocalCluster, as_completed

        cluster = None
        if not scheduler:
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
        with Client(scheduler or cluster) as client:
            futures = client.map(cache_block, [job] * len(todo), todo, pure=False)
            for future in as_completed(futures):
                stats.append(future.result())
                bar.update(1)
        if cluster is not None:
            cluster.close()
    else:
        for b in todo:
            stats.append(cache_block(job, b))
            bar.update(1)
    bar.close()
    return {
        "root": job.root,
        "blocks": manifest.num_blocks(),
        "computed_blocks": len(todo),
        "records": len(manifest.plan),
        "seconds": time.perf_counter() - t0,
        "stats": sorted(stats, key=lambda s: s["block"]),
    }


def _default_workers(params: Params) -> int:
    if resolve_device(params.cache.device).type == "cuda":
        return max(1, torch.cuda.device_count())
    return params.cache.n_workers


def check_cache(reader, params: Params) -> None:
    check_compatible(reader.manifest, expected_fingerprint(params), reader.root)
