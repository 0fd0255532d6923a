"""Codec chains for cached teacher targets: one lossy-or-not transform, then one lossless stage.

A chain is written ``"<transform>+<lossless>"``, e.g. ``"fp16+zstd"``, ``"int8c+zstd"``,
``"sparse0.01+zstd"``, ``"bitround7+blosc"``, ``"raw+none"``. It is chosen per target family in
``params.cache.codecs`` (see ``stores.base.encode_record``); the grammar is `stores.chains`.

Encoding is split in two so that the caching loop can do the transform on the GPU (quantise /
sparsify before the device-to-host copy, which is then 2-8x smaller) and only the lossless stage
on the CPU::

    parts = prepare(array, chain)                       # the transform -> named numpy arrays
    blob  = pack(parts, chain, array.shape, array.dtype) # lossless stage + framing -> bytes
    encode(array, chain) == pack(prepare(array, chain), chain, array.shape, array.dtype)

Torch code that computes the parts itself must produce exactly these (all arrays C-contiguous;
``pack`` checks names, dtypes and shapes and raises ValueError on any difference). Rounding is
``np.round`` / ``torch.round``: round half to even. All arithmetic is float32.

=============  =====================================================================================
transform      parts (name: dtype, shape) and how they are computed from x (shape S)
=============  =====================================================================================
raw            data: x.dtype, S. x unchanged (float32 stays float32, int64 stays int64). Exact.
fp16           data: float16, S. ``x.astype(float16)`` (IEEE round to nearest even, like
               ``tensor.half()``; |x| > 65504 becomes +-inf, so do not use it for unbounded maps).
bitroundN      data: float32, S, N in 1..23 mantissa bits kept. On the int32 bit pattern b of
               float32(x), with m = 23 - N: ``b += ((b >> m) & 1) + (1 << (m - 1)) - 1;
               b &= ~((1 << m) - 1)`` (round half to even on the mantissa, = numcodecs.BitRound).
               Relative error <= 2**-(N+1). The zeroed low bits are what zstd then compresses.
int8c          q: int8, S; scale: float32, [S[0]]. Per channel c (axis 0; a 0-d array is one
               channel): ``amax[c] = max|x[c]|``; ``scale[c] = amax[c] / 127`` (float32), or 1 where
               amax[c] == 0; ``q = clip(round(x / scale[c]), -127, 127)``. Decoded ``q * scale[c]``;
               abs error <= scale[c] / 2 = amax[c] / 254. Non-finite input raises ValueError.
sparseT        idx: uint32, [M]; val: float16, [M]. For maps of probabilities in [0, 1]:
               ``idx = flatnonzero(x.ravel() >= T)`` (C order, ascending), ``val = x.ravel()[idx]
               .astype(float16)``. Everything else decodes to 0 (abs error < T there; negative
               values also become 0). At most 2**32 - 1 elements.
u8p            q: uint8, S. ``round(clip(x, 0, 1) * 255)``; decoded ``q / 255`` (abs error <= 1/510).
topkKfF        class maps: per-anchor top-K classes >= F, logit-domain uint8, explicit background;
maskT          box maps only at cells whose class score >= T; pcaK: per-level channel PCA + int8;
zfpT           ZFP fixed accuracy T * max|x|. See `stores.transforms` for their parts and rules.
=============  =====================================================================================

``prepare(x, chain, classes=..., score=...)``: ``classes`` (the teacher's class count) groups a
topk class map per anchor; ``score`` (the record's class map of the same level) is what a mask
chain thresholds (`stores.base.codec_inputs` picks both for a record's arrays).

Decoding is split the same way: `unpack` (lossless stage + framing, CPU) gives a `CompactArray`
(the parts as stored: ints, fp16, indices, scales), `decode_compact` is the numpy reference
dequantise/scatter (`stages.distill.device_decode` does the same with torch on the training
device); ``decode(blob) == decode_compact(unpack(blob))``.

Decoded arrays are float32 for every lossy transform, and the original dtype for ``raw``.
Non-float arrays (labels, indices, offsets) are always stored exactly: ``encode`` forces the
transform to ``raw`` for them and keeps the chain's lossless stage.

Lossless stages, applied to each part separately (so blosc's byte shuffle sees the part's own
item size): ``zstd`` = numcodecs.Zstd(level=9, checksum=True) (a frame checksum, so a corrupt
blob fails to decode instead of decoding to garbage; level 9, not 3: 4.5 % smaller records of a
trained teacher at 800x1344 for ~45 ms more encoding per record on a stage-1 encoder thread, and
no slower to decode), ``blosc`` = numcodecs.Blosc(cname="zstd",
clevel=3, shuffle=SHUFFLE), ``none``. A part that the stage does not make smaller (e.g. the tiny
``scale`` vector) is stored as is; the header says which per part, with a ``crc32`` (zlib) of
such a part's bytes, checked on decode (blobs without the key, older ones, still decode).

Blob framing (no pickle): a msgpack map (``use_bin_type``)::

    {"format": "kdcache-blob", "version": 1, "chain": "<canonical spec>", "shape": [...],
     "dtype": "<original numpy dtype name>",
     "parts": {name: {"dtype": "<numpy dtype str, little-endian>", "shape": [...],
                      "filter": "none" | "delta", "codec": "zstd" | "blosc" | "none", "bytes": <bin>}}}

``filter`` "delta" (used for sparse ``idx`` when a lossless stage follows) stores
``diff(idx, prepend=0)`` in uint32 arithmetic (exact modulo 2**32, decoded by a uint32
cumsum): ascending indices become small numbers that zstd compresses ~3x better. It is part of
the lossless stage: callers of ``pack`` still pass the plain indices.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
import numcodecs
import numpy as np

from stores import transforms
from stores.chains import (  # noqa: F401  (re-exported: the chain grammar is part of the codec API)
    CODEC_CHAINS_FOR_BENCH,
    HOST_TRANSFORMS,
    INDEXED,
    LOSSLESS,
    TRANSFORMS,
    CodecChain,
    effective_chain,
    parse_chain,
)

BLOB_FORMAT = "kdcache-blob"
BLOB_VERSION = 1

_ZSTD = numcodecs.Zstd(level=9, checksum=True)
_BLOSC = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)


class BlobDecodeError(ValueError):
    """A blob is not a valid kdcache blob (corrupt, truncated or foreign bytes)."""


# --------------------------------------------------------------------------------------------
# transforms


def _bitround(x: np.ndarray, keepbits: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32, order="C")
    if keepbits >= 23:
        return x.copy()
    maskbits = 23 - keepbits
    b = x.view(np.int32).copy()
    half_quantum1 = np.int32((1 << (maskbits - 1)) - 1)
    b += ((b >> maskbits) & np.int32(1)) + half_quantum1
    b &= np.int32(~((1 << maskbits) - 1))
    return b.view(np.float32)


def _channels(x: np.ndarray) -> np.ndarray:
    """[C, rest] view of x (axis 0 = channels; a 0-d array is one channel)."""
    c = x.shape[0] if x.ndim else 1
    return x.reshape(c, x.size // c if c else 0)


def prepare(array: np.ndarray, chain: CodecChain | str, classes: int | None = None,
            score: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The transform: `array` -> its named parts (see the module docstring for each transform).

    Non-float arrays are stored raw whatever the chain says. `classes` groups a topk class map per
    anchor; `score` is the class map a mask chain thresholds.
    """
    x = np.asarray(array)
    chain = effective_chain(x, chain)
    t = chain.transform
    if t == "raw":
        return {"data": np.asarray(x, order="C")}
    x32 = np.asarray(x, dtype=np.float32, order="C")
    if t == "fp16":
        return {"data": x32.astype(np.float16)}
    if t == "bitround":
        return {"data": _bitround(x32, int(chain.param))}
    if t == "int8c":
        flat = _channels(x32)
        amax = np.abs(flat).max(axis=1) if flat.size else np.zeros(flat.shape[0], np.float32)
        if not np.all(np.isfinite(amax)):
            bad = int(np.flatnonzero(~np.isfinite(amax))[0])
            raise ValueError(f"int8c: channel {bad} has non-finite values (NaN/inf): cannot quantise")
        scale = (amax / np.float32(127.0)).astype(np.float32)
        scale[amax == 0] = 1.0
        q = np.clip(np.round(flat / scale[:, None]), -127, 127).astype(np.int8)
        return {"q": q.reshape(x32.shape), "scale": scale}
    if t == "sparse":
        flat = x32.ravel()
        if flat.size >= 2**32:
            raise ValueError(f"sparse: {flat.size} elements exceed the uint32 index range")
        idx = np.flatnonzero(flat >= np.float32(chain.param)).astype(np.uint32)
        return {"idx": idx, "val": flat[idx].astype(np.float16)}
    if t == "u8p":
        q = np.round(np.clip(x32, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)
        return {"q": q}
    if t == "topk":
        return transforms.topk_prepare(x32, chain.param[0], chain.param[1], classes)
    if t == "mask":
        return transforms.mask_prepare(x32, float(chain.param), score)
    if t == "pca":
        return transforms.pca_prepare(x32, int(chain.param))
    if t == "zfp":
        return transforms.zfp_prepare(x32, float(chain.param))
    raise AssertionError(t)  # pragma: no cover


_BY_IDX = ("by idx",)  # marker: a part shaped [C, len(idx)]


def _expected_parts(chain: CodecChain, shape: tuple, dtype: np.dtype) -> dict[str, tuple[np.dtype, tuple | None]]:
    """name -> (dtype, shape or None if 1-d of any length) that `pack` accepts for `chain`."""
    t = chain.transform
    if t == "raw":
        return {"data": (dtype, shape)}
    if t == "fp16":
        return {"data": (np.dtype(np.float16), shape)}
    if t == "bitround":
        return {"data": (np.dtype(np.float32), shape)}
    if t == "int8c":
        channels = shape[0] if len(shape) else 1
        return {"q": (np.dtype(np.int8), shape), "scale": (np.dtype(np.float32), (channels,))}
    if t == "sparse":
        return {"idx": (np.dtype(np.uint32), None), "val": (np.dtype(np.float16), None)}
    if t == "u8p":
        return {"q": (np.dtype(np.uint8), shape)}
    if t == "topk":
        c = shape[0] if len(shape) else 1
        return {"idx": (np.dtype(np.uint32), None), "q": (np.dtype(np.uint8), None),
                "bgc": (np.dtype(np.float32), (c,)), "bgs": (np.dtype(np.float16), (int(np.prod(shape[1:])),))}
    if t == "mask":  # q is [C, M]: checked against idx in pack
        c = shape[0] if len(shape) else 1
        return {"idx": (np.dtype(np.uint32), None), "q": (np.dtype(np.int8), _BY_IDX), "scale": (np.dtype(np.float32), (c,))}
    if t == "pca":  # K' = min(K, C)
        c = shape[0] if len(shape) else 1
        k = min(int(chain.param), c)
        return {"basis": (np.dtype(np.float16), (c, k)), "mean": (np.dtype(np.float32), (c,)),
                "q": (np.dtype(np.int8), (k,) + tuple(shape[1:])), "scale": (np.dtype(np.float32), (k,))}
    if t == "zfp":
        return {"data": (np.dtype(np.uint8), None)}
    raise AssertionError(t)  # pragma: no cover


def _compress(part: np.ndarray, lossless: str) -> tuple[str, bytes]:
    raw = part.tobytes()
    if lossless == "none" or part.nbytes == 0:
        return "none", raw
    data = _ZSTD.encode(raw) if lossless == "zstd" else _BLOSC.encode(part)
    data = bytes(data)
    if len(data) >= len(raw):
        return "none", raw
    return lossless, data


def _zstd_content_size(frame: bytes) -> int | None:
    """Frame_Content_Size from a zstd frame header (RFC 8878 §3.1.1.1), None if absent or not a frame.
    numcodecs checks a frame against its own size but accepts an output buffer larger than that."""
    if len(frame) < 6 or frame[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = frame[4]
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    start = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    if size == 0 or len(frame) < start + size:
        return None
    value = int.from_bytes(frame[start : start + size], "little")
    return value + 256 if size == 2 else value


def _decompress(codec: str, data: bytes) -> bytes:
    if codec == "none":
        return data
    if codec == "zstd":
        return bytes(_ZSTD.decode(data))
    if codec == "blosc":
        return bytes(_BLOSC.decode(data))
    raise BlobDecodeError(f"unknown lossless codec {codec!r} in blob")


def _check_parts(parts: dict, chain: CodecChain, shape: tuple, dtype: np.dtype, err=ValueError) -> None:
    """Names, dtypes and shapes of `parts` against what `chain` produces for `shape`/`dtype`."""
    expected = _expected_parts(chain, shape, dtype)
    if set(parts) != set(expected):
        raise err(f"{chain.spec}: parts {sorted(parts)} do not match the chain's parts {sorted(expected)}")
    for name, (want_dtype, want_shape) in expected.items():
        p = parts[name]
        if p.dtype != want_dtype:
            raise err(f"{chain.spec}: part {name!r} has dtype {p.dtype}, expected {want_dtype}")
        if want_shape is _BY_IDX:  # mask q: [C, len(idx)]
            want_shape = (shape[0] if len(shape) else 1, len(parts["idx"]))
        if want_shape is not None and tuple(p.shape) != want_shape:
            raise err(f"{chain.spec}: part {name!r} has shape {tuple(p.shape)}, expected {want_shape}")
        if want_shape is None and p.ndim != 1:
            raise err(f"{chain.spec}: part {name!r} must be 1-d, got shape {tuple(p.shape)}")
    if chain.transform in ("sparse", "topk"):
        other = "val" if chain.transform == "sparse" else "q"
        if len(parts["idx"]) != len(parts[other]):
            raise err(f"{chain.spec}: idx and {other} lengths differ")


def pack(parts: dict[str, np.ndarray], chain: CodecChain | str, shape: tuple, dtype: str | np.dtype) -> bytes:
    """Lossless stage + framing: the parts of one array (from `prepare`, or computed the same way
    with torch) -> a self-describing blob. `shape`/`dtype` are the ORIGINAL array's.

    For a host transform (zfp) `parts` may also be ``{"data": the float32 array}``: it is
    transformed here."""
    chain = parse_chain(chain)
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    if chain.transform != "raw" and not np.issubdtype(dtype, np.floating):
        chain = CodecChain("raw", chain.lossless)
    if chain.transform in HOST_TRANSFORMS and set(parts) == {"data"} and np.asarray(parts["data"]).dtype != np.uint8:
        parts = prepare(np.asarray(parts["data"]), chain)
    parts = {k: np.asarray(v) for k, v in parts.items()}
    _check_parts(parts, chain, shape, dtype, lambda m: ValueError(f"pack({m.split(':', 1)[0]}):{m.split(':', 1)[1]}"))
    out: dict[str, Any] = {}
    for name, p in parts.items():
        p = np.asarray(p, dtype=p.dtype.newbyteorder("<"), order="C")
        filt = "none"
        if chain.transform in INDEXED and name == "idx" and chain.lossless != "none":
            # ascending flat indices: their differences compress ~3x better (exact, mod 2**32)
            p = np.diff(p, prepend=np.uint32(0)).astype("<u4") if p.size else p
            filt = "delta"
        codec, data = _compress(p, chain.lossless)
        out[name] = {"dtype": p.dtype.str, "shape": list(p.shape), "filter": filt, "codec": codec, "bytes": data}
        if codec == "none":  # stored as is (e.g. a tiny scale vector): no zstd frame checksum guards it
            out[name]["crc32"] = zlib.crc32(data)
    header = {
        "format": BLOB_FORMAT,
        "version": BLOB_VERSION,
        "chain": chain.spec,
        "shape": list(shape),
        "dtype": dtype.name,
        "parts": out,
    }
    return msgpack.packb(header, use_bin_type=True)


def encode(array: np.ndarray, chain: CodecChain | str, classes: int | None = None,
           score: np.ndarray | None = None) -> bytes:
    """One array -> blob (= ``pack(prepare(array, chain, ...), chain, array.shape, array.dtype)``)."""
    x = np.asarray(array)
    eff = effective_chain(x, chain)
    return pack(prepare(x, eff, classes=classes, score=score), eff, x.shape, x.dtype)


def _header(blob: bytes | dict) -> dict:
    if isinstance(blob, dict):  # e.g. a webdataset pipeline that already msgpack-decoded the member
        header = blob
    else:
        try:
            header = msgpack.unpackb(blob, raw=False)
        except Exception as err:  # msgpack raises several unrelated types
            raise BlobDecodeError(f"not a msgpack blob ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict) or header.get("format") != BLOB_FORMAT:
        raise BlobDecodeError("not a kdcache blob (missing format tag)")
    if header.get("version") != BLOB_VERSION:
        raise BlobDecodeError(
            f"blob format version {header.get('version')!r}, this code reads version {BLOB_VERSION}: "
            "rebuild the cache with python -m pipeline.cache_teacher"
        )
    return header


def blob_info(blob: bytes | dict) -> dict:
    """Header facts without decompressing: chain, shape, dtype, stored bytes, raw float32 bytes."""
    h = _header(blob)
    shape = tuple(h["shape"])
    n = int(np.prod(shape)) if shape else 1
    dtype = np.dtype(h["dtype"])
    raw_itemsize = 4 if np.issubdtype(dtype, np.floating) else dtype.itemsize
    return {
        "chain": h["chain"],
        "shape": shape,
        "dtype": dtype.name,
        "stored_bytes": len(blob) if isinstance(blob, bytes | bytearray | memoryview) else None,
        "raw_bytes": n * raw_itemsize,
        "parts": {k: {"dtype": v["dtype"], "shape": tuple(v["shape"]), "codec": v["codec"]} for k, v in h["parts"].items()},
    }


@dataclass(frozen=True)
class CompactArray:
    """One target as stored, after the lossless stage only: what a loader worker hands on.

    ``parts`` are the transform's arrays (ints, fp16, indices, scales), ``shape``/``dtype`` the
    decoded array's. `decode_compact` (numpy) or `stages.distill.device_decode` (torch, on the
    training device) turns it into the map."""

    chain: str
    shape: tuple
    dtype: str
    parts: dict

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())

    def pin_memory(self) -> CompactArray:
        """A copy with page-locked parts, for a DataLoader with ``pin_memory=True`` (which calls
        this): parts that are torch tensors are pinned, numpy parts are left as they are."""
        return CompactArray(self.chain, self.shape, self.dtype,
                            {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in self.parts.items()})


def unpack(blob: bytes | dict) -> CompactArray:
    """Lossless stage + framing only: blob -> CompactArray (raises BlobDecodeError on bad bytes)."""
    h = _header(blob)
    try:
        chain = parse_chain(h["chain"])
        shape = tuple(int(s) for s in h["shape"])
        dtype = np.dtype(h["dtype"])
        parts = {}
        for name, p in h["parts"].items():
            dt = np.dtype(p["dtype"])
            pshape = tuple(int(s) for s in p["shape"])
            n = int(np.prod(pshape)) if pshape else 1
            if p["codec"] == "zstd" and _zstd_content_size(p["bytes"]) == n * dt.itemsize:
                # straight into a writable buffer of the expected size, no copy after it (the loader's
                # hot path); the frame's own size is checked first: numcodecs accepts a larger buffer
                buf = np.empty(n * dt.itemsize, dtype=np.uint8)
                _ZSTD.decode(p["bytes"], out=buf)
                data = buf
            else:
                data = _decompress(p["codec"], p["bytes"])
            if "crc32" in p and zlib.crc32(data) != p["crc32"]:
                raise BlobDecodeError(f"part {name!r} fails its crc32 (damaged bytes)")
            if len(data) != n * dt.itemsize:
                raise BlobDecodeError(f"part {name!r}: {len(data)} bytes for shape {pshape} of {dt}")
            arr = np.frombuffer(data, dtype=dt).reshape(pshape)
            filt = p.get("filter", "none")
            if filt == "delta":
                if not arr.flags.writeable:
                    arr = arr.copy()
                arr = np.cumsum(arr, dtype=dt, out=arr)  # in place: no second index-sized array
            elif filt != "none":
                raise BlobDecodeError(f"unknown filter {filt!r} on part {name!r}")
            # native order and writable (frombuffer views are read-only): torch.from_numpy can
            # share them, a DataLoader can pin them
            arr = arr.astype(dt.newbyteorder("="), copy=False)
            parts[name] = arr if arr.flags.writeable else arr.copy()
        _check_parts(parts, chain, shape, dtype, BlobDecodeError)
        if chain.transform in INDEXED and parts["idx"].size:
            n = int(np.prod(shape[1:] if chain.transform == "mask" else shape))  # mask: cell indices
            if int(parts["idx"].max()) >= n:
                raise BlobDecodeError(f"{chain.transform} index {int(parts['idx'].max())} out of range for shape {shape}")
    except BlobDecodeError:
        raise
    except Exception as err:  # corrupt header fields, failed decompression, bad shapes
        raise BlobDecodeError(f"corrupt blob ({type(err).__name__}: {err})") from None
    return CompactArray(chain.spec, shape, dtype.name, parts)


def decode_compact(c: CompactArray) -> np.ndarray:
    """The numpy reference dequantise / scatter: float32 for lossy chains, else the original dtype."""
    chain = parse_chain(c.chain)
    parts = {k: np.asarray(v) for k, v in c.parts.items()}  # CPU tensors (a loader's) are read in place
    shape, t = tuple(c.shape), chain.transform
    try:
        if t == "raw":
            return parts["data"].astype(np.dtype(c.dtype), copy=True)
        if t in ("fp16", "bitround"):
            return parts["data"].astype(np.float32)
        if t == "int8c":
            flat = _channels(parts["q"])
            return (flat.astype(np.float32) * parts["scale"].astype(np.float32)[:, None]).reshape(shape)
        if t == "sparse":
            out = np.zeros(int(np.prod(shape)) if shape else 1, dtype=np.float32)
            out[parts["idx"]] = parts["val"].astype(np.float32)
            return out.reshape(shape)
        if t == "u8p":
            return parts["q"].astype(np.float32) / np.float32(255.0)
        if t == "topk":
            return transforms.topk_decode(parts, shape, chain.param[1])
        if t == "mask":
            return transforms.mask_decode(parts, shape)
        if t == "pca":
            return transforms.pca_decode(parts, shape)
        if t == "zfp":
            return transforms.zfp_decode(parts, shape)
    except Exception as err:
        raise BlobDecodeError(f"corrupt blob ({type(err).__name__}: {err})") from None
    raise BlobDecodeError(f"unknown transform in chain {c.chain!r}")  # pragma: no cover


def decode(blob: bytes | dict) -> np.ndarray:
    """Self-describing blob -> array: float32 for lossy chains, else the original dtype.

    Raises BlobDecodeError (a ValueError) on corrupt or foreign bytes, never returns garbage
    silently for the compressed chains (zstd frames carry a checksum, blosc checks its sizes).
    """
    return decode_compact(unpack(blob))
