"""Stage 2 data: (image under view v, GT, cached teacher record for that image and view).

Two sources over the same records:
Both hand on compact records (`stores.codecs.CompactArray`: the lossless stage undone, nothing
dequantised); `stages.distill.teacher_source.cached_records_to_device` decodes them on the
training device.
- `CachedViewDataset`: map-style over the Zarr store (random access), shuffled by the training
  loop's `EpochBatchSampler`, which replays exactly the views stage 1 cached and batches only
  images of one padded size (the size the teacher saw).
- `wds_batches`: streaming over the WebDataset shards, split by node (DDP rank) and worker,
  bucketed by padded size the same way.
"""

from __future__ import annotations

import ctypes
import os
import random
import sys
from collections.abc import Iterator

import torch
import webdataset as wds

from stages.data.batching import ViewDataset, collate, view_padded_size
from stages.data.coco import CocoDataset
from stages.data.views import View
from stores.codecs import CompactArray
from stores.wds_store import shard_samples_of

_TUNED: set[int] = set()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def tune_malloc() -> bool:
    """Keep a loader worker's per-record buffers (MBs each: file bytes, msgpack bins, decompressed
    parts) in glibc's heap instead of fresh mmaps, once per process. glibc's default serves such
    blocks with mmap and trims freed heap tops, so every record faulted in (and the kernel zeroed)
    its ~10 MB of buffers again: about 1000 page faults per 1.8 MB record, 15-20 % of the worker's
    CPU time (measured with bench/loader.py). No-op off glibc; returns whether it applied.

    Also keeps blosc parts (the '+bzstd' / '+blz4' lossless stages) decoding in the worker's own
    thread: numcodecs would start its blosc pool in each worker's main thread, cores x workers."""
    pid = os.getpid()
    if pid in _TUNED:
        return True
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    if ok:
        _TUNED.add(pid)
    return ok


def as_tensors(arrays: dict) -> dict:
    """Compact parts as torch tensors sharing the numpy memory (no copy), so that a DataLoader with
    ``pin_memory=True`` pins them (`CompactArray.pin_memory`) before the training step copies them."""
    out = {}
    for name, value in arrays.items():
        if isinstance(value, CompactArray):
            value = CompactArray(value.chain, value.shape, value.dtype,
                                 {k: torch.from_numpy(v) for k, v in value.parts.items()})
        out[name] = value
    return out


def cached_views(reader, dataset: CocoDataset, views: list[View]) -> list[list[int]]:
    """Per training image, the indices of `views` the cache holds; refuses an incomplete cache.

    Both sources call this before training (the Zarr dataset and the WebDataset stream), so a
    partial cache is refused the same way whichever format reads it."""
    cached = set(reader.keys())
    allowed = [[i for i, v in enumerate(views) if (image_id, v.key) in cached] for image_id in dataset.image_ids]
    missing = [dataset.image_ids[i] for i, a in enumerate(allowed) if not a]
    if missing:
        raise ValueError(
            f"cache {reader.root} has no record for {len(missing)} training images (first: image id "
            f"{missing[0]}); finish it with python -m pipeline.cache_teacher"
        )
    return allowed


class CachedViewDataset(torch.utils.data.Dataset):
    """Index = image_index * V + view_index (ViewDataset 'all' layout) joined with the cache record."""

    def __init__(self, dataset: CocoDataset, views: list[View], reader, targets: list[str] | None = None,
                 compact: bool = True):
        self.coco, self.views, self.reader, self.targets = dataset, views, reader, targets
        self.compact = compact
        self.images = ViewDataset(dataset, views, mode="all")
        self.view_index = {v.key: i for i, v in enumerate(views)}
        self.allowed = cached_views(reader, dataset, views)

    def __len__(self) -> int:
        return len(self.images)

    def views_of(self, image: int) -> list[int]:
        return self.allowed[image]

    def bucket_of(self, index: int) -> tuple[int, int]:
        image, v = divmod(index, len(self.views))
        return view_padded_size(self.views[v], *self.coco.image_size(self.coco.image_ids[image]))

    def __getitem__(self, index: int) -> dict:
        tune_malloc()  # once per worker process
        item = self.images[index]
        # only what the losses read; compact: lossless stage only, dequantised on the training device
        record = self.reader.get(item["image_id"], item["view"], targets=self.targets, compact=self.compact,
                                 defer_delta=self.compact)  # index cumsum on the device
        item["teacher"] = as_tensors(record["arrays"])
        item["teacher_meta"] = record["meta"]
        return item


def check_padding(batch: dict) -> tuple[int, int]:
    """The batch's padded size, after checking every record was cached at that size."""
    padded = tuple(batch["images"].shape[-2:])
    for meta in batch["teacher_meta"]:
        if tuple(meta["padded_size"]) != padded:
            raise ValueError(
                f"cache record image {meta['image_id']} view {meta['view']} was computed at padded size "
                f"{meta['padded_size']} but this batch is {list(padded)}: the cache was built with other views "
                "or another SIZE_DIVISOR; rebuild it with python -m pipeline.cache_teacher"
            )
    return padded


def wds_batches(
    shard_paths: list[str],
    decode_sample,
    dataset: CocoDataset,
    views: list[View],
    batch_size: int,
    seed: int,
    start_step: int = 0,
    shuffle_buffer: int = 64,
    pin: bool = False,
    targets: list[str] | None = None,
) -> Iterator[dict]:
    """Endless batches streamed from WebDataset shards (split by DDP rank and DataLoader worker).

    decode_sample(sample) -> {'meta': ..., 'arrays': ...} (stores.wds_store's decoder, which checks
    each sample against its shard's checksums; run `cached_views` first to refuse a partial cache).
    Batches hold one padded size each; `start_step` batches are skipped on resume; `pin` pins the
    batch's compact parts (page-locked memory, for asynchronous copies to a CUDA device); `targets`:
    the families the losses read (only their members are read from the shards; None: all).
    """
    tune_malloc()
    by_key = {v.key: v for v in views}
    streams = _streams()
    if len(shard_paths) < streams:  # a rank or worker without a shard would wait forever
        raise ValueError(
            f"the WebDataset cache has {len(shard_paths)} shards but {streams} readers (processes x loader "
            "workers) each need one: lower train.workers or the process count, use distill.source: zarr, "
            "or rebuild the cache with a smaller cache.block_size"
        )
    epoch, emitted = 0, 0
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(shard_paths)
        rng.shuffle(order)
        # webdataset splits the shards by rank and worker; the samples are read at the sidecar's member
        # offsets (`stores.wds_store.shard_samples`: the same samples, without a Python tar walk)
        pipeline = wds.DataPipeline(wds.SimpleShardList(order), wds.split_by_node, wds.split_by_worker,
                                    shard_samples_of(targets))
        pending: dict[tuple[int, int], list[dict]] = {}
        buffer: list[dict] = []
        for sample in pipeline:
            buffer.append(sample)
            if len(buffer) < shuffle_buffer:
                continue
            sample = buffer.pop(rng.randrange(len(buffer)))
            batch = _add(pending, sample, decode_sample, dataset, by_key, batch_size, pin)
            if batch is not None:
                emitted += 1
                if emitted > start_step:
                    yield batch
        rng.shuffle(buffer)
        for sample in buffer:
            batch = _add(pending, sample, decode_sample, dataset, by_key, batch_size, pin)
            if batch is not None:
                emitted += 1
                if emitted > start_step:
                    yield batch
        epoch += 1


def _streams() -> int:
    """Readers the shards are split between: torchrun ranks (nodes for webdataset) x DataLoader workers."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    info = torch.utils.data.get_worker_info()
    return world * (info.num_workers if info is not None else 1)


def _add(pending, sample, decode_sample, dataset, by_key, batch_size, pin=False):
    record = decode_sample(sample)
    meta = record["meta"]
    if meta.get("dropped"):  # placeholder of an image the json no longer lists (stores.manifest: dropped)
        return None
    view = by_key[meta["view"]]
    group = pending.setdefault(tuple(meta["padded_size"]), [])
    group.append((meta, record["arrays"], view))
    if len(group) < batch_size:
        return None
    items = []
    for meta, arrays, view in group:
        item = ViewDataset.from_pairs(dataset, [(meta["image_id"], view)])[0]
        items.append(item | {"teacher": as_tensors(arrays), "teacher_meta": meta})
    group.clear()
    batch = collate(items)
    if pin:
        batch["teacher"] = [{n: v.pin_memory() if hasattr(v, "pin_memory") else v for n, v in rec.items()}
                            for rec in batch["teacher"]]
    return batch
