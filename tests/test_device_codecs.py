"""Compact codecs: torch encoders (teacher device) and decoders (training device) against the numpy reference.

The numpy functions of `stores.codecs` / `stores.transforms` are the reference; `device_prepare`
must give the same parts (bit for bit for selections and IEEE float32 arithmetic; topk's float64
background and pca's eigh to a stated tolerance), and `decode_on_device(unpack(blob))` must give the
same map as `decode(blob)` (bit for bit; pca to float32 matmul rounding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.cache.targets import device_prepare, parts_to_numpy
from stages.distill.device_decode import decode_on_device, record_to_device
from stages.distill.teacher_source import cached_records_to_device
from stores.base import codec_inputs, encode_record
from stores.codecs import CompactArray, decode, encode, pack, parse_chain, prepare, unpack

RNG = np.random.default_rng(3)
CLASSES = 7
CLS = (1 / (1 + np.exp(-(RNG.standard_normal((2 * CLASSES, 9, 11)) * 2.5 - 4.5)))).astype(np.float32)
FEAT = (RNG.standard_normal((12, 9, 11)) * np.linspace(0.2, 4, 12)[:, None, None]).astype(np.float32)
BOX = (RNG.standard_normal((2 * 4, 9, 11)) * 0.5).astype(np.float32)
CPU = torch.device("cpu")


@pytest.mark.parametrize("spec,x", [("topk1f0.01+zstd", CLS), ("topk3f0.02+zstd", CLS), ("topk9f0.001+zstd", CLS),
                                    ("mask0.2+zstd", BOX), ("mask0+zstd", BOX), ("mask1+zstd", BOX),
                                    ("int8c+zstd", FEAT), ("sparse0.05+zstd", CLS), ("u8p+zstd", CLS)])
def test_device_prepare_equals_reference_bit_for_bit(spec, x):
    chain = parse_chain(spec)
    ref = prepare(x, chain, classes=CLASSES, score=CLS)
    dev = parts_to_numpy(device_prepare(torch.from_numpy(x), chain, classes=CLASSES, score=torch.from_numpy(CLS)))
    assert sorted(dev) == sorted(ref)
    for name in ref:
        assert dev[name].dtype == ref[name].dtype, name
        if name == "bgc":  # float64 sums in another order: equal to float32 rounding
            np.testing.assert_allclose(dev[name], ref[name], rtol=1e-6)
        elif name == "bgs":  # the same, then rounded to float16: at most one float16 step apart
            np.testing.assert_allclose(dev[name].astype(np.float32), ref[name].astype(np.float32), rtol=1e-3, atol=1e-3)
        else:
            np.testing.assert_array_equal(dev[name], ref[name], err_msg=name)
    assert pack(dev, chain, x.shape, x.dtype)  # pack accepts the device parts


def test_device_pca_matches_reference_to_tolerance():
    chain = parse_chain("pca6+zstd")
    ref = decode(encode(FEAT, chain))
    dev_parts = parts_to_numpy(device_prepare(torch.from_numpy(FEAT), chain))
    dev = decode(pack(dev_parts, chain, FEAT.shape, FEAT.dtype))
    # eigh differs across libraries in the last bits: the decoded maps agree to a fraction of the int8 step
    assert np.abs(dev - ref).max() <= 0.02 * np.abs(FEAT).max()


def test_zfp_device_prepare_is_coded_by_pack():
    pytest.importorskip("zfpy")
    chain = parse_chain("zfp0.01+none")
    host = parts_to_numpy(device_prepare(torch.from_numpy(FEAT), chain))
    np.testing.assert_array_equal(decode(pack(host, chain, FEAT.shape, FEAT.dtype)), decode(encode(FEAT, chain)))


EXACT = ["raw+zstd", "fp16+zstd", "bitround7+blosc", "int8c+zstd", "sparse0.05+zstd", "u8p+none", "mask0.2+zstd",
         "topk2f0.01+zstd"]


@pytest.mark.parametrize("spec", EXACT)
def test_device_decode_equals_reference_bit_for_bit(spec):
    x = CLS if spec.startswith(("topk", "sparse", "u8p")) else (BOX if spec.startswith("mask") else FEAT)
    blob = encode(x, spec, classes=CLASSES, score=CLS)
    ref = decode(blob)
    dev = decode_on_device(unpack(blob), CPU)
    assert dev.dtype == torch.from_numpy(ref).dtype and tuple(dev.shape) == ref.shape
    np.testing.assert_array_equal(dev.numpy(), ref)


def test_device_decode_of_capped_and_legacy_topk_equals_reference():
    # full groups (top-k drops above-floor classes: the per-group cap) and a legacy blob (floor cap)
    x = (0.2 * (1 + RNG.random(CLS.shape))).astype(np.float32)
    x[:, 3:6] = CLS[:, 3:6]  # some cells with fewer than K classes above the floor
    for k in (1, 3, CLASSES):
        parts = prepare(x, f"topk{k}f0.01+zstd", classes=CLASSES)
        legacy = {n: v for n, v in parts.items() if n != "classes"}
        for p in (parts, legacy):
            blob = pack(p, f"topk{k}f0.01+zstd", x.shape, x.dtype)
            np.testing.assert_array_equal(decode_on_device(unpack(blob), CPU).numpy(), decode(blob))


def test_device_decode_pca_within_float32_matmul_rounding():
    blob = encode(FEAT, "pca5+zstd")
    ref = decode(blob)
    dev = decode_on_device(unpack(blob), CPU).numpy()
    np.testing.assert_allclose(dev, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_exact_integers_and_records_through_cached_records_to_device():
    arrays = {"fpn.0": FEAT, "cls.0": CLS, "box.0": BOX, "cand.index": np.arange(5, dtype=np.int64)}
    codecs = {"fpn": "int8c+zstd", "cls": "topk2f0.01+zstd", "box": "mask0.2+zstd"}
    rec = encode_record(1, "v", {}, arrays, codecs, num_classes=CLASSES)
    compact = {n: unpack(b) for n, b in rec.blobs.items()}
    assert all(isinstance(c, CompactArray) for c in compact.values())
    assert compact["cand.index"].parts["data"].dtype == np.int64
    reference = {n: decode(b) for n, b in rec.blobs.items()}
    for out in (cached_records_to_device([compact], CPU)[0], record_to_device(reference, CPU)):
        for name, ref in reference.items():
            np.testing.assert_array_equal(out[name].numpy(), ref, err_msg=name)
            assert out[name].dtype == torch.from_numpy(ref).dtype, name
    assert codec_inputs("box.3", {"cls.3": 1}, 80) == {"score": 1}
    assert codec_inputs("cls.0", {}, 80) == {"classes": 80}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_equals_reference():  # pragma: no cover - run on the GPU machine
    dev = torch.device("cuda")
    for spec in EXACT:
        x = CLS if spec.startswith(("topk", "sparse", "u8p")) else (BOX if spec.startswith("mask") else FEAT)
        blob = encode(x, spec, classes=CLASSES, score=CLS)
        np.testing.assert_array_equal(decode_on_device(unpack(blob), dev).cpu().numpy(), decode(blob), err_msg=spec)


def test_topk_values_on_bin_edges_agree():
    from stores.transforms import logit_tables

    bounds = logit_tables(0.01)[0]
    x = np.zeros((1, 1, bounds.size), np.float32)
    x[0, 0] = bounds  # each value sits exactly on an edge: it belongs to the bin above it
    chain = parse_chain("topk1f0.01+zstd")
    ref = prepare(x, chain)
    dev = parts_to_numpy(device_prepare(torch.from_numpy(x), chain))
    np.testing.assert_array_equal(ref["q"], np.arange(1, bounds.size + 1))
    np.testing.assert_array_equal(dev["q"], ref["q"])
