"""The layout of a `stores.codecs` blob: its msgpack framing, and the parts (names, dtypes, shapes)
that each transform must produce, checked by `stores.codecs.pack` before it writes a blob and by
`stores.codecs.unpack` after it reads one (`_check_parts`; `_header` reads and checks the framing).

Blob framing (no pickle): a msgpack map (``use_bin_type``)::

    {"format": "kdcache-blob", "version": 1, "chain": "<canonical spec>", "shape": [...],
     "dtype": "<original numpy dtype name>",
     "parts": {name: {"dtype": "<numpy dtype str, little-endian>", "shape": [...],
                      "filter": "none" | "delta" | "delta8" | "int8e", "codec": "zstd" | "blosc" | "pco" | "none",
                      "bytes": <bin>, ["escapes": {<an entry of the same form>}]}}}

``filter`` "delta" (used for sparse ``idx`` when a lossless stage follows) stores
``diff(idx, prepend=0)`` in uint32 arithmetic (exact modulo 2**32, decoded by a uint32
cumsum): ascending indices become small numbers that zstd compresses ~3x better. On an int8c
``q`` part under zstd it is ``diff(q.ravel(), prepend=0)`` in int8 arithmetic (exact modulo 256,
decoded by an int8 cumsum in C order), kept only when it compresses smaller (box maps: ~18 %;
blobs written before it carry "none" and read as before). It is part of the lossless stage:
callers of ``pack`` still pass the plain indices / codes.

``filter`` "delta8" (index parts only, written by `stores.codecs.pack` where it is not larger than
"delta") stores the same uint32 differences narrower: the part is uint8 [M] holding each difference
< 255 as is and ``ESCAPE`` (255) for the others, whose true differences follow, in order, in the
entry's own ``"escapes"`` entry (uint32 [E], filter "none", with its own codec and checksum). Decoded:
each 255 replaced by the next escape (their counts must be equal), then the uint32 cumsum, giving
the same uint32 ``idx`` part as "delta"; the parts `_check_parts` sees are the decoded ones, so a
chain's parts are the same whichever filter stored them. Class maps keep ~30 % of their cells and
almost every gap is < 255 (COCO-shaped P3: 1,167 escapes in 3.6 M differences), so the worker
decompresses a quarter of the bytes. Readers older than the filter refuse such blobs by name
("unknown filter"), never misread them; blobs with "delta" / no filter read as before.

``filter`` "int8e" (pcaKsS / cpcaKsS ``q`` parts) stores int16 codes as int8 with the
few that do not fit escaped: `stores.narrow_codes` has the layout and its reasons.
"""

from __future__ import annotations

import msgpack
import numpy as np

from stores.chains import CodecChain

BLOB_FORMAT = "kdcache-blob"
BLOB_VERSION = 1
ESCAPE = 255  # a "delta8" difference of this value is an escape: see the module docstring


class BlobDecodeError(ValueError):
    """A blob is not a valid kdcache blob (corrupt, truncated or foreign bytes)."""


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
                "bgc": (np.dtype(np.float32), (c,)), "bgs": (np.dtype(np.float16), (int(np.prod(shape[1:])),)),
                "classes": (np.dtype(np.uint32), (1,))}
    if t == "mask":  # q is [C, M]: checked against idx in pack
        c = shape[0] if len(shape) else 1
        return {"idx": (np.dtype(np.uint32), None), "q": (np.dtype(np.int8), _BY_IDX), "scale": (np.dtype(np.float32), (c,))}
    if t == "pca":  # K' = min(K, C)
        c = shape[0] if len(shape) else 1
        k = min(int(chain.param), c)
        return {"basis": (np.dtype(np.float16), (c, k)), "mean": (np.dtype(np.float32), (c,)),
                "q": (np.dtype(np.int8), (k,) + tuple(shape[1:])), "scale": (np.dtype(np.float32), (k,))}
    if t == "pcas":  # K' <= min(K, C) varies per map: checked against q in _check_parts
        c = shape[0] if len(shape) else 1
        return {"basis": (np.dtype(np.float16), None), "mean": (np.dtype(np.float32), (c,)),
                "q": (np.dtype(np.int16), None), "step": (np.dtype(np.float32), (1,))}
    if t == "cpca":  # the basis is the cache's (stores.cache_basis), named by bid; q as for pcas
        c = shape[0] if len(shape) else 1
        return {"mean": (np.dtype(np.float32), (c,)), "q": (np.dtype(np.int16), None),
                "step": (np.dtype(np.float32), (1,)), "bid": (np.dtype(np.uint8), (8,))}
    if t in ("zfp", "sz"):
        return {"data": (np.dtype(np.uint8), None)}
    raise AssertionError(t)  # pragma: no cover


def _check_parts(parts: dict, chain: CodecChain, shape: tuple, dtype: np.dtype, err=ValueError) -> None:
    """Names, dtypes and shapes of `parts` against what `chain` produces for `shape`/`dtype`."""
    expected = _expected_parts(chain, shape, dtype)
    if chain.transform == "topk" and "classes" not in parts:  # a legacy topk blob: decoded with the floor cap
        expected.pop("classes")
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
        if want_shape is None and p.ndim != 1 and chain.transform not in ("pcas", "cpca"):
            raise err(f"{chain.spec}: part {name!r} must be 1-d, got shape {tuple(p.shape)}")
    if chain.transform in ("pcas", "cpca"):
        _check_pcas(parts, chain, shape, err)
    if chain.transform in ("sparse", "topk"):
        other = "val" if chain.transform == "sparse" else "q"
        if len(parts["idx"]) != len(parts[other]):
            raise err(f"{chain.spec}: idx and {other} lengths differ")


def _check_pcas(parts: dict, chain: CodecChain, shape: tuple, err) -> None:
    """pcaKsS: basis [C, K'] and q [K', *cells] with K' <= min(K, C); cpcaKsS: q alone (its basis is the
    cache's and never in the blob: a blob carrying one is refused)."""
    c = shape[0] if len(shape) else 1
    q = parts["q"]
    if chain.transform == "cpca":
        if q.ndim < 1 or q.shape[0] > min(int(chain.param[0]), c) or tuple(q.shape[1:]) != tuple(shape[1:]):
            raise err(f"{chain.spec}: part 'q' has shape {tuple(q.shape)}, expected "
                      f"(<= {min(int(chain.param[0]), c)},) + {tuple(shape[1:])}")
        return
    basis = parts["basis"]
    kk = basis.shape[1] if basis.ndim == 2 else -1
    if basis.ndim != 2 or basis.shape[0] != c or not 0 <= kk <= min(int(chain.param[0]), c):
        raise err(f"{chain.spec}: part 'basis' has shape {tuple(basis.shape)}, expected ({c}, <= {min(int(chain.param[0]), c)})")
    if tuple(q.shape) != (kk,) + tuple(shape[1:]):
        raise err(f"{chain.spec}: part 'q' has shape {tuple(q.shape)}, expected {(kk,) + tuple(shape[1:])}")


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
