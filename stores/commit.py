"""The commit protocol of a cache: how a block becomes visible, without rename or locks.

It holds on a local disk, NFS and an object store (S3 and S3-compatible servers, GCS, Azure via
fsspec) alike, because it asks only this of the store:

1. **a whole-object write is atomic**: a reader sees the old object, the new one, or none, never a
   part (one PUT on S3, which also holds for multipart uploads: the object exists only once the
   upload completes; temp file + ``os.replace`` on POSIX, `stores.url.write_whole`);
2. **read-after-write consistency**: once a write returned, every reader on every node that GETs or
   LISTs sees it (S3 has been strongly consistent since December 2020; NFS gives close-to-open);
3. nothing else: no rename, no append, no locks. Conditional create (``If-None-Match: *``,
   `stores.url.write_new`) is used where offered and never required for correctness.

The protocol:

- **Objects are written whole.** Each shard object (a Zarr shard holding one block of one array, a
  WebDataset tar) is written by one writer in one write, never updated in place.
- **A marker makes a block visible, written last.** Zarr: ``zarr/done/block-NNNNNN.json`` after every
  shard object of the block; it records the sha256 of every blob and the size of every shard object
  it names (``objects``). WebDataset: the sidecar ``shard-NNNNNN.json`` (sha256 / crc32c of every
  member, tar size, member offsets) goes first and the tar itself, written whole, is the marker.
- **Readers trust a block only through its marker.** A block without one does not exist for a
  reader (`CacheReader.keys`, ``locate``); data is checked against the marker / sidecar checksums
  (zarr's crc32c per chunk and shard index, the blobs' sha256 in `stores.verify`, crc32c per
  streamed member), so an object replaced under a marker is reported, never silently read.
- **Two writers of one block are harmless.** A block is computed deterministically from the
  manifest (same teacher, views, codecs, thread count), so a slow node and its replacement write
  the same bytes under the same names; whichever marker lands last is equivalent. Claims avoid the
  wasted work, not a corruption: on a dask cluster the scheduler's `distributed.Lock` per block
  (`stages.cache.claims`); in-process runs own the cache.
- **Creation without a lock.** The manifest is created with a conditional write on an object store
  (the loser checks the winner's against its own, `stores.base.ensure_manifest`); the Zarr group is
  uploaded with its ``zarr.json`` last (`stores.zarr_layout.create_store`), and a family array's
  metadata is the same bytes whoever writes it.
- **Leftovers of a killed writer are never read and are cleaned.** Objects of an unmarked block
  are invisible; the next write of that block deletes them first (`ZarrCacheWriter._remove_block_files`)
  and aborts the multipart uploads left open under its keys (`stores.url.abort_uploads`, also at a
  claim: `stages.cache.claims.remove_stale_temps`). ``cache_teacher --repair`` removes the marker of a
  block verify finds damaged, so the rerun rewrites it the same way.
- **Readers pin the manifest.** A reader loads ``manifest.json`` once and reads only blocks of that
  plan; blocks written later become visible at `CacheReader.refresh`, never half of one.

`write_marker` is the one call that publishes a block.
"""

from __future__ import annotations

import json

from stores.url import write_whole


def write_marker(path, digests: dict) -> None:
    """Publish a block: its marker (the blobs' checksums, the objects' sizes), written whole and
    LAST, after every object it names."""
    write_whole(path, json.dumps(digests, sort_keys=True).encode())
