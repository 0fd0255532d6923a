"""cpcaKsS: one PCA basis per cache (stores.cache_basis), fitted by stage 1 and attached by the readers.

The basis fit is checked against numpy's SVD of the same centred sample (a different algorithm from
the eigendecomposition of the scatter matrix the code uses), the coding error against the uniform
quantiser's bound, and a real cache (pipeline code, Zarr + WebDataset) against a raw cache of the
same teacher.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.cache.device_codecs import cpca_prepare as device_cpca_prepare
from stages.cache.plan import open_reader, prepare_store
from stages.distill.device_decode import decode_on_device
from stores.base import StoreReadError
from stores.cache_basis import BasisFit, CacheBases, cpca_prepare
from stores.codecs import BlobDecodeError, decode, encode, pack, unpack
from stores.verify import store_summary, verify_store
from tests.cache_fixtures import build_cache, copy_cache, tiny_params

pytest_plugins = ["tests.cache_fixtures"]

CPCA = {"fpn": "cpca16s0.1+pco", "cls": "topk24f0.01+zstd", "box": "int8c+zstd"}


def _maps(rng, n, c=24, rank=6, cells=(12, 10)):
    """Feature-like maps: a shared low-rank channel mixing plus a per-map offset and small noise."""
    mix = np.random.default_rng(7).normal(size=(c, rank))
    return [(mix @ rng.normal(size=(rank, cells[0] * cells[1])) + rng.normal(size=(c, 1))
             + 0.01 * rng.normal(size=(c, cells[0] * cells[1]))).astype(np.float32).reshape(c, *cells)
            for _ in range(n)]


def test_basis_spans_the_samples_principal_subspace():
    maps = _maps(np.random.default_rng(0), 5)
    fit = BasisFit()
    for m in maps:
        fit.add("fpn.0", m)
    basis = fit.bases(6)["fpn.0"].astype(np.float64)
    # oracle: left singular vectors of the cells, each map centred on its own channel mean
    centred = np.concatenate([m.reshape(24, -1) - m.reshape(24, -1).mean(axis=1, keepdims=True) for m in maps], 1)
    u = np.linalg.svd(centred.astype(np.float64), full_matrices=False)[0][:, :6]
    cosines = np.linalg.svd(basis.T @ u, compute_uv=False)  # principal angles between the subspaces
    assert basis.shape == (24, 6) and cosines.min() > 0.999, cosines
    assert np.allclose(basis.T @ basis, np.eye(6), atol=2e-3)  # orthonormal up to float16
    assert np.all(basis[np.abs(basis).argmax(axis=0), np.arange(6)] > 0)  # the documented sign rule
    torch_fit = BasisFit()
    for m in maps:
        torch_fit.add("fpn.0", torch.from_numpy(m))
    np.testing.assert_array_equal(torch_fit.bases(6)["fpn.0"], fit.bases(6)["fpn.0"])


def test_full_rank_code_error_is_the_quantiser_step():
    rng = np.random.default_rng(1)
    fit = BasisFit()
    for m in _maps(rng, 4):
        fit.add("fpn.0", m)
    basis = fit.bases(24)["fpn.0"]  # K = C: nothing truncated, the step alone sets the error
    x = _maps(rng, 1)[0]
    blob = encode(x, "cpca24s0.1+pco", basis=basis)
    y = decode(blob, CacheBases({"fpn.0": basis}))
    flat = x.reshape(24, -1)
    step = 0.1 * np.sqrt(((flat - flat.mean(axis=1, keepdims=True)) ** 2).mean())
    # a uniform quantiser's error is step / sqrt(12) rms per coefficient; the float16 basis adds a little
    assert np.sqrt(((y - x) ** 2).mean()) < 0.4 * step
    parts = unpack(blob).parts
    assert parts["q"].dtype == np.int16 and "basis" not in parts, "the basis is the cache's, not the blob's"
    truncated = decode(encode(x, "cpca2s0.1+pco", basis=fit.bases(2)["fpn.0"]), CacheBases({"fpn.0": fit.bases(2)["fpn.0"]}))
    assert np.sqrt(((truncated - x) ** 2).mean()) > 4 * np.sqrt(((y - x) ** 2).mean()), "K < rank drops energy"


def test_a_blob_without_its_own_basis_is_refused():
    rng = np.random.default_rng(2)
    maps = _maps(rng, 3)
    fits = [BasisFit(), BasisFit()]
    for i, m in enumerate(maps):
        fits[i % 2].add("fpn.0", m)
    mine, other = (f.bases(8)["fpn.0"] for f in fits)
    blob = encode(maps[2], "cpca8s0.2+zstd", basis=mine)
    with pytest.raises(BlobDecodeError, match="static/codec_basis.npz"):
        decode(blob)
    with pytest.raises(BlobDecodeError, match="another cache"):
        decode(blob, CacheBases({"fpn.0": other}))
    with pytest.raises(ValueError, match="no cache basis"):
        encode(maps[2], "cpca8s0.2+zstd")
    with pytest.raises(ValueError, match="do not match the chain's parts"):  # the basis never goes in a blob
        pack({**cpca_prepare(maps[2], mine, 0.2), "basis": mine}, "cpca8s0.2+zstd", maps[2].shape, np.float32)


def test_device_encoder_matches_the_reference():
    rng = np.random.default_rng(3)
    fit = BasisFit()
    for m in _maps(rng, 3):
        fit.add("fpn.1", m)
    basis = fit.bases(12)["fpn.1"]
    x = _maps(rng, 1)[0]
    ref = cpca_prepare(x, basis, 0.2)
    dev = {k: v.numpy() for k, v in device_cpca_prepare(torch.from_numpy(x), basis, 0.2).items()}
    assert sorted(dev) == sorted(ref) and dev["bid"].tobytes() == ref["bid"].tobytes()
    np.testing.assert_allclose(dev["mean"], ref["mean"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dev["step"], ref["step"], rtol=1e-6)
    assert dev["q"].shape == ref["q"].shape and np.abs(dev["q"].astype(int) - ref["q"]).max() <= 1


@pytest.fixture(scope="module")
def cpca_cache(tiny_coco, tiny_teacher, tmp_path_factory):
    """A real cache with cpca feature maps, and a raw one of the same teacher to compare with."""
    root = tmp_path_factory.mktemp("cpca")
    params = tiny_params(tiny_coco, tiny_teacher, root / "cpca", codecs=CPCA)
    raw = tiny_params(tiny_coco, tiny_teacher, root / "raw", codecs={"fpn": "raw+none"}, targets=["fpn"])
    build_cache(params)
    build_cache(raw)
    return params, raw


def test_cache_fits_one_basis_and_both_formats_decode_against_it(cpca_cache):
    params, raw = cpca_cache
    root = Path(params.cache.path)
    statics = json.loads((root / "manifest.json").read_text())["statics"]
    basis_file = root / "static" / "codec_basis.npz"
    assert statics["codec_basis"] == hashlib.sha256(basis_file.read_bytes()).hexdigest()
    with np.load(basis_file, allow_pickle=False) as z:
        assert sorted(z.files) == [f"fpn.{lv}" for lv in range(5)] and z["fpn.0"].shape == (16, 16)
    ref = open_reader(raw.cache.path, "zarr")
    for fmt in ("zarr", "wds"):
        reader = open_reader(root, fmt)
        for key in reader.keys()[::5]:
            cached, live = reader.get(*key, ["fpn"]).arrays, ref.get(*key, ["fpn"]).arrays
            compact = reader.get(*key, ["fpn"], compact=True, defer_delta=True).arrays
            for name, x in live.items():
                rel = np.sqrt(((cached[name] - x) ** 2).mean()) / max(float(x.std()), 1e-12)
                assert rel < 0.06, (fmt, key, name, rel)  # S = 0.1: about 0.03 of the map's rms
                on_device = decode_on_device(compact[name], torch.device("cpu")).numpy()
                np.testing.assert_allclose(on_device, cached[name], rtol=1e-5, atol=1e-5)
                assert "basis" not in reader.get_encoded(*key, [name]).blobs  # not stored per record
    assert verify_store(root).ok
    assert store_summary(root)["statics_bytes"]["codec_basis"] == basis_file.stat().st_size  # inspect_cache shows it


def test_a_rerun_keeps_the_basis_and_a_damaged_one_is_refused(cpca_cache, tmp_path):
    params = copy_cache(cpca_cache[0], tmp_path)
    basis_file = Path(params.cache.path) / "static" / "codec_basis.npz"
    before = (basis_file.read_bytes(), basis_file.stat().st_mtime_ns)
    assert build_cache(params)["computed_blocks"] == 0
    assert (basis_file.read_bytes(), basis_file.stat().st_mtime_ns) == before, "a resumed cache keeps its basis"
    damaged = bytearray(before[0])
    damaged[-10] ^= 0xFF
    basis_file.write_bytes(bytes(damaged))
    with pytest.raises(StoreReadError, match="codec_basis.npz does not match the sha256"):
        open_reader(params.cache.path, "zarr").get(*open_reader(params.cache.path, "zarr").keys()[0])
    with pytest.raises(ValueError, match="codec_basis.npz is damaged.*--overwrite"):
        prepare_store(params)
    report = verify_store(params.cache.path)
    assert not report.ok and any("codec_basis.npz checksum mismatch" in e for e in report.errors)
    assert not any("does not decode" in e for e in report.errors), "one error for the basis, not one per blob"


def test_cpca_is_refused_for_maps_without_channels_and_without_sample_images(tiny_coco, tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match="cache.codecs.cls: cpca16s0.1\\+pco codes feature maps"):
        prepare_store(tiny_params(tiny_coco, tiny_teacher, tmp_path, codecs={"cls": "cpca16s0.1+pco"}))
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path, codecs=CPCA)
    with pytest.raises(ValueError, match="cache.basis_images is 0"):
        prepare_store(replace(params, cache=replace(params.cache, basis_images=0)))


def _with(params, mode, source):
    return replace(params, distill=replace(params.distill, teacher=mode, source=source,
                                           losses={"cskd": 1.0, "mse": 1.0}))


def test_stage_two_reads_a_cpca_cache_as_the_live_teacher(cpca_cache):
    from stages.distill.run import build_run

    params = cpca_cache[0]
    runs = {mode: build_run(_with(params, mode, "zarr"), None) for mode in ("offline", "online")}
    runs["online"].student.load_state_dict(runs["offline"].student.state_dict())
    runs["online"].kd.load_state_dict(runs["offline"].kd.state_dict())
    batches = {mode: next(run.make_batches(0)) for mode, run in runs.items()}
    assert batches["offline"]["image_ids"] == batches["online"]["image_ids"]
    cached, live = (runs[m].step_loss(batches[m]) for m in ("offline", "online"))
    # the terms of the feature maps (and the head run on them); cskd/pred_cls reads the topk class maps,
    # which for this untrained teacher sit at its 0.01 prior, right at the chain's floor
    terms = [n for n in live if n.startswith(("cskd", "mse")) and n != "cskd/pred_cls"]
    assert len(terms) >= 8, terms
    for name in terms:
        c, v = float(cached[name].detach()), float(live[name].detach())
        assert abs(c - v) / max(abs(v), 1e-12) < 0.01, (name, c, v)


def test_stage_two_streams_a_cpca_cache_from_webdataset(cpca_cache):
    from stages.distill.run import build_run

    params = cpca_cache[0]
    run = build_run(_with(params, "offline", "wds"), None)
    batch = next(run.make_batches(0))
    zarr = open_reader(params.cache.path, "zarr")
    for image_id, view, arrays in zip(batch["image_ids"], batch["views"], batch["teacher"]):
        expected = zarr.get(image_id, view, targets=["fpn"]).arrays
        for name in expected:  # compact parts with the basis attached, decoded as stage 2 does
            on_device = decode_on_device(arrays[name], torch.device("cpu")).numpy()
            np.testing.assert_allclose(on_device, expected[name], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(sum(run.step_loss(batch).values()))


def test_dask_workers_code_against_the_drivers_basis(cpca_cache, tiny_coco, tiny_teacher, tmp_path):
    """Two dask worker processes load the basis the driver fitted (static/codec_basis.npz) and write
    blocks bit-identical to the single-process cache's."""
    import os

    from tests.cache_fixtures import all_records, assert_same_records

    params = tiny_params(tiny_coco, tiny_teacher, tmp_path, codecs=CPCA, n_workers=2)
    stats = build_cache(params)["stats"]
    assert sorted(s["block"] for s in stats) == [0, 1, 2, 3] and all(s["pid"] != os.getpid() for s in stats)
    basis = [(Path(p.cache.path) / "static" / "codec_basis.npz").read_bytes() for p in (params, cpca_cache[0])]
    assert basis[0] == basis[1], "the same sample, teacher and thread count fit the same basis"
    for fmt in ("zarr", "wds"):
        assert_same_records(all_records(params.cache.path, fmt), all_records(cpca_cache[0].cache.path, fmt), fmt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")
def test_cuda_encode_and_decode_match_the_reference():  # pragma: no cover - run on the GPU machine
    rng = np.random.default_rng(4)
    fit = BasisFit()
    for m in _maps(rng, 3):
        fit.add("fpn.0", torch.from_numpy(m).cuda())  # the driver's fit on the teacher's device
    basis = fit.bases(16)["fpn.0"]
    x = _maps(rng, 1)[0]
    dev = {k: v.cpu().numpy() for k, v in device_cpca_prepare(torch.from_numpy(x).cuda(), basis, 0.2).items()}
    ref = cpca_prepare(x, basis, 0.2)
    assert dev["bid"].tobytes() == ref["bid"].tobytes() and np.abs(dev["q"].astype(int) - ref["q"]).max() <= 1
    blob = encode(x, "cpca16s0.2+pco", basis=basis)
    bases = CacheBases({"fpn.0": basis})
    on_gpu = decode_on_device(bases.attach(unpack(blob)), torch.device("cuda")).cpu().numpy()
    np.testing.assert_allclose(on_gpu, decode(blob, bases), rtol=1e-5, atol=1e-5)
