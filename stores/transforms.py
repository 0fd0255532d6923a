"""The compact transforms (pca, cpca, topk, mask, zfp, sz): numpy reference encoders and decoders
(`stores.codecs` frames them).

Each transform turns one float map into named *parts* (small integer / fp16 arrays and scales)
and back. `stages.cache.device_codecs` computes the same parts with torch on the teacher's device
and `stages.distill.device_decode` decodes them on the training device; these numpy functions are
the reference both are tested against (inspect_cache and the tests decode with them).

=========  ==========================================================================================
transform  parts (name: dtype, shape) of x (shape [C, *S], N = prod(S) cells) and how they are made
=========  ==========================================================================================
topkKfF    Class maps (probabilities in [0, 1]). Channels are grouped per anchor: channel c = a*G + k
           with G = `classes` (all C channels form one group when `classes` is None). An element is
           kept when it is >= F (float32) and >= the K-th largest value of its (anchor, cell) group
           (ties at the K-th value are all kept, so torch.topk and numpy agree exactly).
           idx: uint32 [M] flat C-order indices of kept elements (ascending; delta-filtered);
           q: uint8 [M] logit-domain bins: ``q = searchsorted(logit_bounds(F), p, side="right")``,
           decoded ``logit_centres(F)[q]`` (255 equal logit steps from logit(F) to LOGIT_HI; relative
           error of p <= step / 2, e.g. 2.7 % at F = 0.01);
           bgc: float32 [C] and bgs: float16 [N]: the explicit background, a rank-one model of the
           dropped elements (per class channel x per cell, `background_fit`, then one mass-keeping
           pass against the capped decode, `background_rebalance`); classes: uint32 [1] = G.
           A dropped element decodes to ``min(bgc[c] * bgs[n], cap[a, n])`` (float32), where cap is
           the smallest decoded kept value of its (anchor, cell) group when that group holds >= min(K, G)
           kept elements (top-K may have dropped elements above F there: each is <= the K-th value),
           else F (everything dropped there is < F). ~2 bytes per cell: it keeps the class priors and
           where the teacher sees "something" that top-K alone would lose. Legacy blobs (written before
           the `classes` part) decode with cap = F everywhere, as they always did (that cap turned
           every above-floor element dropped by top-K into F: errors of 0.24 at p = 0.25 on an
           ambiguous teacher, and every class of a teacher at its 0.01 prior decoded to F).
maskT      Box / quality maps, kept only at cells where the teacher is confident: ``score`` (the
           record's class map of the same level, [Cs, *S]) has max over its channels >= T.
           idx: uint32 [M] kept cell indices (ascending; delta-filtered); q: int8 [C, M] and
           scale: float32 [C]: int8c of the kept columns (scale = max|x[c, kept]| / 127, 1 if 0).
           Other cells decode to 0 (the box losses weight cells by the teacher's score or by
           positives, so a cell the teacher scores below T contributes little).
pcaK       Feature maps: a per-record, per-level channel basis (transform coding). With
           mean = mean over cells (float64), B = the top-K eigenvectors of the channel covariance
           (float64 eigh, largest first, each signed so its largest-|.| entry is positive) stored as
           basis: float16 [C, K'] (K' = min(K, C)); mean: float32 [C]; the coefficients
           ``B16.T @ (x - mean)`` (float32) int8c-quantised per component: q: int8 [K', *S],
           scale: float32 [K']. Decoded ``B16 @ (q * scale) + mean``. The basis lives in the blob
           (K' * C * 2 bytes per level), so every record decodes on its own; eigh is not bitwise
           equal across libraries/devices, so device and numpy *encoders* agree only to a
           tolerance, while both *decoders* of one blob agree to float32 matmul rounding.
pcaKsS     Feature maps, transform coding with one quantiser step per map (per level): the basis,
           mean and float32 coefficients of pcaK (at most K components), then ``step = max(S * rms,
           max|coeff| / 32767)`` with rms = sqrt(mean over channels of the channel variances) (float64,
           cast to float32), ``q = round(coeff / step)`` int16 (never clipped). One step for all
           components is reverse water-filling: a component whose spread is below the step quantises
           to (mostly) zeros and costs the lossless stage (best: pco) almost nothing, a strong one gets
           as many levels as it needs; the error is about step / sqrt(12) per coefficient whatever K.
           Trailing components whose codes are all 0 are dropped with their basis columns.
           basis: float16 [C, K'] (K' <= min(K, C)); mean: float32 [C]; q: int16 [K', *S]; step:
           float32 [1]. Decoded ``B16 @ (q * step) + mean`` (float32).
zfpT       ZFP fixed-accuracy (numcodecs ZFPY), tolerance T * max|x|: data: uint8 [bytes] (empty
           for an all-zero map). Decoded on the CPU by ZFPY (no torch decoder): a reference for the rate-distortion study.
szT        SZ3 (the pysz package) with an absolute error bound T * max|x|: data: uint8 [bytes] (empty
           for an all-zero map). CPU only, like zfpT.
=========  ==========================================================================================
"""

from __future__ import annotations

import numpy as np

LOGIT_HI = 9.0  # top of the logit grid: p = 0.99988; higher probabilities fall in the top bin
_TABLES: dict[float, tuple[np.ndarray, np.ndarray]] = {}


def logit_tables(floor: float) -> tuple[np.ndarray, np.ndarray]:
    """(bounds float32 [255], centres float32 [256]) of the logit grid from logit(floor) to LOGIT_HI.

    Computed in float64 once and cast, so numpy and torch (which copies these tables) agree exactly.
    """
    key = float(floor)
    if key not in _TABLES:
        lo = np.log(key) - np.log1p(-key) if key < 1.0 else LOGIT_HI
        hi = max(LOGIT_HI, lo + 1e-3)
        step = (hi - lo) / 255.0
        centres = 1.0 / (1.0 + np.exp(-(lo + step * np.arange(256, dtype=np.float64))))
        bounds = 1.0 / (1.0 + np.exp(-(lo + step * (np.arange(255, dtype=np.float64) + 0.5))))
        _TABLES[key] = (bounds.astype(np.float32), centres.astype(np.float32))
    return _TABLES[key]


def _groups(x: np.ndarray, classes: int | None) -> np.ndarray:
    """[A, G, N] view of a [C, *S] map (channel c = a * G + k)."""
    c = x.shape[0]
    g = c if not classes else int(classes)
    if g <= 0 or c % g:
        raise ValueError(f"topk: {c} channels are not a whole number of anchors of {classes} classes")
    return x.reshape(c // g, g, -1)


def topk_prepare(x: np.ndarray, k: int, floor: float, classes: int | None = None) -> dict[str, np.ndarray]:
    x = np.asarray(x, dtype=np.float32, order="C")
    if x.ndim < 1:
        raise ValueError("topk: needs a [C, ...] class map")
    grouped = _groups(x, classes)
    keep = grouped >= np.float32(floor)
    if k < grouped.shape[1]:
        kth = np.partition(grouped, grouped.shape[1] - k, axis=1)[:, grouped.shape[1] - k][:, None, :]
        keep &= grouped >= kth
    g = grouped.shape[1]
    bounds, centres = logit_tables(floor)
    # one bin look-up for every element: the kept ones are the stored codes, and their decoded values
    # give the decoder's background cap per (anchor, cell) (see the table)
    bins = np.searchsorted(bounds, grouped, side="right")
    decoded = np.where(keep, centres[bins], np.float32(1))
    full = keep.sum(axis=1) >= min(k, g)
    cap = np.repeat(np.where(full, decoded.min(axis=1), np.float32(floor)), g, axis=0)  # [C, N]
    keep = keep.reshape(x.shape[0], -1)
    idx = np.flatnonzero(keep).astype(np.uint32)
    q = bins.reshape(-1)[idx].astype(np.uint8)  # grouped is x's C order: flat indices match
    dropped = ~keep
    bgc, bgs = background_fit(x.reshape(x.shape[0], -1), dropped)
    bgc, bgs = background_rebalance(x.reshape(x.shape[0], -1), dropped, bgc, bgs, cap)
    return {"idx": idx, "q": q, "bgc": bgc, "bgs": bgs, "classes": np.array([g], np.uint32)}


def background_fit(x: np.ndarray, dropped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank-one model of the dropped elements of a [C, N] probability map, x[c, n] ~ bgc[c] * bgs[n]:
    bgc (float32 [C]) the mean of channel c's dropped elements, bgs (float16 [N]) the mean over a
    cell's dropped elements of x / bgc (float64 sums; 0 where nothing is dropped). Products, not
    logits: the model keeps each class's mean probability (a logit-mean would sit below it by the
    spread of the dropped logits), and for small p a separable logit field is a separable product."""
    w = dropped.astype(np.float32)
    n_c = w.sum(axis=1, dtype=np.float64)
    bgc = ((x * w).sum(axis=1, dtype=np.float64) / np.maximum(n_c, 1)).astype(np.float32)
    safe = np.where(bgc > 0, bgc, np.float32(1))
    ratio = x / safe[:, None] * w * (bgc > 0)[:, None]
    n_s = w.sum(axis=0, dtype=np.float64)
    bgs = np.minimum(ratio.sum(axis=0, dtype=np.float64) / np.maximum(n_s, 1), 65504).astype(np.float16)
    return bgc, bgs


def background_rebalance(x: np.ndarray, dropped: np.ndarray, bgc: np.ndarray, bgs: np.ndarray,
                         cap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One alternating pass that gives back the mass the decoder's cap takes: bgc[c] times (sum of
    channel c's dropped x) / (sum of their capped decode), then bgs[n] the same per cell (float64
    sums; a factor of 1 where the decode sums to 0). The cap clips the rank-one product's
    overshoots and keeps its undershoots, so without this the background sits a few % low, summed
    over millions of elements (a KD loss's value moved ~1 % on the synth20 teacher)."""
    def capped(bgc: np.ndarray, bgs: np.ndarray) -> np.ndarray:
        return np.where(dropped, np.minimum(bgc[:, None] * bgs.astype(np.float32)[None, :], cap), np.float32(0))

    def factor(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)

    mass = np.where(dropped, x, np.float32(0))
    y = capped(bgc, bgs)
    bgc = (bgc * factor(mass.sum(axis=1, dtype=np.float64), y.sum(axis=1, dtype=np.float64))).astype(np.float32)
    y = capped(bgc, bgs)
    bgs = np.minimum(bgs * factor(mass.sum(axis=0, dtype=np.float64), y.sum(axis=0, dtype=np.float64)), 65504)
    return bgc, bgs.astype(np.float16)


def topk_decode(parts: dict[str, np.ndarray], shape: tuple, floor: float, k: int | None = None) -> np.ndarray:
    n = int(np.prod(shape)) if shape else 1
    idx = parts["idx"]
    if idx.size and int(idx.max()) >= n:
        raise ValueError(f"topk index {int(idx.max())} out of range for shape {shape}")
    # the rank-one product can overshoot where a channel's mean is tiny and a cell's ratio large
    # (values > 1 were seen on trained teachers): the background is capped (see the table), float32
    # mins, exact in torch too
    bg = parts["bgc"][:, None] * parts["bgs"].astype(np.float32)[None, :]
    vals = logit_tables(floor)[1][parts["q"]]
    out = (np.minimum(bg, np.float32(floor)) if "classes" not in parts  # legacy blob
           else _capped(bg, idx, vals, int(parts["classes"][0]), k, floor)).ravel()
    out[idx] = vals
    return out.reshape(shape)


def _capped(bg: np.ndarray, idx: np.ndarray, vals: np.ndarray, g: int, k: int | None, floor: float) -> np.ndarray:
    """min(bg [C, N], cap) with cap per (anchor, cell) group as the table says."""
    c, cells = bg.shape
    if g <= 0 or c % g:
        raise ValueError(f"topk: {c} channels are not a whole number of anchors of {g} classes")
    chan, cell = np.divmod(idx.astype(np.int64), cells)
    group = chan // g * cells + cell
    count = np.bincount(group, minlength=c // g * cells)
    smallest = np.ones(c // g * cells, np.float32)
    np.minimum.at(smallest, group, vals)
    cap = np.where(count >= min(int(k) if k else g, g), smallest, np.float32(floor))
    return np.minimum(bg.reshape(c // g, g, cells), cap.reshape(c // g, 1, cells))


def cell_scores(score: np.ndarray, shape: tuple) -> np.ndarray:
    """Max over the channels of the score map, per cell, checked against the masked map's cells."""
    score = np.asarray(score, dtype=np.float32)
    if tuple(score.shape[1:]) != tuple(shape[1:]):
        raise ValueError(f"mask: score map cells {tuple(score.shape[1:])} differ from the map's {tuple(shape[1:])}")
    return score.reshape(score.shape[0], -1).max(axis=0) if score.shape[0] else np.zeros(0, np.float32)


def int8_columns(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8c of a [C, M] matrix: (q int8 [C, M], scale float32 [C])."""
    amax = np.abs(v).max(axis=1) if v.size else np.zeros(v.shape[0], np.float32)
    if not np.all(np.isfinite(amax)):
        raise ValueError("non-finite values (NaN/inf): cannot quantise")
    scale = (amax / np.float32(127.0)).astype(np.float32)
    scale[amax == 0] = 1.0
    return np.clip(np.round(v / scale[:, None]), -127, 127).astype(np.int8), scale


def mask_prepare(x: np.ndarray, threshold: float, score: np.ndarray | None) -> dict[str, np.ndarray]:
    if score is None:
        raise ValueError("mask: needs the record's class map of the same level (cache the 'cls' target too)")
    x = np.asarray(x, dtype=np.float32, order="C")
    flat = x.reshape(x.shape[0], -1)
    idx = np.flatnonzero(cell_scores(score, x.shape) >= np.float32(threshold)).astype(np.uint32)
    q, scale = int8_columns(flat[:, idx])
    return {"idx": idx, "q": np.ascontiguousarray(q), "scale": scale}


def mask_decode(parts: dict[str, np.ndarray], shape: tuple) -> np.ndarray:
    c = shape[0]
    n = int(np.prod(shape[1:]))
    idx = parts["idx"]
    if idx.size and int(idx.max()) >= n:
        raise ValueError(f"mask cell index {int(idx.max())} out of range for shape {shape}")
    out = np.zeros((c, n), dtype=np.float32)
    out[:, idx] = parts["q"].astype(np.float32) * parts["scale"][:, None]
    return out.reshape(shape)


def pca_basis(flat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(basis float16 [C, K'], mean float32 [C]) of a [C, N] float32 matrix (see the table)."""
    basis, mean, _ = _pca(flat, k)
    return basis, mean


def _pca(flat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """pca_basis and the mean channel variance (float64: trace of the covariance / C)."""
    c, n = flat.shape
    mean = flat.mean(axis=1, dtype=np.float64) if n else np.zeros(c)
    centred = flat.astype(np.float64) - mean[:, None]
    cov = centred @ centred.T / max(n, 1)
    _, vecs = np.linalg.eigh(cov)
    kk = min(k, c)
    basis = vecs[:, ::-1][:, :kk]
    sign = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(kk)])
    sign[sign == 0] = 1
    return (basis * sign).astype(np.float16), mean.astype(np.float32), float(np.trace(cov)) / max(c, 1)


def _cells_matrix(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x as C-order float32, its [C, N] view) of a feature map, checked for the PCA transforms."""
    x = np.asarray(x, dtype=np.float32, order="C")
    if x.ndim < 2:
        raise ValueError(f"pca: needs a [C, ...] map with cells, got shape {x.shape}")
    flat = x.reshape(x.shape[0], -1)
    if not np.all(np.isfinite(flat)):
        raise ValueError("pca: non-finite values (NaN/inf): cannot transform")
    return x, flat


def pca_prepare(x: np.ndarray, k: int) -> dict[str, np.ndarray]:
    x, flat = _cells_matrix(x)
    basis, mean = pca_basis(flat, k)
    coeff = basis.astype(np.float32).T @ (flat - mean[:, None])
    q, scale = int8_columns(coeff)
    return {"basis": basis, "mean": mean, "q": q.reshape((basis.shape[1],) + x.shape[1:]), "scale": scale}


def pca_decode(parts: dict[str, np.ndarray], shape: tuple) -> np.ndarray:
    q = parts["q"].reshape(parts["q"].shape[0], -1).astype(np.float32) * parts["scale"][:, None]
    return (parts["basis"].astype(np.float32) @ q + parts["mean"][:, None]).reshape(shape)


def pcas_prepare(x: np.ndarray, k: int, rel_step: float) -> dict[str, np.ndarray]:
    x, flat = _cells_matrix(x)
    basis, mean, var = _pca(flat, k)
    coeff = basis.astype(np.float32).T @ (flat - mean[:, None])
    step = pcas_step(var, rel_step, float(np.abs(coeff).max()) if coeff.size else 0.0)
    q = np.round(coeff / step).astype(np.int16)
    kk = pcas_kept(np.abs(q).max(axis=1) if q.size else np.zeros(q.shape[0], np.int16))
    return {"basis": np.ascontiguousarray(basis[:, :kk]), "mean": mean,
            "q": np.ascontiguousarray(q[:kk]).reshape((kk,) + x.shape[1:]), "step": step}


def pcas_step(var: float, rel_step: float, coeff_amax: float) -> np.ndarray:
    """float32 [1]: S * rms, raised so the largest coefficient fits int16 (1 for a constant map)."""
    step = max(rel_step * float(np.sqrt(max(var, 0.0))), coeff_amax / 32767.0)
    return np.array([step if step > 0 else 1.0], dtype=np.float32)


def pcas_kept(amax_per_component: np.ndarray) -> int:
    """K': components up to the last one with a nonzero code (components come largest first)."""
    nz = np.flatnonzero(np.asarray(amax_per_component) > 0)
    return int(nz[-1]) + 1 if nz.size else 0


def pcas_decode(parts: dict[str, np.ndarray], shape: tuple) -> np.ndarray:
    cells = int(np.prod(shape[1:]))  # explicit: q may hold no component at all (a constant map)
    q = parts["q"].reshape(parts["q"].shape[0], cells).astype(np.float32) * parts["step"][0]
    return (parts["basis"].astype(np.float32) @ q + parts["mean"][:, None]).reshape(shape)


def _zfpy(tolerance: float = -1.0):
    """numcodecs' ZFPY in fixed-accuracy mode (needs the zfpy package; pin zfpy==1.0.1: numcodecs
    0.16 fails to import with zfpy's '1.0.1.post0' version string)."""
    try:
        from numcodecs.zfpy import ZFPY
    except ImportError:
        raise ValueError("zfp chains need the zfpy package: pip install zfpy==1.0.1") from None
    return ZFPY(tolerance=tolerance)


def zfp_prepare(x: np.ndarray, tolerance: float) -> dict[str, np.ndarray]:
    x = np.asarray(x, dtype=np.float32, order="C")
    amax = float(np.abs(x).max()) if x.size else 0.0
    if not np.isfinite(amax):
        raise ValueError("zfp: non-finite values (NaN/inf)")
    if amax == 0:  # all zero: nothing to store
        return {"data": np.zeros(0, dtype=np.uint8)}
    data = _zfpy(tolerance * amax).encode(x)
    return {"data": np.frombuffer(data, dtype=np.uint8).copy()}


def zfp_decode(parts: dict[str, np.ndarray], shape: tuple) -> np.ndarray:
    if not parts["data"].size:
        return np.zeros(shape, dtype=np.float32)
    out = np.asarray(_zfpy().decode(parts["data"].tobytes()))
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"zfp stream holds shape {out.shape}, header says {shape}")
    return out.astype(np.float32, copy=False)


def _pysz():
    """pysz (SZ3's Python binding); an optional dependency: `pip install kdcache[sz]`."""
    try:
        import pysz
    except ImportError:
        raise ValueError("sz chains need the pysz package: pip install pysz (or kdcache[sz])") from None
    return pysz


def sz_prepare(x: np.ndarray, bound: float) -> dict[str, np.ndarray]:
    x = np.asarray(x, dtype=np.float32, order="C")
    amax = float(np.abs(x).max()) if x.size else 0.0
    if not np.isfinite(amax):
        raise ValueError("sz: non-finite values (NaN/inf)")
    if amax == 0:
        return {"data": np.zeros(0, dtype=np.uint8)}
    pysz = _pysz()
    conf = pysz.szConfig()
    conf.errorBoundMode = pysz.szErrorBoundMode.ABS
    conf.absErrorBound = bound * amax
    data, _ = pysz.sz.compress(x, conf)
    return {"data": np.array(data, dtype=np.uint8)}


def sz_decode(parts: dict[str, np.ndarray], shape: tuple) -> np.ndarray:
    if not parts["data"].size:
        return np.zeros(shape, dtype=np.float32)
    out, _ = _pysz().sz.decompress(np.ascontiguousarray(parts["data"]), np.float32, tuple(shape))
    return np.asarray(out, dtype=np.float32).reshape(shape)
