"""Dataset fingerprints that see content: the label space globally, image content per block.

The cache fingerprint (`stores.manifest`) holds what applies to every record: for the dataset,
its categories (ids and names, in label order: class k is the k-th category by id). What
changes image by image is fingerprinted per block of the plan: `block_fingerprints` hashes, for
each image of a block, its bytes (sha256 of the file), its json entry and its annotations.

So a same-size edit of an image's pixels, a fixed corrupt image or one image's edited boxes make
exactly the blocks holding that image stale: `stale_blocks` names them, and stage 1 recomputes
those alone (a full rebuild at COCO scale otherwise); stage 2 refuses a cache whose blocks no
longer match its dataset, naming the block and its images.

Hashing reads every image once per check (hashlib releases the GIL: HASH_THREADS files at a
time); the work is per image and per block, so it parallelises and nothing global has to be
held to compare two runs.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from stages.data.coco import CocoDataset
from stores.manifest import Manifest

HASH_THREADS = 8


def dataset_identity(dataset: CocoDataset) -> dict[str, Any]:
    """The dataset part of the cache fingerprint: the label space (category ids and names)."""
    return {"categories": [[int(c["id"]), str(c["name"])] for c in dataset.categories]}


def _file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_FILE_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # dataset -> {image id: file sha256}


def image_digests(dataset: CocoDataset, image_ids: list[int]) -> dict[int, str]:
    """image id -> sha256 of (file bytes, json entry, annotations); unknown ids map to ''. Each file
    is read once per dataset object (a rerun that keeps the cached plan hashes nothing twice)."""
    ids = set(dataset.image_ids)
    memo = _FILE_DIGESTS.setdefault(dataset, {})
    todo = [i for i in image_ids if i in ids and i not in memo]
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        memo.update(zip(todo, pool.map(lambda i: _file_sha256(dataset.image_path(i)), todo)))
    files = {i: memo[i] for i in image_ids if i in ids}
    out = {}
    for image_id in image_ids:
        if image_id not in files:
            out[image_id] = ""
            continue
        # the annotations as the dataset indexed them (sorted by id); CocoDataset keeps them per image
        anns = dataset._anns.get(image_id, [])  # noqa: SLF001 (no public per-image accessor)
        text = json.dumps([dataset.image_info(image_id), anns, files[image_id]], sort_keys=True, default=str)
        out[image_id] = hashlib.sha256(text.encode()).hexdigest()
    return out


def block_fingerprints(plan: list[tuple[int, str]], block_size: int, dataset: CocoDataset) -> list[str]:
    """One digest per block of `plan`: its records (image id, view) and its images' content."""
    digests = image_digests(dataset, sorted({i for i, _ in plan}))
    out = []
    for start in range(0, len(plan), block_size):
        records = plan[start : start + block_size]
        text = json.dumps([[i, v, digests[i]] for i, v in records], separators=(",", ":"))
        out.append(hashlib.sha256(text.encode()).hexdigest())
    return out


def stale_blocks(cached: Manifest, current: list[str]) -> list[int]:
    """Blocks whose recorded content fingerprint differs from `current`: every block if none are
    recorded, and the blocks a grown plan adds (they have none)."""
    have = cached.block_fingerprints
    if not have or len(have) > len(current):
        return list(range(len(current)))
    return [b for b, c in enumerate(current) if b >= len(have) or have[b] != c]


def keep_cached_plan(cached: Manifest, manifest: Manifest, dataset: CocoDataset) -> Manifest:
    """`manifest` laid over the cached plan when the dataset lost and/or gained images since it was built.

    A plan is the (image, view) list cut into blocks of block_size records, so dropping or adding one
    image in sorted order would shift every later block. Instead the cached plan is kept: the records
    of images the json no longer lists stay in place as placeholders (`dropped`), and the records of
    new images (their views chosen by the same seeded per-image rule, `manifest.plan`) are appended
    after it, in image id order. Only the blocks that held a dropped image, the new blocks and the
    cached plan's last block when it was partly filled change fingerprint and are recomputed. The
    result depends only on the cached plan and the json, so a rerun gives the same plan. Returns
    `manifest` unchanged when the plans already agree or when the surviving images' records differ
    (views changed: refused as usual, rebuild with --overwrite).
    """
    if manifest.plan == cached.plan and not cached.dropped:
        return manifest
    live = set(dataset.image_ids)
    cached_ids = {i for i, _ in cached.plan}
    if not _same_records(cached, manifest, live):
        return manifest  # the surviving images' records differ too (views changed): not a deletion / append
    plan = cached.plan + [r for r in manifest.plan if r[0] not in cached_ids]
    dropped = sorted(cached_ids - live)
    return replace(manifest, plan=plan, dropped=dropped,
                   block_fingerprints=block_fingerprints(plan, manifest.block_size, dataset))


def _same_records(cached: Manifest, manifest: Manifest, live: set[int]) -> bool:
    """The cached plan holds, for the images still listed, the records and order a fresh plan gives:
    each dataset version's appended segment (`cached.versions`) is in plan order on its own."""
    ends = sorted({0, len(cached.plan), *(int(v["records"]) for v in cached.versions if 0 < v["records"] < len(cached.plan))})
    for a, b in zip(ends, ends[1:]):
        segment = [r for r in cached.plan[a:b] if r[0] in live]
        ids = {i for i, _ in segment}
        if segment != [r for r in manifest.plan if r[0] in ids]:
            return False
    return True


def grew_from(cached: Manifest, manifest: Manifest) -> bool:
    """`manifest`'s plan is `cached`'s with records appended (an appended dataset version)."""
    return len(manifest.plan) > len(cached.plan) and manifest.plan[: len(cached.plan)] == cached.plan


def check_blocks_current(manifest: Manifest, dataset: CocoDataset, root) -> None:
    """Stage 2: refuse a cache whose blocks were computed from other image content, naming the
    first stale block, its images and the fix (a rerun of stage 1 recomputes only those)."""
    ids = set(dataset.image_ids) | set(manifest.dropped)
    missing = [i for i, _ in manifest.plan if i not in ids]
    if missing:
        raise ValueError(
            f"cache {root} holds image {missing[0]}, which is not in {dataset.ann_file}: the dataset changed "
            "since the cache was built; rebuild it (python -m pipeline.cache_teacher --overwrite)"
        )
    stale = stale_blocks(manifest, block_fingerprints(manifest.plan, manifest.block_size, dataset))
    if stale:
        images = sorted({i for i, _ in manifest.block_records(stale[0])})
        shown = ", ".join(map(str, images[:8])) + (" ..." if len(images) > 8 else "")
        raise ValueError(
            f"cache {root}: {len(stale)} blocks were computed from other image content than {dataset.images_dir} / "
            f"{dataset.ann_file} holds now (first: block {stale[0]}, images {shown}); rerun "
            "python -m pipeline.cache_teacher to recompute only those blocks"
        )
