"""Stage 2 data: (image under view v, GT, cached teacher record for that image and view).

Two sources over the same records:
- `CachedViewDataset`: map-style over the Zarr store (random access), shuffled by the training
  loop's `EpochBatchSampler`, which replays exactly the views stage 1 cached and batches only
  images of one padded size (the size the teacher saw).
- `wds_batches`: streaming over the WebDataset shards, split by node (DDP rank) and worker,
  bucketed by padded size the same way.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
import webdataset as wds

from stages.data.batching import ViewDataset, collate, view_padded_size
from stages.data.coco import CocoDataset
from stages.data.views import View


class CachedViewDataset(torch.utils.data.Dataset):
    """Index = image_index * V + view_index (ViewDataset 'all' layout) joined with the cache record."""

    def __init__(self, dataset: CocoDataset, views: list[View], reader, targets: list[str] | None = None):
        self.coco, self.views, self.reader, self.targets = dataset, views, reader, targets
        self.images = ViewDataset(dataset, views, mode="all")
        cached = set(reader.keys())
        self.view_index = {v.key: i for i, v in enumerate(views)}
        self.allowed: list[list[int]] = []
        for image_id in dataset.image_ids:
            self.allowed.append([i for i, v in enumerate(views) if (image_id, v.key) in cached])
        missing = [dataset.image_ids[i] for i, a in enumerate(self.allowed) if not a]
        if missing:
            raise ValueError(
                f"cache {reader.root} has no record for {len(missing)} training images (first: image id "
                f"{missing[0]}); finish it with python -m pipeline.cache_teacher"
            )

    def __len__(self) -> int:
        return len(self.images)

    def views_of(self, image: int) -> list[int]:
        return self.allowed[image]

    def bucket_of(self, index: int) -> tuple[int, int]:
        image, v = divmod(index, len(self.views))
        return view_padded_size(self.views[v], *self.coco.image_size(self.coco.image_ids[image]))

    def __getitem__(self, index: int) -> dict:
        item = self.images[index]
        record = self.reader.get(item["image_id"], item["view"], targets=self.targets)  # only what the losses read
        item["teacher"] = record["arrays"]
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
) -> Iterator[dict]:
    """Endless batches streamed from WebDataset shards (split by DDP rank and DataLoader worker).

    decode_sample(sample) -> {'meta': ..., 'arrays': ...} (stores.wds_store's decoder).
    Batches hold one padded size each; `start_step` batches are skipped on resume.
    """
    by_key = {v.key: v for v in views}
    epoch, emitted = 0, 0
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(shard_paths)
        rng.shuffle(order)
        pipeline = wds.WebDataset(order, shardshuffle=False, nodesplitter=wds.split_by_node,
                                  workersplitter=wds.split_by_worker, empty_check=False)
        pending: dict[tuple[int, int], list[dict]] = {}
        buffer: list[dict] = []
        for sample in pipeline:
            buffer.append(sample)
            if len(buffer) < shuffle_buffer:
                continue
            sample = buffer.pop(rng.randrange(len(buffer)))
            batch = _add(pending, sample, decode_sample, dataset, by_key, batch_size)
            if batch is not None:
                emitted += 1
                if emitted > start_step:
                    yield batch
        rng.shuffle(buffer)
        for sample in buffer:
            batch = _add(pending, sample, decode_sample, dataset, by_key, batch_size)
            if batch is not None:
                emitted += 1
                if emitted > start_step:
                    yield batch
        epoch += 1


def _add(pending, sample, decode_sample, dataset, by_key, batch_size):
    record = decode_sample(sample)
    meta = record["meta"]
    view = by_key[meta["view"]]
    group = pending.setdefault(tuple(meta["padded_size"]), [])
    group.append((meta, record["arrays"], view))
    if len(group) < batch_size:
        return None
    items = []
    for meta, arrays, view in group:
        item = ViewDataset.from_pairs(dataset, [(meta["image_id"], view)])[0]
        items.append(item | {"teacher": arrays, "teacher_meta": meta})
    group.clear()
    return collate(items)
