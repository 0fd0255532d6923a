"""Dequantise / scatter cached targets on the training device.

A loader worker only undoes the lossless stage (`stores.codecs.unpack`: zstd + framing) and hands
on `CompactArray`s: int8 / uint8 codes, fp16 values, indices and scales, a few times smaller than
the float32 maps. Here their parts are pinned, copied asynchronously and turned into float32 maps
by the training device, so the CPU never inflates a record on the hot path.

Every transform mirrors `stores.codecs.decode_compact` (the numpy reference) operation for
operation; elementwise float32 products and quotients, gathers and scatters are IEEE-exact, so
the two decodes agree bit for bit. The exception is pca / pcas / cpca (a float32 matmul, whose summation
order is the BLAS's own): equal to the reference within float32 rounding of the product. zfp and sz
have no torch decoder: they are decoded by their libraries on the host and copied.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from stores.codecs import (
    CODES8_SUFFIX,
    DELTA_SUFFIX,
    ESCAPE,
    ESCAPES_SUFFIX,
    HOST_TRANSFORMS,
    NARROW_SUFFIX,
    CompactArray,
    decode_compact,
    parse_chain,
)
from stores.lossless import undelta_in_place, widen_deltas
from stores.narrow_codes import MARK, widen_codes
from stores.transforms import logit_tables

_TABLES: dict[tuple[float, str], Tensor] = {}


def to_device(a: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """One part (or map) on `device`: pinned and copied asynchronously on CUDA."""
    if isinstance(a, Tensor):
        t = a
    elif not a.flags.writeable and device.type != "cuda":  # parts unpacked from bytes are read-only
        t = torch.from_numpy(np.array(a))
    else:
        with warnings.catch_warnings():  # read-only parts: pin_memory below copies them anyway
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        if t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def _centres(floor: float, device: torch.device) -> Tensor:
    key = (float(floor), str(device))
    if key not in _TABLES:
        _TABLES[key] = torch.from_numpy(logit_tables(floor)[1]).to(device)
    return _TABLES[key]


def _capped(bg: Tensor, idx: Tensor, vals: Tensor, g: int, k: int, floor: float) -> Tensor:
    """`stores.transforms._capped` in torch: min(bg, cap) with cap per (anchor, cell) group (the
    smallest kept value where the group holds >= min(K, G) kept, else F); counts and mins are exact."""
    c, cells = bg.shape
    if g <= 0 or c % g:
        raise ValueError(f"topk: {c} channels are not a whole number of anchors of {g} classes")
    group = idx // cells // g * cells + idx % cells
    count = torch.bincount(group, minlength=c // g * cells)
    smallest = torch.ones(c // g * cells, dtype=torch.float32, device=bg.device)
    smallest = smallest.scatter_reduce(0, group, vals, "amin", include_self=True)
    cap = torch.where(count >= min(k, g), smallest, torch.full_like(smallest, floor))
    return torch.minimum(bg.reshape(c // g, g, cells), cap.reshape(c // g, 1, cells))


def wrapped_cumsum(d: Tensor, torch_ops: bool | None = None) -> Tensor:
    """int8 differences (any shape) -> their cumsum in C order modulo 256, as int8 (two's complement):
    the reference's `stores.lossless.undelta_in_place`, exactly.

    With torch (accelerators; ``torch_ops``): summed in int32 where no running sum can overflow
    (|sum| <= 128 * numel), else int64 (integer sums are exact in any order); the low byte of the sum,
    as uint8 then reinterpreted, is the int8 value (no reliance on a narrowing cast). On the CPU,
    numpy's int32 cumsum on a copy (~0.35 ms per 600 kB P3 box map, torch's CPU cumsum ~2x that)."""
    if torch_ops is None:
        torch_ops = d.device.type != "cpu"
    if torch_ops:
        s = d.reshape(-1).cumsum(0, dtype=torch.int32 if d.numel() * 128 < 2**31 else torch.int64)
        s &= 255
        return s.to(torch.uint8).view(torch.int8).reshape(d.shape)
    codes = d.numpy().copy()  # the handed-on part stays as it is (a CompactArray may be decoded twice)
    undelta_in_place(codes)
    return torch.from_numpy(codes)


def narrow_indices(d8: Tensor, esc: Tensor, gather: bool | None = None) -> Tensor:
    """"delta8" index differences (uint8 [M], 255 = the next of the uint32 escapes [E]) -> the int64
    indices, vectorised. `stores.codecs.unpack` checked that the marks number E and that every index
    is < n, so the k-th mark takes esc[k] and the int64 cumsum is the reference's uint32 one.

    On an accelerator (``gather``) the k-th mark's escape is gathered at (running count of marks - 1)
    with torch: no host sync (nonzero would wait for the device). On the CPU the reference's numpy
    widening (each mark replaced by the next escape) and numpy's int64 cumsum, on the tensors' own
    memory: torch's CPU nonzero / gather over M entries are ~10x slower (COCO-shaped P3, 3.6 M
    differences: ~3 ms with numpy, ~8 ms with torch's nonzero, ~35 ms with the gather)."""
    if gather is None:
        gather = d8.device.type != "cpu"
    if gather:
        d = d8.long()
        if esc.numel():
            mark = d8 == ESCAPE
            d = torch.where(mark, esc.long()[(mark.cumsum(0) - 1).clamp_min(0)], d)
        return d.cumsum_(0)
    d = widen_deltas(d8.numpy(), esc.numpy(), np.int64)  # the host reference's widening, into int64
    return torch.from_numpy(np.cumsum(d, out=d))


def wide_codes(q8: Tensor, esc: Tensor, gather: bool | None = None) -> Tensor:
    """"int8e" codes (int8, -128 = the next of the int16 escapes [E], C order) -> the int16 codes.
    `stores.codecs.unpack` checked that the marks number E. On an accelerator the k-th mark's escape
    is gathered at (running count of marks - 1), as `narrow_indices` does: no host sync. On the CPU
    the numpy reference (`stores.narrow_codes.widen_codes`) on the tensors' memory."""
    if gather is None:
        gather = q8.device.type != "cpu"
    if not gather:
        return torch.from_numpy(widen_codes(q8.numpy(), esc.numpy()))
    q = q8.to(torch.int16)
    if esc.numel():
        mark = (q8 == MARK).reshape(-1)
        picked = esc[(mark.cumsum(0) - 1).clamp_min(0)]
        q = torch.where(mark, picked, q.reshape(-1)).reshape(q8.shape)
    return q


def undelta_on_device(p: dict[str, Tensor]) -> None:
    """The cumsums that `unpack(..., defer_delta=True)` left to the device, in place on the parts dict
    (`stores.codecs.undelta` is the numpy reference): ``<name>.delta`` int8 -> int8 codes wrapping mod
    256; ``<name>.delta`` uint32 -> int64 indices; ``<name>.delta8`` + ``<name>.escapes`` -> int64 indices;
    ``<name>.int8e`` + ``<name>.escapes`` -> int16 codes."""
    for k in [k for k in p if k.endswith(DELTA_SUFFIX)]:  # differences handed on by the worker
        d = p.pop(k)
        # indices: checked by unpack (no wrap, in range); codes: any int8 is valid
        p[k[: -len(DELTA_SUFFIX)]] = wrapped_cumsum(d) if d.dtype == torch.int8 else d.long().cumsum(0)
    for k in [k for k in p if k.endswith(NARROW_SUFFIX)]:
        base = k[: -len(NARROW_SUFFIX)]
        p[base] = narrow_indices(p.pop(k), p.pop(base + ESCAPES_SUFFIX))
    for k in [k for k in p if k.endswith(CODES8_SUFFIX)]:
        base = k[: -len(CODES8_SUFFIX)]
        p[base] = wide_codes(p.pop(k), p.pop(base + ESCAPES_SUFFIX))


def decode_on_device(c: CompactArray, device: torch.device) -> Tensor:
    """A CompactArray -> the decoded map on `device` (float32 for lossy chains, else its dtype)."""
    chain = parse_chain(c.chain)
    t = chain.transform
    if t in HOST_TRANSFORMS:  # zfp, sz: library decoders on the host
        return to_device(decode_compact(c), device)
    if t == "cpca":
        return _cpca_on_device(c, device)
    p = {k: to_device(v, device) for k, v in c.parts.items() if k != "classes"}  # classes: a host-side int
    undelta_on_device(p)
    shape = tuple(c.shape)
    if t == "raw":
        return p["data"].reshape(shape)
    if t in ("fp16", "bitround"):
        return p["data"].float().reshape(shape)
    if t == "int8c":
        channels = shape[0] if shape else 1
        q = p["q"].reshape(channels, -1).float()
        return (q * p["scale"].float()[:, None]).reshape(shape)
    if t == "u8p":
        return p["q"].float() / 255.0
    n = int(np.prod(shape)) if shape else 1
    if t == "sparse":
        out = torch.zeros(n, dtype=torch.float32, device=device)
        out[p["idx"].long()] = p["val"].float()
        return out.reshape(shape)
    if t == "topk":
        floor = float(np.float32(chain.param[1]))  # the numpy reference's cap, exactly
        bg = p["bgc"][:, None] * p["bgs"].float()[None, :]
        vals = _centres(chain.param[1], device)[p["q"].long()]
        idx = p["idx"].long()
        out = (bg.clamp_max(floor) if "classes" not in c.parts  # legacy blob
               else _capped(bg, idx, vals, int(np.asarray(c.parts["classes"])[0]), chain.param[0], floor)).reshape(-1)
        out[idx] = vals
        return out.reshape(shape)
    if t == "mask":
        out = torch.zeros((shape[0], n // shape[0] if shape[0] else 0), dtype=torch.float32, device=device)
        out[:, p["idx"].long()] = p["q"].float() * p["scale"][:, None]
        return out.reshape(shape)
    if t == "pca":
        q = p["q"].reshape(p["q"].shape[0], -1).float() * p["scale"][:, None]
        return (p["basis"].float() @ q + p["mean"][:, None]).reshape(shape)
    if t == "pcas":
        q = p["q"].reshape(p["q"].shape[0], n // shape[0] if shape[0] else 0).float() * p["step"][0]
        return (p["basis"].float() @ q + p["mean"][:, None]).reshape(shape)
    raise ValueError(f"no device decoder for chain {c.chain!r}")


_BASES: dict[tuple[bytes, int, str], Tensor] = {}  # cpca: the cache's bases, copied once per device


def _cpca_on_device(c: CompactArray, device: torch.device) -> Tensor:
    """cpcaKsS as pcaKsS, with the basis (attached by the reader, `stores.cache_basis`) copied to
    the device once per (basis id, K') instead of once per record."""
    if "basis" not in c.parts:
        decode_compact(c)  # raises the reference's error: the blob was read without its cache's basis
    codes = {k: to_device(v, device) for k, v in c.parts.items() if k.startswith("q")}  # q, or q.int8e + q.escapes
    undelta_on_device(codes)
    q = codes["q"]
    key = (np.asarray(c.parts["bid"]).tobytes(), int(q.shape[0]), str(device))
    basis = _BASES.get(key)
    if basis is None:
        if len(_BASES) >= 256:  # levels x distinct K' of the caches in use; bounded all the same
            _BASES.clear()
        basis = _BASES[key] = to_device(c.parts["basis"], device).float()
    shape = tuple(c.shape)
    cells = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    codes = q.reshape(q.shape[0], cells).float() * to_device(c.parts["step"], device)[0]
    return (basis @ codes + to_device(c.parts["mean"], device)[:, None]).reshape(shape)


def record_to_device(rec: dict, device: torch.device) -> dict[str, Tensor]:
    """{name: CompactArray or numpy array} -> {name: decoded tensor on device}."""
    out = {}
    for name, value in rec.items():
        out[name] = decode_on_device(value, device) if isinstance(value, CompactArray) else to_device(value, device)
    return out
