"""Who may write a block: claims through the dask scheduler, never POSIX file locks.

Caches live on NFS and object stores at scale, where `flock`/`fcntl` locks are missing, local to
one client or silently ignored. Stage 1 needs only what `stores.commit` states: whole-object writes
(one PUT on an object store, temp file + rename on disk) and read-after-write visibility; a block's
done marker is written last, so a reader that sees it sees the whole block. No locks, no appends.

Ownership: on a dask cluster the scheduler assigns each block task to one worker at a time, and a
task reassigned after its worker died (or was presumed dead) takes the block's
`distributed.Lock` before it writes (the lease of a dead holder expires after
`distributed.scheduler.locks.lease-timeout`). Inside the claim the writer rechecks the marker
(a finished block is skipped) and removes the temp files a dead writer left. Publishes are
idempotent: a block is computed deterministically from the manifest, so a second publish of the
same block writes the same bytes under the same names.

In-process runs (`cache.n_workers: 1`, no scheduler) take no claim: one process owns the cache;
two concurrent runs on one cache must share a scheduler (`--scheduler`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from stores.base import remove_path
from stores.url import abort_uploads, as_path, is_remote
from stores.zarr_layout import abort_block_uploads


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


@contextlib.contextmanager
def claim(digest: str, name: str) -> Iterator[None]:
    """Exclusive claim `name` of the cache with fingerprint digest `digest`, held by the dask
    scheduler (a no-op outside a dask worker)."""
    if not _in_dask_worker():
        yield
        return
    from distributed import Lock

    with Lock(f"kdcache-{digest[:16]}-{name}"):
        yield


def remove_stale_temps(root: str | Path, block: int) -> list[Path]:
    """Delete the temp files of `block` left by a writer that died mid-publish (call it holding the
    block's claim: nobody else is writing the block then). Returns what was removed."""
    root = as_path(root)
    if is_remote(root):  # no temp objects on an object store: abort the block's open multipart uploads
        keys = abort_block_uploads(root / "zarr", block)
        keys += abort_uploads(root / "wds", lambda key: key.endswith(f"shard-{block:06d}.tar"))
        return [root / k for k in keys]
    patterns = [
        f"wds/shard-{block:06d}.tar.tmp-*",  # WdsCacheWriter's shard before its rename
        f"wds/.shard-{block:06d}.json.tmp-*",  # its sidecar (atomic_write_bytes)
        f"zarr/done/.block-{block:06d}.json.tmp-*",  # a Zarr done marker (atomic_write_bytes)
        f"zarr/*/c/{block}.*.partial",  # zarr LocalStore's temp shard files
        f"zarr/*/*/c/{block}.*.partial",
    ]
    removed = [p for pattern in patterns for p in root.glob(pattern)]
    for p in removed:
        remove_path(p)
    return removed
