"""Faults: truncated tar shard, corrupted zarr chunk, disk full mid-block, concurrent writers."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import tarfile

import pytest

from stores import (
    StoreReadError,
    StoreWriteError,
    WdsCacheReader,
    WdsCacheWriter,
    ZarrCacheReader,
    ZarrCacheWriter,
    verify_store,
)
from tests.store_conformance import assert_record_equal, block_records, make_manifest

WRITERS = {"zarr": ZarrCacheWriter, "wds": WdsCacheWriter}
READERS = {"zarr": ZarrCacheReader, "wds": WdsCacheReader}


def write(root, fmt, blocks=None):
    m = make_manifest()
    w = WRITERS[fmt](root, m)
    for b in range(m.num_blocks()) if blocks is None else blocks:
        w.write_block(b, block_records(m, b))
    return m


# ------------------------------------------------------------------------------------------------
# truncated / damaged WebDataset shard


@pytest.mark.parametrize("keep", [0.5, "boundary"])
def test_truncated_tar_shard(tmp_path, keep):
    m = write(tmp_path, "wds")
    shard = tmp_path / "wds" / "shard-000001.tar"
    data = shard.read_bytes()
    if keep == "boundary":  # cut exactly between two records: tarfile alone would not notice
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
        cut = members[len(members) // 2].offset
    else:
        cut = int(len(data) * keep)
    shard.write_bytes(data[:cut])
    reader = WdsCacheReader(tmp_path)
    image_id, view = m.block_records(1)[-1]
    with pytest.raises(StoreReadError) as info:
        reader.get(image_id, view)
    msg = str(info.value)
    assert str(shard) in msg and "delete it and rerun python -m pipeline.cache_teacher" in msg
    with pytest.raises(StoreReadError, match="shard-000001.tar.*truncated"):
        list(reader.iter_records())
    assert_record_equal(reader.get(*m.block_records(0)[0]), *m.block_records(0)[0])  # other shards fine
    report = verify_store(tmp_path)
    assert not report.ok and any("block 1" in e and str(shard) in e for e in report.errors)
    assert report.n_records == 6
    # the documented fix: delete the shard and rerun -> only block 1 is rewritten
    shard.unlink()
    w = WdsCacheWriter(tmp_path, m)
    assert w.missing_blocks() == [1]
    w.write_block(1, block_records(m, 1))
    assert verify_store(tmp_path).ok


def test_truncated_tar_without_sidecar_still_detected(tmp_path):
    m = write(tmp_path, "wds")
    shard = tmp_path / "wds" / "shard-000002.tar"
    (tmp_path / "wds" / "shard-000002.json").unlink()
    shard.write_bytes(shard.read_bytes()[:3000])
    reader = WdsCacheReader(tmp_path)
    with pytest.raises(StoreReadError, match="shard-000002.tar"):
        list(reader.iter_records(shards=[shard]))
    with pytest.raises(StoreReadError, match="shard-000002.tar"):
        reader.get(*m.block_records(2)[-1])
    report = verify_store(tmp_path)
    assert not report.ok and any("sidecar" in e and "shard-000002" in e for e in report.errors)


def test_flipped_bytes_in_tar_member_fail_checksum(tmp_path):
    m = write(tmp_path, "wds")
    shard = tmp_path / "wds" / "shard-000000.tar"
    image_id, view = m.block_records(0)[1]
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"{image_id:012d}_{view}.fpn.1.msgpack")
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreReadError, match=f"target fpn.1 of image {image_id} view {view} fails its checksum"):
        WdsCacheReader(tmp_path).get(image_id, view)
    report = verify_store(tmp_path)
    assert any(f"block 0 image {image_id} view {view}: target fpn.1 checksum mismatch" in e for e in report.errors)
    assert report.n_records == 9


# ------------------------------------------------------------------------------------------------
# corrupted zarr chunk


def _flip(path, where=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", [0.3, 0.999])  # inside a record's chunk / inside the shard index
def test_corrupted_zarr_chunk(tmp_path, where):
    m = write(tmp_path, "zarr")
    chunk = tmp_path / "zarr" / "targets" / "fpn" / "c" / "1"
    _flip(chunk, where)
    report = verify_store(tmp_path)
    assert not report.ok
    assert any("block 1" in e and str(chunk) in e and "image" in e for e in report.errors), report.errors
    reader = ZarrCacheReader(tmp_path)
    failures = 0
    for image_id, view in m.block_records(1):
        try:
            rec = reader.get(image_id, view)
        except StoreReadError as err:
            failures += 1
            msg = str(err)
            assert str(chunk) in msg and f"image {image_id} view {view}" in msg
            assert "block-000001.json and rerun python -m pipeline.cache_teacher" in msg
        else:  # records whose bytes were not hit must come back intact, never as garbage
            assert_record_equal(rec, image_id, view)
    assert failures >= 1
    assert report.n_records == 10 - failures
    # blocks without damage read fine; the targets selection avoids the damaged file entirely
    assert_record_equal(reader.get(*m.block_records(2)[0]), *m.block_records(2)[0])
    assert reader.get(*m.block_records(1)[0], targets=["cls"]).arrays
    # the documented fix: delete the done marker, rerun -> the block is rewritten, store verifies
    (tmp_path / "zarr" / "done" / "block-000001.json").unlink()
    w = ZarrCacheWriter(tmp_path, m)
    assert w.missing_blocks() == [1]
    w.write_block(1, block_records(m, 1))
    assert verify_store(tmp_path).ok


def test_corrupted_zarr_meta_and_missing_marker_data(tmp_path):
    write(tmp_path, "zarr")
    _flip(tmp_path / "zarr" / "meta" / "c" / "0", 0.2)
    report = verify_store(tmp_path)
    assert any("zarr/meta/c/0" in e for e in report.errors)


# ------------------------------------------------------------------------------------------------
# disk full while writing a block


def _enospc_after(n):
    calls = {"n": 0}

    def fail(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return fail.original(*args, **kwargs)

    return fail


@pytest.mark.parametrize("after", [0, 3])
def test_enospc_zarr_leaves_no_marker_and_resumes(tmp_path, monkeypatch, after):
    import zarr.storage._local as local

    m = write(tmp_path, "zarr", blocks=[0])
    w = ZarrCacheWriter(tmp_path, m)
    fail = _enospc_after(after)
    fail.original = local._put
    monkeypatch.setattr(local, "_put", fail)  # zarr's low-level file write
    with pytest.raises(StoreWriteError) as info:
        w.write_block(1, block_records(m, 1))
    assert str(info.value) == (
        f"disk full while writing block 1 of {tmp_path}: free space and rerun; 1 finished blocks are kept"
    )
    monkeypatch.undo()
    assert not (tmp_path / "zarr" / "done" / "block-000001.json").exists()
    assert w.completed_blocks() == {0}
    assert ZarrCacheReader(tmp_path).keys() == m.block_records(0)
    # resumable: a new run writes the missing blocks only
    w2 = ZarrCacheWriter(tmp_path, m)
    assert w2.missing_blocks() == [1, 2]
    for b in w2.missing_blocks():
        w2.write_block(b, block_records(m, b))
    assert verify_store(tmp_path).ok


def test_enospc_at_marker_write_zarr(tmp_path, monkeypatch):
    import stores.zarr_store as zs

    m = write(tmp_path, "zarr", blocks=[0])

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zs, "write_marker", full)  # the marker, written last (stores.commit)
    with pytest.raises(StoreWriteError, match="disk full while writing block 2"):
        ZarrCacheWriter(tmp_path, m).write_block(2, block_records(m, 2))
    assert ZarrCacheReader(tmp_path).completed_blocks() == {0}


@pytest.mark.parametrize("after", [0, 5])
def test_enospc_wds_leaves_no_shard_and_resumes(tmp_path, monkeypatch, after):
    m = write(tmp_path, "wds", blocks=[0, 2])
    w = WdsCacheWriter(tmp_path, m)
    fail = _enospc_after(after)
    fail.original = tarfile.TarFile.addfile
    monkeypatch.setattr(tarfile.TarFile, "addfile", fail)
    with pytest.raises(StoreWriteError) as info:
        w.write_block(1, block_records(m, 1))
    assert str(info.value) == (
        f"disk full while writing block 1 of {tmp_path}: free space and rerun; 2 finished blocks are kept"
    )
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "wds").iterdir())
    assert "shard-000001.tar" not in names and not any(".tmp-" in n for n in names)
    assert WdsCacheReader(tmp_path).completed_blocks() == {0, 2}
    w2 = WdsCacheWriter(tmp_path, m)
    assert w2.missing_blocks() == [1]
    w2.write_block(1, block_records(m, 1))
    assert verify_store(tmp_path).ok


def test_other_oserror_message(tmp_path, monkeypatch):
    m = make_manifest()
    w = WdsCacheWriter(tmp_path, m)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tarfile.TarFile, "addfile", denied)
    with pytest.raises(StoreWriteError, match=r"could not write block 0 of .*Permission denied.*rerun.*0 finished blocks are kept"):
        w.write_block(0, block_records(m, 0))


def test_leftover_temp_files_are_reported_not_fatal(tmp_path):
    write(tmp_path, "wds")
    (tmp_path / "wds" / "shard-000001.tar.tmp-99999").write_bytes(b"partial")
    report = verify_store(tmp_path)
    assert report.ok and any("leftover temp file" in w for w in report.warnings)


def test_verify_without_manifest(tmp_path):
    report = verify_store(tmp_path)
    assert not report.ok and "manifest missing" in report.errors[0]


# ------------------------------------------------------------------------------------------------
# concurrent writers


def _writer_process(root, fmt, blocks, barrier):
    m = make_manifest()
    barrier.wait(timeout=60)  # both processes create/open the store at the same moment
    w = WRITERS[fmt](root, m)
    for b in blocks:
        w.write_block(b, block_records(m, b))


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_two_processes_write_different_blocks(tmp_path, fmt):
    ctx = mp.get_context("spawn")  # no fork of a process that runs zarr's event-loop thread
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_writer_process, args=(str(tmp_path), fmt, blocks, barrier))
        for blocks in ([0, 2], [1])
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    report = verify_store(tmp_path, formats=[fmt])
    assert report.ok, report.errors
    reader = READERS[fmt](tmp_path)
    m = make_manifest()
    assert reader.keys() == m.plan
    for key in m.plan:
        assert_record_equal(reader.get(*key), *key)
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert os.listdir(tmp_path / fmt)


# ------------------------------------------------------------------------------------------------
# the WebDataset streaming path checks what the Zarr reader and verify check


def _stream(root):
    import webdataset as wds

    return wds.WebDataset(WdsCacheReader(root).shard_paths(), shardshuffle=False, empty_check=False)


def test_flipped_scale_byte_in_tar_member_is_refused_by_the_stream(tmp_path):
    import numpy as np

    from stores.codecs import prepare
    from stores.wds_store import decode_sample
    from tests.store_conformance import make_arrays

    m = write(tmp_path, "wds")
    image_id, view = m.block_records(0)[1]
    key = f"{image_id:012d}_{view}"
    shard = tmp_path / "wds" / "shard-000000.tar"
    _, arrays = make_arrays(image_id, view)
    scale = prepare(arrays["fpn.1"], "int8c+zstd")["scale"].astype("<f4").tobytes()  # stored as is (tiny)
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"{key}.fpn.1.msgpack")
    data = bytearray(shard.read_bytes())
    at = data.find(scale, member.offset_data, member.offset_data + member.size)
    assert at > 0, "the scale vector is stored verbatim in the member"
    data[at + 2] ^= 0x40  # one byte of one quantisation scale: a 3x-off channel if it went unseen
    shard.write_bytes(bytes(data))
    samples = list(_stream(tmp_path))
    sample = next(s for s in samples if s["__key__"] == key)
    with pytest.raises(StoreReadError) as info:
        decode_sample(sample)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"shard {shard}: member {key}.fpn.1.msgpack fails its crc32c checksum" in msg
    assert "rerun python -m pipeline.cache_teacher" in msg
    with pytest.raises(StoreReadError, match=f"shard {shard}: member {key}.fpn.1.msgpack fails"):
        decode_sample(sample, targets=["fpn"], compact=True)  # the device-decode path too
    decode_sample(sample, targets=["cls"])  # the damaged member is not read for other targets
    with pytest.raises(StoreReadError, match="fails its crc32"):  # the blob's own part checksum, unverified
        decode_sample(sample, verify=False)
    # the same damage, seen by the other readers: random access and verify
    with pytest.raises(StoreReadError, match=f"target fpn.1 of image {image_id} view {view} fails its checksum"):
        WdsCacheReader(tmp_path).get(image_id, view)
    assert any("fpn.1 checksum mismatch" in e for e in verify_store(tmp_path).errors)
    assert np.isfinite(decode_sample(samples[0])["arrays"]["fpn.0"]).all()  # undamaged samples still read


def test_stream_refuses_missing_member_truncated_shard_and_missing_sidecar(tmp_path):
    from stores.wds_store import decode_sample

    m = write(tmp_path, "wds")
    samples = list(_stream(tmp_path))
    broken = {k: v for k, v in samples[2].items() if k != "box.0.msgpack"}
    with pytest.raises(StoreReadError, match=r"shard .*shard-000000.tar: member .*\.box\.0\.msgpack is missing"):
        decode_sample(broken)
    shard = tmp_path / "wds" / "shard-000001.tar"
    one = next(s for s in samples if s["__url__"] == str(shard))
    shard.write_bytes(shard.read_bytes()[:-1024])  # cut inside the end-of-archive marker
    with pytest.raises(StoreReadError, match=f"shard {shard} is truncated or damaged"):
        decode_sample(one)
    side = tmp_path / "wds" / "shard-000002.json"
    side.unlink()
    last = next(s for s in samples if s["__url__"].endswith("shard-000002.tar"))
    with pytest.raises(StoreReadError, match="shard .*shard-000002.tar has no readable checksum sidecar"):
        decode_sample(last)
    assert m.num_blocks() == 3


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_partial_cache_is_refused_the_same_way_by_both_sources(tmp_path, fmt):
    from types import SimpleNamespace

    from stages.data.views import View
    from stages.distill.loader import cached_views

    m = make_manifest()
    write(tmp_path, fmt, blocks=[0, 2])  # block 1 (images 11, 12) was never written
    views = [View(64, 96, False), View(64, 96, True)]
    dataset = SimpleNamespace(image_ids=sorted({i for i, _ in m.plan}))  # the training set's ids
    with pytest.raises(ValueError) as info:
        cached_views(READERS[fmt](tmp_path), dataset, views)
    assert str(info.value) == (f"cache {tmp_path} has no record for 2 training images (first: image id 11); "
                               "finish it with python -m pipeline.cache_teacher")
    write(tmp_path, fmt, blocks=[1])
    assert cached_views(READERS[fmt](tmp_path), dataset, views) == [[0, 1]] * 5
