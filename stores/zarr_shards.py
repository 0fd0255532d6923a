"""Direct reads of the Zarr store's shard files (`stores.zarr_store`): one record's bytes, checked.

A zarr read costs ~1 ms of fixed overhead per array; a record is 4-7 arrays, so the reader goes to
the shard file itself when the array's zarr.json says exactly what `stores.zarr_store` writes
(`_SHARD_CODECS`), and to zarr for anything else.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import google_crc32c  # zarr's own crc32c implementation (its Crc32cCodec uses it)

from stores.url import explain_error, is_remote, read_range, retrying

# The shard codec configuration `_create_vlen` writes. Arrays whose zarr.json says exactly this are
# read by `_ShardFiles` (the file bytes, checked with the same crc32c as zarr); any other is read by zarr.
_SHARD_CODECS = [{
    "name": "sharding_indexed",
    "configuration": {
        "chunk_shape": [1],
        "codecs": [{"name": "vlen-bytes", "configuration": {}}, {"name": "crc32c"}],
        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
        "index_location": "end",
    },
}]
_EMPTY = 2**64 - 1  # the shard index's (offset, nbytes) of a chunk never written


class _NotFast(Exception):
    """The direct read did not find what zarr writes (damage, another layout): read through zarr,
    which raises the error `ZarrCacheReader._corrupt` turns into a one-line message."""


def _crc_ok(data: bytes) -> bool:
    return len(data) >= 4 and google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


class ShardUnreachable(OSError):
    """A shard object could not be fetched from its object store (retries exhausted): not damage.
    The message names the object and the fix."""


def read_inner_chunk(path: Path, i: int, chunks_per_shard: int, indexes: dict | None = None) -> bytes:
    """Element `i` of the one-record inner chunk `i` of a sharded variable-length-bytes shard file.

    Why not zarr: a zarr read costs ~1 ms of fixed overhead per array (event loop round trip, codec
    pipeline); a record is 4-7 arrays, so at 300 records/s per worker zarr alone would take the whole
    budget. This reads the same bytes zarr would (zarr v3 sharding spec: inner chunks, then the index
    of (offset, nbytes) uint64 little-endian pairs plus its crc32c at the end; each chunk is
    numcodecs vlen-bytes (uint32 count, uint32 length, bytes) plus its crc32c) and checks both
    checksums; anything unexpected raises `_NotFast` so that zarr itself reads (and reports) it.
    tests/test_zarr_store.py checks it against zarr's own reads.

    On an object store (`path` a URL path) it makes ranged GETs: the shard index once per shard
    (kept in `indexes`, a reader's dict; a shard rewritten later fails the chunk's crc and is read
    by zarr), then the record's chunk: one GET per record and array."""
    if is_remote(path):
        return _read_remote(path, i, chunks_per_shard, indexes if indexes is not None else {})
    n_index = 16 * chunks_per_shard + 4
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < n_index:
                raise _NotFast
            f.seek(size - n_index)
            index = f.read(n_index)
            if not _crc_ok(index):
                raise _NotFast
            offset, nbytes = struct.unpack_from("<QQ", index, 16 * i)
            if offset == _EMPTY and nbytes == _EMPTY:
                return b""  # the array's fill value
            if nbytes < 12 or offset + nbytes > size - n_index:
                raise _NotFast
            f.seek(offset)
            chunk = f.read(nbytes)
    except FileNotFoundError:
        return b""  # zarr reads a missing shard as fill values too
    except OSError as err:
        raise _NotFast from err
    return _element(chunk, nbytes)


def _element(chunk: bytes, nbytes: int) -> bytes:
    if not _crc_ok(chunk):
        raise _NotFast
    count, length = struct.unpack_from("<II", chunk, 0)
    if count != 1 or 8 + length != nbytes - 4:
        raise _NotFast
    return chunk[8 : 8 + length]


def _fetch(path, start: int, end: int | None) -> bytes:
    try:
        return read_range(path, start, end)
    except FileNotFoundError:
        raise
    except Exception as err:  # botocore / aiohttp errors after s3fs's retries
        raise ShardUnreachable(explain_error(str(path), err, "cannot read shard object")
                               + " (retried); rerun when the store answers") from None


def _read_remote(path, i: int, chunks_per_shard: int, indexes: dict) -> bytes:
    n_index = 16 * chunks_per_shard + 4
    key = str(path)
    index = indexes.get(key)
    try:
        if index is None:
            index = _fetch(path, -n_index, None)  # the object's tail: Range: bytes=-N
            if len(index) != n_index or not _crc_ok(index):
                raise _NotFast
            if len(indexes) > 256:
                indexes.clear()
            indexes[key] = index
        offset, nbytes = struct.unpack_from("<QQ", index, 16 * i)
        if offset == _EMPTY and nbytes == _EMPTY:
            return b""
        if nbytes < 12:
            raise _NotFast
        chunk = _fetch(path, offset, offset + nbytes)
    except FileNotFoundError:
        return b""
    if len(chunk) != nbytes:
        indexes.pop(key, None)
        raise _NotFast
    try:
        return _element(chunk, nbytes)
    except _NotFast:
        indexes.pop(key, None)  # a shard rewritten since its index was read: zarr reads it afresh
        raise


def read_inner_chunks(fs, paths: list[str], i: int, chunks_per_shard: int, indexes: dict) -> list[bytes]:
    """`read_inner_chunk` of record `i` from several shard objects of one object store at once: the
    missing shard indexes in one concurrent batch of ranged GETs, then every record chunk in another
    (fsspec ``cat_ranges``), so a record of 6 families costs about one round trip, not 6. `paths` are
    the filesystem `fs`'s own paths (strings: building a UPath per array and record costs more CPU
    than the read)."""
    n_index = 16 * chunks_per_shard + 4
    need = [p for p in paths if p not in indexes]
    if need:
        tails = _fetch_many(fs, need, [-n_index] * len(need), [None] * len(need))
        for p, tail in zip(need, tails):
            if isinstance(tail, FileNotFoundError):
                continue  # a missing shard reads as fill values, below
            if isinstance(tail, BaseException) or len(tail) != n_index or not _crc_ok(tail):
                raise _NotFast
            indexes[p] = tail
    spans = []
    for p in paths:
        index = indexes.get(p)
        if index is None:
            spans.append(None)
            continue
        offset, nbytes = struct.unpack_from("<QQ", index, 16 * i)
        spans.append(None if (offset, nbytes) == (_EMPTY, _EMPTY) else (offset, nbytes))
    todo = [(p, sp) for p, sp in zip(paths, spans) if sp is not None]
    chunks = iter(_fetch_many(fs, [p for p, _ in todo], [o for _, (o, _) in todo], [o + n for _, (o, n) in todo]))
    out = []
    for p, sp in zip(paths, spans):
        if sp is None:
            out.append(b"")
            continue
        chunk = next(chunks)
        if isinstance(chunk, BaseException) or len(chunk) != sp[1]:
            indexes.pop(p, None)
            raise _NotFast
        try:
            out.append(_element(chunk, sp[1]))
        except _NotFast:
            indexes.pop(p, None)  # rewritten since its index was read: zarr reads it afresh
            raise
    return out


def _fetch_many(fs, paths: list, starts: list, ends: list) -> list:
    """Concurrent ranged GETs (retried together when the store does not answer); a missing object's
    entry is its FileNotFoundError."""
    if not paths:
        return []

    def call():
        got = fs.cat_ranges(list(paths), starts, ends, on_error="return")
        if any(isinstance(g, BaseException) and not isinstance(g, FileNotFoundError) for g in got):
            err = next(g for g in got if isinstance(g, BaseException) and not isinstance(g, FileNotFoundError))
            raise err
        return got

    try:
        return retrying(call)
    except Exception as err:
        raise ShardUnreachable(explain_error(fs.unstrip_protocol(paths[0]), err, "cannot read shard object")
                               + " (retried); rerun when the store answers") from None
