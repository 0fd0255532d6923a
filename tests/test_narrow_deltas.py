"""Narrow index differences ("delta8") and int8c codes' cumsum on the training device.

The oracles are written from the blob format (`stores.blob_schema`) with Python integers, numpy's
``flatnonzero`` and numcodecs' Zstd, never with the code under test: blobs of the old forms (uint32
"delta", no filter) and of the new one are built by hand here, and every decode path (`unpack`, the
numpy reference `undelta` / `decode_compact`, `stages.distill.device_decode` on the CPU) must give the
indices ``flatnonzero`` gives.
"""

from __future__ import annotations

import msgpack
import numcodecs
import numpy as np
import pytest
import torch

from stages.config import CacheParams
from stages.distill.device_decode import decode_on_device, narrow_indices, wrapped_cumsum
from stores.codecs import BlobDecodeError, decode, decode_compact, encode, pack, undelta, unpack

_ZSTD = numcodecs.Zstd(level=9, checksum=True)
CPU = torch.device("cpu")


def _entry(values: list[int] | np.ndarray, dtype: str, filt: str = "none") -> dict:
    a = np.asarray(values, dtype=dtype)
    if a.size == 0:
        return {"dtype": a.dtype.str, "shape": [0], "filter": filt, "codec": "none", "bytes": b""}
    return {"dtype": a.dtype.str, "shape": list(a.shape), "filter": filt, "codec": "zstd",
            "bytes": bytes(_ZSTD.encode(a.tobytes()))}


def _differences(idx: np.ndarray) -> list[int]:
    out, prev = [], 0
    for i in idx.tolist():
        out.append(i - prev)
        prev = i
    return out


def _sparse_blob(idx: np.ndarray, n: int, form: str) -> bytes:
    """A sparse0.5 blob of an [n] map, ones at `idx`, its idx part written by hand in `form`:
    "none" (plain uint32), "delta" (uint32 differences) or "delta8" (uint8 + uint32 escapes)."""
    d = _differences(idx)
    if form == "none":
        entry = _entry(idx, "<u4")
    elif form == "delta":
        entry = _entry(d, "<u4", "delta")
    else:
        entry = _entry([min(v, 255) for v in d], "|u1", "delta8")
        entry["escapes"] = _entry([v for v in d if v >= 255], "<u4")
    header = {"format": "kdcache-blob", "version": 1, "chain": "sparse0.5+zstd", "shape": [n], "dtype": "float32",
              "parts": {"idx": entry, "val": _entry(np.ones(len(idx)), "<f2")}}
    return msgpack.packb(header, use_bin_type=True)


def _cases() -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(17)
    mask = rng.random(60_000) < 0.3
    mask[1000:1400] = False  # a long gap: escapes
    mask[5000:40000] = rng.random(35_000) < 0.002  # many gaps >= 255, some consecutive escapes
    out = {"random with long gaps": (np.flatnonzero(mask), mask.size)}
    for gap in (254, 255, 256):
        out[f"gaps of exactly {gap}"] = (np.arange(7, 7 + 40 * gap, gap), 7 + 40 * gap)
    out["empty"] = (np.zeros(0, np.int64), 500)
    out["single entry at 0"] = (np.array([0]), 1)
    out["single entry past 255"] = (np.array([70_000]), 70_001)
    out["first difference escaped, then dense"] = (np.r_[300, np.arange(301, 900)], 900)
    out["huge gap"] = (np.array([3, 3_000_000_000 % 2**31, 2**31 - 1]), 2**31)
    return out


@pytest.mark.parametrize("case", list(_cases()))
def test_every_form_of_an_index_part_decodes_to_flatnonzero(case):
    idx, n = _cases()[case]
    dense = np.zeros(n, np.float32) if n < 10_000_000 else None
    if dense is not None:
        dense[idx] = 1.0
    for form in ("none", "delta", "delta8"):
        blob = _sparse_blob(idx, n, form)
        plain = unpack(blob)
        assert plain.parts["idx"].dtype == np.uint32, form
        np.testing.assert_array_equal(plain.parts["idx"], idx, err_msg=form)
        deferred = unpack(blob, defer_delta=True)
        np.testing.assert_array_equal(undelta(deferred.parts)["idx"], idx, err_msg=form)
        if form == "delta8" and len(idx):  # handed on narrow: the worker never widened it
            assert set(deferred.parts) == {"idx.delta8", "idx.escapes", "val"}
            assert deferred.parts["idx.delta8"].dtype == np.uint8
            assert deferred.parts["idx.escapes"].size == sum(v >= 255 for v in _differences(idx))
        if dense is not None:
            np.testing.assert_array_equal(decode(blob), dense, err_msg=form)
            np.testing.assert_array_equal(decode_compact(deferred), dense, err_msg=form)
            np.testing.assert_array_equal(decode_on_device(deferred, CPU).numpy(), dense, err_msg=form)
    # pack's own blob of the same indices (whichever form it picks) reads the same
    blob = pack({"idx": idx.astype(np.uint32), "val": np.ones(len(idx), np.float16)}, "sparse0.5+zstd", (n,), np.float32)
    np.testing.assert_array_equal(undelta(unpack(blob, defer_delta=True).parts)["idx"], idx)
    np.testing.assert_array_equal(unpack(blob).parts["idx"], idx)


def test_narrow_indices_on_the_device_equal_python_sums():
    rng = np.random.default_rng(3)
    d = rng.integers(0, 255, 5000)
    d[rng.random(5000) < 0.05] = 0  # zero differences too
    d[[0, 1, 2, 900, 4999]] = [255, 70_000, 256, 1_000_000, 255]  # escapes first, consecutive, last
    want = np.cumsum(d)  # Python-exact int64 sums of the true differences
    d8 = np.where(d >= 255, 255, d).astype(np.uint8)
    esc = d[d >= 255].astype(np.uint32)
    for gather in (None, True, False):  # the CPU's way, the accelerators' way (no host sync), the CPU's way
        got = narrow_indices(torch.from_numpy(d8), torch.from_numpy(esc), gather=gather)
        assert got.dtype == torch.int64
        np.testing.assert_array_equal(got.numpy(), want)
    empty = narrow_indices(torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint32))
    assert empty.numel() == 0


def test_pack_picks_the_narrow_form_only_where_it_is_not_larger():
    rng = np.random.default_rng(5)
    # a class map's kept cells: dense, small gaps -> narrow, and not larger than the uint32 form
    idx = np.flatnonzero(rng.random(200_000) < 0.3)
    blob = pack({"idx": idx.astype(np.uint32), "val": np.ones(len(idx), np.float16)}, "sparse0.5+zstd",
                (200_000,), np.float32)
    assert msgpack.unpackb(blob)["parts"]["idx"]["filter"] == "delta8"
    assert len(blob) <= len(_sparse_blob(idx, 200_000, "delta"))
    # every gap escaped: the narrow form only adds bytes, the uint32 differences are kept
    idx = np.sort(rng.choice(2**31, 3000, replace=False))
    blob = pack({"idx": idx.astype(np.uint32), "val": np.ones(len(idx), np.float16)}, "sparse0.5+zstd",
                (2**31,), np.float32)
    assert msgpack.unpackb(blob)["parts"]["idx"]["filter"] == "delta"
    np.testing.assert_array_equal(unpack(blob).parts["idx"], idx)


def _real_chains() -> dict[str, tuple[bytes, np.ndarray]]:
    """topk / mask / sparse blobs of class-map-like arrays, with the same array's blob in the old
    uint32-delta form (its idx entry re-written by hand from the indices the narrow blob holds)."""
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(9 * 6, 40, 70)).astype(np.float32) * 3 - 2
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    box = rng.normal(size=(36, 40, 70)).astype(np.float32)
    out = {}
    for label, blob in (("topk", encode(probs, "topk3f0.05+zstd", classes=6)),
                        # the default class chain (topk24f0.015+lz4): blosc LZ4 parts, delta8 indices
                        ("topk lz4", encode(probs, CacheParams().codecs["cls"], classes=6)),
                        ("mask", encode(box, "mask0.98+zstd", score=probs[:36])),
                        ("sparse", encode(probs, "sparse0.4+zstd"))):
        header = msgpack.unpackb(blob, raw=False)
        assert header["parts"]["idx"]["filter"] == "delta8", label
        assert header["parts"]["idx"]["codec"] == ("blosc" if "lz4" in label else "zstd"), label
        idx = unpack(blob).parts["idx"]
        header["parts"]["idx"] = _entry(_differences(idx), "<u4", "delta")
        out[label] = (blob, msgpack.packb(header, use_bin_type=True))
    return out


def test_topk_mask_sparse_decode_on_the_device_like_the_old_blob():
    for label, (blob, old) in _real_chains().items():
        want = decode(old)
        deferred = unpack(blob, defer_delta=True)
        assert {"idx.delta8", "idx.escapes"} <= set(deferred.parts), label
        np.testing.assert_array_equal(decode(blob), want, err_msg=label)
        np.testing.assert_array_equal(decode_compact(deferred), want, err_msg=label)
        np.testing.assert_array_equal(decode_on_device(deferred, CPU).numpy(), want, err_msg=label)
        np.testing.assert_array_equal(decode_on_device(unpack(old, defer_delta=True), CPU).numpy(), want)


def _tampered(blob: bytes, change) -> bytes:
    header = msgpack.unpackb(blob, raw=False)
    change(header["parts"]["idx"])
    return msgpack.packb(header, use_bin_type=True)


def test_malformed_narrow_blobs_raise_in_the_worker():
    idx = np.r_[np.arange(0, 100), 600, 601, 2000, np.arange(2001, 2100)]  # two escapes: 501, 1399
    n = 2100
    good = _sparse_blob(idx, n, "delta8")
    d = _differences(idx)
    d8 = [min(v, 255) for v in d]
    bad = {
        "one escape missing": lambda e: e.update(escapes=_entry([501], "<u4")),
        "one escape too many": lambda e: e.update(escapes=_entry([501, 1399, 5], "<u4")),
        "an escape mark too many": lambda e: e.update(bytes=bytes(_ZSTD.encode(np.array(d8[:-1] + [255], np.uint8).tobytes()))),
        "an index past n (escape)": lambda e: e.update(escapes=_entry([501, 1400], "<u4")),
        "an index past n (small differences)": lambda e: e.update(bytes=bytes(_ZSTD.encode(np.array(d8[:-1] + [2], np.uint8).tobytes()))),
        "an index past n (a huge escape)": lambda e: e.update(escapes=_entry([501, 2**32 - 1500], "<u4")),
        "truncated differences": lambda e: e.update(bytes=e["bytes"][:-5]),
        "truncated escapes": lambda e: e["escapes"].update(bytes=e["escapes"]["bytes"][:-3]),
        "differences shorter than val": lambda e: e.update(shape=[len(d8) - 1],
                                                           bytes=bytes(_ZSTD.encode(np.array(d8[:-1], np.uint8).tobytes()))),
        "escapes not uint32": lambda e: e.update(escapes=_entry([501, 1399], "<u8")),
        "no escapes entry": lambda e: e.pop("escapes"),
        "differences not uint8": lambda e: e.update(dtype="<u2"),
        "unknown filter": lambda e: e.update(filter="delta9"),
    }
    assert unpack(good, defer_delta=True).parts["idx.escapes"].tolist() == [501, 1399]
    for label, change in bad.items():
        blob = _tampered(good, change)
        for defer in (True, False):
            with pytest.raises(BlobDecodeError):
                unpack(blob, defer_delta=defer)
                pytest.fail(f"{label} (defer_delta={defer}) was accepted")


def _sawtooth_codes() -> np.ndarray:
    """int8c input whose codes run -127..127 and jump back (differences of -254 and +254 wrap in int8),
    with scale 1 per channel (amax 127)."""
    ramp = (np.arange(8 * 30 * 50) % 255 - 127).reshape(8, 30, 50)
    ramp[:, ::7, :] *= -1  # jumps both ways
    return ramp.astype(np.float32)


def test_int8c_codes_cumsum_on_the_device_equals_the_host_decode_bit_for_bit():
    x = _sawtooth_codes()
    blob = encode(x, "int8c+zstd")
    assert msgpack.unpackb(blob)["parts"]["q"]["filter"] == "delta"  # the filter pack keeps (smaller)
    host = unpack(blob)
    np.testing.assert_array_equal(host.parts["q"], x.astype(np.int8))  # oracle: the codes are x itself
    deferred = unpack(blob, defer_delta=True)
    assert set(deferred.parts) == {"q.delta", "scale"} and deferred.parts["q.delta"].shape == x.shape
    diffs = deferred.parts["q.delta"].astype(np.int64)
    assert diffs.min() < -100 and diffs.max() > 100  # wrapping differences are present
    np.testing.assert_array_equal(undelta(deferred.parts)["q"], host.parts["q"])
    want = decode(blob)
    np.testing.assert_array_equal(want, x)
    for got in (decode_compact(deferred), decode_on_device(deferred, CPU).numpy()):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # bit for bit
    np.testing.assert_array_equal(wrapped_cumsum(torch.from_numpy(deferred.parts["q.delta"]), torch_ops=True).numpy(),
                                  host.parts["q"])  # the accelerators' torch path on the same codes
    np.testing.assert_array_equal(undelta(deferred.parts)["q"], host.parts["q"])  # the part was not summed in place
    # the device's wrapping cumsum on its own: Python-exact sums taken mod 256 as the oracle
    rng = np.random.default_rng(1)
    for shape in [(0,), (1,), (3, 5, 7), (40_001,)]:
        d = rng.integers(-128, 128, shape).astype(np.int8)
        s = np.cumsum(d.reshape(-1).astype(np.int64)).reshape(shape)
        for torch_ops in (None, True, False):  # the CPU's way (numpy), the accelerators' way (torch), the CPU's
            got = wrapped_cumsum(torch.from_numpy(d), torch_ops=torch_ops)
            np.testing.assert_array_equal(got.numpy(), ((s + 128) % 256 - 128).astype(np.int8))


def test_int8c_deferred_codes_keep_the_shape_check():
    blob = encode(_sawtooth_codes(), "int8c+zstd")
    header = msgpack.unpackb(blob, raw=False)
    header["parts"]["q"]["shape"] = [8, 50, 30]  # same bytes, another shape than the map's
    for defer in (True, False):
        with pytest.raises(BlobDecodeError, match="shape"):
            unpack(msgpack.packb(header, use_bin_type=True), defer_delta=defer)


def test_a_narrow_part_that_steps_back_reads_as_the_uint32_form_does():
    """An escape of 2**32 - 1 is a step back by one in the format's uint32 arithmetic (pack never
    writes it): both paths give the reference's indices, and the deferred one hands on the host's
    widened indices, not narrow parts whose int64 device sum would differ."""
    d, n = [5, 3, 2**32 - 1, 4], 20
    want = [5, 8, 7, 11]  # uint32 running sums
    header = msgpack.unpackb(_sparse_blob(np.arange(4), n, "none"), raw=False)  # val: 4 ones
    header["parts"]["idx"] = _entry([5, 3, 255, 4], "|u1", "delta8")
    header["parts"]["idx"]["escapes"] = _entry([d[2]], "<u4")
    blob = msgpack.packb(header, use_bin_type=True)
    assert unpack(blob).parts["idx"].tolist() == want
    deferred = unpack(blob, defer_delta=True)
    assert set(deferred.parts) == {"idx", "val"} and deferred.parts["idx"].tolist() == want


def test_the_range_check_is_exact_at_the_bound_on_a_long_part():
    """`narrow_deltas_in_range` decides sum(true differences) < n exactly, also where its byte sums
    run over many blocks (> 257 rows of 16 kB, all escape marks: the worst case for its accumulators)."""
    from stores.lossless import narrow_deltas_in_range

    rng = np.random.default_rng(2)
    d8 = np.full(257 * 16384 * 2 + 999, 255, np.uint8)
    d8[rng.random(d8.size) < 0.001] = 7
    esc = np.full(int(np.count_nonzero(d8 == 255)), 3, np.uint32)
    total = int(np.where(d8 == 255, 3, d8.astype(np.int64)).sum())  # Python-exact via int64
    assert narrow_deltas_in_range(d8, esc, total + 1)
    assert not narrow_deltas_in_range(d8, esc, total)
    assert not narrow_deltas_in_range(d8, esc[:-1], total + 1)  # one escape short
    plain = rng.integers(0, 255, 300_001).astype(np.uint8)
    s = int(plain.astype(np.int64).sum())
    assert narrow_deltas_in_range(plain, np.zeros(0, np.uint32), s + 1)
    assert not narrow_deltas_in_range(plain, np.zeros(0, np.uint32), s)
