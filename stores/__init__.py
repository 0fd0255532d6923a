"""The teacher-target cache format: codecs, manifest, Zarr and WebDataset stores, verification.

numpy in, numpy out: nothing here imports torch, stages or pipeline.

    from stores import Manifest, encode_record, open_writer, open_reader
    writers = [open_writer(root, manifest, fmt) for fmt in ("zarr", "wds")]
    rec = encode_record(image_id, view, meta, arrays, codecs)   # encode once ...
    for w in writers: w.write_block(b, [rec, ...])               # ... write to both formats
    reader = open_reader(root, "zarr"); reader.get(image_id, view).arrays["fpn.0"]
    reader.get(image_id, view, compact=True)   # lossless stage only: CompactArrays, for the device
"""

from __future__ import annotations

from pathlib import Path

from stores.base import (
    CacheReader,
    CacheWriter,
    DecodedRecord,
    EncodedRecord,
    StoreError,
    StoreReadError,
    StoreWriteError,
    chain_for,
    decode_record,
    encode_record,
    record_key,
    target_family,
)
from stores.codecs import (
    CODEC_CHAINS_FOR_BENCH,
    BlobDecodeError,
    CodecChain,
    CompactArray,
    decode,
    decode_compact,
    encode,
    pack,
    parse_chain,
    prepare,
    unpack,
)
from stores.manifest import (
    SCHEMA_VERSION,
    CacheMismatchError,
    Manifest,
    check_compatible,
    make_plan,
    sha256_file,
)
from stores.verify import VerifyReport, store_summary, verify_store
from stores.wds_store import WdsCacheReader, WdsCacheWriter, decode_sample
from stores.zarr_store import ZarrCacheReader, ZarrCacheWriter

WRITERS = {"zarr": ZarrCacheWriter, "wds": WdsCacheWriter}
READERS = {"zarr": ZarrCacheReader, "wds": WdsCacheReader}


def open_writer(root: str | Path, manifest: Manifest, fmt: str) -> CacheWriter:
    """A writer of format 'zarr' or 'wds' under cache folder `root`."""
    if fmt not in WRITERS:
        raise ValueError(f"unknown cache format {fmt!r}: expected one of {sorted(WRITERS)}")
    return WRITERS[fmt](root, manifest)


def open_reader(root: str | Path, fmt: str = "zarr") -> CacheReader:
    """A reader of format 'zarr' or 'wds' of cache folder `root`."""
    if fmt not in READERS:
        raise ValueError(f"unknown cache format {fmt!r}: expected one of {sorted(READERS)}")
    return READERS[fmt](root)


__all__ = [
    "CODEC_CHAINS_FOR_BENCH",
    "SCHEMA_VERSION",
    "BlobDecodeError",
    "CacheMismatchError",
    "CacheReader",
    "CacheWriter",
    "CodecChain",
    "CompactArray",
    "DecodedRecord",
    "EncodedRecord",
    "Manifest",
    "StoreError",
    "StoreReadError",
    "StoreWriteError",
    "VerifyReport",
    "WdsCacheReader",
    "WdsCacheWriter",
    "ZarrCacheReader",
    "ZarrCacheWriter",
    "chain_for",
    "check_compatible",
    "decode",
    "decode_compact",
    "decode_record",
    "decode_sample",
    "encode",
    "encode_record",
    "make_plan",
    "open_reader",
    "open_writer",
    "pack",
    "parse_chain",
    "prepare",
    "record_key",
    "sha256_file",
    "store_summary",
    "target_family",
    "unpack",
    "verify_store",
]
