"""Stage 1: run the teacher once over (image, view) records and write them to the cache stores.

Work is split into blocks of `cache.block_size` consecutive records of the manifest's plan. A
block is computed and written whole by one process holding the block's lock (so no two writers
touch one shard, even if two runs or a rescheduled dask task race), its done marker last: a
killed run resumes with only the missing blocks. Blocks run in-process (`n_workers: 1`), on a
local dask cluster (`n_workers > 1`, one process each; on GPU machines one worker per GPU) or on
an existing cluster (`scheduler: ADDRESS`); every worker process loads the teacher once.

The teacher is the bottleneck by design. Per block: images are decoded ahead (a prefetch thread,
or DataLoader workers), batches hold one padded size (the student will see exactly that input),
targets are cropped, quantised and sparsified on the device and copied to pinned host memory
asynchronously, then framed + compressed by a background encoder thread while the next batch runs
on the teacher. In-process, block b is written by a writer thread while block b + 1 is computed.

On CPU the float results depend on torch's intra-op thread count (oneDNN splits reductions
differently), so caches built with different thread counts differ in the last bits; dask workers
run with one thread each. Per-block stats record the count.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stages.cache_targets import (
    ALL_TARGETS,
    DENSE_TARGETS,
    device_prepare,
    extract_records,
    parts_to_numpy,
    record_meta,
)
from stages.config import ModelParams, Params, from_dict, to_dict
from stages.data.batching import ViewDataset, collate, view_padded_size
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.detectors.base import Detector
from stages.detectors.build import build_head, load_detector
from stages.training import resolve_device
from stores.base import EncodedRecord
from stores.codecs import CodecChain, effective_chain, pack, parse_chain
from stores.manifest import SCHEMA_VERSION, Manifest, check_compatible, sha256_file
from stores.wds_store import WdsCacheReader, WdsCacheWriter
from stores.zarr_store import ZarrCacheReader, ZarrCacheWriter

WRITERS = {"zarr": ZarrCacheWriter, "wds": WdsCacheWriter}
READERS = {"zarr": ZarrCacheReader, "wds": WdsCacheReader}
DEFAULT_CHAIN = parse_chain("raw+zstd")  # families without a codec entry (detections, candidates, stats) stay exact
PREFETCH_BATCHES = 2  # decoded batches held ahead of the teacher (in-process loading)
ENCODE_THREADS = 2  # zstd releases the GIL: two encoders keep up with a GPU teacher


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


def _read_checkpoint(checkpoint: str | Path) -> dict:
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(
            f"teacher checkpoint {path} not found: train it (python -m pipeline.train_teacher) or set teacher.checkpoint"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...
        raise ValueError(f"teacher checkpoint {path} is not readable ({type(err).__name__}); retrain or replace it") from None
    if not isinstance(state, dict):
        raise ValueError(f"teacher checkpoint {path} holds a {type(state).__name__}, not a checkpoint or state_dict")
    return state


def teacher_model_params(checkpoint: str | Path, fallback: ModelParams | None = None) -> dict[str, Any]:
    """The teacher's ModelParams as a dict: from a kdcache checkpoint, or `fallback` (params'
    teacher.model) for a raw torchvision-style state_dict that carries no architecture."""
    state = _read_checkpoint(checkpoint)
    if "model_params" in state:
        return to_dict(from_dict(ModelParams, state["model_params"], "model_params"))
    if fallback is None:
        raise ValueError(f"teacher checkpoint {checkpoint} is a raw state_dict: describe it in teacher.model")
    return to_dict(fallback)


def load_teacher(checkpoint: str | Path, arch: dict, num_classes: int) -> Detector:
    """The teacher on the CPU: a kdcache checkpoint (architecture from the file) or a raw
    state_dict described by `arch` (teacher.model) with `num_classes` classes."""
    state = _read_checkpoint(checkpoint)
    if "model_params" in state:
        return load_detector(checkpoint)
    return load_detector(checkpoint, from_dict(ModelParams, arch), num_classes)


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
    """Per process: the teacher (loaded once per checkpoint + fingerprint), and per job (one
    run_cache call) the dataset, manifest and writers, opened afresh: a store deleted and rebuilt
    at the same path (--overwrite) must not be written through handles of the old one."""
    teacher_key = (job.checkpoint, job.digest, job.device, job.num_classes)
    if _WORKER.get("teacher_key") != teacher_key:
        _WORKER.pop("teacher", None)  # free the old teacher's (GPU) memory before loading
        device = _worker_device(job.device)
        manifest = Manifest.load(Path(job.root) / "manifest.json")
        teacher = load_teacher(job.checkpoint, manifest.fingerprint["teacher_arch"], job.num_classes)
        _WORKER.update(teacher_key=teacher_key, device=device, teacher=teacher.to(device).eval())
    if _WORKER.get("job") != job:
        manifest = Manifest.load(Path(job.root) / "manifest.json")
        _WORKER.update(
            job=job,
            manifest=manifest,
            dataset=CocoDataset(job.images_dir, job.ann_file),
            writers=[WRITERS[f](job.root, manifest) for f in job.formats],
        )
    if "encoder" not in _WORKER:
        _WORKER["encoder"] = ThreadPoolExecutor(max_workers=ENCODE_THREADS, thread_name_prefix="kdcache-encode")
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
        try:
            hw = dataset.image_size(image_id)
        except KeyError:
            raise ValueError(
                f"cache plan has image {image_id}, which is not in {dataset.ann_file}: dataset changed? "
                "rebuild the cache (python -m pipeline.cache_teacher --overwrite)"
            ) from None
        groups.setdefault(view_padded_size(views[key], *hw), []).append(pos)
    return [g[i : i + batch_size] for _, g in sorted(groups.items()) for i in range(0, len(g), batch_size)]


def _prefetch(make_batch, batches: list[list[int]], depth: int = PREFETCH_BATCHES) -> Iterator[dict]:
    """Batches built by a background thread, `depth` ahead (image decoding overlaps the teacher);
    an exception there (a corrupt image) is raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        for idx in batches:
            if stop.is_set():
                return
            try:
                item = (make_batch(idx), None)
            except BaseException as err:  # handed to the consumer, which re-raises it
                item = (None, err)
            q.put(item)
            if item[1] is not None:
                return

    thread = threading.Thread(target=work, name="kdcache-prefetch", daemon=True)
    thread.start()
    try:
        for _ in batches:
            batch, err = q.get()
            if err is not None:
                raise err
            yield batch
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.05)


def _loader(job: CacheJob, dataset: ViewDataset, batches: list[list[int]], device: torch.device) -> Iterable[dict]:
    workers = job.loader_workers
    if workers > 0 and multiprocessing.current_process().daemon:
        workers = 0  # daemonic processes (dask workers by default) may not have children
    if workers == 0:
        return _prefetch(lambda idx: collate([dataset[i] for i in idx]), batches)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers, pin_memory=device.type == "cuda"
    )


HostRecord = tuple[int, str, dict, dict]  # image_id, view, meta, {name: (parts, chain, shape, dtype)}


def _encode(host_records: list[HostRecord], event) -> list[EncodedRecord]:
    if event is not None:
        event.synchronize()  # the async device-to-host copies have landed
    out = []
    for image_id, view, meta, arrays in host_records:
        blobs = {}
        for name, (parts, chain, shape, dtype) in arrays.items():
            host = parts_to_numpy(parts)
            if "scale" in host and not np.all(np.isfinite(host["scale"])):
                # the device-side int8c cannot raise without a sync; the numpy reference does
                raise ValueError(f"image {image_id} view {view}: {name} has non-finite values (NaN/inf): "
                                 "the teacher diverged? cannot quantise it with int8c")
            blobs[name] = pack(host, chain, shape, dtype)
        out.append(EncodedRecord(image_id=image_id, view=view, meta=meta, blobs=blobs))
    return out


@dataclass
class ComputedBlock:
    """A block whose teacher work is done; its records are still being encoded (futures)."""

    block: int
    keys: list[tuple[int, str]]
    encoded: list[Future]
    teacher_seconds: float
    started: float


def compute_block(job: CacheJob, block: int) -> ComputedBlock | None:
    """Run the teacher over one block; encoding continues on the encoder threads. None if the
    block is complete in every format already."""
    state = _worker_state(job)
    if all(block in w.completed_blocks() for w in state["writers"]):
        return None
    t0 = time.perf_counter()
    device, teacher, dataset = state["device"], state["teacher"], state["dataset"]
    manifest: Manifest = state["manifest"]
    fp = manifest.fingerprint
    targets = fp["targets"]
    views = {View.from_dict(v).key: View.from_dict(v) for v in fp["views"]}
    keys = manifest.block_records(block)
    codecs = {f: parse_chain(c) for f, c in fp["codecs"].items()}
    batches = block_batches(keys, views, dataset, job.batch_size)
    items = ViewDataset.from_pairs(dataset, [(image_id, views[key]) for image_id, key in keys])
    encoded, teacher_s = [], 0.0
    for batch in _loader(job, items, batches, device):
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
        encoded.append(state["encoder"].submit(_encode, host, event))
    return ComputedBlock(block, keys, encoded, teacher_s, t0)


@contextlib.contextmanager
def block_lock(root: str | Path, block: int) -> Iterator[None]:
    """Exclusive inter-process lock of one block (``<root>/.locks/block-N.lock``): a second run on
    the same cache, or a dask task rescheduled while its first copy still runs, waits instead of
    rewriting the shard under the first writer."""
    path = Path(root) / ".locks" / f"block-{block:06d}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def finish_block(job: CacheJob, computed: ComputedBlock) -> dict[str, Any]:
    """Wait for the block's encoding, then write it (whole) to every format that lacks it."""
    state = _worker_state(job)
    t0 = time.perf_counter()
    encoded = [r for f in computed.encoded for r in f.result()]
    by_key = {(r.image_id, r.view): r for r in encoded}
    ordered = [by_key[tuple(k)] for k in computed.keys]
    with block_lock(job.root, computed.block):
        writers = [w for w in state["writers"] if computed.block not in w.completed_blocks()]
        for w in writers:
            w.write_block(computed.block, ordered)
    now = time.perf_counter()
    return {
        "block": computed.block,
        "records": len(ordered),
        "bytes": sum(len(b) for r in ordered for b in r.blobs.values()),
        "seconds": now - computed.started,
        "teacher_seconds": computed.teacher_seconds,
        "write_seconds": now - t0,
        "formats": [w.format for w in writers],
        "skipped": False,
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
    }


def cache_block(job: CacheJob, block: int) -> dict[str, Any]:
    """Compute and write one block (skipped if already complete): one dask task."""
    computed = compute_block(job, block)
    if computed is None:
        return {"block": block, "records": 0, "skipped": True, "pid": os.getpid()}
    return finish_block(job, computed)


def cache_blocks(job: CacheJob, blocks: Iterable[int]) -> Iterator[dict[str, Any]]:
    """In-process pipeline: block b is written by a writer thread while block b + 1 runs on the
    teacher. Yields each block's stats once it is on disk (a write error stops the pipeline)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-write") as writer:
        pending: Future | None = None
        for b in blocks:
            computed = compute_block(job, b)
            if pending is not None:
                yield pending.result()
                pending = None
            if computed is None:
                yield {"block": b, "records": 0, "skipped": True, "pid": os.getpid()}
            else:
                pending = writer.submit(finish_block, job, computed)
        if pending is not None:
            yield pending.result()


def _prepare_array(tensor: torch.Tensor, chain: CodecChain) -> tuple[dict, CodecChain, tuple, np.dtype]:
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
    with tqdm(total=len(todo), desc="cache blocks", unit="block", disable=not progress) as bar:
        if todo and (scheduler or n_workers > 1):
            stats = _run_dask(job, todo, scheduler, n_workers, bar)
        else:
            for s in cache_blocks(job, todo):
                stats.append(s)
                bar.update(1)
    return {
        "root": job.root,
        "blocks": manifest.num_blocks(),
        "computed_blocks": sum(not s["skipped"] for s in stats),
        "records": len(manifest.plan),
        "seconds": time.perf_counter() - t0,
        "fingerprint_digest": job.digest,
        "stats": sorted(stats, key=lambda s: s["block"]),
    }


def _run_dask(job: CacheJob, todo: list[int], scheduler: str, n_workers: int, bar) -> list[dict[str, Any]]:
    """One task per block on an existing scheduler or a local cluster of single-threaded processes."""
    import dask
    from distributed import Client, LocalCluster, as_completed

    stats = []
    with contextlib.ExitStack() as stack:
        if scheduler:
            client = stack.enter_context(Client(scheduler))
        else:
            # DataLoader workers are children of the dask worker: allowed only if it is not daemonic
            stack.enter_context(dask.config.set({"distributed.worker.daemon": job.loader_workers == 0}))
            cluster = stack.enter_context(
                LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
            )
            client = stack.enter_context(Client(cluster))
        futures = client.map(cache_block, [job] * len(todo), todo, pure=False)
        for future in as_completed(futures):
            stats.append(future.result())
            bar.update(1)
    return stats


def _default_workers(params: Params) -> int:
    if resolve_device(params.cache.device).type == "cuda":
        return max(1, torch.cuda.device_count())
    return params.cache.n_workers


def check_cache(reader, params: Params) -> None:
    check_compatible(reader.manifest, expected_fingerprint(params), reader.root)
