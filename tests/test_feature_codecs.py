"""FPN family: pcaKsS (one quantiser step per level), the pcodec lossless stage and SZ3.

Oracles are independent of the code under test: the PCA subspace against numpy's SVD of the centred
map, the step against its definition from np.var, the error against the quantiser's own bound
(step / 2 per coefficient), pcodec parts against numcodecs.PCodec decoding the stored bytes, and SZ3
against the absolute error bound it promises.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from stages.cache.targets import device_prepare, parts_to_numpy
from stages.distill.device_decode import decode_on_device
from stores.codecs import BlobDecodeError, decode, encode, pack, parse_chain, prepare, unpack

RNG = np.random.default_rng(11)
C, H, W = 16, 12, 15
# a feature map with a decaying channel spectrum (correlated channels) and a non-zero mean
_MIX = np.linalg.qr(RNG.standard_normal((C, C)))[0]
_SPREAD = 6.0 * 0.6 ** np.arange(C)
FEAT = (_MIX @ (RNG.standard_normal((C, H * W)) * _SPREAD[:, None]) + RNG.standard_normal((C, 1)) * 3)
FEAT = FEAT.reshape(C, H, W).astype(np.float32)
CPU = torch.device("cpu")


def _centred(x: np.ndarray) -> np.ndarray:
    f = x.reshape(x.shape[0], -1).astype(np.float64)
    return f - f.mean(axis=1, keepdims=True)


def test_pcas_chain_names_round_trip_and_old_names_still_parse():
    c = parse_chain("pca64s0.25+pco")
    assert (c.transform, c.param, c.lossless) == ("pcas", (64, 0.25), "pco")
    assert parse_chain(c.spec) == c and c.spec == "pca64s0.25+pco"
    assert parse_chain("pca32+zstd").param == 32  # manifests name their chains: old names stay valid
    assert parse_chain("sz0.01+none").param == 0.01
    for bad in ("pca0s0.1+zstd", "pca8s0+zstd", "sz0+none", "sz1.5+none", "raw+lz5"):
        with pytest.raises(ValueError, match="bad codec chain"):
            parse_chain(bad)


def test_pcas_step_basis_and_error_bound_against_independent_oracles():
    s = 0.1
    parts = prepare(FEAT, "pca16s0.1+zstd")
    flat = _centred(FEAT)
    rms = np.sqrt(np.var(FEAT.reshape(C, -1).astype(np.float64), axis=1).mean())
    assert parts["step"].dtype == np.float32 and parts["q"].dtype == np.int16
    np.testing.assert_allclose(parts["step"][0], s * rms, rtol=1e-6)
    kk = parts["basis"].shape[1]
    # water-filling: the weakest components (spread far below the step) cost nothing and are dropped
    assert 1 <= kk < C and np.abs(parts["q"][kk - 1]).max() > 0
    # the kept basis spans numpy's SVD top-K' subspace (fp16 columns: to float16 precision)
    u = np.linalg.svd(flat, full_matrices=False)[0][:, :kk]
    b = parts["basis"].astype(np.float64)
    np.testing.assert_allclose(b @ b.T, u @ u.T, atol=5e-3)
    # per cell, the error is the coefficients' rounding (<= step / 2 each) plus the dropped components
    dec = decode(encode(FEAT, "pca16s0.1+zstd"))
    err = np.linalg.norm(dec.reshape(C, -1) - FEAT.reshape(C, -1), axis=0)
    dropped = np.linalg.norm((np.eye(C) - u @ u.T) @ flat, axis=0)
    bound = np.sqrt(kk) * parts["step"][0] / 2 + dropped + 2e-3 * np.linalg.norm(flat, axis=0)
    assert np.all(err <= bound + 1e-4)
    # and the relative error shrinks with the step (about step^2 / 12 per kept coefficient)
    fine = decode(encode(FEAT, "pca16s0.01+zstd"))
    assert np.sum((fine - FEAT) ** 2) < 0.05 * np.sum((dec - FEAT) ** 2)


def test_pcas_codes_never_clip_int16_and_a_constant_map_decodes_exactly():
    spiky = FEAT.copy()
    spiky[0, 0, 0] = 1e6  # one outlier: S * rms would overflow int16, the step is raised instead
    parts = prepare(spiky, "pca16s0.001+zstd")
    assert np.abs(parts["q"].astype(np.int32)).max() <= 32767
    dec = decode(encode(spiky, "pca16s0.001+zstd"))
    assert abs(dec[0, 0, 0] - 1e6) <= 1e6 * 1e-3
    const = np.full((4, 3, 5), 2.5, np.float32)
    blob = encode(const, "pca8s0.1+pco")
    assert unpack(blob).parts["q"].shape == (0, 3, 5)  # no component left: the mean is the map
    np.testing.assert_array_equal(decode(blob), const)


def test_pcas_device_encoder_and_decoder_match_the_reference():
    chain = parse_chain("pca16s0.05+pco")
    ref_blob = encode(FEAT, chain)
    dev_parts = parts_to_numpy(device_prepare(torch.from_numpy(FEAT), chain))
    assert {k: v.dtype for k, v in dev_parts.items()} == {k: v.dtype for k, v in unpack(ref_blob).parts.items()}
    ref = decode(ref_blob)
    dev = decode(pack(dev_parts, chain, FEAT.shape, FEAT.dtype))
    # eigh differs across libraries in the last bits: both decodes sit within the quantiser's error
    step = float(unpack(ref_blob).parts["step"][0])
    assert np.abs(dev - ref).max() <= 4 * step
    # the training device's decode of one blob equals the numpy reference to float32 matmul rounding
    on_device = decode_on_device(unpack(ref_blob), CPU).numpy()
    np.testing.assert_allclose(on_device, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_pco_lossless_stage_is_exact_and_is_pcodec():
    pc = pytest.importorskip("numcodecs.pcodec")
    ints = RNG.integers(-300, 300, size=(5, 7, 9)).astype(np.int16)
    blob = encode(ints, "raw+pco")
    header = msgpack.unpackb(blob, raw=False)
    part = header["parts"]["data"]
    assert part["codec"] == "pco"
    np.testing.assert_array_equal(np.asarray(pc.PCodec().decode(part["bytes"])).reshape(ints.shape), ints)
    np.testing.assert_array_equal(decode(blob), ints)
    np.testing.assert_array_equal(decode(encode(FEAT, "raw+pco")), FEAT)
    # pcodec has no 8-bit numbers: pca32's int8 codes fall back to zstd, inside the same blob
    parts = msgpack.unpackb(encode(FEAT, "pca8+pco"), raw=False)["parts"]
    assert parts["q"]["codec"] in ("zstd", "none") and parts["scale"]["codec"] != "pco"
    np.testing.assert_array_equal(decode(encode(FEAT, "pca8+pco")), decode(encode(FEAT, "pca8+zstd")))
    damaged = bytearray(blob)
    damaged[-5] ^= 0xFF
    with pytest.raises(BlobDecodeError):
        np.testing.assert_array_equal(decode(bytes(damaged)), ints)


def test_sz_respects_its_absolute_error_bound_and_decodes_on_the_host():
    pytest.importorskip("pysz")
    for t in (0.05, 0.005):
        blob = encode(FEAT, f"sz{t}+none")
        dec = decode(blob)
        assert dec.shape == FEAT.shape and dec.dtype == np.float32
        assert np.abs(dec - FEAT).max() <= t * np.abs(FEAT).max() * (1 + 1e-5)
        np.testing.assert_array_equal(decode_on_device(unpack(blob), CPU).numpy(), dec)
    host = parts_to_numpy(device_prepare(torch.from_numpy(FEAT), parse_chain("sz0.01+none")))
    np.testing.assert_array_equal(decode(pack(host, "sz0.01+none", FEAT.shape, FEAT.dtype)),
                                  decode(encode(FEAT, "sz0.01+none")))
    np.testing.assert_array_equal(decode(encode(np.zeros((2, 3, 4), np.float32), "sz0.01+none")), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pcas_on_cuda_matches_the_reference():  # pragma: no cover - run on the GPU machine
    dev = torch.device("cuda")
    chain = parse_chain("pca16s0.05+pco")
    blob = encode(FEAT, chain)
    ref = decode(blob)
    got = decode_on_device(unpack(blob), dev).cpu().numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    parts = parts_to_numpy(device_prepare(torch.from_numpy(FEAT).to(dev), chain))
    step = float(unpack(blob).parts["step"][0])
    assert np.abs(decode(pack(parts, chain, FEAT.shape, FEAT.dtype)) - ref).max() <= 4 * step


def test_a_chain_whose_library_is_missing_is_refused_with_the_pip_line(monkeypatch):
    import sys

    from stores.codecs import require_libraries

    require_libraries("pca64s0.25+pco")  # installed here: no error
    monkeypatch.setitem(sys.modules, "pysz", None)  # makes `import pysz` fail, as on a machine without it
    with pytest.raises(ValueError, match="pip install pysz"):
        require_libraries("sz0.01+none")
    require_libraries("pca32+zstd")  # chains without optional libraries never fail
    from dataclasses import replace

    from stages.cache.plan import codec_spec
    from stages.config import Params

    params = Params()
    assert codec_spec(params)["fpn"] == "cpca64s0.25+lz4"  # the default FPN chain
    with pytest.raises(ValueError, match=r"^cache.codecs.fpn: sz chains need the pysz package"):
        codec_spec(replace(params, cache=replace(params.cache, codecs={"fpn": "sz0.01+none"})))
