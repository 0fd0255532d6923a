"""Streaming reads of the WebDataset cache shards that `stores.wds_store` writes: the member names,
the sidecar checks, and the sample reader of the stage-2 loader.

The stage-2 loader streams with webdataset's shard list and splitters but reads the samples with
`shard_samples` (the same sample dicts, taken at the sidecar's member offsets: no Python tar walk),
checks each against its shard's sidecar (`verify_sample`) and decodes it (`decode_sample`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import google_crc32c  # zarr's crc32c implementation (hardware crc32c: ~10 GB/s against sha256's ~1.5)

from stores.base import (
    REBUILD,
    DecodedRecord,
    EncodedRecord,
    StoreReadError,
    decode_record,
    record_key,
    select_names,
    unpack_record,
)
from stores.url import as_path, explain_error, is_url, open_shard, retrying

META_MEMBER = "meta.json"
BLOB_SUFFIX = ".msgpack"


def shard_path(store: Path, block: int) -> Path:
    return store / f"shard-{block:06d}.tar"


def sidecar_path(store: Path, block: int) -> Path:
    return store / f"shard-{block:06d}.json"


def _block_of(path: Path) -> int | None:
    stem = path.name.split(".", 1)[0]
    try:
        return int(stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def parse_key(key: str) -> tuple[int, str]:
    image, _, view = key.partition("_")
    return int(image), view


def sample_to_record(sample: dict) -> EncodedRecord:
    """A webdataset sample dict ({"__key__", "meta.json", "<target>.msgpack", ...}) -> EncodedRecord.

    Values may be raw bytes (no ``.decode()`` in the pipeline; recommended) or already decoded by
    webdataset's default handlers (dict); `stores.codecs.decode` accepts both forms.
    """
    image_id, view = parse_key(sample["__key__"].rsplit("/", 1)[-1])
    meta = sample[META_MEMBER]
    if isinstance(meta, bytes | bytearray):
        meta = json.loads(meta)
    blobs = {k[: -len(BLOB_SUFFIX)]: v for k, v in sample.items() if k.endswith(BLOB_SUFFIX)}
    return EncodedRecord(image_id, view, dict(meta), blobs)


_SIDECARS: dict[str, tuple[tuple, dict, dict]] = {}  # shard path -> ((size, mtime), sidecar, key -> digests)


def _stream_digests(url: str) -> tuple[dict, dict]:
    """(sidecar, record key -> digest entry) of the shard at `url`, checked once per process:
    the sidecar exists and the tar has the size it records (a truncated shard is named here)."""
    path = as_path(url)
    try:
        st = retrying(path.stat)
        stamp = (st.st_size, getattr(st, "st_mtime_ns", None) or getattr(st, "st_mtime", 0))
    except FileNotFoundError:
        stamp = (-1, 0)
    except Exception as err:  # an object store that does not answer (after its client's retries)
        raise StoreReadError(explain_error(str(url), err, "cannot read shard") + "; rerun when the store answers") from None
    hit = _SIDECARS.get(url)
    if hit is not None and hit[0] == stamp:  # a shard rewritten by a repair run is checked afresh
        return hit[1], hit[2]
    block = _block_of(path)
    fix = f"delete it and rerun {REBUILD} to rewrite this block"
    side_path = sidecar_path(path.parent, block) if block is not None else None
    try:
        side = json.loads(side_path.read_text()) if side_path is not None else None
    except (OSError, ValueError):
        side = None
    if not side or "records" not in side:
        raise StoreReadError(f"shard {path} has no readable checksum sidecar ({side_path}); {fix}")
    size = stamp[0]
    if size != side.get("tar_bytes"):
        raise StoreReadError(f"shard {path} is truncated or damaged ({size} bytes, {side.get('tar_bytes')} "
                             f"written); {fix}")
    index = {record_key(r["image_id"], r["view"]): r for r in side["records"]}
    if len(_SIDECARS) > 64:  # a worker streams a few shards at a time
        _SIDECARS.clear()
    _SIDECARS[url] = (stamp, side, index)
    return side, index


def member_crcs(meta: bytes, blobs: dict[str, bytes]) -> dict:
    """The crc32c of a record's meta and blob members, stored in the sidecar beside their sha256.

    Why: streaming checks every member of every sample; sha256 of 1.5 MB took about a third of a
    worker's time per record, crc32c ~20x less. A crc32c catches every error burst of up to 32 bits
    (so any flipped byte) in a member; the sha256 stays for `stores.verify`."""
    return {"meta_crc32c": google_crc32c.value(meta),
            "crc32c": {n: google_crc32c.value(b) for n, b in sorted(blobs.items())}}


def _member_ok(digest: dict, name: str | None, data: bytes) -> tuple[bool, str]:
    """(data matches the sidecar, the checksum used) for member `name` (None: the meta). crc32c
    where the sidecar has it, sha256 for shards written before it did."""
    if "crc32c" in digest:
        want = digest["meta_crc32c"] if name is None else digest["crc32c"].get(name)
        return google_crc32c.value(data) == want, "crc32c"
    want = digest["meta_sha256"] if name is None else digest["sha256"].get(name)
    return hashlib.sha256(data).hexdigest() == want, "sha256"


def _record_spans(members: dict) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """The sidecar's members grouped per sample key in shard order: [(key, [(suffix, offset, size)])].
    Keys and suffixes split as webdataset does (the key is the name up to its first dot)."""
    records: dict[str, list[tuple[str, int, int]]] = {}
    for name, (offset, size) in sorted(members.items(), key=lambda kv: kv[1][0]):
        key, _, suffix = name.partition(".")
        records.setdefault(key, []).append((suffix, int(offset), int(size)))
    return list(records.items())


def iter_shard_samples(url: str | Path, targets: Iterable[str] | None = None) -> Iterator[dict]:
    """The samples of one shard, as webdataset's tar reader yields them ({"__key__", "__url__",
    "meta.json": bytes, "<target>.msgpack": bytes, ...}), read at the member offsets its sidecar
    records instead of parsing every tar header. With `targets`, only the meta and the selected
    targets' members are read (a student that reads FPN maps only skips the class and box bytes,
    as the Zarr reader does); `decode_sample` with the same `targets` checks exactly those.

    Why: webdataset walks the tar with Python's tarfile (~16 headers and buffered reads per record),
    about a third of a streaming worker's CPU time on 1.5 MB records. The data read here is exactly
    the bytes webdataset yields (tests/test_loader_fast_paths.py checks it); the tar size is checked
    against the sidecar first and each member against its crc32c by `decode_sample`, so damage is
    caught as before. Shards whose sidecar lacks the offsets are read by webdataset itself."""
    url = str(url)
    side, _ = _stream_digests(url)  # sidecar readable and tar size as written, else StoreReadError
    members = side.get("members")
    if not members:
        from webdataset.tariterators import tarfile_samples  # the library's reader (no offsets to use)

        yield from tarfile_samples(iter([{"url": url}]))
        return
    fix = f"delete it and rerun {REBUILD} to rewrite this block"
    wanted = _member_filter(targets)
    try:
        with open_shard(url) as f:
            for key, parts in _record_spans(members):
                sample = {"__key__": key, "__url__": url}
                for suffix, offset, size in parts:
                    if not wanted(suffix):
                        continue
                    f.seek(offset)
                    data = f.read(size)
                    if len(data) != size:
                        raise EOFError(f"member {key}.{suffix} is cut short")
                    sample[suffix] = data
                yield sample
    except (OSError, EOFError) as err:
        if is_url(url) and not isinstance(err, EOFError | FileNotFoundError):
            raise StoreReadError(explain_error(url, err, "cannot read shard") + "; rerun when the store answers") from None
        raise StoreReadError(f"shard {url} is truncated or unreadable ({err}); {fix}") from None


def shard_samples(src: Iterable[dict], targets: Iterable[str] | None = None) -> Iterator[dict]:
    """webdataset pipeline stage ({"url": shard} items -> samples), in place of
    ``webdataset.tarfile_to_samples()``: ``wds.DataPipeline(wds.SimpleShardList(urls),
    wds.split_by_node, wds.split_by_worker, shard_samples)``. See `iter_shard_samples`; with
    `targets`, use ``shard_samples_of(targets)`` as the stage."""
    for item in src:
        yield from iter_shard_samples(item["url"], targets)


def shard_samples_of(targets: Iterable[str] | None):
    """The `shard_samples` stage reading only the meta and the members of `targets` (families,
    names or aliases, as `select_names` takes them; None: every member)."""
    return functools.partial(shard_samples, targets=None if targets is None else tuple(targets))


def verify_sample(sample: dict, targets: Iterable[str] | None = None) -> None:
    """Check a streamed sample against its shard's sidecar, as the Zarr reader and verify do: its
    meta and every selected blob have the checksum recorded at write time (crc32c; sha256 in older
    shards) and no member is missing.
    Raises StoreReadError naming the shard and the member. Samples without ``__url__`` (built by
    hand, not streamed from a shard) have nothing to be checked against and pass."""
    url = sample.get("__url__")
    if url is None:
        return
    _, index = _stream_digests(str(url))
    key = str(sample.get("__key__", "")).rsplit("/", 1)[-1]
    fix = f"delete that shard and rerun {REBUILD} to rewrite its block"
    digest = index.get(key)
    if digest is None:
        raise StoreReadError(f"shard {url}: sample {key} is not listed in its sidecar (damaged); {fix}")
    meta = sample.get(META_MEMBER)
    if not isinstance(meta, bytes | bytearray) or not _member_ok(digest, None, meta)[0]:
        raise StoreReadError(f"shard {url}: member {key}.{META_MEMBER} is missing or fails its checksum; {fix}")
    for name in select_names(digest["sha256"], targets):
        blob = sample.get(name + BLOB_SUFFIX)
        if not isinstance(blob, bytes | bytearray):
            raise StoreReadError(f"shard {url}: member {key}.{name}{BLOB_SUFFIX} is missing; {fix}")
        ok, kind = _member_ok(digest, name, blob)
        if not ok:
            raise StoreReadError(f"shard {url}: member {key}.{name}{BLOB_SUFFIX} fails its {kind} checksum "
                                 f"(the shard is damaged); {fix}")


def _member_filter(targets: Iterable[str] | None):
    """suffix -> read it? The meta and every non-blob member always; blobs of the selected targets."""
    if targets is None:
        return lambda suffix: True
    targets = tuple(targets)
    seen: dict[str, bool] = {}

    def wanted(suffix: str) -> bool:
        hit = seen.get(suffix)
        if hit is None:
            hit = seen[suffix] = (not suffix.endswith(BLOB_SUFFIX)
                                  or bool(select_names([suffix[: -len(BLOB_SUFFIX)]], targets)))
        return hit
    return wanted


def decode_sample(sample: dict, targets: Iterable[str] | None = None, compact: bool = False,
                  verify: bool = True, defer_delta: bool = False, bases=None) -> DecodedRecord:
    """A webdataset sample of a cache shard -> DecodedRecord (rec["meta"], rec["arrays"]).

    For ``webdataset.WebDataset(reader.shard_paths())`` pipelines (raw bytes: no ``.decode()``).
    With `verify` (default) the sample is checked against its shard's sidecar checksums first
    (`verify_sample`). ``compact=True`` only undoes the lossless stage: arrays are `CompactArray`s
    for decoding on the training device (``defer_delta``: index parts stay delta-coded for the
    device's cumsum, `stores.codecs.unpack`); `bases`: the cache's PCA bases, which cpca blobs need
    (``reader.codec_bases()``). Raises StoreReadError naming the sample and its shard if
    it is incomplete or corrupt.
    """
    where = sample.get("__url__", "a cache shard")
    if verify:
        verify_sample(sample, targets)
    try:
        rec = sample_to_record(sample)
        return (unpack_record(rec, targets, defer_delta, bases) if compact
                else decode_record(rec, targets, bases))
    except (KeyError, ValueError) as err:  # BlobDecodeError is a ValueError
        raise StoreReadError(
            f"sample {sample.get('__key__')} of {where} is incomplete or corrupt ({err}); delete that shard "
            f"and rerun {REBUILD} to rewrite its block"
        ) from None
