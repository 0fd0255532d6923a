"""The loader's fast read paths (issue 9 part 4): each one against the library it stands in for.

- Zarr: `read_inner_chunk` (the shard file's bytes, checked with crc32c) returns exactly what zarr
  itself reads, for every record and array, including records of a block never written; damaged
  bytes still end in zarr's own read and the one-line StoreReadError.
- WebDataset: the sidecar's per-member crc32c (beside sha256) refuses a flipped byte at EVERY
  position of a member; shards whose sidecar predates crc32c are still checked with sha256.
- `stores.codecs.unpack` decompressing zstd straight into its output buffer equals numcodecs'
  plain decode, and a frame of another size than the header says is refused.
"""

from __future__ import annotations

import json
import tarfile

import msgpack
import numcodecs
import numpy as np
import pytest
import webdataset as wds

from stores import StoreReadError, WdsCacheReader, WdsCacheWriter, ZarrCacheReader, ZarrCacheWriter
from stores.codecs import BlobDecodeError, _zstd_content_size, encode, unpack
from stores.wds_store import decode_sample, member_crcs
from stores.zarr_store import read_inner_chunk
from tests.store_conformance import assert_record_equal, block_records, make_manifest


def test_zarr_direct_read_equals_zarr_and_falls_back_on_damage(tmp_path):
    m = make_manifest()
    w = ZarrCacheWriter(tmp_path, m)
    for b in range(m.num_blocks() - 1):  # the last block stays unwritten: fill values
        w.write_block(b, block_records(m, b))
    reader = ZarrCacheReader(tmp_path)
    names = ["meta"] + [f"targets/{f}" for f in reader.families()]
    assert all(reader._direct(n) for n in names)
    for r in range(len(m.plan)):
        block, i = divmod(r, m.block_size)
        for n in names:
            want = bytes(reader._array(n)[r : r + 1][0])  # zarr's own read: the oracle
            assert read_inner_chunk(reader.shard_file(n, block), i, m.block_size) == want, (n, r)
    for image_id, view in m.block_records(0):
        assert_record_equal(reader.get(image_id, view), image_id, view)
    # a flipped byte inside one record's chunk: crc32c fails, zarr reads it and the error names the file
    image_id, view = m.block_records(0)[1]
    shard = reader.shard_file("targets/fpn", 0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreReadError) as info:
        for key in m.block_records(0):
            ZarrCacheReader(tmp_path).get(*key)
    msg = str(info.value)
    assert "\n" not in msg and str(shard) in msg and "rerun python -m pipeline.cache_teacher" in msg


def test_crc32c_check_value():
    # RFC 3720 (iSCSI) B.4 check value of CRC-32C: the checksum the sidecar records
    assert member_crcs(b"123456789", {})["meta_crc32c"] == 0xE3069283


def _sample(root, key):
    return next(s for s in wds.WebDataset(WdsCacheReader(root).shard_paths(), shardshuffle=False,
                                          empty_check=False) if s["__key__"] == key)


@pytest.mark.parametrize("sidecar", ["crc32c", "sha256 only (older shards)"])
def test_every_flipped_byte_of_a_member_is_refused(tmp_path, sidecar):
    m = make_manifest()
    w = WdsCacheWriter(tmp_path, m)
    w.write_block(0, block_records(m, 0))
    image_id, view = m.block_records(0)[0]
    key = f"{image_id:012d}_{view}"
    shard, side = tmp_path / "wds" / "shard-000000.tar", tmp_path / "wds" / "shard-000000.json"
    if sidecar != "crc32c":
        doc = json.loads(side.read_text())
        for rec in doc["records"]:
            del rec["crc32c"], rec["meta_crc32c"]
        side.write_text(json.dumps(doc))
    kind = "crc32c" if sidecar == "crc32c" else "sha256"
    decode_sample(_sample(tmp_path, key), compact=True)  # undamaged: reads
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"{key}.box.0.msgpack")
    clean = shard.read_bytes()
    positions = range(member.offset_data, member.offset_data + member.size, max(1, member.size // 40))
    for at in [*positions, member.offset_data + member.size - 1]:
        data = bytearray(clean)
        data[at] ^= 0x01
        shard.write_bytes(bytes(data))
        with pytest.raises(StoreReadError, match=f"member {key}.box.0.msgpack fails its {kind} checksum"):
            decode_sample(_sample(tmp_path, key), compact=True)


def test_unpack_into_buffer_equals_numcodecs_decode():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 40, 56)).astype(np.float32)
    for chain in ("int8c+zstd", "fp16+zstd", "sparse0.5+zstd", "raw+zstd"):
        blob = encode(x, chain)
        header = msgpack.unpackb(blob, raw=False)
        got = unpack(blob)
        for name, p in header["parts"].items():
            raw = numcodecs.Zstd().decode(p["bytes"]) if p["codec"] == "zstd" else p["bytes"]
            assert _zstd_content_size(p["bytes"]) in (None, len(raw))
            want = np.frombuffer(raw, dtype=p["dtype"]).reshape(p["shape"])
            if p.get("filter") == "delta":
                want = np.cumsum(want, dtype=want.dtype)
            np.testing.assert_array_equal(got.parts[name], want)
            assert got.parts[name].flags.writeable
    # a valid zstd frame holding fewer bytes than the part's shape: refused, not padded with garbage
    header = msgpack.unpackb(encode(x, "int8c+zstd"), raw=False)
    q = header["parts"]["q"]
    q["bytes"] = numcodecs.Zstd(checksum=True).encode(np.zeros(x.size - 7, np.int8))
    q["codec"] = "zstd"
    with pytest.raises(BlobDecodeError):
        unpack(msgpack.packb(header, use_bin_type=True))
