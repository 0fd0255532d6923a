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
pcaKsS         per-level channel PCA, one quantiser step S * rms per level, int16 codes;
cpcaKsS        pcaKsS against ONE basis per cache (fitted by stage 1, stored once): `stores.cache_basis`;
zfpT, szT      ZFP / SZ3 with error bound T * max|x|. See `stores.transforms` for parts and rules.
=============  =====================================================================================

``prepare(x, chain, classes=..., score=...)``: ``classes`` (the teacher's class count) groups a
topk class map per anchor; ``score`` (the record's class map of the same level) is what a mask
chain thresholds (`stores.base.codec_inputs` picks both for a record's arrays).

Decoding is split the same way: `unpack` (lossless stage + framing, CPU; `stores.compact`) gives a `CompactArray`
(the parts as stored: ints, fp16, indices, scales), `decode_compact` is the numpy reference
dequantise/scatter (`stages.distill.device_decode` does the same with torch on the training
device); ``decode(blob) == decode_compact(unpack(blob))``.

Decoded arrays are float32 for every lossy transform, and the original dtype for ``raw``.
Non-float arrays (labels, indices, offsets) are always stored exactly: ``encode`` forces the
transform to ``raw`` for them and keeps the chain's lossless stage.

The lossless stage (zstd / blosc / pco / none, applied to each part, and the checksums it stores)
is `stores.lossless`; the blob framing (a msgpack map, no pickle), the delta filter and the parts
each transform must produce (checked by `pack` and `unpack`) are `stores.blob_schema`.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from stores import cache_basis, transforms
from stores.blob_schema import (  # noqa: F401  (ESCAPE re-exported for the device decode)
    BLOB_FORMAT,
    BLOB_VERSION,
    ESCAPE,
    BlobDecodeError,
    _check_parts,
    _header,
)
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
from stores.compact import (  # noqa: F401  (re-exported: the worker's side of the codec API)
    DELTA_SUFFIX,
    ESCAPES_SUFFIX,
    NARROW_SUFFIX,
    CompactArray,
    undelta,
    unpack,
)
from stores.lossless import (  # noqa: F401  (re-exported: callers import them from stores.codecs)
    _SMALL_PART,
    _ZSTD,
    _compress,
    _decompress,
    _dtype,
    _pcodec,
    _zstandard,
    _zstd_content_size,
    _zstd_small,
    decode_part,
    decoded_part,
    deltas_in_range,
    narrow_deltas_in_range,
    narrow_entry,
    narrow_part,
    packed_size,
    part_entry,
    require_libraries,
    undelta_in_place,
    widen_deltas,
)
from stores.narrow_codes import CODES8_SUFFIX, codes8_entry, few_escapes  # noqa: F401  (CODES8_SUFFIX re-exported)

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
            score: np.ndarray | None = None, basis: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The transform: `array` -> its named parts (see the module docstring for each transform).

    Non-float arrays are stored raw whatever the chain says. `classes` groups a topk class map per
    anchor; `score` is the class map a mask chain thresholds; `basis` is the cache's basis of this
    map for a cpca chain (`stores.cache_basis`).
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
    if t == "pcas":
        return transforms.pcas_prepare(x32, int(chain.param[0]), float(chain.param[1]))
    if t == "cpca":
        return cache_basis.cpca_prepare(x32, basis, float(chain.param[1]))
    if t == "zfp":
        return transforms.zfp_prepare(x32, float(chain.param))
    if t == "sz":
        return transforms.sz_prepare(x32, float(chain.param))
    raise AssertionError(t)  # pragma: no cover


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
            if p.size:  # the same differences as uint8 + escapes where not larger: 4x fewer bytes to decode
                wide = part_entry(p, filt, *_compress(p, chain.lossless))
                narrow = narrow_entry(p, chain.lossless)
                out[name] = narrow if packed_size(narrow) <= packed_size(wide) else wide
                continue
        if chain.transform in ("pcas", "cpca") and name == "q" and chain.lossless != "none" and p.size:
            # int16 codes that nearly all fit int8: int8 + escapes ("int8e"), where not larger
            narrow = codes8_entry(p, chain.lossless)
            if chain.lossless != "pco" and few_escapes(narrow, p.size):
                # int8 wins by construction (the int16 part holds the same low bytes plus a sign byte
                # per code); skipping the int16 attempt saves LZ4HC ~0.3 s per COCO-shaped P3 map
                out[name] = narrow
                continue
            wide = part_entry(p, filt, *_compress(p, chain.lossless))
            out[name] = narrow if packed_size(narrow) <= packed_size(wide) else wide
            continue
        codec, data = _compress(p, chain.lossless)
        if chain.transform == "int8c" and name == "q" and codec in ("zstd", "blosc"):
            # a dense map's neighbouring cells are close: int8 differences in C order (wrapping mod 256,
            # exact) compress ~18 % smaller under zstd on box maps, ~13 % under lz4;
            # kept only where they are smaller
            d = np.diff(p.reshape(-1), prepend=np.int8(0)).reshape(p.shape)
            codec_d, data_d = _compress(d, chain.lossless)
            if codec_d == codec and len(data_d) < len(data):
                p, filt, codec, data = d, "delta", codec_d, data_d
        out[name] = part_entry(p, filt, codec, data)
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
           score: np.ndarray | None = None, basis: np.ndarray | None = None) -> bytes:
    """One array -> blob (= ``pack(prepare(array, chain, ...), chain, array.shape, array.dtype)``)."""
    x = np.asarray(array)
    eff = effective_chain(x, chain)
    return pack(prepare(x, eff, classes=classes, score=score, basis=basis), eff, x.shape, x.dtype)


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


def decode_compact(c: CompactArray) -> np.ndarray:
    """The numpy reference dequantise / scatter: float32 for lossy chains, else the original dtype."""
    chain = parse_chain(c.chain)
    # CPU tensors (a loader's) are read in place; parts handed on still delta-coded get their cumsum
    parts = undelta({k: np.asarray(v) for k, v in c.parts.items()})
    shape, t = tuple(c.shape), chain.transform
    if t == "cpca" and "basis" not in parts:
        raise BlobDecodeError(cache_basis.NEEDS_BASIS)
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
            return transforms.topk_decode(parts, shape, chain.param[1], chain.param[0])
        if t == "mask":
            return transforms.mask_decode(parts, shape)
        if t == "pca":
            return transforms.pca_decode(parts, shape)
        if t in ("pcas", "cpca"):
            return transforms.pcas_decode(parts, shape)
        if t == "zfp":
            return transforms.zfp_decode(parts, shape)
        if t == "sz":
            return transforms.sz_decode(parts, shape)
    except Exception as err:
        raise BlobDecodeError(f"corrupt blob ({type(err).__name__}: {err})") from None
    raise BlobDecodeError(f"unknown transform in chain {c.chain!r}")  # pragma: no cover


def decode(blob: bytes | dict, bases: cache_basis.CacheBases | None = None) -> np.ndarray:
    """Self-describing blob -> array: float32 for lossy chains, else the original dtype.

    Raises BlobDecodeError (a ValueError) on corrupt or foreign bytes, never returns garbage
    silently for the compressed chains (zstd frames carry a checksum, blosc checks its sizes).
    `bases`: the cache's PCA bases, which cpca blobs need (`stores.cache_basis`).
    """
    return decode_compact(cache_basis.attach_basis(unpack(blob), bases))
