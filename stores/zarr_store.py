"""Zarr v3 (zarr-python 3.1) store: random access per record, one shard file per block.

Layout under ``<root>/zarr``::

    zarr.json                     group; attrs["kdcache"]: num_records, block_size, levels, views, ...
    index/image_id   [N] int64    record r = manifest.plan[r]; written once at creation
    index/view       [N] int32    index into attrs["kdcache"]["views"]
    index/image_size [N, 2] int32         per-image extent (h, w) of the view; -1 until written
    index/level_sizes [N, L, 2] int32     per-level map sizes (h, w); -1 until written
    meta             [N] variable-length bytes: the record's meta as canonical JSON
    targets/<family> [N] variable-length bytes: msgpack {target name: codecs blob} for the
                     family's targets ("fpn" -> fpn.0..fpn.4, "cls", "box", "quality", "det", "cand")
    done/block-000012.json        done marker of block 12 (sha256 of every blob), written LAST

Every variable-length-bytes array uses the sharding codec with shard = one block
(``block_size`` records) and inner chunk = one record, each inner chunk and the shard index
protected by crc32c. Index arrays are chunked by block too. So a block is whole shard / chunk
files only: two writers on different blocks never touch the same file, and reading one record
reads the shard index and that record's bytes, never the whole block. Maps keep each image's own
extent (no padding to a dataset maximum): a blob holds its array's exact shape.

Why one array per target *family* rather than per target name (measured, zarr 3.1.6, local
disk, 26 target names, 20 kB each): every zarr array read costs ~1.1 ms of fixed overhead
(event loop round trip, shard index decode, crc), so per-name arrays cost ~30 ms per record read
one by one and ~18-23 ms gathered concurrently, against ~1 ms for a whole-record array. Per-family
arrays (<= 6 reads plus meta, gathered concurrently) keep the read cost at a few ms while still
letting a reader fetch only the families a loss needs (`get(..., targets={"fpn"})`), which is
the granularity of ``KDLosses.needs()``. Array names and `blob_info` keep per-target sizes
inspectable (`stores.verify.store_summary`). Measured on this layout (2-core CPU box, a
RetinaNet-like record: 5 levels of fpn 128 ch + cls 54 ch + box 36 ch at 160x256, detections,
candidates; 752 kB float32 -> 232 kB stored with int8c / sparse0.01 / fp16 + zstd): random
`get_encoded` 5.0 ms, `get` with decoding 8.2 ms, `get(targets={"fpn"})` 3.2 ms, block write
4.6 ms per record (the WebDataset store: 0.5 / 4.0 / 1.3 ms, 2.7 ms).

The variable-length-bytes data type has no ratified Zarr v3 spec yet (zarr-python warns
"UnstableSpecificationWarning"; silenced here). The cache is a derived artefact pinned to
zarr>=3.1,<4 and rebuilt when the schema changes, so that is acceptable.

Corruption: a flipped byte in a shard file fails its crc32c (or the blob's zstd checksum) and
`get` raises StoreReadError naming the shard file and the fix (delete the block's done marker and
rerun cache_teacher, which rewrites that block only); `stores.verify` checks sha256 against the
done markers.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable
from pathlib import Path

import msgpack
import numpy as np
import zarr

from stores.base import (
    REBUILD,
    CacheReader,
    CacheWriter,
    EncodedRecord,
    StoreReadError,
    StoreWriteError,
    meta_bytes,
    remove_path,
    root_lock,
    select_names,
    target_family,
    wanted_families,
)
from stores.commit import write_marker
from stores.manifest import CacheMismatchError
from stores.url import as_path, is_remote
from stores.zarr_layout import (  # noqa: F401  (marker_path, LAYOUT, SUBDIR re-exported)
    LAYOUT,
    SUBDIR,
    abort_block_uploads,
    block_objects,
    create_store,
    marker_path,
    quiet,
    require_family,
    scan_markers,
    store_attrs,
    zarr_url,
)
from stores.zarr_shards import (  # noqa: F401  (_SHARD_CODECS, read_inner_chunk re-exported)
    _SHARD_CODECS,
    ShardUnreachable,
    _NotFast,
    read_inner_chunk,
    read_inner_chunks,
)

try:  # zarr's async core lets one record's arrays be read concurrently
    from zarr.core.sync import sync as _zarr_sync
except ImportError:  # pragma: no cover - other zarr layouts
    _zarr_sync = None


_quiet = quiet  # the zarr reads below silence the same warning

# the direct shard reads (`read_inner_chunk`, the codec layout they expect) live in stores.zarr_shards;
# creation, family arrays and done markers in stores.zarr_layout (re-exported: marker_path)
_scan_markers = scan_markers


class ZarrCacheWriter(CacheWriter):
    format = SUBDIR

    def _open_store(self) -> None:
        self.store = self.root / SUBDIR
        m = self.manifest
        if not is_remote(self.store) and self.store.exists() and not (self.store / "zarr.json").exists():
            raise StoreWriteError(
                f"{self.store} exists but is not a zarr store (no zarr.json): delete it and rerun {REBUILD}"
            )
        if not (self.store / "zarr.json").exists():
            create_store(self.root, self.store, m)
        else:
            attrs = store_attrs(self.store)
            if attrs.get("layout") != LAYOUT:
                raise StoreReadError(
                    f"{self.store} has layout {attrs.get('layout')!r}, this code writes {LAYOUT!r}: "
                    f"delete {self.store} and rerun {REBUILD}"
                )
            have = (attrs.get("fingerprint_digest"), attrs.get("num_records"), attrs.get("block_size"))
            want = (m.fingerprint_digest(), len(m.plan), m.block_size)
            if have != want:  # e.g. manifest.json deleted by hand, then a different run started
                raise CacheMismatchError(
                    f"cache {self.root}: its zarr store was built for another manifest (fingerprint "
                    f"{str(have[0])[:12]}, {have[1]} records, block size {have[2]}; you asked for "
                    f"{want[0][:12]}, {want[1]} records, block size {want[2]}); delete {self.store} and "
                    f"rerun {REBUILD}"
                )
        with _quiet():
            self._group = zarr.open_group(zarr_url(self.store), mode="r+")
        self._families: dict[str, zarr.Array] = {}

    def completed_blocks(self) -> set[int]:
        return _scan_markers(self.store)

    def _family_array(self, family: str) -> zarr.Array:
        arr = self._families.get(family)
        if arr is not None:
            return arr
        path = self.store / "targets" / family
        if not (path / "zarr.json").exists():
            with root_lock(self.root):  # another writer may be creating it right now (disk only)
                if not (path / "zarr.json").exists():
                    require_family(self._group["targets"], family, len(self.manifest.plan), self.manifest.block_size)
        with _quiet():
            arr = zarr.open_array(zarr_url(path), mode="r+")
        self._families[family] = arr
        return arr

    def _write_block(self, block: int, records: list[EncodedRecord], digests: dict) -> None:
        start, stop = self.manifest.block_range(block)
        # files of an earlier failed attempt (or of a block whose marker was deleted because it was
        # damaged) would make zarr read-modify-write a corrupt shard: start from nothing
        self._remove_block_files(block)
        families: dict[str, list[dict[str, bytes]]] = {}
        for i, rec in enumerate(records):
            for name, blob in rec.blobs.items():
                families.setdefault(target_family(name), [{} for _ in records])[i][name] = blob
        for family, per_record in sorted(families.items()):
            vals = np.empty(len(records), dtype=object)
            vals[:] = [msgpack.packb(d, use_bin_type=True) if d else b"" for d in per_record]
            self._family_array(family)[start:stop] = vals
        metas = np.empty(len(records), dtype=object)
        metas[:] = [meta_bytes(r.meta) for r in records]
        self._group["meta"][start:stop] = metas
        sizes = np.full((len(records), 2), -1, dtype=np.int32)
        levels = np.full((len(records), self.manifest.levels, 2), -1, dtype=np.int32)
        for i, r in enumerate(records):
            if r.meta.get("image_size") is not None:
                sizes[i] = r.meta["image_size"]
            if r.meta.get("level_sizes") is not None:
                levels[i] = r.meta["level_sizes"]
        self._group["index/image_size"][start:stop] = sizes
        self._group["index/level_sizes"][start:stop] = levels
        # the done marker goes last: its presence means every object of the block is complete; it
        # names the shard objects with their sizes (stores.commit)
        shards = ["meta"] + [f"targets/{f}" for f in sorted(families)]
        digests = {**digests, "objects": block_objects(self.store, shards, block)}
        # read back before the marker vouches for the block: a damaged array shape makes zarr drop an
        # out-of-range write silently, so check the extent is the plan's and every shard object landed
        n = len(self.manifest.plan)
        arrays = {f"targets/{f}": self._family_array(f) for f in families}
        arrays |= {a: self._group[a] for a in ("meta", "index/image_size", "index/level_sizes")}
        wrong = [f"array {a} holds {arr.shape[0]} records, not {n}" for a, arr in arrays.items() if arr.shape[0] != n]
        wrong += [f"{s} has no shard object for it" for s in shards if f"{s}/c/{block}" not in digests["objects"]]
        if wrong:
            raise StoreWriteError(f"block {block} did not land in {self.store} ({wrong[0]}): its metadata is damaged; "
                                  f"rerun {REBUILD} --repair (no done marker was written)")
        write_marker(marker_path(self.store, block), digests)

    def _array_dirs(self) -> list[Path]:
        """The arrays written block by block (index/image_id and index/view are written once)."""
        dirs = [self.store / "meta", self.store / "index" / "image_size", self.store / "index" / "level_sizes"]
        d = self.store / "targets"
        if d.exists():
            dirs += [p for p in d.iterdir() if (p / "zarr.json").exists()]
        return dirs

    def _remove_block_files(self, block: int) -> None:
        """Delete the block's shard / chunk files (left by a failed or abandoned attempt)."""
        for d in self._array_dirs():
            remove_path(d / "c" / str(block))
        abort_block_uploads(self.store, block)  # a writer killed mid-upload (object stores)

    def _discard_block(self, block: int) -> None:
        try:
            remove_path(marker_path(self.store, block))
            self._remove_block_files(block)
        except OSError:
            pass


class ZarrCacheReader(CacheReader):
    format = SUBDIR

    def __init__(self, path: str | Path):
        self.store = as_path(path) / SUBDIR
        self._arrays: dict[str, zarr.Array] = {}
        self._layouts: dict[str, bool] = {}
        self._indexes: dict = {}  # shard object -> its shard index (one GET per shard, not per record)
        self._pid = -1
        super().__init__(path)
        if not (self.store / "zarr.json").exists():
            raise StoreReadError(f"cache {self.root} has no zarr store ({self.store}): build it with {REBUILD}")
        attrs = store_attrs(self.store)
        if attrs.get("layout") != LAYOUT:
            raise StoreReadError(
                f"{self.store} has layout {attrs.get('layout')!r}, this code reads {LAYOUT!r}: "
                f"delete {self.store} and rerun {REBUILD}"
            )

    def _scan_completed(self) -> set[int]:
        d = self.store / "targets"  # a family's array exists before any marker of a block using it
        self._family_names = sorted(p.name for p in d.iterdir() if (p / "zarr.json").exists()) if d.exists() else []
        return _scan_markers(self.store)

    def families(self) -> list[str]:
        """Target families stored (as of the last refresh)."""
        return list(self._family_names)

    def _array(self, name: str) -> zarr.Array:
        if self._pid != os.getpid():  # opened in a parent before a fork: reopen per process
            self._arrays, self._pid = {}, os.getpid()
        arr = self._arrays.get(name)
        if arr is None:
            with _quiet():
                arr = zarr.open_array(zarr_url(self.store / name), mode="r")
            self._arrays[name] = arr
        return arr

    def _direct(self, name: str) -> bool:
        """True if array `name` has the layout `read_inner_chunk` reads (checked once per array)."""
        ok = self._layouts.get(name)
        if ok is None:
            try:
                spec = json.loads((self.store / name / "zarr.json").read_text())
                ok = (spec.get("codecs") == _SHARD_CODECS and spec.get("data_type") == "variable_length_bytes"
                      and spec.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
                      == [self.manifest.block_size]
                      and spec.get("chunk_key_encoding") == {"name": "default", "configuration": {"separator": "/"}})
            except (OSError, ValueError, AttributeError):
                ok = False
            self._layouts[name] = ok
        return ok

    def _read(self, names: list[str], r: int) -> list[bytes]:
        if all(self._direct(n) for n in names):
            block, i = divmod(r, self.manifest.block_size)
            try:
                if is_remote(self.store):  # concurrent ranged GETs: about one round trip per record
                    fs, base = self.store.fs, self.store.path
                    return read_inner_chunks(fs, [f"{base}/{n}/c/{block}" for n in names], i,
                                             self.manifest.block_size, self._indexes)
                return [read_inner_chunk(self.shard_file(n, block), i, self.manifest.block_size, self._indexes)
                        for n in names]
            except _NotFast:
                pass  # zarr reads it again and raises the error that names the damaged file
        return self._read_zarr(names, r)

    def _read_zarr(self, names: list[str], r: int) -> list[bytes]:
        arrays = [self._array(n) for n in names]
        if _zarr_sync is not None and all(hasattr(a, "_async_array") for a in arrays):

            async def gather():
                return await asyncio.gather(*[a._async_array.getitem(slice(r, r + 1)) for a in arrays])

            values = _zarr_sync(gather())
        else:  # pragma: no cover
            values = [a[r : r + 1] for a in arrays]
        return [bytes(v[0]) for v in values]

    def shard_file(self, name: str, block: int) -> Path:
        return self.store / name / "c" / str(block)

    def describe_location(self, image_id: int, view: str) -> str:
        r, b = self.locate(image_id, view)
        return f"block {b} of {self.store} (shard files {self.store}/*/c/{b})"

    def fix_hint(self, image_id: int, view: str) -> str:
        b = self._index[(int(image_id), str(view))] // self.manifest.block_size
        return f"delete {marker_path(self.store, b)} and rerun {REBUILD} to rewrite this block"

    def get_encoded(self, image_id: int, view: str, targets: Iterable[str] | None = None) -> EncodedRecord:
        r, b = self.locate(image_id, view)
        families = self.families()
        if targets is not None:
            targets = list(targets)
            wanted = wanted_families(targets)
            families = [f for f in families if f in wanted]
        names = ["meta"] + [f"targets/{f}" for f in families]
        try:
            raw = self._read(names, r)
        except ShardUnreachable as err:  # the object store did not answer: not damage
            raise StoreReadError(str(err)) from None
        except Exception as err:
            raise self._corrupt(image_id, view, b, names, err) from None
        blobs: dict[str, bytes] = {}
        try:
            meta = json.loads(raw[0])
            for value in raw[1:]:
                if value:
                    blobs.update(msgpack.unpackb(value, raw=False))
        except Exception as err:
            raise self._corrupt(image_id, view, b, names, err) from None
        if targets is not None:
            blobs = {n: blobs[n] for n in select_names(blobs, targets)}
        return EncodedRecord(int(image_id), str(view), meta, blobs)

    def _corrupt(self, image_id, view, block, names, err) -> StoreReadError:
        r = self._index[(int(image_id), str(view))]
        bad = []
        for n in names:  # find the damaged file(s): read each array alone
            try:
                value = bytes(self._array(n)[r : r + 1][0])
                json.loads(value) if n == "meta" else (msgpack.unpackb(value, raw=False) if value else None)
            except Exception:
                bad.append(n)
        files = ", ".join(str(self.shard_file(n, block)) for n in (bad or names))
        text = f"{type(err).__name__}: {err}"
        return StoreReadError(
            f"cannot read image {image_id} view {view} (block {block}) from {files}: "
            f"{text[:200]}; the store is damaged: delete {marker_path(self.store, block)} "
            f"and rerun {REBUILD} to rewrite this block"
        )

    def get_raw_block(self, block: int) -> list[tuple[bytes, dict[str, bytes]]]:
        """(meta bytes, {family: element bytes}) of every record of a block, for verify."""
        start, stop = self.manifest.block_range(block)
        out = []
        meta = self._array("meta")[start:stop]
        fam = {f: self._array(f"targets/{f}")[start:stop] for f in self.families()}
        for i in range(stop - start):
            out.append((bytes(meta[i]), {f: bytes(v[i]) for f, v in fam.items()}))
        return out

    def get_raw_record(self, r: int) -> tuple[bytes, dict[str, bytes], list[tuple[str, str]]]:
        """(meta bytes, {family: element bytes}, [(array name, error)]) of record number `r`,
        reading each array on its own so that one damaged file is named precisely."""
        meta, fams, bad = b"", {}, []
        for name in ["meta"] + [f"targets/{f}" for f in self.families()]:
            try:
                value = bytes(self._array(name)[r : r + 1][0])
            except Exception as err:
                bad.append((name, f"{type(err).__name__}: {str(err)[:120]}"))
                continue
            if name == "meta":
                meta = value
            else:
                fams[name.split("/", 1)[1]] = value
        return meta, fams, bad

    def index_arrays(self) -> dict[str, np.ndarray]:
        """image_id, view (index into `views`), image_size, level_sizes for every planned record."""
        return {k: self._array(f"index/{k}")[...] for k in ("image_id", "view", "image_size", "level_sizes")}

    @property
    def views(self) -> list[str]:
        return store_attrs(self.store)["views"]

