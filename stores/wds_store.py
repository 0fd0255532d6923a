"""WebDataset store: one tar shard per block, for streaming reads (webdataset pipelines).

Layout under ``<root>/wds``::

    shard-000012.tar     block 12; written as shard-000012.tar.tmp-<pid>, then os.replace'd:
                         the rename is the done marker
    shard-000012.json    sidecar, written (atomically) BEFORE the rename: sha256 and size of every
                         blob, tar size, member offsets (random access without scanning the tar)

Members of a record (WebDataset sample key ``f"{image_id:012d}_{view}"``, no dots in it)::

    000000000042_s160m256f0.meta.json          the record meta (canonical JSON)
    000000000042_s160m256f0.fpn.0.msgpack      one codecs blob per target: the same bytes as Zarr
    ...

So ``webdataset.WebDataset(reader.shard_paths())`` yields samples whose keys are "meta.json" and
"<target>.msgpack"; turn one into a record with `sample_to_record` (it accepts raw bytes or
webdataset-decoded values). Tars are written with Python's tarfile, with fixed member metadata
(mtime 0, uid/gid 0, mode 0644): the same block gives byte-identical shards. No pickle anywhere.

`iter_records` streams shards in order; `get` seeks to the members via the sidecar offsets (or an
index built by scanning the tar headers when a sidecar is missing). A truncated or corrupt shard
raises StoreReadError naming the shard file and the fix: delete it and rerun cache_teacher,
which rewrites that block only.

The streaming side (member names, sidecar checks, the offset-based sample reader `shard_samples`,
`verify_sample`, `decode_sample`) is `stores.wds_shards`; its names are re-exported here.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from stores.base import (
    REBUILD,
    CacheReader,
    CacheWriter,
    DecodedRecord,
    EncodedRecord,
    StoreReadError,
    decode_record,
    meta_bytes,
    record_key,
    remove_path,
    select_names,
)
from stores.codecs import BlobDecodeError
from stores.manifest import CacheMismatchError, atomic_write_bytes
from stores.url import (
    abort_uploads,
    as_path,
    explain_error,
    is_remote,
    open_shard,
    read_range,
    retrying,
    write_whole,
)
from stores.wds_shards import (  # noqa: F401  (re-exported: callers import them from stores.wds_store)
    BLOB_SUFFIX,
    META_MEMBER,
    _block_of,
    _member_ok,
    decode_sample,
    iter_shard_samples,
    member_crcs,
    parse_key,
    sample_to_record,
    shard_path,
    shard_samples,
    shard_samples_of,
    sidecar_path,
    verify_sample,
)

SUBDIR = "wds"


def _end_marker_ok(path: Path, members: list[tuple[int, int]]) -> bool:
    """True if the two zero blocks that end a tar follow the last member's data: a tar cut short
    anywhere before them (even exactly between two members, which tarfile itself accepts as a
    clean end) fails this check."""
    end = 0
    if members:
        off, size = max(members)
        end = off + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    tail = read_range(path, end, end + 2 * tarfile.BLOCKSIZE)
    return tail == bytes(2 * tarfile.BLOCKSIZE)


def _unreachable(path, err: BaseException) -> StoreReadError:
    """An object store that did not answer (after its client's retries): not damage, say so."""
    return StoreReadError(explain_error(str(path), err, "cannot read") + " (retried); rerun when the store answers")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class WdsCacheWriter(CacheWriter):
    format = SUBDIR

    def _open_store(self) -> None:
        self.store = self.root / SUBDIR
        if not is_remote(self.store):
            self.store.mkdir(parents=True, exist_ok=True)
        for side in sorted(self.store.glob("shard-*.json"))[:1]:
            try:
                digest = json.loads(side.read_text()).get("fingerprint_digest")
            except (OSError, ValueError):
                continue
            if digest != self.manifest.fingerprint_digest():
                raise CacheMismatchError(
                    f"cache {self.root}: its shards were written for another manifest (fingerprint "
                    f"{str(digest)[:12]}, you asked for {self.manifest.fingerprint_digest()[:12]}); "
                    f"delete {self.store} and rerun {REBUILD}"
                )

    def completed_blocks(self) -> set[int]:
        out = set()
        for p in self.store.glob("shard-*.tar"):
            b = _block_of(p)
            if b is not None:
                out.add(b)
        return out

    def _tmp_path(self, block: int) -> Path:
        return self.store / f"shard-{block:06d}.tar.tmp-{os.getpid()}"

    def _write_block(self, block: int, records: list[EncodedRecord], digests: dict) -> None:
        # on disk the tar is written to a temp name and renamed (the rename is the done marker); on an
        # object store it is built in memory and PUT whole (the PUT is): the sidecar goes first
        remote = is_remote(self.store)
        tmp = self._tmp_path(block)
        with (io.BytesIO() if remote else open(tmp, "wb")) as f, \
                tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rec in records:
                key = record_key(rec.image_id, rec.view)
                data = meta_bytes(rec.meta)
                tar.addfile(_tarinfo(f"{key}.{META_MEMBER}", len(data)), io.BytesIO(data))
                for name in sorted(rec.blobs):
                    blob = rec.blobs[name]
                    tar.addfile(_tarinfo(f"{key}.{name}{BLOB_SUFFIX}", len(blob)), io.BytesIO(blob))
            if remote:
                tar.close()
                data = f.getvalue()
        members = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") if remote else tarfile.open(tmp, mode="r:") as tar:
            for m in tar.getmembers():
                members[m.name] = [m.offset_data, m.size]
        crcs = {(r.image_id, r.view): member_crcs(meta_bytes(r.meta), r.blobs) for r in records}
        entries = [{**e, **crcs[(e["image_id"], e["view"])]} for e in digests.get("records", [])]
        size = len(data) if remote else tmp.stat().st_size
        sidecar = {**digests, "records": entries, "tar_bytes": size, "members": members}
        atomic_write_bytes(sidecar_path(self.store, block), json.dumps(sidecar, sort_keys=True).encode())
        if remote:
            write_whole(shard_path(self.store, block), data)  # one PUT: the shard appears whole or not at all
        else:
            os.replace(tmp, shard_path(self.store, block))  # the rename is the done marker

    def _discard_block(self, block: int) -> None:
        try:
            if is_remote(self.store):  # an upload cut off mid-way: abort it (no temp file exists)
                abort_uploads(self.store, lambda key: key.endswith(shard_path(self.store, block).name))
                return
            remove_path(self._tmp_path(block))
        except OSError:
            pass


class WdsCacheReader(CacheReader):
    format = SUBDIR

    def __init__(self, path: str | Path, verify_checksums: bool = True):
        self.store = as_path(path) / SUBDIR
        self.verify_checksums = verify_checksums
        self._sidecars: dict[int, dict] = {}
        super().__init__(path)
        if not self.store.exists():
            raise StoreReadError(f"cache {self.root} has no webdataset store ({self.store}): build it with {REBUILD}")

    def _scan_completed(self) -> set[int]:
        if not self.store.exists():
            return set()
        return {b for p in self.store.glob("shard-*.tar") if (b := _block_of(p)) is not None}

    def shard_paths(self) -> list[str]:
        """Paths of the completed shards in block order (for webdataset.WebDataset)."""
        return [str(shard_path(self.store, b)) for b in sorted(self._completed)]

    def _fix(self, path: Path) -> str:
        return f"delete it and rerun {REBUILD} to rewrite this block"

    def sidecar(self, block: int) -> dict | None:
        """The block's sidecar (None if missing or unreadable)."""
        if block not in self._sidecars:
            path = sidecar_path(self.store, block)
            try:
                self._sidecars[block] = json.loads(retrying(path.read_text) if is_remote(path) else path.read_text())
            except (FileNotFoundError, ValueError):
                return None
            except Exception as err:  # on an object store: not answering is not "no sidecar"
                if is_remote(path):
                    raise _unreachable(path, err) from None
                return None
        return self._sidecars[block]

    def _check_size(self, block: int) -> None:
        path = shard_path(self.store, block)
        side = self.sidecar(block)
        try:
            size = retrying(path.stat).st_size
        except FileNotFoundError:
            raise StoreReadError(f"shard {path} is missing; rerun {REBUILD} to rewrite this block") from None
        except Exception as err:
            raise _unreachable(path, err) from None
        if side is not None and size != side.get("tar_bytes"):
            raise StoreReadError(
                f"shard {path} is truncated or damaged ({size} bytes, {side.get('tar_bytes')} written); "
                f"{self._fix(path)}"
            )

    def _members(self, block: int) -> dict[str, list[int]]:
        side = self.sidecar(block)
        if side is not None and "members" in side:
            return side["members"]
        path = shard_path(self.store, block)  # no sidecar: scan the tar headers
        try:
            with open_shard(str(path)) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                members = {m.name: [m.offset_data, m.size] for m in tar.getmembers()}
            complete = _end_marker_ok(path, [tuple(v) for v in members.values()])
        except (tarfile.TarError, OSError, EOFError) as err:
            raise StoreReadError(f"shard {path} is unreadable ({err}); {self._fix(path)}") from None
        if not complete:
            raise StoreReadError(f"shard {path} is truncated (no end-of-archive marker); {self._fix(path)}")
        self._sidecars[block] = {"members": members}
        return members

    def get_encoded(self, image_id: int, view: str, targets: Iterable[str] | None = None) -> EncodedRecord:
        r, b = self.locate(image_id, view)
        self._check_size(b)
        path = shard_path(self.store, b)
        key = record_key(image_id, view)
        members = self._members(b)
        prefix = f"{key}."
        mine = {n[len(prefix) :]: off for n, off in members.items() if n.startswith(prefix)}
        if META_MEMBER not in mine:
            raise StoreReadError(f"shard {path} has no record {key}; {self._fix(path)}")
        names = [n[: -len(BLOB_SUFFIX)] for n in mine if n.endswith(BLOB_SUFFIX)]
        names = select_names(names, targets)
        digests = self._record_digests(b, image_id, view) if self.verify_checksums else None
        blobs = {}
        spans = [mine[META_MEMBER]] + [mine[n + BLOB_SUFFIX] for n in names]
        lo, hi = min(o for o, _ in spans), max(o + n for o, n in spans)
        try:  # a record's members are contiguous in its shard: one (ranged) read for all of them
            data = read_range(path, lo, hi)
        except Exception as err:
            if is_remote(path):
                raise _unreachable(path, err) from None
            raise StoreReadError(f"cannot read shard {path} ({err}); {self._fix(path)}") from None
        meta_raw = data[mine[META_MEMBER][0] - lo : mine[META_MEMBER][0] - lo + mine[META_MEMBER][1]]
        for name in names:
            off, size = mine[name + BLOB_SUFFIX]
            blobs[name] = data[off - lo : off - lo + size]
            if len(blobs[name]) != size:
                raise StoreReadError(f"shard {path} is truncated at member {key}.{name}; {self._fix(path)}")
        if digests is not None:
            sha = digests.get("sha256", {})
            for name, blob in blobs.items():
                if name in sha and not _member_ok(digests, name, blob)[0]:
                    raise StoreReadError(
                        f"shard {path}: target {name} of image {image_id} view {view} fails its checksum "
                        f"(the shard is damaged); {self._fix(path)}"
                    )
        try:
            meta = json.loads(meta_raw)
        except ValueError:
            raise StoreReadError(f"shard {path}: meta of {key} is not JSON (damaged); {self._fix(path)}") from None
        return EncodedRecord(int(image_id), str(view), meta, blobs)

    def _record_digests(self, block: int, image_id: int, view: str) -> dict | None:
        side = self.sidecar(block)
        if side is None or "records" not in side:
            return None
        for rec in side["records"]:
            if rec["image_id"] == int(image_id) and rec["view"] == str(view):
                return rec
        return None

    def describe_location(self, image_id: int, view: str) -> str:
        r, b = self.locate(image_id, view)
        return f"shard {shard_path(self.store, b)}"

    def fix_hint(self, image_id: int, view: str) -> str:
        return f"delete that shard and rerun {REBUILD} to rewrite this block"

    def iter_encoded(self, shards: Iterable[str | Path] | None = None) -> Iterator[EncodedRecord]:
        """Stream the records of `shards` (default: every completed shard, in block order)."""
        paths = [as_path(p) for p in shards] if shards is not None else [as_path(p) for p in self.shard_paths()]
        for path in paths:
            yield from self._iter_shard(path)

    def iter_records(
        self, shards: Iterable[str | Path] | None = None, targets: Iterable[str] | None = None
    ) -> Iterator[DecodedRecord]:
        """Stream decoded records of `shards` (default: every completed shard, in block order)."""
        for rec in self.iter_encoded(shards):
            try:
                yield decode_record(rec, targets, self.codec_bases())
            except BlobDecodeError as err:
                raise StoreReadError(
                    f"image {rec.image_id} view {rec.view}: a blob does not decode ({err}); the shard holding "
                    f"it is damaged: delete it and rerun {REBUILD} to rewrite this block"
                ) from None

    def _iter_shard(self, path: Path) -> Iterator[EncodedRecord]:
        block = _block_of(path)
        side = self.sidecar(block) if block is not None else None
        if block is not None and path.parent == self.store:
            self._check_size(block)
        expected = len(side["records"]) if side and "records" in side else None
        count = 0
        current: dict | None = None
        spans: list[tuple[int, int]] = []
        try:
            with open_shard(str(path)) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    spans.append((member.offset_data, member.size))
                    key, _, suffix = member.name.partition(".")
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise EOFError(f"member {member.name} is cut short")
                    if current is None or current["__key__"] != key:
                        if current is not None:
                            yield self._sample(current, path, block)
                            count += 1
                        current = {"__key__": key}
                    current[suffix] = data
            if not _end_marker_ok(path, spans):
                raise EOFError("no end-of-archive marker after the last member")
        except (tarfile.TarError, EOFError, OSError) as err:
            raise StoreReadError(f"shard {path} is truncated or corrupt ({err}); {self._fix(path)}") from None
        if current is not None:
            yield self._sample(current, path, block)
            count += 1
        if expected is not None and count != expected:
            raise StoreReadError(
                f"shard {path} holds {count} records, its sidecar lists {expected} (truncated); {self._fix(path)}"
            )

    def _sample(self, sample: dict, path: Path, block: int | None) -> EncodedRecord:
        try:
            rec = sample_to_record(sample)
        except (KeyError, ValueError) as err:
            raise StoreReadError(
                f"shard {path}: record {sample.get('__key__')} is incomplete ({err}); {self._fix(path)}"
            ) from None
        if self.verify_checksums and block is not None and path.parent == self.store:
            digests = self._record_digests(block, rec.image_id, rec.view)
            sha = digests.get("sha256", {}) if digests else {}
            for name, blob in rec.blobs.items():
                if name in sha and not _member_ok(digests, name, blob)[0]:
                    raise StoreReadError(
                        f"shard {path}: target {name} of image {rec.image_id} view {rec.view} fails its "
                        f"checksum (the shard is damaged); {self._fix(path)}"
                    )
        return rec
