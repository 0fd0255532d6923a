"""The loader worker's faster arithmetic, each against a reference
written here from the blob format's definition (`stores.blob_schema`), not by the code it checks:

- `undelta_in_place`: the delta filter undone in the part's own wrapping arithmetic (int8 codes
  mod 256, uint32 indices mod 2**32), now summed in 32-bit integers for 8-bit parts;
- `deltas_in_range`: "the running sums of the differences stay below n", decided exactly (Python
  integers are the oracle), now with blocked uint32 sums;
- `_zstd_into`: a large zstd part decoded with a reused context into its buffer, frame checksum
  still verified;
- blobs as written before (and by) this change unpack to the parts numcodecs / pcodec and numpy's
  reference cumsum give, part by part, with and without the deferred index cumsum.
"""

from __future__ import annotations

import msgpack
import numcodecs
import numpy as np
import pytest

from stores.blob_schema import BlobDecodeError
from stores.codecs import DELTA_SUFFIX, encode, pack, undelta, unpack
from stores.lossless import _zstd_into, deltas_in_range, undelta_in_place
from tests.blob_damage import refused_flips


def _wrapping_cumsum(d: np.ndarray) -> np.ndarray:
    """cumsum of `d` in its own dtype's modular arithmetic, via exact Python-sized integers."""
    bits = d.dtype.itemsize * 8
    total = np.cumsum(d.reshape(-1).astype(object))  # exact, no wrap
    unsigned = np.array([int(v) % (1 << bits) for v in total], dtype=np.uint64)
    return unsigned.astype(np.dtype(f"u{d.dtype.itemsize}")).view(d.dtype).reshape(d.shape)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.uint32])
def test_undelta_in_place_wraps_like_the_format_says(dtype):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    d = rng.integers(info.min, int(info.max) + 1, size=(3, 37, 41), dtype=np.int64).astype(dtype)
    d.reshape(-1)[:50] = info.max  # long runs that wrap many times
    d.reshape(-1)[50:90] = info.min
    want = _wrapping_cumsum(d)
    got = d.copy()
    undelta_in_place(got)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)
    # a long run of large steps: running sums far past 2**24 (where float accumulators turn inexact)
    run = np.full(600_000, info.max, dtype)
    run[::7] = info.max // 3
    got = run.copy()
    undelta_in_place(got)
    np.testing.assert_array_equal(got, _wrapping_cumsum(run))
    empty = np.zeros(0, dtype)
    undelta_in_place(empty)  # nothing to do, no error
    assert empty.size == 0


def test_deltas_in_range_is_exactly_sum_below_n():
    rng = np.random.default_rng(1)
    cases = [
        (np.zeros(0, np.uint32), 1),
        (np.array([5], np.uint32), 5),
        (np.array([5], np.uint32), 6),
        (np.ones(1000, np.uint32), 1000),  # dense: the bound passes ...
        (np.ones(1000, np.uint32), 999),  # ... or the exact sum decides
        (np.array([0, 2**31 - 1], np.uint32), 2**31),
        (np.array([0, 2**31], np.uint32), 2**31),  # one difference >= n
        (np.full(3, 2**31 + 5, np.uint32), 2**31),  # the uint32 sum would wrap to a small number
        (np.array([2**32 - 1, 2], np.uint32), 2**31),
        # 65536 x 65537 = 2**32 + 65536: a uint32 sum over blocks of 2**16 would wrap to 65536 < n
        (np.full(65536, 65537, np.uint32), 2**31),
        (np.full(65536 * 3, 65537, np.uint32), 2**31),
    ]
    for size in (2, 3, 7, 1000, 70_001, 300_000):
        for top in (1, 200, 70_000, 2**20, 2**31 - 1):
            d = rng.integers(0, top, size=size, endpoint=True, dtype=np.uint64).astype(np.uint32)
            exact = sum(int(v) for v in d)
            for n in (exact, exact + 1, max(exact - 1, 1), 2**31):
                if 1 <= n <= 2**31:
                    cases.append((d, n))
    for d, n in cases:
        want = sum(int(v) for v in d) < n
        assert deltas_in_range(d, n) == want, (d.size, int(d.max()) if d.size else None, n)


def test_large_zstd_part_into_its_buffer_checks_the_frame():
    rng = np.random.default_rng(2)
    data = rng.integers(0, 6, size=300_000).astype(np.uint8)  # > 64 kB: the buffer path
    frame = bytes(numcodecs.Zstd(level=9, checksum=True).encode(data.tobytes()))
    out = np.empty(data.size, np.uint8)
    _zstd_into(frame, out)
    np.testing.assert_array_equal(out, data)
    bad = bytearray(frame)
    bad[-1] ^= 0x01  # the frame checksum (XXH64, low 4 bytes) is the frame's last field
    with pytest.raises(BlobDecodeError, match="decompress"):
        _zstd_into(bytes(bad), np.empty(data.size, np.uint8))
    with pytest.raises(BlobDecodeError, match="size"):  # buffer shorter than the frame's content
        _zstd_into(frame, np.empty(data.size - 1, np.uint8))
    with pytest.raises(BlobDecodeError, match="size"):  # longer: fewer bytes than the buffer holds
        _zstd_into(frame, np.empty(data.size + 1, np.uint8))


def test_every_flipped_byte_of_a_large_part_is_refused_or_harmless():
    x = np.random.default_rng(3).normal(size=(8, 100, 168)).astype(np.float32)  # q: 134 kB
    blob = encode(x, "int8c+zstd")
    frame = msgpack.unpackb(blob, raw=False)["parts"]["q"]["bytes"]
    refused, tried = refused_flips(blob, "q", range(0, len(frame), max(1, len(frame) // 600)))
    assert refused >= tried - 3


def _reference_parts(blob: bytes) -> dict[str, np.ndarray]:
    """Each part as the format defines it: the library's decode of its bytes, then the delta
    filter undone with numpy's cumsum in the part's dtype (the original reference)."""
    def stored(p):
        if p["codec"] == "zstd":
            raw = numcodecs.Zstd().decode(p["bytes"])
        elif p["codec"] == "blosc":
            raw = numcodecs.Blosc().decode(p["bytes"])
        elif p["codec"] == "pco":
            from numcodecs.pcodec import PCodec

            raw = np.asarray(PCodec().decode(p["bytes"])).tobytes()
        else:
            raw = p["bytes"]
        return np.frombuffer(bytes(raw), dtype=p["dtype"]).reshape(p["shape"])

    out = {}
    for name, p in msgpack.unpackb(blob, raw=False)["parts"].items():
        a = stored(p)
        if p.get("filter") == "delta8":  # uint8 differences, 255 = the next uint32 escape
            escapes = iter(stored(p["escapes"]).tolist())
            a = np.array([next(escapes) if v == 255 else v for v in a.tolist()], dtype=np.uint32)
            a = np.cumsum(a, dtype=np.uint32)
        if p.get("filter") == "delta":
            a = np.cumsum(a.reshape(-1), dtype=a.dtype).reshape(a.shape)
        out[name] = a
    return out


def _old_int8c_blob(x: np.ndarray) -> bytes:
    """An int8c blob as written before the int8 delta filter existed: q stored plainly."""
    from stores.codecs import prepare

    blob = pack(prepare(x, "int8c+zstd"), "int8c+zstd", x.shape, x.dtype)
    header = msgpack.unpackb(blob, raw=False)
    q = prepare(x, "int8c+zstd")["q"]
    header["parts"]["q"].update(filter="none", codec="zstd",
                                bytes=bytes(numcodecs.Zstd(level=9, checksum=True).encode(q.tobytes())))
    return msgpack.packb(header, use_bin_type=True)


def test_old_and_new_blobs_unpack_to_the_reference_parts():
    rng = np.random.default_rng(4)
    fpn = rng.normal(size=(16, 100, 168)).astype(np.float32)
    box = (rng.normal(size=(36, 50, 84)) * np.linspace(0.1, 3, 36)[:, None, None]).astype(np.float32)
    logits = rng.normal(size=(9 * 6, 50, 84)).astype(np.float32) * 3
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    blobs = {
        "int8c (delta filtered, large)": encode(box, "int8c+zstd"),
        "int8c (before the delta filter)": _old_int8c_blob(box),
        "topk": encode(probs, "topk24f0.01+zstd", classes=6),
        "sparse": encode(probs, "sparse0.5+zstd"),
        "mask": encode(box, "mask0.3+zstd", score=probs[:36]),
        "fp16 blosc": encode(fpn, "fp16+blosc"),
        "u8p none": encode(probs, "u8p+none"),
        "raw": encode(np.arange(100, dtype=np.int64), "raw+zstd"),
    }
    try:
        import pcodec  # noqa: F401

        blobs["pcas pco"] = encode(fpn, "pca8s0.25+pco")
    except ImportError:
        pass
    for label, blob in blobs.items():
        want = _reference_parts(blob)
        got = unpack(blob)
        assert set(got.parts) == set(want), label
        for name, w in want.items():
            g = got.parts[name]
            assert g.dtype == w.dtype and g.flags.writeable, (label, name)
            np.testing.assert_array_equal(g, w, err_msg=f"{label}: {name}")
        deferred = unpack(blob, defer_delta=True)
        for name, g in deferred.parts.items():
            if name.endswith(DELTA_SUFFIX):
                base = name[: -len(DELTA_SUFFIX)]
                summed = np.cumsum(g.reshape(-1).astype(np.int64)).reshape(g.shape)
                if g.dtype == np.int8:  # int8c codes: the sums wrap mod 256
                    summed = ((summed + 128) % 256 - 128).astype(np.int8)
                np.testing.assert_array_equal(summed, want[base], err_msg=label)
            elif name.endswith((".delta8", ".escapes")):  # narrow index differences
                base = name.rsplit(".", 1)[0]
                np.testing.assert_array_equal(undelta(deferred.parts)[base], want[base], err_msg=label)
            else:
                np.testing.assert_array_equal(g, want[name], err_msg=f"{label}: {name} (deferred)")


@pytest.mark.parametrize("lossless", ["bzstd", "blz4"])
def test_fast_blosc_stages_write_plain_blosc_parts_that_unpack_exactly(lossless):
    """The fast-decoding stages write ordinary blosc frames (codec "blosc"): numcodecs' own Blosc
    decode is the oracle, and `unpack` (which decodes them straight into the part's buffer) agrees."""
    from stores.lossless import _compress

    rng = np.random.default_rng(5)
    parts = {
        "q16": (rng.normal(size=(16, 50, 84)) * 20).astype(np.int16),
        "q8": rng.integers(-3, 4, size=(36, 50, 84)).astype(np.int8),
        "idx": np.cumsum(rng.integers(1, 9, size=40_000)).astype(np.uint32),
    }
    for name, part in parts.items():
        codec, data = _compress(part, lossless)
        assert codec == "blosc", (lossless, name)
        want = np.frombuffer(bytes(numcodecs.Blosc().decode(data)), part.dtype).reshape(part.shape)
        np.testing.assert_array_equal(want, part)
        header = msgpack.unpackb(encode(part.astype(np.float32), "raw+none"), raw=False)
        header.update(dtype=part.dtype.name, chain="raw+zstd")
        header["parts"] = {"data": {"dtype": part.dtype.str, "shape": list(part.shape), "filter": "none",
                                    "codec": codec, "bytes": data}}
        got = unpack(msgpack.packb(header, use_bin_type=True)).parts["data"]
        assert got.flags.writeable and got.dtype == part.dtype
        np.testing.assert_array_equal(got, part)
        # a frame whose header records another size than the part's shape: refused, never padded
        bad = bytearray(data)
        bad[4:8] = (part.nbytes - part.dtype.itemsize).to_bytes(4, "little")
        header["parts"]["data"]["bytes"] = bytes(bad)
        with pytest.raises(BlobDecodeError):
            unpack(msgpack.packb(header, use_bin_type=True))
