"""pcaKsS / cpcaKsS int16 codes stored as int8 with escapes ("int8e"), and the "lz4" stage.

The oracles are the codes themselves and blobs built by hand from the format (`stores.narrow_codes`,
`stores.blob_schema`) with Python lists and numcodecs, never with the code under test: an int8e blob
and a plain int16 blob of the same parts must decode to the same codes and the same map on every
path (`unpack`, the numpy reference `decode_compact`, `stages.distill.device_decode` on the CPU with
numpy and with the accelerator's gather).
"""

from __future__ import annotations

import msgpack
import numcodecs
import numpy as np
import pytest
import torch

from stages.distill.device_decode import decode_on_device, wide_codes
from stores.cache_basis import CacheBases
from stores.codecs import BlobDecodeError, decode, decode_compact, encode, pack, unpack
from stores.transforms import pcas_prepare

_ZSTD = numcodecs.Zstd(level=9, checksum=True)
CPU = torch.device("cpu")
EDGES = [0, 1, -1, 126, 127, -127, -128, 128, -129, 300, -300, 32767, -32768]  # -128 is the mark: escaped


def _entry(values, dtype: str, shape=None, filt: str = "none") -> dict:
    a = np.asarray(values, dtype=dtype)
    return {"dtype": a.dtype.str, "shape": list(a.shape if shape is None else shape), "filter": filt,
            "codec": "zstd", "bytes": bytes(_ZSTD.encode(a.tobytes()))}


def _parts(seed: int = 0, k: int = 6, c: int = 8, hw=(5, 7)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.integers(-20, 21, size=(k, *hw)).astype(np.int16)
    q.reshape(-1)[: len(EDGES) * 3 : 3] = EDGES  # every edge value, spread over the components
    return {"basis": rng.standard_normal((c, k)).astype(np.float16), "mean": rng.standard_normal(c).astype(np.float32),
            "q": q, "step": np.array([0.25], np.float32)}


def _blob(parts: dict, form: str, chain: str = "pca6s0.25+zstd") -> bytes:
    """A pcas blob written by hand; its q part plain int16 ("none") or int8 + int16 escapes ("int8e")."""
    q = parts["q"]
    if form == "none":
        qe = _entry(q.ravel().tolist(), "<i2", q.shape)
    else:
        flat = q.ravel().tolist()
        qe = _entry([v if -127 <= v <= 127 else -128 for v in flat], "|i1", q.shape, "int8e")
        qe["escapes"] = _entry([v for v in flat if not -127 <= v <= 127], "<i2")
    entries = {"basis": _entry(parts["basis"], "<f2"), "mean": _entry(parts["mean"], "<f4"), "q": qe,
               "step": _entry(parts["step"], "<f4")}
    c = parts["basis"].shape[0]
    header = {"format": "kdcache-blob", "version": 1, "chain": chain, "shape": [c, *q.shape[1:]],
              "dtype": "float32", "parts": entries}
    return msgpack.packb(header, use_bin_type=True)


def test_int8e_and_int16_blobs_decode_to_the_same_codes_and_map_on_every_path():
    parts = _parts()
    plain, narrow = _blob(parts, "none"), _blob(parts, "int8e")
    assert np.array_equal(unpack(narrow).parts["q"], parts["q"]) and unpack(narrow).parts["q"].dtype == np.int16
    want = decode(plain)
    assert np.array_equal(decode(narrow), want)
    handed = unpack(narrow, defer_delta=True)
    assert set(handed.parts) == {"basis", "mean", "step", "q.int8e", "q.escapes"}
    assert handed.parts["q.int8e"].dtype == np.int8 and handed.parts["q.escapes"].dtype == np.int16
    assert handed.parts["q.escapes"].tolist() == [v for v in parts["q"].ravel().tolist() if not -127 <= v <= 127]
    assert np.array_equal(decode_compact(handed), want)
    on_cpu = decode_on_device(handed, CPU).numpy()
    np.testing.assert_allclose(on_cpu, want, rtol=1e-6, atol=1e-5)  # a float32 matmul: BLAS summation order
    q8, esc = (torch.from_numpy(np.array(handed.parts[k])) for k in ("q.int8e", "q.escapes"))
    for gather in (False, True):  # numpy on the CPU; the accelerator's gather, run here on the CPU
        assert torch.equal(wide_codes(q8, esc, gather=gather), torch.from_numpy(parts["q"]))


def test_pack_narrows_pcas_codes_where_smaller_and_keeps_int16_under_pco():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 24, 40)).astype(np.float32)
    x[:4] *= 40  # strong channels: a few coefficients beyond int8
    for lossless, want in (("zstd", "int8e"), ("lz4", "int8e"), ("none", "none")):
        blob = encode(x, f"pca16s0.25+{lossless}")
        q = msgpack.unpackb(blob, raw=False)["parts"]["q"]
        assert q["filter"] == want, lossless
        ref = pcas_prepare(x, 16, 0.25)
        assert np.array_equal(unpack(blob).parts["q"], ref["q"])
    parts = _parts(seed=4)  # every edge code, -128 (the mark) among them, through pack's own narrowing
    blob = pack(parts, "pca6s0.25+zstd", (8, 5, 7), np.float32)
    assert msgpack.unpackb(blob, raw=False)["parts"]["q"]["filter"] == "int8e"
    assert np.array_equal(unpack(blob).parts["q"], parts["q"])
    assert np.array_equal(decode(blob), decode(_blob(parts, "none")))
    flat = rng.standard_normal((32, 24, 40)).astype(np.float32)  # a fine step: nearly every code escapes
    for lossless in ("pco", "zstd"):
        q = msgpack.unpackb(encode(flat, f"pca16s0.002+{lossless}"), raw=False)["parts"]["q"]
        assert q["filter"] == "none" and q["codec"] == lossless


def test_malformed_int8e_blobs_raise_in_the_worker():
    parts = _parts()
    h = msgpack.unpackb(_blob(parts, "int8e"), raw=False)
    esc = np.frombuffer(_ZSTD.decode(h["parts"]["q"]["escapes"]["bytes"]), "<i2")
    h["parts"]["q"]["escapes"] = _entry(esc[:-1], "<i2")  # one escape short of the marks
    short = msgpack.packb(h, use_bin_type=True)
    for defer in (False, True):
        with pytest.raises(BlobDecodeError, match="escape marks"):
            unpack(short, defer_delta=defer)
    h["parts"]["q"]["escapes"] = _entry(esc.astype(np.int32), "<i4")  # escapes of the wrong type
    with pytest.raises(BlobDecodeError, match="int16"):
        unpack(msgpack.packb(h, use_bin_type=True), defer_delta=True)
    with pytest.raises(BlobDecodeError):
        wide_codes(torch.tensor([-128, 3], dtype=torch.int8), torch.tensor([], dtype=torch.int16), gather=False)


def test_lz4_parts_carry_a_checksum_of_their_decoded_bytes():
    x = np.random.default_rng(5).standard_normal((16, 30, 30)).astype(np.float32)
    x[:, 5:, :] = 0  # a compressible map: LZ4 makes it smaller, so the part is stored as a blosc frame
    blob = encode(x, "int8c+lz4")
    h = msgpack.unpackb(blob, raw=False)
    q = h["parts"]["q"]
    assert q["codec"] == "blosc" and "crc32c" in q
    np.testing.assert_array_equal(decode(blob), decode(encode(x, "int8c+zstd")))
    ramps = np.arange(8, dtype=np.float32)[:, None, None] * np.arange(64, dtype=np.float32)[None, None, :]
    smooth = np.broadcast_to(ramps, (8, 40, 64)).copy()  # each row a ramp: constant differences
    lz4, zstd = encode(smooth, "int8c+lz4"), encode(smooth, "int8c+zstd")
    assert msgpack.unpackb(lz4, raw=False)["parts"]["q"]["filter"] == "delta"  # differences: smaller under LZ4 too
    assert np.array_equal(decode(lz4), decode(zstd))
    handed = unpack(lz4, defer_delta=True)
    assert "q.delta" in handed.parts and np.array_equal(decode_on_device(handed, CPU).numpy(), decode(zstd))
    raw = bytearray(q["bytes"])
    raw[len(raw) // 2] ^= 0x5A  # a flipped byte inside the LZ4 stream
    q["bytes"] = bytes(raw)
    with pytest.raises(BlobDecodeError):
        unpack(msgpack.packb(h, use_bin_type=True))


def test_cpca_int8e_codes_decode_on_the_device_with_the_cache_basis():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((24, 20, 30)).astype(np.float32)
    x[:3] *= 60
    basis = np.linalg.qr(rng.standard_normal((24, 24)))[0].astype(np.float16)
    bases = CacheBases({"fpn.0": basis})
    blob = encode(x, "cpca24s0.2+lz4", basis=basis)
    assert msgpack.unpackb(blob, raw=False)["parts"]["q"]["filter"] == "int8e"
    handed = bases.attach(unpack(blob, defer_delta=True))
    assert "q.int8e" in handed.parts and handed.parts["basis"].shape[1] == handed.parts["q.int8e"].shape[0]
    want = decode_compact(bases.attach(unpack(blob)))
    np.testing.assert_allclose(decode_on_device(handed, CPU).numpy(), want, rtol=1e-6, atol=1e-4)
