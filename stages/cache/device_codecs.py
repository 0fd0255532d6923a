"""Torch encoders of the compact transforms (topk, mask, pca, pcas, cpca) on the teacher's device.

Each returns the parts `stores.transforms` documents, so `stores.codecs.pack` frames them after the
device-to-host copy. topk and mask are selections, comparisons, table look-ups and IEEE float32
divisions: bit for bit the numpy reference (tests hold them to it); topk's background model uses
float64 sums, equal to the reference to rounding (summation order). pca uses eigh, which no two libraries compute
bit for bit: its parts agree with the reference to a tolerance, and the blob carries its basis, so
any decoder reproduces what was stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from stores.cache_basis import basis_id
from stores.transforms import logit_tables, pcas_kept, pcas_step


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
    bounds_np, centres_np = logit_tables(floor)
    bounds = torch.from_numpy(bounds_np).to(x.device)
    centres = torch.from_numpy(centres_np).to(x.device)
    # one bin look-up for every element: the kept ones are the stored codes, and their decoded values
    # give the decoder's background cap per (anchor, cell)
    bins = torch.searchsorted(bounds, grouped.contiguous(), right=True)
    decoded = torch.where(keep, centres[bins], 1.0)
    full = keep.sum(dim=1) >= min(k, g)
    cap = torch.where(full, decoded.amin(dim=1), floor_t).repeat_interleave(g, dim=0)  # [C, N]
    idx = torch.nonzero(keep.reshape(-1)).flatten()
    q = bins.reshape(-1)[idx].to(torch.uint8)  # grouped is x's C order: flat indices match
    dropped = ~keep.reshape(c, -1)
    bgc, bgs = background_fit(x.reshape(c, -1), dropped)
    bgc, bgs = background_rebalance(x.reshape(c, -1), dropped, bgc, bgs, cap)
    return {"idx": idx.to(_index_dtype(flat.numel())), "q": q, "bgc": bgc, "bgs": bgs,
            "classes": torch.tensor([g], dtype=torch.int64).to(torch.uint32)}


def background_fit(x: Tensor, dropped: Tensor) -> tuple[Tensor, Tensor]:
    """`stores.transforms.background_fit` in torch: (bgc float32 [C], bgs float16 [N])."""
    w = dropped.float()
    n_c = w.double().sum(dim=1)
    bgc = ((x * w).double().sum(dim=1) / n_c.clamp_min(1)).float()
    safe = torch.where(bgc > 0, bgc, torch.ones_like(bgc))
    ratio = x / safe[:, None] * w * (bgc > 0)[:, None]
    bgs = (ratio.double().sum(dim=0) / w.double().sum(dim=0).clamp_min(1)).clamp_max(65504).half()
    return bgc, bgs


def background_rebalance(x: Tensor, dropped: Tensor, bgc: Tensor, bgs: Tensor, cap: Tensor) -> tuple[Tensor, Tensor]:
    """`stores.transforms.background_rebalance` in torch (float64 sums: equal to rounding)."""
    def capped(bgc: Tensor, bgs: Tensor) -> Tensor:
        return torch.where(dropped, torch.minimum(bgc[:, None] * bgs.float()[None, :], cap), 0.0)

    def factor(num: Tensor, den: Tensor) -> Tensor:
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))

    mass = torch.where(dropped, x, 0.0)
    y = capped(bgc, bgs)
    bgc = (bgc.double() * factor(mass.double().sum(dim=1), y.double().sum(dim=1))).float()
    y = capped(bgc, bgs)
    bgs = (bgs.double() * factor(mass.double().sum(dim=0), y.double().sum(dim=0))).clamp_max(65504).half()
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


def _pca(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, float]:
    """(basis float16 [C, K'], mean float32 [C], float32 coefficients [K', N], mean channel variance)."""
    if x.dim() < 2:
        raise ValueError(f"pca: needs a [C, ...] map with cells, got shape {tuple(x.shape)}")
    c = x.shape[0]
    flat = x.reshape(c, -1)
    n = flat.shape[1]
    mean = flat.double().mean(dim=1) if n else flat.new_zeros(c, dtype=torch.float64)
    centred = flat.double() - mean[:, None]
    cov = centred @ centred.T / max(n, 1)
    _, vecs = torch.linalg.eigh(cov)
    kk = min(k, c)
    basis = vecs.flip(1)[:, :kk]
    sign = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    sign[sign == 0] = 1
    basis16 = (basis * sign).half()
    mean32 = mean.float()
    coeff = basis16.float().T @ (flat - mean32[:, None])
    return basis16, mean32, coeff, float(torch.diagonal(cov).sum()) / max(c, 1)


def pca_prepare(x: Tensor, k: int) -> dict[str, Tensor]:
    basis16, mean32, coeff, _ = _pca(x, k)
    q, scale = int8_columns(coeff)
    kk = basis16.shape[1]
    return {"basis": basis16, "mean": mean32, "q": q.reshape((kk,) + tuple(x.shape[1:])), "scale": scale}


def pcas_prepare(x: Tensor, k: int, rel_step: float) -> dict[str, Tensor]:
    """pcaKsS (`stores.transforms.pcas_prepare`): one step per map, int16 codes, trailing zero
    components dropped. The step is computed from float64 statistics and cast as the reference does."""
    basis16, mean32, coeff, var = _pca(x, k)
    amax = float(coeff.abs().max()) if coeff.numel() else 0.0
    step = torch.from_numpy(pcas_step(var, rel_step, amax)).to(x.device)
    q = torch.round(coeff / step).to(torch.int16)
    kk = pcas_kept(q.abs().amax(dim=1).cpu().numpy() if q.numel() else [])
    return {"basis": basis16[:, :kk].contiguous(), "mean": mean32,
            "q": q[:kk].reshape((kk,) + tuple(x.shape[1:])).contiguous(), "step": step}


def cpca_prepare(x: Tensor, basis, rel_step: float) -> dict[str, Tensor]:
    """cpcaKsS (`stores.cache_basis.cpca_prepare`) against the cache's basis: `basis` is the float16
    [C, K] basis as a numpy array (its id is computed once and kept) or a `DeviceBasis`."""
    if basis is None:
        raise ValueError("cpca: no cache basis for this map (static/codec_basis.npz is fitted by pipeline.cache_teacher)")
    if not isinstance(basis, DeviceBasis):
        basis = DeviceBasis.of(basis, x.device)
    if x.dim() < 2 or basis.basis.shape[0] != x.shape[0]:
        raise ValueError(f"cpca: basis {tuple(basis.basis.shape)} does not fit a map of shape {tuple(x.shape)}")
    flat = x.reshape(x.shape[0], -1)
    mean32 = flat.double().mean(dim=1).float() if flat.shape[1] else flat.new_zeros(flat.shape[0])
    centred = flat - mean32[:, None]
    var = float((centred.double() ** 2).mean()) if centred.numel() else 0.0
    coeff = basis.basis.float().T @ centred
    amax = float(coeff.abs().max()) if coeff.numel() else 0.0
    step = torch.from_numpy(pcas_step(var, rel_step, amax)).to(x.device)
    q = torch.round(coeff / step).to(torch.int16)
    kk = pcas_kept(q.abs().amax(dim=1).cpu().numpy() if q.numel() else [])
    return {"mean": mean32, "q": q[:kk].reshape((kk,) + tuple(x.shape[1:])).contiguous(), "step": step,
            "bid": basis.bid}


@dataclass(frozen=True)
class DeviceBasis:
    """A cache basis on the teacher's device, with its blob id (`stores.cache_basis.basis_id`)."""

    basis: Tensor
    bid: Tensor

    @classmethod
    def of(cls, basis: np.ndarray, device: torch.device | str) -> DeviceBasis:
        return cls(torch.from_numpy(np.ascontiguousarray(basis)).to(device), torch.from_numpy(basis_id(basis)))
