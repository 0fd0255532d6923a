"""A cache receipt: the small local JSON file that stands for a cache kept at a URL.

dvc hashes local files; a cache in a bucket (``cache.path: s3://bucket/prefix``) is outside its
reach (dvc's external outputs need a plugin per cloud and copy the data into dvc's cache). So when
cache.path is a URL, stage 1 writes ``cache.receipt`` after its run: the URL, the sha256 of the
store's manifest.json and the completed blocks of each format. The receipt is stage 1's out in the
dvc DAG (dvc.yaml's ``cache/teacher``, the folder itself for a local cache) and every student
stage depends on it, so dvc reruns the students exactly when the cache in the bucket changed (other
targets, codecs, views, an appended dataset, a block repaired into existence) and reuses them when
a rerun of stage 1 found everything complete: the receipt is deterministic (no times, no hosts).

A receipt is overwritten only by a receipt (its ``format`` key proves it is one); a folder or any
other file at that path is refused, naming it and the fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stores.manifest import MANIFEST_NAME, atomic_write_bytes
from stores.url import as_path, url_of

RECEIPT_FORMAT = "kdcache-cache-receipt-v1"


class ReceiptError(ValueError):
    """The receipt path holds something that is not a receipt; the message names it and the fix."""


def check_receipt_path(receipt: str | Path) -> None:
    """Refuse (before any teacher work) a receipt path that holds a folder or a file of another kind."""
    path = Path(receipt)
    fix = "move it away or set cache.receipt to another file"
    if path.is_dir():
        raise ReceiptError(f"cache.receipt {path} is a folder (a local cache?), not a receipt file: {fix}")
    if path.exists():
        try:
            ok = json.loads(path.read_text()).get("format") == RECEIPT_FORMAT
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise ReceiptError(f"cache.receipt {path} exists and is not a kdcache receipt: {fix}")


def cache_receipt(cache_path: str | Path) -> dict:
    """The receipt of the cache at `cache_path`: URL, manifest sha256, completed blocks per format."""
    from stores.wds_store import WdsCacheReader
    from stores.zarr_store import ZarrCacheReader

    root = as_path(cache_path)
    manifest = (root / MANIFEST_NAME).read_bytes()
    blocks = {}
    for fmt, reader in (("zarr", ZarrCacheReader), ("wds", WdsCacheReader)):
        if (root / fmt).exists():
            done = sorted(reader(root).completed_blocks())
            blocks[fmt] = {"count": len(done), "sha256": hashlib.sha256(json.dumps(done).encode()).hexdigest()}
    return {"format": RECEIPT_FORMAT, "url": url_of(root), "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "blocks": blocks}


def write_receipt(receipt: str | Path, cache_path: str | Path) -> dict:
    """Write the receipt of `cache_path` to the local file `receipt` (atomically) and return it."""
    check_receipt_path(receipt)
    data = cache_receipt(cache_path)
    atomic_write_bytes(Path(receipt), (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
    return data
