"""The loader worker's side of a blob: the lossless stage and framing only (`unpack`), and what
it hands on (`CompactArray`: the transform's parts as stored, index and int8 code parts possibly
still delta-coded for the training device's cumsum, `undelta` being its numpy reference).

Split from `stores.codecs` (which re-exports all of it) so that each module keeps one job:
codecs.py codes and decodes whole arrays, this one is the hot path of a stage-2 loader worker.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from stores.blob_schema import BlobDecodeError, _check_parts, _header
from stores.chains import INDEXED, CodecChain, parse_chain
from stores.lossless import (
    _dtype,
    decoded_part,
    deltas_in_range,
    narrow_deltas_in_range,
    narrow_part,
    undelta_in_place,
    widen_deltas,
)
from stores.narrow_codes import CODES8_SUFFIX, codes8_part, widen_codes


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


DELTA_SUFFIX = ".delta"  # a part handed on still delta-coded: `unpack(..., defer_delta=True)`
NARROW_SUFFIX = ".delta8"  # index differences handed on as uint8 with escapes ("delta8" parts) ...
ESCAPES_SUFFIX = ".escapes"  # ... and the uint32 differences of their escape marks, in order


@functools.lru_cache(maxsize=256)
def _chain(spec: str) -> CodecChain:
    return parse_chain(spec)


def undelta(parts: dict) -> dict:
    """The numpy reference of the device's cumsums: parts handed on still delta-coded (`unpack`'s
    `defer_delta`) replaced by the parts themselves (new arrays); other parts unchanged.

    - ``<name>.delta`` uint32 [M]: index differences, uint32 cumsum;
    - ``<name>.delta`` int8 (any shape): an int8c map's codes, cumsum in C order wrapping mod 256;
    - ``<name>.delta8`` uint8 [M] + ``<name>.escapes`` uint32 [E]: index differences, each 255 replaced
      in order by the next escape (`stores.lossless.widen_deltas`), then the uint32 cumsum;
    - ``<name>.int8e`` int8 + ``<name>.escapes`` int16 [E]: int16 codes, each -128 replaced in order by
      the next escape (`stores.narrow_codes.widen_codes`)."""
    if not any(k.endswith((DELTA_SUFFIX, NARROW_SUFFIX, CODES8_SUFFIX)) for k in parts):
        return parts
    out = {}
    for k, v in parts.items():
        if k.endswith(DELTA_SUFFIX):
            d = np.array(v)  # a copy: the handed-on part stays as it is
            undelta_in_place(d)
            out[k[: -len(DELTA_SUFFIX)]] = d
        elif k.endswith(NARROW_SUFFIX):
            base = k[: -len(NARROW_SUFFIX)]
            d = widen_deltas(np.asarray(v), np.asarray(parts[base + ESCAPES_SUFFIX]))
            undelta_in_place(d)
            out[base] = d
        elif k.endswith(CODES8_SUFFIX):
            base = k[: -len(CODES8_SUFFIX)]
            out[base] = widen_codes(np.asarray(v), np.asarray(parts[base + ESCAPES_SUFFIX]))
        elif not k.endswith(ESCAPES_SUFFIX):
            out[k] = v
    return out


@functools.lru_cache(maxsize=256)
def _dtype_name(s: str) -> str:
    return _dtype(s).name  # np.dtype.name is a Python property (~2 us); unpack names one per blob


def unpack(blob: bytes | dict, defer_delta: bool = False) -> CompactArray:
    """Lossless stage + framing only: blob -> CompactArray (raises BlobDecodeError on bad bytes).

    ``defer_delta=True`` (the loader's hot path) hands delta-filtered parts on still coded, and the
    training device does the cumsum (`stages.distill.device_decode`; `undelta` / `decode_compact` do
    it in numpy), which saves the worker a pass over its largest parts:

    - an index part (sparse / topk / mask ``idx``) as ``idx.delta`` (uint32 differences) or, for a
      "delta8" part, ``idx.delta8`` (uint8) + ``idx.escapes`` (uint32). Their range is checked here
      first (`deltas_in_range` / `narrow_deltas_in_range`: every index < n, escape marks = escapes),
      so no malformed blob reaches a device index op; a part that fails the check falls back to the
      host cumsum and the reference's checks (which raise);
    - an int8c map's int8 codes as ``q.delta`` (same shape; any int8 is a valid code, so no check);
    - an "int8e" part (pcaKsS / cpcaKsS codes, `stores.narrow_codes`) as ``q.int8e`` (int8) +
      ``q.escapes`` (int16), its escape marks counted against the escapes first.
    """
    h = _header(blob)
    try:
        chain = _chain(h["chain"])
        shape = tuple(map(int, h["shape"]))
        dtype = _dtype(h["dtype"])
        parts = {}
        deferred = []
        narrow = None  # (name, uint8 differences, escapes) of a delta8 part handed on as it is
        codes8 = []  # (name, int8 codes, int16 escapes) of int8e parts handed on as they are
        for name, p in h["parts"].items():
            filt = p.get("filter", "none")
            if filt == "int8e":
                q8, esc = codes8_part(name, p)  # escape marks counted against the escapes here
                if defer_delta:
                    codes8.append((name, q8, esc))
                    parts[name] = np.broadcast_to(np.zeros((), np.int16), q8.shape)  # stands in for the check
                else:
                    parts[name] = widen_codes(q8, esc)
                continue
            if filt == "delta8":
                d8, esc = narrow_part(name, p)
                if defer_delta and narrow is None:
                    narrow = (name, d8, esc)
                    arr = np.broadcast_to(np.zeros((), np.uint32), d8.shape)  # stands in for the check below
                else:
                    arr = widen_deltas(d8, esc)
                    undelta_in_place(arr)
                parts[name] = arr
                continue
            arr = decoded_part(name, p)
            if filt == "delta":
                if defer_delta and arr.ndim >= 1 and (arr.dtype == np.int8 or (arr.dtype == np.uint32 and arr.ndim == 1)):
                    deferred.append(name)
                else:
                    undelta_in_place(arr)
            elif filt != "none":
                raise BlobDecodeError(f"unknown filter {filt!r} on part {name!r}")
            parts[name] = arr
        _check_parts(parts, chain, shape, dtype, BlobDecodeError)
        indexed = chain.transform in INDEXED and parts["idx"].size
        n = math.prod(shape[1:] if chain.transform == "mask" else shape)  # mask: cell indices
        for name in deferred:  # handed on only when the device's cumsum is provably the reference's
            arr = parts[name]
            if arr.dtype == np.int8:  # int8c codes: the device wraps mod 256 like the reference
                parts[name + DELTA_SUFFIX] = parts.pop(name)
            elif indexed and name == "idx" and n <= 2**31 and deltas_in_range(arr, n):
                parts[name + DELTA_SUFFIX] = parts.pop(name)
            else:
                undelta_in_place(arr)
        if narrow is not None:
            name, d8, esc = narrow
            if indexed and name == "idx" and n <= 2**31 and narrow_deltas_in_range(d8, esc, n):
                del parts[name]
                parts[name + NARROW_SUFFIX], parts[name + ESCAPES_SUFFIX] = d8, esc
            else:  # the reference's path: raises on a wrong escape count, then on the range below
                parts[name] = widen_deltas(d8, esc)
                undelta_in_place(parts[name])
        for name, q8, esc in codes8:  # any int8 code is valid and the counts agree: the device widens
            del parts[name]
            parts[name + CODES8_SUFFIX], parts[name + ESCAPES_SUFFIX] = q8, esc
        if indexed and "idx" in parts and int(parts["idx"].max()) >= n:
            raise BlobDecodeError(f"{chain.transform} index {int(parts['idx'].max())} out of range for shape {shape}")
    except BlobDecodeError:
        raise
    except Exception as err:  # corrupt header fields, failed decompression, bad shapes
        raise BlobDecodeError(f"corrupt blob ({type(err).__name__}: {err})") from None
    return CompactArray(chain.spec, shape, _dtype_name(h["dtype"]), parts)
