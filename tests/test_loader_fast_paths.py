"""The loader's fast read paths: each one against the library it stands in for.

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
from tests.blob_damage import refused_flips
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
            if p.get("filter") == "delta8":  # uint8 differences, 255 = the next uint32 escape
                e = p["escapes"]
                esc = iter(np.frombuffer(numcodecs.Zstd().decode(e["bytes"]) if e["codec"] == "zstd" else e["bytes"],
                                         dtype=e["dtype"]).tolist())
                want = np.cumsum([next(esc) if v == 255 else v for v in want.tolist()], dtype=np.uint32)
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


# ------------------------------------------------------------------------------------------------
# index cumsum on the device, sidecar-driven shard reading


def _indexed_blobs() -> dict[str, tuple[bytes, np.ndarray]]:
    """Blobs of the index-carrying chains, dense and sparse, with the kept indices the chain's rule
    gives (the oracle, computed here with numpy, not by the codec)."""
    rng = np.random.default_rng(1)
    probs = rng.random((2 * 3, 20, 28)).astype(np.float32) ** 3  # 2 anchors x 3 classes
    box = rng.normal(size=(2 * 4, 20, 28)).astype(np.float32)
    return {
        "sparse dense": (encode(probs + np.float32(0.01), "sparse0.005+zstd"), np.arange(probs.size)),
        "sparse": (encode(probs, "sparse0.5+zstd"), np.flatnonzero(probs.ravel() >= np.float32(0.5))),
        "topk (all kept)": (encode(probs, "topk9f0.0001+zstd", classes=3), None),
        "topk": (encode(probs, "topk1f0.3+zstd", classes=3), None),
        "mask": (encode(box, "mask0.4+zstd", score=probs), np.flatnonzero(probs.max(axis=0).ravel() >= np.float32(0.4))),
    }


def test_deferred_delta_decodes_exactly_like_the_reference():
    import torch

    from stages.distill.device_decode import decode_on_device
    from stores.codecs import DELTA_SUFFIX, decode, decode_compact, undelta

    for label, (blob, want_idx) in _indexed_blobs().items():
        ref = unpack(blob)
        got = unpack(blob, defer_delta=True)
        assert "idx" not in got.parts, label
        if "idx.delta8" in got.parts:  # narrow differences, 255 = the next uint32 escape
            narrow, esc = got.parts["idx.delta8"], iter(got.parts["idx.escapes"].tolist())
            assert narrow.dtype == np.uint8 and narrow.flags.writeable
            deltas = np.array([next(esc) if v == 255 else v for v in narrow.tolist()], dtype=np.uint32)
        else:
            deltas = got.parts["idx" + DELTA_SUFFIX]
            assert deltas.dtype == np.uint32 and deltas.flags.writeable
        np.testing.assert_array_equal(np.cumsum(deltas.astype(np.int64)), ref.parts["idx"], err_msg=label)
        if want_idx is not None:
            np.testing.assert_array_equal(ref.parts["idx"], want_idx, err_msg=label)
        np.testing.assert_array_equal(undelta(got.parts)["idx"], ref.parts["idx"], err_msg=label)
        for name in ref.parts.keys() - {"idx"}:
            np.testing.assert_array_equal(got.parts[name], ref.parts[name], err_msg=label)
        assert set(got.parts) - set(ref.parts) <= {"idx.delta", "idx.delta8", "idx.escapes"}, label
        np.testing.assert_array_equal(decode_compact(got), decode(blob), err_msg=label)
        dev = decode_on_device(got, torch.device("cpu")).numpy()
        np.testing.assert_array_equal(dev, decode(blob), err_msg=label)


def _sparse_blob(idx: list[int], n: int) -> bytes:
    """A sparse0.5 blob of an [n] map holding `idx` as written (pack does not check the range)."""
    from stores.codecs import pack

    idx = np.asarray(idx, dtype=np.uint32)
    return pack({"idx": idx, "val": np.ones(len(idx), np.float16)}, "sparse0.5+zstd", (n,), np.float32)


def test_deferred_delta_still_refuses_out_of_range_and_keeps_odd_indices_exact():
    n = 1000
    for idx in ([3, 999, 1000], [1000], [0, 4000000000]):  # past the end, also through uint32 wrap-around
        blob = _sparse_blob(idx, n)
        for defer in (False, True):
            with pytest.raises(BlobDecodeError, match="out of range"):
                unpack(blob, defer_delta=defer)
    # descending indices (never written by pack's callers) wrap in uint32: the deferred path gives
    # the reference's parts (host cumsum), not a delta part the device would sum differently
    blob = _sparse_blob([500, 7, 9], n)
    got, ref = unpack(blob, defer_delta=True), unpack(blob)
    assert set(got.parts) == set(ref.parts) == {"idx", "val"}
    np.testing.assert_array_equal(got.parts["idx"], [500, 7, 9])
    np.testing.assert_array_equal(got.parts["idx"], ref.parts["idx"])


@pytest.mark.parametrize("with_offsets", [True, False])
def test_shard_samples_equal_webdatasets_samples(tmp_path, with_offsets):
    from stores.wds_store import iter_shard_samples, shard_samples

    m = make_manifest()
    w = WdsCacheWriter(tmp_path, m)
    for b in range(m.num_blocks()):
        w.write_block(b, block_records(m, b))
    shards = WdsCacheReader(tmp_path).shard_paths()
    if not with_offsets:  # a sidecar without member offsets: webdataset's own reader is used
        side = tmp_path / "wds" / "shard-000000.json"
        doc = json.loads(side.read_text())
        del doc["members"]
        side.write_text(json.dumps(doc))
    want = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    got = list(wds.DataPipeline(wds.SimpleShardList(shards), shard_samples))
    assert len(got) == len(want) == len(m.plan)
    for g, s in zip(got, want):
        assert g.keys() - {"__local_path__"} == s.keys() - {"__local_path__"}
        for k in g.keys() - {"__local_path__"}:
            assert g[k] == s[k], k
        rec = decode_sample(g, compact=True, defer_delta=True)
        assert rec.meta == decode_sample(s).meta
    # a truncated shard is named before any sample is read
    path = tmp_path / "wds" / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[:-700])
    with pytest.raises(StoreReadError, match="shard-000001.tar is truncated"):
        list(iter_shard_samples(path))


def test_shard_samples_of_targets_read_exactly_those_members(tmp_path):
    """A run whose losses read only some families streams only their members (and the meta): each
    equals webdataset's bytes of that member, and the record decodes as the full sample does."""
    from stores.wds_store import shard_samples_of

    m = make_manifest()
    w = WdsCacheWriter(tmp_path, m)
    for b in range(m.num_blocks()):
        w.write_block(b, block_records(m, b))
    shards = WdsCacheReader(tmp_path).shard_paths()
    want = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    for targets in (["fpn"], ["cls", "box"], ["fpn.1"]):
        got = list(wds.DataPipeline(wds.SimpleShardList(shards), shard_samples_of(targets)))
        assert len(got) == len(want)
        for g, s in zip(got, want):
            blobs = {k for k in s if k.endswith(".msgpack")
                     and (k.split(".")[0] in targets or k.rsplit(".", 1)[0] in targets)}
            assert blobs and g.keys() - {"__key__", "__url__", "meta.json"} == blobs
            assert all(g[k] == s[k] for k in blobs | {"meta.json"})
            a, b = decode_sample(g, targets), decode_sample(s, targets)
            assert sorted(a.arrays) == sorted(b.arrays) and all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    # every member: the same samples as without a selection
    full = list(wds.DataPipeline(wds.SimpleShardList(shards), shard_samples_of(None)))
    assert [g.keys() for g in full] == [{k for k in s if k != "__local_path__"} for s in want]


def test_shard_samples_refuse_every_flipped_byte_of_a_member(tmp_path):
    from stores.wds_store import iter_shard_samples

    m = make_manifest()
    WdsCacheWriter(tmp_path, m).write_block(0, block_records(m, 0))
    image_id, view = m.block_records(0)[1]
    key = f"{image_id:012d}_{view}"
    shard = tmp_path / "wds" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"{key}.fpn.0.msgpack")
    clean = shard.read_bytes()
    for at in [*range(member.offset_data, member.offset_data + member.size, max(1, member.size // 40)),
               member.offset_data + member.size - 1]:
        data = bytearray(clean)
        data[at] ^= 0x04
        shard.write_bytes(bytes(data))
        with pytest.raises(StoreReadError, match=f"member {key}.fpn.0.msgpack fails its crc32c checksum"):
            for sample in iter_shard_samples(shard):
                decode_sample(sample, compact=True, defer_delta=True)


def test_pco_parts_are_handed_on_as_pcodec_decodes_them():
    pytest.importorskip("pcodec")
    from numcodecs.pcodec import PCodec

    x = np.random.default_rng(2).normal(size=(16, 24, 40)).astype(np.float32)
    blob = encode(x, "pca8s0.25+pco")
    header = msgpack.unpackb(blob, raw=False)
    got = unpack(blob)
    assert any(p["codec"] == "pco" for p in header["parts"].values())
    for name, p in header["parts"].items():
        if p["codec"] != "pco":
            continue
        want = np.asarray(PCodec(level=8).decode(p["bytes"])).reshape(p["shape"])  # the library: the oracle
        assert got.parts[name].dtype == want.dtype and got.parts[name].flags.writeable
        np.testing.assert_array_equal(got.parts[name], want)


def test_small_zstd_parts_never_decode_to_garbage():
    """Small parts go through python-zstandard's reused context: any flipped byte of the frame is
    refused (frame checksum, sizes) or, where the byte does not matter, decodes to the same part."""
    x = np.random.default_rng(3).normal(size=(4, 20, 25)).astype(np.float32)
    blob = encode(x, "int8c+zstd")
    header = msgpack.unpackb(blob, raw=False)
    frame = header["parts"]["q"]["bytes"]
    assert header["parts"]["q"]["codec"] == "zstd" and x.size < 1 << 16
    want = unpack(blob).parts["q"]
    np.testing.assert_array_equal(want, np.frombuffer(numcodecs.Zstd().decode(frame), np.int8).reshape(x.shape))
    refused, _ = refused_flips(blob, "q", range(len(frame)))
    assert refused >= len(frame) - 8  # all but a few header bits that do not change the content
