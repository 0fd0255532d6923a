"""topkKfFpP: a class floor fitted per cache (stores.cache_basis.ClassFloorFit), stored by stage 1 in
static/class_floor.npz and named by every class blob's resolved chain. The fitted floor is checked
against numpy's quantile of the same sample; a real cache (pipeline code, Zarr + WebDataset) against
the floor a fresh fit of its sample images gives."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from stages.cache.plan import open_reader, prepare_store
from stores.cache_basis import ClassFloorFit, class_floor_chains, resolve_class_chains
from stores.chains import CodecChain, parse_chain
from stores.codecs import blob_info, decode
from tests.cache_fixtures import build_cache, copy_cache, tiny_params

pytest_plugins = ["tests.cache_fixtures"]

FLOOR_CODECS = {"fpn": "int8c+zstd", "cls": "topk24f0.001p0.05+zstd", "box": "int8c+zstd"}


@pytest.mark.parametrize("share", [0.3, 0.05, 0.01])
def test_fitted_floor_is_the_share_quantile_rounded_up(share):
    rng = np.random.default_rng(0)
    x = rng.beta(0.3, 8.0, size=(9, 40, 30)).astype(np.float32)
    fit = ClassFloorFit(0.001)
    fit.add(x[:4])
    fit.add(x[4:])  # streaming: two batches
    floor = fit.floor(share)
    assert float(f"{floor:.4g}") == floor  # 4 significant digits: the chain spec prints it exactly
    assert (x >= np.float32(floor)).mean() <= share  # rounded up: never more than the share
    assert floor == pytest.approx(np.quantile(x, 1 - share), rel=0.01)  # numpy's quantile, to the grid
    assert fit.floor(0.999) == pytest.approx(0.001)  # never below the chain's minimum floor


def test_chain_grammar_and_resolution():
    chain = parse_chain("topk24f0.015p0.02+lz4")
    assert chain.param == (24, 0.015, 0.02) and parse_chain(chain.spec) == chain
    assert parse_chain("topk24f0.015+lz4").param == (24, 0.015)  # the fixed-floor chain is unchanged
    with pytest.raises(ValueError, match="0 < P < 1"):
        parse_chain("topk24f0.015p1.5+lz4")
    codecs = {"cls": "topk24f0.015p0.02+lz4", "fpn": "int8c+zstd"}
    assert set(class_floor_chains(codecs)) == {"cls"}
    resolved = resolve_class_chains(codecs, {"cls": 0.0237})
    assert resolved["cls"] == CodecChain("topk", "lz4", (24, 0.0237)) and resolved["cls"].spec == "topk24f0.0237+lz4"
    with pytest.raises(ValueError, match="class_floor.npz"):
        resolve_class_chains(codecs, None)  # a blob is never written with an unresolved floor


@pytest.fixture(scope="module")
def floor_cache(tiny_coco, tiny_teacher, tmp_path_factory):
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path_factory.mktemp("floor"), codecs=FLOOR_CODECS,
                         basis_images=3)
    build_cache(params)
    return params


def test_cache_fits_its_floor_and_every_class_blob_names_it(floor_cache, tiny_teacher):
    import torch

    from stages.cache.basis import fit_class_floors, sample_records
    from stages.data.batching import ViewDataset, collate
    from stages.data.coco import CocoDataset
    from stages.data.views import View
    from stages.detectors.build import load_detector
    from stores.manifest import Manifest

    root = Path(floor_cache.cache.path)
    manifest_json = json.loads((root / "manifest.json").read_text())
    floor_file = root / "static" / "class_floor.npz"
    assert manifest_json["statics"]["class_floor"] == hashlib.sha256(floor_file.read_bytes()).hexdigest()
    with np.load(floor_file, allow_pickle=False) as z:
        assert z.files == ["cls"] and z["cls"].dtype == np.float64
        floor = float(z["cls"][0])
    # a fresh fit over the same sample records, with the same teacher: the same floor
    manifest = Manifest.load(root / "manifest.json")
    views = {View.from_dict(v).key: View.from_dict(v) for v in manifest.fingerprint["views"]}
    data = CocoDataset(floor_cache.data.train_images, floor_cache.data.train_ann)
    items = ViewDataset.from_pairs(data, [(i, views[k]) for i, k in sample_records(manifest, 3)])
    teacher = load_detector(tiny_teacher).eval()
    again = fit_class_floors(teacher, (collate([items[i]]) for i in range(len(items))),
                             class_floor_chains(FLOOR_CODECS), teacher.num_classes, torch.device("cpu"))
    assert again == {"cls": floor} and 0.001 <= floor < 1
    kept = total = 0
    for fmt in ("zarr", "wds"):
        reader = open_reader(root, fmt)
        for key in reader.keys():
            blobs = reader.get_encoded(*key, ["cls"]).blobs
            for name, blob in blobs.items():
                info = blob_info(blob)
                assert info["chain"] == f"topk24f{floor:g}+zstd", name  # the blob names its floor
                assert np.isfinite(decode(blob)).all()
                kept += info["parts"]["q"]["shape"][0] if fmt == "zarr" else 0  # one code per kept element
                total += int(np.prod(info["shape"])) if fmt == "zarr" else 0
    # at most the sample's 5 %, give or take what the other images hold (this random teacher sits at its
    # 0.01 prior, so the fitted floor keeps next to nothing; at the chain's minimum 0.001 top-24 keeps all)
    assert kept / total <= 0.1, (floor, kept, total)


def test_a_rerun_keeps_the_floor_and_a_damaged_one_is_refused(floor_cache, tmp_path):
    params = copy_cache(floor_cache, tmp_path)
    floor_file = Path(params.cache.path) / "static" / "class_floor.npz"
    before = (floor_file.read_bytes(), floor_file.stat().st_mtime_ns)
    assert build_cache(params)["computed_blocks"] == 0
    assert (floor_file.read_bytes(), floor_file.stat().st_mtime_ns) == before, "a resumed cache keeps its floor"
    damaged = bytearray(before[0])
    damaged[-10] ^= 0xFF
    floor_file.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="class_floor.npz is damaged.*--overwrite"):
        prepare_store(params)


def test_no_sample_images_is_refused(tiny_coco, tiny_teacher, tmp_path):
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path, codecs=FLOOR_CODECS)
    with pytest.raises(ValueError, match="cache.basis_images is 0"):
        prepare_store(replace(params, cache=replace(params.cache, basis_images=0)))
