"""The "int8e" filter: int16 quantiser codes stored as int8, with the few that do not fit escaped.

pcaKsS / cpcaKsS codes are int16 (`stores.transforms`), but a trained teacher's coefficients quantise
to |q| <= 127 almost everywhere (COCO-shaped RetinaNet at 800x1344: 99.97 % of 1.4 M codes). Storing
them as int8 halves what the loader worker decompresses, and a byte-oriented lossless stage then
codes them as well as pcodec codes the int16s, for a fraction of its decode time (numbers in
`stores.lossless`).

A part with filter "int8e" holds int8 [same shape as the codes]: each code in [-127, 127] as is,
``MARK`` (-128) for any other, whose true value follows, in C order, in the entry's own ``"escapes"``
entry (int16 [E], filter "none"). Decoded: each mark replaced by the next escape (their counts must
be equal). `stores.codecs.pack` writes it where it is not larger than the plain int16 part, so a
'+pco' chain, whose int16 codes pcodec packs tighter, keeps them; under the other stages, codes
with at most 1 % escapes are stored narrow without trying the int16 part (`few_escapes`). The parts `_check_parts` sees are
the widened int16 ones: a chain's parts are the same whichever filter stored them. Readers older
than the filter refuse such blobs by name ("unknown filter"), never misread them.

A loader worker (`stores.codecs.unpack(..., defer_delta=True)`) hands the pair on as
``q.int8e`` + ``q.escapes`` after checking that the marks number E, and the training device widens
them (`stages.distill.device_decode`); `widen_codes` is the numpy reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stores.blob_schema import BlobDecodeError
from stores.lossless import _compress, decoded_part, part_entry

MARK = -128  # an "int8e" code of this value is an escape
CODES8_SUFFIX = ".int8e"  # int16 codes handed on as int8 with escape marks ...
# ... and their escaped int16 values under `stores.compact.ESCAPES_SUFFIX` (".escapes"), in order


def codes8_entry(q: np.ndarray, lossless: str) -> dict[str, Any]:
    """The "int8e" entry of int16 codes `q` (any shape): int8 codes, ``MARK`` where |q| > 127 or q is
    the mark itself, the true values of those in the entry's ``escapes`` (int16 [E], C order)."""
    q = np.ascontiguousarray(q, dtype="<i2")
    escaped = (q < -127) | (q > 127)
    q8 = np.where(escaped, MARK, q).astype(np.int8)
    esc = np.ascontiguousarray(q[escaped], dtype="<i2")
    entry = part_entry(q8, "int8e", *_compress(q8, lossless))
    entry["escapes"] = part_entry(esc, "none", *_compress(esc, lossless))
    return entry


def few_escapes(entry: dict[str, Any], codes: int) -> bool:
    """An "int8e" entry whose escapes are at most 1 % of its `codes` (a trained teacher's: ~0.03 %)."""
    return int(np.prod(entry["escapes"]["shape"])) * 100 <= codes


def mark_count(q8: np.ndarray) -> int:
    """How many codes are the escape mark; `min` (SIMD) answers 0 for the usual part with none."""
    if q8.size == 0 or int(q8.min()) > MARK:
        return 0
    return int(np.count_nonzero(q8 == MARK))


def codes8_part(name: str, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """An "int8e" part: (int8 codes, int16 escapes [E]) as stored, the counts checked."""
    q8 = decoded_part(name, p)
    esc_entry = p.get("escapes")
    if q8.dtype != np.int8 or not isinstance(esc_entry, dict):
        raise BlobDecodeError(f"part {name!r}: an int8e part is int8 with an escapes entry")
    esc = decoded_part(name + ".escapes", esc_entry)
    if esc.dtype != np.int16 or esc.ndim != 1 or esc_entry.get("filter", "none") != "none":
        raise BlobDecodeError(f"part {name!r}: int8e escapes must be int16 [E] unfiltered, got {esc.dtype} {esc.shape}")
    marks = mark_count(q8)
    if marks != esc.size:
        raise BlobDecodeError(f"part {name!r}: int8e has {marks} escape marks for {esc.size} escapes")
    return q8, esc


def widen_codes(q8: np.ndarray, esc: np.ndarray) -> np.ndarray:
    """int8 codes + escapes -> the int16 codes (a new array): each mark replaced, in C order, by the
    next escape. Raises BlobDecodeError when the counts differ."""
    q8 = np.asarray(q8)
    q = q8.astype(np.int16)
    marks = mark_count(q8)
    if marks != np.asarray(esc).size:
        raise BlobDecodeError(f"int8e: {marks} escape marks for {np.asarray(esc).size} escapes")
    if marks:
        q[q8 == MARK] = esc
    return q


def code_rows(parts: dict) -> int:
    """K' (rows of the codes) of pcaKsS / cpcaKsS parts, whether "q" is plain or handed on narrow."""
    q = parts["q"] if "q" in parts else parts["q" + CODES8_SUFFIX]
    return int(q.shape[0])
