"""The lossless stage of a codec chain (`stores.codecs`): zstd / Blosc / pcodec, on each part of a blob.

Lossless stages, applied to each part separately (so blosc's byte shuffle sees the part's own
item size): ``zstd`` = numcodecs.Zstd(level=9, checksum=True) (a frame checksum, so a corrupt
blob fails to decode instead of decoding to garbage; level 9, not 3: 4.5 % smaller records of a
trained teacher at 800x1344 for ~45 ms more encoding per record on a stage-1 encoder thread, and
no slower to decode), ``blosc`` = numcodecs.Blosc(cname="zstd",
clevel=3, shuffle=SHUFFLE), ``pco`` = numcodecs.PCodec(level=8) (pcodec: near-entropy coding of
16/32/64-bit numbers, e.g. pcaKsS's int16 codes; 8-bit parts of a '+pco' chain fall back to zstd),
``none``; ``bzstd`` / ``blz4`` = numcodecs.Blosc(zstd 5 / lz4hc 9, BITSHUFFLE) and ``lz4`` =
numcodecs.Blosc(lz4hc 9, SHUFFLE), faster to decode for more bytes (see `_BLOSC_FAST`; their parts
are stored as ``blosc``, with a ``crc32c`` of the decoded bytes: a blosc frame has no checksum). A part that the stage does
not make smaller (e.g. the tiny ``scale`` vector) is stored as is; the header says which per part, with a ``crc32`` (zlib) of
such a part's bytes, checked on decode (blobs without the key, older ones, still decode); ``pco``
parts carry a ``crc32c`` (google-crc32c) of their decoded bytes (a pcodec stream has no checksum).

`stores.codecs.pack` calls `_compress` per part and writes those checksum keys; `stores.codecs.unpack`
decodes each part with `decode_part` (straight into a buffer of the frame's size, `_zstd_content_size`,
or with a per-thread zstd context, `_zstd_small`; `_decompress` for the rest) and undoes the delta
filter with `undelta_in_place` / checks deferred index differences with `deltas_in_range`;
"delta8" index parts (uint8 differences + escapes, `stores.blob_schema`) are written by
`narrow_entry`, read by `narrow_part`, checked by `narrow_deltas_in_range`, widened by `widen_deltas`;
"int8e" code parts (int16 codes as int8 + escapes) are `stores.narrow_codes`'.
"""

from __future__ import annotations

import functools
import math
import threading
import zlib
from typing import Any

import google_crc32c
import msgpack
import numcodecs
import numpy as np

from stores import transforms
from stores.blob_schema import ESCAPE, BlobDecodeError
from stores.chains import CodecChain, parse_chain

_ZSTD = numcodecs.Zstd(level=9, checksum=True)
_BLOSC = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
# fast-decoding lossless stages for the loader: blosc with a bit shuffle, then zstd
# ("bzstd") or LZ4HC ("blz4"). Demo teacher at 800x1344, one worker, default transforms: fpn +pco
# 1.31 MB/record at ~125 rec/s; fpn +bzstd 1.39 MB, ~135; fpn +blz4 1.60 MB, ~160; fpn, cls and box
# +blz4 1.80 MB, ~205 (COCO shape: 2.36 MB at ~55 -> 3.28 MB at ~65, its class maps dominate).
# Their parts are ordinary blosc frames (part codec "blosc", decoded by `decode_part` like any blosc
# part); a chain can name them once `stores.chains.LOSSLESS` lists them (readers older than that
# refuse the chain name with a clear error).
# "lz4": LZ4HC with the byte shuffle, for int8 codes (pcaKsS's codes narrowed to int8 by
# the "int8e" filter, `stores.narrow_codes`): a bit shuffle gains nothing on them and halves LZ4's
# decode speed. COCO-shaped synth20 teacher at 800x1344, one record's five FPN code parts: int16 +pco
# 443 kB in 2.5 ms, int8e +zstd 466 kB in 1.7 ms, int8e +lz4 582 kB in 0.5 ms (one core of this
# project's 2-core CPU; whole records side by side: bench.realscale's "before" loader column).
_BLOSC_FAST = {
    "bzstd": numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE),
    "blz4": numcodecs.Blosc(cname="lz4hc", clevel=9, shuffle=numcodecs.Blosc.BITSHUFFLE),
    "lz4": numcodecs.Blosc(cname="lz4hc", clevel=9, shuffle=numcodecs.Blosc.SHUFFLE),
}


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
    if lossless in _BLOSC_FAST:  # item size = the part's, so the bit shuffle sees whole numbers
        data = bytes(_BLOSC_FAST[lossless].encode(np.ascontiguousarray(part)))
        return ("none", raw) if len(data) >= len(raw) else ("blosc", data)
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


def _blosc_size(frame: bytes) -> int | None:
    """The uncompressed size a blosc frame's header records (bytes 4-8 of its 16-byte header)."""
    return int.from_bytes(frame[4:8], "little") if len(frame) >= 16 else None


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


def _zstd_into(frame: bytes, out: np.ndarray) -> None:
    """A large zstd part decoded into `out` (exactly the frame's content size) with the thread's
    reused context: ~10 % faster than numcodecs' fresh context per call on a 600 kB part. Reading
    one byte past the end makes libzstd finish the frame, so its checksum is verified as numcodecs
    does (a flipped checksum byte raises)."""
    dctx = getattr(_LOCAL, "dctx", None)
    if dctx is None:
        dctx = _LOCAL.dctx = _zstandard.ZstdDecompressor()
    try:
        with dctx.stream_reader(frame, read_across_frames=False) as reader:
            got = reader.readinto(out)
            extra = reader.read(1)
    except _zstandard.ZstdError as err:
        raise BlobDecodeError(f"does not decompress ({err})") from None
    if got != out.nbytes or extra:
        raise BlobDecodeError(f"decompresses to another size than its frame header says ({got} bytes)")


def decode_part(p: dict, nbytes: int) -> bytes | bytearray | np.ndarray:
    """One part's stored bytes (its header entry `p`: codec, bytes, optional crc32 / crc32c) -> its
    decoded bytes, checksum-checked; `nbytes` is what its dtype and shape need (a frame of another
    size is decoded by the generic path, and the caller refuses the length). The result is writable
    (a bytearray or uint8 array) except for parts stored as is (``codec`` none: msgpack's bytes)."""
    codec, raw = p["codec"], p["bytes"]
    if codec == "zstd" and _zstd_content_size(raw) == nbytes:
        if nbytes < _SMALL_PART and _zstandard is not None:
            data = _zstd_small(raw)
        else:
            # straight into a writable buffer of the expected size, no copy after it (the loader's hot
            # path); the frame's own size is checked first: numcodecs accepts a larger buffer
            data = np.empty(nbytes, dtype=np.uint8)
            if _zstandard is not None:
                _zstd_into(raw, data)
            else:  # pragma: no cover
                _ZSTD.decode(raw, out=data)  # a zstd frame carries its own checksum, verified here
    elif codec == "blosc" and _blosc_size(raw) == nbytes:
        data = np.empty(nbytes, dtype=np.uint8)  # into the part's buffer: no bytes copies after it
        numcodecs.blosc.decompress(raw, data)
    else:
        data = _decompress(codec, raw)
    if "crc32" in p and zlib.crc32(data) != p["crc32"]:
        raise BlobDecodeError("fails its crc32 (damaged bytes)")
    if "crc32c" in p and google_crc32c.value(data) != p["crc32c"]:  # pco parts: hardware crc32c, decoded bytes
        raise BlobDecodeError("fails its crc32c (damaged bytes)")
    return data


_BYTE_CUMSUM = {np.dtype(np.int8): np.int32, np.dtype(np.uint8): np.uint32}


def undelta_in_place(arr: np.ndarray) -> None:
    """Undo the delta filter in place, in C order: ``arr = cumsum(arr)`` in arr's own wrapping
    arithmetic (int8 codes mod 256, uint32 indices mod 2**32), as `stores.blob_schema` defines it.

    8-bit parts (an int8c map's codes, ~600 kB per P3 box map) are summed in 32-bit integers and
    truncated back: numpy's 8-bit accumulate runs ~4x slower per element than its 32-bit one, and a
    sum that wraps modulo 2**32 still gives every value modulo 256 exactly (two's complement)."""
    flat = arr.reshape(-1)
    wide = _BYTE_CUMSUM.get(arr.dtype)
    if wide is None:
        np.cumsum(flat, dtype=arr.dtype, out=flat)
    else:
        np.copyto(flat, np.cumsum(flat, dtype=wide), casting="unsafe")


def deltas_in_range(d: np.ndarray, n: int) -> bool:
    """True if the running sums of the uint32 differences `d` stay below `n` (<= 2**31) without
    wrapping, so that their int64 cumsum (on the device) is exactly the reference's uint32 cumsum and
    every index is < n. Differences are >= 0, so that is ``sum(d) < n``, decided exactly.

    The bound d[0] + max(d) * (len - 1) < n passes dense indices without summing. Otherwise the sum
    is taken in uint32 over blocks short enough that no block sum can wrap (L * max(d) < 2**32), and
    the block sums are added in uint64: numpy's plain ``d.sum(dtype=uint64)`` casts element by
    element, ~5x slower (3.6 M differences of a COCO-shaped P3 class map: ~1 ms against ~0.2 ms)."""
    size = d.size
    if size == 0:
        return True
    first = int(d[0])
    if size == 1:
        return first < n
    top = int(d.max())
    if top >= n:
        return False
    if first + top * (size - 1) < n:
        return True
    block = 1 << min(16, (((1 << 32) - 1) // max(top, 1)).bit_length() - 1)  # block * top < 2**32
    whole = size // block * block
    total = int(np.add.reduce(d[:whole].reshape(-1, block), axis=1, dtype=np.uint32).sum(dtype=np.uint64))
    return total + int(d[whole:].sum(dtype=np.uint64)) < n


_ROW = 1 << 14  # byte sums: columns of this many uint16 accumulators ...
_ROWS = (1 << 16) // 255  # ... each summing at most 257 rows, so that none can wrap


def _escape_count(d8: np.ndarray) -> int:
    """How many entries of the uint8 differences are the escape mark; `max` (SIMD, ~6x cheaper than
    the comparison) answers 0 for the many maps without a gap of 255 or more."""
    if d8.size == 0 or int(d8.max()) < ESCAPE:
        return 0
    return int(np.count_nonzero(d8 == ESCAPE))


def narrow_deltas_in_range(d8: np.ndarray, esc: np.ndarray, n: int) -> bool:
    """True if the "delta8" differences (`d8` uint8 with escapes, `esc` uint32, see
    `stores.blob_schema`) are well formed and their running sums stay below `n` (<= 2**31): the
    escape marks are exactly ``len(esc)`` (so the device's gather of the k-th escape is in bounds)
    and ``sum(true differences) < n`` (differences are >= 0, so the last index is the largest; an
    int64 cumsum on the device then equals the reference's uint32 cumsum). Decided exactly.

    The uint8 differences are summed exactly by `_byte_sum`, the escapes in uint64; with the count of
    marks, ~0.55 ms per 3.6 M differences of a COCO-shaped P3 class map (the zstd decode of the narrow
    part is ~1 ms; of the uint32 one it was ~3 ms)."""
    if d8.ndim != 1 or esc.ndim != 1 or _escape_count(d8) != esc.size:
        return False
    if d8.size == 0:
        return True
    return _byte_sum(d8) - ESCAPE * esc.size + int(esc.sum(dtype=np.uint64)) < n


def _byte_sum(d8: np.ndarray) -> int:
    """The exact sum of a uint8 array: rows of `_ROW` bytes added column-wise into uint16 accumulators,
    at most `_ROWS` (257) rows at a time (257 * 255 < 2**16, so none wraps), then those in uint64.
    ~1.6x faster than ``np.add.reduce(d8, dtype=uint32)``, whose cast runs element by element."""
    whole = d8.size // _ROW * _ROW
    table = d8[:whole].reshape(-1, _ROW)
    total = int(d8[whole:].sum(dtype=np.uint64))
    for start in range(0, table.shape[0], _ROWS):
        total += int(np.add.reduce(table[start : start + _ROWS], axis=0, dtype=np.uint16).sum(dtype=np.uint64))
    return total


def widen_deltas(d8: np.ndarray, esc: np.ndarray, dtype: type = np.uint32) -> np.ndarray:
    """"delta8" differences -> the differences they stand for (a new array of `dtype`: uint32 for the
    reference, int64 for a CPU training device's cumsum): each escape mark replaced, in order, by
    the next escape. Raises BlobDecodeError when the counts differ."""
    count = _escape_count(d8)
    if d8.ndim != 1 or esc.ndim != 1 or count != esc.size:
        raise BlobDecodeError(f"delta8: {count} escape marks for {esc.size} escapes")
    d = d8.astype(dtype)
    if count:
        d[d8 == ESCAPE] = esc
    return d


# ------------------------------------------------------------------------------------------------
# one part's header entry: written by `stores.codecs.pack`, read back by `stores.codecs.unpack`


def part_entry(p: np.ndarray, filt: str, codec: str, data: bytes) -> dict[str, Any]:
    """One part's header entry (`stores.blob_schema`), with the checksum its codec needs."""
    entry = {"dtype": p.dtype.str, "shape": list(p.shape), "filter": filt, "codec": codec, "bytes": data}
    if codec == "none":  # stored as is (e.g. a tiny scale vector): no zstd frame checksum guards it
        entry["crc32"] = zlib.crc32(data)
    elif codec in ("pco", "blosc"):  # pcodec / blosc frames carry no checksum: the decoded bytes are checked
        entry["crc32c"] = google_crc32c.value(np.ascontiguousarray(p).reshape(-1).view(np.uint8))
    return entry


def narrow_entry(d: np.ndarray, lossless: str) -> dict[str, Any]:
    """The "delta8" entry of uint32 index differences `d` (`stores.blob_schema`): uint8 differences,
    255 marking an escape whose true difference is the next entry of the uint32 ``escapes`` list."""
    escaped = d >= ESCAPE
    d8 = np.minimum(d, ESCAPE).astype(np.uint8)
    esc = np.ascontiguousarray(d[escaped], dtype="<u4")
    entry = part_entry(d8, "delta8", *_compress(d8, lossless))
    entry["escapes"] = part_entry(esc, "none", *_compress(esc, lossless))
    return entry


def packed_size(entry: dict) -> int:
    """Bytes an entry takes in the blob: what pack compares to keep the smaller index form."""
    return len(msgpack.packb(entry, use_bin_type=True))


@functools.lru_cache(maxsize=256)
def _dtype(s: str) -> np.dtype:
    return np.dtype(s)  # np.dtype(str) costs ~2 us; a record has ~100 parts


def decoded_part(name: str, p: dict) -> np.ndarray:
    """One stored part (header entry `p`) -> its array as stored (filter not undone): native order,
    writable (frombuffer views of bytes are read-only; torch.from_numpy shares it, a DataLoader pins it)."""
    dt = _dtype(p["dtype"])
    pshape = tuple(map(int, p["shape"]))
    nbytes = math.prod(pshape) * dt.itemsize
    try:
        data = decode_part(p, nbytes)
    except BlobDecodeError as err:
        raise BlobDecodeError(f"part {name!r} {err}") from None
    if len(data) != nbytes:
        raise BlobDecodeError(f"part {name!r}: {len(data)} bytes for shape {pshape} of {dt}")
    arr = np.frombuffer(data, dtype=dt).reshape(pshape)
    if not dt.isnative:
        arr = arr.astype(dt.newbyteorder("="))
    elif not arr.flags.writeable:
        arr = arr.copy()
    return arr


def narrow_part(name: str, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """A "delta8" part: (uint8 differences [M], uint32 escapes [E]) as stored."""
    d8 = decoded_part(name, p)
    esc_entry = p.get("escapes")
    if d8.dtype != np.uint8 or d8.ndim != 1 or not isinstance(esc_entry, dict):
        raise BlobDecodeError(f"part {name!r}: a delta8 part is uint8 [M] with an escapes entry")
    esc = decoded_part(name + ".escapes", esc_entry)
    if esc.dtype != np.uint32 or esc.ndim != 1 or esc_entry.get("filter", "none") != "none":
        raise BlobDecodeError(f"part {name!r}: delta8 escapes must be uint32 [E] unfiltered, got {esc.dtype} {esc.shape}")
    return d8, esc
