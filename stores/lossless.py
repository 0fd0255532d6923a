"""The lossless stage of a codec chain (`stores.codecs`): zstd / Blosc / pcodec, on each part of a blob.

Lossless stages, applied to each part separately (so blosc's byte shuffle sees the part's own
item size): ``zstd`` = numcodecs.Zstd(level=9, checksum=True) (a frame checksum, so a corrupt
blob fails to decode instead of decoding to garbage; level 9, not 3: 4.5 % smaller records of a
trained teacher at 800x1344 for ~45 ms more encoding per record on a stage-1 encoder thread, and
no slower to decode), ``blosc`` = numcodecs.Blosc(cname="zstd",
clevel=3, shuffle=SHUFFLE), ``pco`` = numcodecs.PCodec(level=8) (pcodec: near-entropy coding of
16/32/64-bit numbers, e.g. pcaKsS's int16 codes; 8-bit parts of a '+pco' chain fall back to zstd),
``none``. A part that the stage does not make smaller (e.g. the tiny
``scale`` vector) is stored as is; the header says which per part, with a ``crc32`` (zlib) of
such a part's bytes, checked on decode (blobs without the key, older ones, still decode); ``pco``
parts carry a ``crc32c`` (google-crc32c) of their decoded bytes (a pcodec stream has no checksum).

`stores.codecs.pack` calls `_compress` per part and writes those checksum keys; `stores.codecs.unpack`
decodes a part with `_decompress`, or on its hot path straight into a buffer of the frame's size
(`_zstd_content_size`) or with a per-thread zstd context (`_zstd_small`).
"""

from __future__ import annotations

import threading

import numcodecs
import numpy as np

from stores import transforms
from stores.blob_schema import BlobDecodeError
from stores.chains import CodecChain, parse_chain

_ZSTD = numcodecs.Zstd(level=9, checksum=True)
_BLOSC = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)


_PCO: list = []


def _pcodec():
    """numcodecs' PCodec, level 8 (needs the pcodec package, in the range numcodecs supports)."""
    if not _PCO:
        try:
            from numcodecs.pcodec import PCodec
        except ImportError:
            raise ValueError("'+pco' chains need the pcodec package: pip install 'pcodec>=0.3,<0.4'") from None
        _PCO.append(PCodec(level=8))
    return _PCO[0]


# pcodec codes 16/32/64-bit numbers only: other parts of a '+pco' chain (int8 / uint8 codes) use zstd
_PCO_DTYPES = {np.dtype(t) for t in ("<u2", "<u4", "<u8", "<i2", "<i4", "<i8", "<f2", "<f4", "<f8")}


def require_libraries(chain: CodecChain | str) -> None:
    """ValueError naming the pip package when `chain` needs an optional library that is missing
    (zfp: zfpy, sz: pysz, '+pco': pcodec), so a run can refuse it before any teacher work."""
    chain = parse_chain(chain)
    if chain.transform == "zfp":
        transforms._zfpy()
    elif chain.transform == "sz":
        transforms._pysz()
    if chain.lossless == "pco":
        _pcodec()


def _compress(part: np.ndarray, lossless: str) -> tuple[str, bytes]:
    raw = part.tobytes()
    if lossless == "none" or part.nbytes == 0:
        return "none", raw
    if lossless == "pco":
        if part.dtype not in _PCO_DTYPES:
            return _compress(part, "zstd")
        data = bytes(_pcodec().encode(np.ascontiguousarray(part).ravel()))
        return ("none", raw) if len(data) >= len(raw) else ("pco", data)
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
    if codec == "pco":  # a writable uint8 view of the decoded numbers: no copy on the loader's path
        return np.ascontiguousarray(_pcodec().decode(data)).reshape(-1).view(np.uint8)
    raise BlobDecodeError(f"unknown lossless codec {codec!r} in blob")


try:  # python-zstandard: one reusable decompression context per thread
    import zstandard as _zstandard
except ImportError:  # pragma: no cover - numcodecs decodes every part then
    _zstandard = None
_LOCAL = threading.local()
_SMALL_PART = 1 << 16  # bytes: below this, numcodecs' fixed cost per call dominates


def _zstd_small(frame: bytes) -> bytearray:
    """A small zstd part, decoded with a context kept per thread. numcodecs.Zstd creates a fresh one
    per call (~10-30 us here), and a record has ~50-90 zstd parts, most of them a few kB. The frame
    checksum is verified as in numcodecs; a bytearray so that the part stays writable."""
    dctx = getattr(_LOCAL, "dctx", None)
    if dctx is None:
        dctx = _LOCAL.dctx = _zstandard.ZstdDecompressor()
    return bytearray(dctx.decompress(frame))
