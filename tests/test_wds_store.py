"""WebDataset store: the shared conformance suite plus streaming / webdataset compatibility."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from stores import StoreReadError, WdsCacheReader, WdsCacheWriter, decode_record
from stores.wds_store import decode_sample, sample_to_record
from tests.store_conformance import (
    CODECS,
    StoreConformance,
    assert_record_equal,
    block_records,
    make_manifest,
)


class TestWdsConformance(StoreConformance):
    writer_cls = WdsCacheWriter
    reader_cls = WdsCacheReader
    fmt = "wds"


def _write(tmp_path):
    m = make_manifest()
    w = WdsCacheWriter(tmp_path, m)
    for b in range(m.num_blocks()):
        w.write_block(b, block_records(m, b))
    return m


def test_shards_members_and_sidecars(tmp_path):
    m = _write(tmp_path)
    store = tmp_path / "wds"
    assert sorted(p.name for p in store.iterdir()) == [
        "shard-000000.json", "shard-000000.tar", "shard-000001.json", "shard-000001.tar",
        "shard-000002.json", "shard-000002.tar",
    ]
    with tarfile.open(store / "shard-000002.tar") as tar:
        names = tar.getnames()
        assert all(t.mtime == 0 and t.uid == 0 for t in tar.getmembers())
    image_id, view = m.block_records(2)[0]
    key = f"{image_id:012d}_{view}"
    assert f"{key}.meta.json" in names and f"{key}.fpn.0.msgpack" in names and f"{key}.det.labels.msgpack" in names
    side = json.loads((store / "shard-000002.json").read_text())
    assert side["block"] == 2 and len(side["records"]) == 2
    assert side["tar_bytes"] == (store / "shard-000002.tar").stat().st_size


def test_deterministic_shards(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    for b in range(3):
        name = f"wds/shard-{b:06d}.tar"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_iter_records_streams_in_plan_order(tmp_path):
    m = _write(tmp_path)
    reader = WdsCacheReader(tmp_path)
    recs = list(reader.iter_records())
    assert [(r.image_id, r.view) for r in recs] == m.plan
    for r in recs[:3]:
        assert_record_equal(r, r.image_id, r.view)
    only = list(reader.iter_records(shards=reader.shard_paths()[1:2], targets=["cls"]))
    assert [(r.image_id, r.view) for r in only] == m.block_records(1)
    assert sorted(only[0].arrays) == ["cls.0", "cls.1", "cls.2"]


def test_webdataset_pipeline_reads_shards(tmp_path):
    import webdataset as wds

    m = _write(tmp_path)
    reader = WdsCacheReader(tmp_path)
    ds = wds.WebDataset(reader.shard_paths(), shardshuffle=False, empty_check=False)
    samples = list(ds)
    assert [(sample_to_record(s).image_id, sample_to_record(s).view) for s in samples] == m.plan
    rec = decode_record(sample_to_record(samples[5]))
    assert_record_equal(rec, rec.image_id, rec.view, CODECS)
    # webdataset's default decoders turn .json / .msgpack into python objects: still readable
    decoded = list(wds.WebDataset(reader.shard_paths()[:1], shardshuffle=False, empty_check=False).decode())
    rec2 = decode_record(sample_to_record(decoded[0]))
    np.testing.assert_array_equal(rec2.arrays["fpn.1"], reader.get(rec2.image_id, rec2.view).arrays["fpn.1"])
    # decode_sample: what stage 2's wds batches use
    rec3 = decode_sample(samples[5])
    assert rec3["meta"]["image_id"] == rec.image_id and sorted(rec3["arrays"]) == sorted(rec.arrays)
    assert sorted(decode_sample(samples[5], targets=["candidates"]).arrays) == ["cand.index", "cand.offsets", "cand.score"]
    broken = dict(samples[5])
    broken["fpn.0.msgpack"] = broken["fpn.0.msgpack"][:50]
    with pytest.raises(StoreReadError, match=f"shard .*shard-000001.tar: member {samples[5]['__key__']}.fpn.0.msgpack "
                       "fails its crc32c checksum"):
        decode_sample(broken)
    with pytest.raises(StoreReadError, match=f"sample {samples[5]['__key__']} of .*shard-000001.tar"):
        decode_sample(broken, verify=False)  # the blob's own framing still refuses it
