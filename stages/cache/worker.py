"""Stage 1 worker side: run the teacher over one block and write it whole.

A block is computed and written whole by one process (so no two writers touch one shard), its
done marker last: a killed run resumes with only the missing blocks. Every worker process loads
the teacher once and keeps it. On a dask cluster a block is written under its scheduler claim
(`stages.cache.claims`: no file locks; what the filesystem must offer is documented there).

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
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stages.cache.basis import load_class_floors
from stages.cache.claims import claim, remove_stale_temps
from stages.cache.device_codecs import DeviceBasis
from stages.cache.plan import WRITERS, CacheJob
from stages.cache.targets import device_prepare, extract_records, parts_to_numpy, record_meta
from stages.data.batching import ViewDataset, collate, view_padded_size
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.detectors.resolved_teacher import ResolvedTeacher, reload_checked
from stages.training import resolve_device
from stores.base import EncodedRecord, codec_inputs, load_codec_bases, target_family
from stores.cache_basis import resolve_class_chains
from stores.codecs import CodecChain, effective_chain, pack, parse_chain
from stores.manifest import Manifest
from stores.url import as_path

DEFAULT_CHAIN = parse_chain("raw+zstd")  # families without a codec entry (detections, candidates, stats) stay exact
PREFETCH_BATCHES = 2  # decoded batches held ahead of the teacher (in-process loading)
ENCODE_THREADS = 2  # zstd releases the GIL: two encoders keep up with a GPU teacher

_WORKER: dict[str, Any] = {}


def _worker_state(job: CacheJob, resolved: ResolvedTeacher | None = None) -> dict[str, Any]:
    """Per process: the teacher (loaded once per checkpoint + fingerprint), and per job (one
    run_cache call) the dataset, manifest and writers, opened afresh: a store deleted and rebuilt
    at the same path (--overwrite) must not be written through handles of the old one.

    The teacher is built from `resolved` in the driver's own process (no file read); a dask worker
    re-reads the checkpoint and refuses it unless its sha256 is the one the manifest's fingerprint
    records (`stages.detectors.resolved_teacher`: why workers re-read rather than receive weights)."""
    teacher_key = (job.checkpoint, job.digest, job.device, job.num_classes)
    if _WORKER.get("teacher_key") != teacher_key:
        _WORKER.pop("teacher", None)  # free the old teacher's (GPU) memory before loading
        device = _worker_device(job.device)
        fp = Manifest.load(as_path(job.root) / "manifest.json").fingerprint
        if resolved is not None and resolved.sha256 == fp["teacher_weights"]:
            teacher = resolved.build()
        else:
            index = fp.get("label_map", {}).get("index")  # the teacher's classes -> the dataset's
            teacher = reload_checked(job.checkpoint, fp["teacher_weights"], fp["teacher_arch"], job.num_classes, index)
        _WORKER.update(teacher_key=teacher_key, device=device, teacher=teacher.to(device).eval())
        _WORKER["teacher_loads"] = _WORKER.get("teacher_loads", 0) + 1  # per process: stats show it is 1
    if _WORKER.get("job") != job:
        manifest = Manifest.load(as_path(job.root) / "manifest.json")
        _WORKER.update(
            job=job,
            manifest=manifest,
            dataset=CocoDataset(job.images_dir, job.ann_file, exif_transpose=job.exif_transpose),
        )
        with claim(job.digest, "store"):  # opening checks/creates folders: one worker at a time
            _WORKER["writers"] = [WRITERS[f](job.root, manifest) for f in job.formats]
        bases = load_codec_bases(as_path(job.root), manifest)  # cpca chains: the cache's basis, on the device once
        _WORKER["bases"] = {n: DeviceBasis.of(b, _WORKER["device"]) for n, b in bases.by_name.items()} if bases else None
        _WORKER["class_floors"] = load_class_floors(as_path(job.root), manifest)  # topkKfFpP: the fitted floors
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


def compute_block(job: CacheJob, block: int, teacher: ResolvedTeacher | None = None) -> ComputedBlock | None:
    """Run the teacher over one block; encoding continues on the encoder threads. None if the
    block is complete in every format already. `teacher`: the run's, when this is its process."""
    state = _worker_state(job, teacher)
    if all(block in w.completed_blocks() for w in state["writers"]):
        return None
    t0 = time.perf_counter()
    device, teacher, dataset = state["device"], state["teacher"], state["dataset"]
    manifest: Manifest = state["manifest"]
    fp = manifest.fingerprint
    targets = fp["targets"]
    views = {View.from_dict(v).key: View.from_dict(v) for v in fp["views"]}
    keys = manifest.block_records(block)
    dropped = set(manifest.dropped)
    live = [k for k in keys if k[0] not in dropped]  # dropped images get placeholders (finish_block)
    codecs = resolve_class_chains(fp["codecs"], state.get("class_floors"))  # blobs name their resolved floor
    batches = block_batches(live, views, dataset, job.batch_size)
    items = ViewDataset.from_pairs(dataset, [(image_id, views[key]) for image_id, key in live])
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
                arrays = {n: _prepare_array(t, codecs.get(n.split(".")[0], DEFAULT_CHAIN),
                                            **codec_inputs(n, rec, teacher.num_classes, state["bases"]))
                          for n, t in rec.items()}
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


def dropped_record(image_id: int, view: str) -> EncodedRecord:
    """The placeholder of a record whose image the dataset no longer lists (Manifest.dropped): it
    keeps the record's place in the plan, so no other block moves; it holds no target."""
    return EncodedRecord(image_id=int(image_id), view=str(view), meta={"image_id": int(image_id), "view": str(view),
                         "dropped": True}, blobs={})


def finish_block(job: CacheJob, computed: ComputedBlock) -> dict[str, Any]:
    """Wait for the block's encoding, then write it (whole) to every format that lacks it."""
    state = _worker_state(job)
    t0 = time.perf_counter()
    encoded = [r for f in computed.encoded for r in f.result()]
    by_key = {(r.image_id, r.view): r for r in encoded}
    ordered = [by_key.get(tuple(k)) or dropped_record(*k) for k in computed.keys]
    # the first writes of a Zarr store create its per-family arrays: one creator at a time
    first = "zarr" in job.formats and not all(
        (as_path(job.root) / "zarr" / "targets" / target_family(n) / "zarr.json").exists() for r in ordered for n in r.blobs
    )
    with claim(job.digest, "store") if first else contextlib.nullcontext(), claim(job.digest, f"block-{computed.block}"):
        # under the claim: a copy of this task that finished first made the block complete, and a
        # copy that died mid-publish left temp files only (see stages.cache.claims)
        writers = [w for w in state["writers"] if computed.block not in w.completed_blocks()]
        if writers:
            remove_stale_temps(job.root, computed.block)
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
        "teacher_loads": state["teacher_loads"],
    }


def cache_block(job: CacheJob, block: int) -> dict[str, Any]:
    """Compute and write one block (skipped if already complete): one dask task."""
    computed = compute_block(job, block)
    if computed is None:
        return {"block": block, "records": 0, "skipped": True, "pid": os.getpid()}
    return finish_block(job, computed)


def cache_blocks(job: CacheJob, blocks: Iterable[int], teacher: ResolvedTeacher | None = None) -> Iterator[dict[str, Any]]:
    """In-process pipeline: block b is written by a writer thread while block b + 1 runs on the
    teacher (built from `teacher`, the run's resolved one). Yields each block's stats once it is on
    disk (a write error stops the pipeline)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-write") as writer:
        pending: Future | None = None
        for b in blocks:
            computed = compute_block(job, b, teacher)
            if pending is not None:
                yield pending.result()
                pending = None
            if computed is None:
                yield {"block": b, "records": 0, "skipped": True, "pid": os.getpid()}
            else:
                pending = writer.submit(finish_block, job, computed)
        if pending is not None:
            yield pending.result()


def _prepare_array(tensor: torch.Tensor, chain: CodecChain, **inputs) -> tuple[dict, CodecChain, tuple, np.dtype]:
    """Device-side transform of one record array, with its host copy already under way.
    `inputs`: the transform's side inputs (`stores.base.codec_inputs`)."""
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        tensor = tensor.float()  # autocast's bf16/fp16 maps are stored from float32
    dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
    chain = effective_chain(np.empty(0, dtype), chain)
    parts = {k: _to_host(v) for k, v in device_prepare(tensor, chain, **inputs).items()}
    return parts, chain, tuple(tensor.shape), dtype


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t.detach()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t.detach(), non_blocking=True)

