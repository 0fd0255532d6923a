"""Torch encoders of the compact transforms (topk, mask, pca) on the teacher's device.

Each returns the parts `stores.transforms` documents, so `stores.codecs.pack` frames them after the
device-to-host copy. topk and mask are selections, comparisons, table look-ups and IEEE float32
divisions: bit for bit the numpy reference (tests hold them to it); topk's background model uses
float64 sums, equal to the reference to rounding (summation order). pca uses eigh, which no two libraries compute
bit for bit: its parts agree with the reference to a tolerance, and the blob carries its basis, so
any decoder reproduces what was stored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stores.transforms import logit_tables


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


def int8_columns(v: Tensor) -> tuple[Tensor, Tensor]:
    """int8c of a [C, M] float32 matrix: (q int8 [C, M], scale float32 [C])."""
    amax = v.abs().amax(dim=1) if v.shape[1] else v.new_zeros(v.shape[0])
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(v / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def topk_prepare(x: Tensor, k: int, floor: float, classes: int | None = None) -> dict[str, Tensor]:
    c = x.shape[0]
    g = int(classes) if classes else c
    if g <= 0 or c % g:
        raise ValueError(f"topk: {c} channels are not a whole number of anchors of {classes} classes")
    grouped = x.reshape(c // g, g, -1)
    floor_t = torch.tensor(floor, dtype=torch.float32, device=x.device)
    keep = grouped >= floor_t
    if k < g:
        kth = torch.topk(grouped, k, dim=1).values[:, k - 1 : k, :]
        keep &= grouped >= kth
    flat = x.reshape(-1)
    idx = torch.nonzero(keep.reshape(-1)).flatten()
    vals = flat[idx]
    bounds = torch.from_numpy(logit_tables(floor)[0]).to(x.device)
    q = torch.searchsorted(bounds, vals, right=True).to(torch.uint8)
    bgc, bgs = background_fit(x.reshape(c, -1), ~keep.reshape(c, -1))
    return {"idx": idx.to(_index_dtype(flat.numel())), "q": q, "bgc": bgc, "bgs": bgs}


def background_fit(x: Tensor, dropped: Tensor) -> tuple[Tensor, Tensor]:
    """`stores.transforms.background_fit` in torch: (bgc float32 [C], bgs float16 [N])."""
    w = dropped.float()
    n_c = w.double().sum(dim=1)
    bgc = ((x * w).double().sum(dim=1) / n_c.clamp_min(1)).float()
    safe = torch.where(bgc > 0, bgc, torch.ones_like(bgc))
    ratio = x / safe[:, None] * w * (bgc > 0)[:, None]
    bgs = (ratio.double().sum(dim=0) / w.double().sum(dim=0).clamp_min(1)).clamp_max(65504).half()
    return bgc, bgs


def mask_prepare(x: Tensor, threshold: float, score: Tensor | None) -> dict[str, Tensor]:
    if score is None:
        raise ValueError("mask: needs the record's class map of the same level (cache the 'cls' target too)")
    if tuple(score.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"mask: score map cells {tuple(score.shape[1:])} differ from the map's {tuple(x.shape[1:])}")
    flat = x.reshape(x.shape[0], -1)
    cell = score.float().reshape(score.shape[0], -1).amax(dim=0)
    idx = torch.nonzero(cell >= torch.tensor(threshold, dtype=torch.float32, device=x.device)).flatten()
    q, scale = int8_columns(flat[:, idx])
    return {"idx": idx.to(_index_dtype(flat.shape[1])), "q": q.contiguous(), "scale": scale}


def pca_prepare(x: Tensor, k: int) -> dict[str, Tensor]:
    if x.dim() < 2:
        raise ValueError(f"pca: needs a [C, ...] map with cells, got shape {tuple(x.shape)}")
    c = x.shape[0]
    flat = x.reshape(c, -1)
    n = flat.shape[1]
    mean = flat.double().mean(dim=1) if n else flat.new_zeros(c, dtype=torch.float64)
    centred = flat.double() - mean[:, None]
    _, vecs = torch.linalg.eigh(centred @ centred.T / max(n, 1))
    kk = min(k, c)
    basis = vecs.flip(1)[:, :kk]
    sign = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    sign[sign == 0] = 1
    basis16 = (basis * sign).half()
    mean32 = mean.float()
    coeff = basis16.float().T @ (flat - mean32[:, None])
    q, scale = int8_columns(coeff)
    return {"basis": basis16, "mean": mean32, "q": q.reshape((kk,) + tuple(x.shape[1:])), "scale": scale}
