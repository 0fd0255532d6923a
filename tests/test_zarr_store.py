"""Zarr store: the shared conformance suite plus zarr-specific layout checks."""

from __future__ import annotations

import json

import numpy as np
import zarr

from stores import ZarrCacheReader, ZarrCacheWriter
from tests.store_conformance import VIEWS, StoreConformance, block_records, make_arrays, make_manifest


class TestZarrConformance(StoreConformance):
    writer_cls = ZarrCacheWriter
    reader_cls = ZarrCacheReader
    fmt = "zarr"


def test_layout_index_and_sharding(tmp_path):
    m = make_manifest()
    w = ZarrCacheWriter(tmp_path, m)
    for b in range(m.num_blocks()):
        w.write_block(b, block_records(m, b))
    store = tmp_path / "zarr"
    # one shard file per block per array, a done marker per block
    for name in ("meta", "targets/fpn", "targets/cls", "targets/box", "targets/det", "targets/cand"):
        assert sorted(p.name for p in (store / name / "c").iterdir()) == ["0", "1", "2"], name
        codecs = json.loads((store / name / "zarr.json").read_text())["codecs"]
        assert codecs[0]["name"] == "sharding_indexed"
        assert codecs[0]["configuration"]["chunk_shape"] == [1]
    assert sorted(p.name for p in (store / "done").iterdir()) == [f"block-00000{b}.json" for b in range(3)]
    reader = ZarrCacheReader(tmp_path)
    idx = reader.index_arrays()
    assert idx["image_id"].tolist() == [i for i, _ in m.plan]
    assert [reader.views[v] for v in idx["view"]] == [v for _, v in m.plan]
    for r, (image_id, view) in enumerate(m.plan):
        meta, _ = make_arrays(image_id, view)
        assert idx["image_size"][r].tolist() == meta["image_size"]
        assert idx["level_sizes"][r].tolist() == meta["level_sizes"]
    # plain zarr can open it too
    g = zarr.open_group(str(store), mode="r")
    assert g["targets/fpn"].shape == (10,)
    assert g.attrs["kdcache"]["block_size"] == 4


def test_per_image_extent_no_padding(tmp_path):
    m = make_manifest()
    w = ZarrCacheWriter(tmp_path, m)
    w.write_block(0, block_records(m, 0))
    reader = ZarrCacheReader(tmp_path)
    shapes = {reader.get(i, v).arrays["fpn.0"].shape for i, v in m.block_records(0)}
    assert len(shapes) > 1  # each image keeps its own H x W


def test_partial_last_block_and_single_block(tmp_path):
    from stores import make_plan

    m = make_manifest(plan=make_plan([1, 2, 3], [VIEWS[0]]), block_size=16)
    w = ZarrCacheWriter(tmp_path, m)
    assert m.num_blocks() == 1
    w.write_block(0, block_records(m, 0))
    reader = ZarrCacheReader(tmp_path)
    assert len(reader) == 3
    np.testing.assert_array_equal(reader.get(2, VIEWS[0]).arrays["det.labels"], make_arrays(2, VIEWS[0])[1]["det.labels"])
