"""One PCA basis per cache, for the ``cpcaKsS`` feature chain (transform coding with a shared basis).

``pcaKsS`` fits a channel basis to every map and stores it in the record: at 800x1344 that is
C x K float16 per level (139 KB per record on a 256-channel FPN at K = 64), and at demo size it
costs about as much as the codes it explains. ``cpcaKsS`` fits the basis once per cache instead,
from a sample of the teacher's maps, and stores it once:

- **Fit** (`BasisFit`): per target name (``fpn.0`` .. ``fpn.4``), the scatter matrix of the maps'
  cells after removing each map's own channel mean (the encoder removes it too, and stores it per
  map), summed over the sample in float64. The basis is its top-K eigenvectors, largest first, each
  column's sign fixed so its largest-magnitude entry is positive, cast to float16: [C, min(K, C)].
- **Storage**: ``static/codec_basis.npz`` (one array per target name; np.savez, no pickle), its
  sha256 recorded in the manifest's ``statics`` next to the teacher head's, so `stores.verify`
  checks it and a resumed run reuses it rather than refitting.
- **Blobs** carry ``bid`` (uint8 [8]): the first 8 bytes of the sha256 of the basis' shape and
  float16 bytes. A reader attaches the basis with that id (`CacheBases.attach`); a blob is never
  decoded against another cache's basis, and one read without its basis raises an error that says so.
- **Code** (`cpca_prepare`, same arithmetic as ``pcaKsS`` but for the fixed basis B):
  ``mean`` = the map's channel mean (float32 [C]); ``coeff = B.float32^T @ (x - mean)``;
  ``step = pcas_step(var, S, max|coeff|)`` with var the map's mean channel variance (S x rms);
  ``q = round(coeff / step)`` int16; trailing all-zero components are dropped (K' <= K).
  Decoded ``B[:, :K'] @ (q * step) + mean`` (`stores.transforms.pcas_decode` once attached).

With K = C nothing is truncated: the shared basis is then a fixed orthogonal transform and the
quantiser step alone sets the error. With K < C, energy outside the cache's subspace is dropped;
the fidelity tables say where that matters.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from stores.blob_schema import BlobDecodeError
from stores.narrow_codes import code_rows
from stores.transforms import _cells_matrix, pcas_kept, pcas_step

BASIS_STATIC = "codec_basis"  # static/<name>.npz of a cache whose codecs use a cpca chain
NEEDS_BASIS = ("a cpca blob is coded against its cache's PCA basis (static/codec_basis.npz): read it through "
               "the cache's reader (stores.open_reader), which attaches it")


def basis_id(basis: np.ndarray) -> np.ndarray:
    """uint8 [8]: the first 8 bytes of sha256(shape, float16 little-endian bytes) of a basis."""
    b = np.ascontiguousarray(basis, dtype="<f2")
    return np.frombuffer(hashlib.sha256(repr(b.shape).encode() + b.tobytes()).digest()[:8], np.uint8).copy()


class BasisFit:
    """Streaming fit of one basis per target name from sample maps (numpy or torch, [C, ...])."""

    def __init__(self) -> None:
        self._scatter: dict[str, np.ndarray] = {}
        self.cells: dict[str, int] = {}

    def add(self, name: str, x: Any) -> None:
        if hasattr(x, "double"):  # a torch tensor: the product runs on its device, in float64
            flat = x.detach().reshape(x.shape[0], -1).double()
            centred = flat - flat.mean(dim=1, keepdim=True)
            scatter = (centred @ centred.T).cpu().numpy()
        else:
            flat = np.asarray(x, dtype=np.float64).reshape(np.shape(x)[0], -1)
            centred = flat - flat.mean(axis=1, keepdims=True)
            scatter = centred @ centred.T
        if not np.all(np.isfinite(scatter)):
            raise ValueError(f"cpca basis fit: {name} has non-finite values (NaN/inf): the teacher diverged?")
        if name in self._scatter and self._scatter[name].shape != scatter.shape:
            raise ValueError(f"cpca basis fit: {name} has {scatter.shape[0]} channels, earlier maps "
                             f"{self._scatter[name].shape[0]}")
        self._scatter[name] = self._scatter.get(name, 0) + scatter
        self.cells[name] = self.cells.get(name, 0) + flat.shape[1]

    def bases(self, k: int) -> dict[str, np.ndarray]:
        """{name: float16 [C, min(k, C)]}: the top-k eigenvectors of each name's scatter matrix."""
        out = {}
        for name, scatter in self._scatter.items():
            _, vecs = np.linalg.eigh(scatter)
            kk = min(int(k), scatter.shape[0])
            basis = vecs[:, ::-1][:, :kk]
            sign = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(kk)])
            sign[sign == 0] = 1
            out[name] = np.ascontiguousarray((basis * sign).astype(np.float16))
        return out


def cpca_prepare(x: np.ndarray, basis: np.ndarray | None, rel_step: float) -> dict[str, np.ndarray]:
    """The numpy reference encoder (see the module docstring)."""
    if basis is None:
        raise ValueError("cpca: no cache basis for this map: the chain needs the basis fitted by "
                         "python -m pipeline.cache_teacher (static/codec_basis.npz)")
    x, flat = _cells_matrix(x)
    basis = np.asarray(basis)
    if basis.dtype != np.float16 or basis.ndim != 2 or basis.shape[0] != flat.shape[0]:
        raise ValueError(f"cpca: basis {basis.dtype} {basis.shape} does not fit a map of {flat.shape[0]} channels")
    mean = flat.mean(axis=1, dtype=np.float64) if flat.shape[1] else np.zeros(flat.shape[0])
    centred = flat - mean.astype(np.float32)[:, None]
    var = float((centred.astype(np.float64) ** 2).mean()) if centred.size else 0.0
    coeff = basis.astype(np.float32).T @ centred
    step = pcas_step(var, rel_step, float(np.abs(coeff).max()) if coeff.size else 0.0)
    q = np.round(coeff / step).astype(np.int16)
    kk = pcas_kept(np.abs(q).max(axis=1) if q.size else np.zeros(q.shape[0], np.int16))
    return {"mean": mean.astype(np.float32), "q": np.ascontiguousarray(q[:kk]).reshape((kk,) + x.shape[1:]),
            "step": step, "bid": basis_id(basis)}


class CacheBases:
    """A cache's bases by id, attached to its cpca blobs as they are read (float16 [C, K'] views
    of one array per target, made contiguous once per K')."""

    def __init__(self, named: Mapping[str, np.ndarray]):
        self.by_name = {n: np.asarray(b) for n, b in named.items()}
        self._by_id = {basis_id(b).tobytes(): b for b in self.by_name.values()}
        self._sliced: dict[tuple[bytes, int], np.ndarray] = {}

    def basis_for(self, bid: np.ndarray, kk: int) -> np.ndarray:
        key = (np.asarray(bid, np.uint8).tobytes(), int(kk))
        if key not in self._sliced:
            basis = self._by_id.get(key[0])
            if basis is None:
                raise BlobDecodeError(f"cpca blob names basis {key[0].hex()}, which this cache's "
                                      "static/codec_basis.npz does not hold (a blob from another cache?)")
            if kk > basis.shape[1]:
                raise BlobDecodeError(f"cpca blob has {kk} components, its basis {basis.shape[1]}")
            self._sliced[key] = np.ascontiguousarray(basis[:, :kk])
        return self._sliced[key]

    def attach(self, c):
        """A `stores.codecs.CompactArray` with its basis attached (others are returned as they are)."""
        if not c.chain.startswith("cpca") or "basis" in c.parts:
            return c
        return dataclasses.replace(c, parts={**c.parts, "basis": self.basis_for(c.parts["bid"], code_rows(c.parts))})


def attach_basis(c, bases: CacheBases | None):
    """`CacheBases.attach`, or `c` unchanged without bases (decoding a cpca blob then says why it fails)."""
    return c if bases is None else bases.attach(c)


# ---------------------------------------------------------------- per-cache class floor (topkKfFpP)
#
# ``topkKfF`` keeps an anchor's classes >= F, a constant: a teacher that is less sure on a cache's
# images (real photos leave more classes above 0.015 than synthetic renders) keeps more elements and
# its class maps grow (bytes ~ kept elements). ``topkKfFpP`` instead fits the floor to the cache, as
# cpca fits its basis: over the `cache.basis_images` sample, the smallest floor >= F that a share of at
# most P of the class elements reach (its value rounded UP to 4 significant digits, so the share
# stays <= P). Stage 1 stores it in ``static/class_floor.npz`` (one float64 [1] per family; sha256 in
# the manifest's statics) and writes every blob with the resolved chain ``topkKf<floor>``: each blob
# names its own floor, so readers decode it as any topkKfF blob, and caches written before this
# chain existed read as they always did.

CLASS_FLOOR_STATIC = "class_floor"
_FLOOR_EDGES = 4096  # geometric histogram edges from F to 1: the floor is found to 0.1 % of its value


def class_floor_chains(codecs: Mapping[str, Any]) -> dict[str, Any]:
    """{family: chain} of the families whose chain is topkKfFpP (a floor to fit per cache)."""
    from stores.chains import parse_chain

    out = {}
    for family, spec in codecs.items():
        chain = parse_chain(spec)
        if chain.transform == "topk" and len(chain.param) > 2:
            out[family] = chain
    return out


class ClassFloorFit:
    """Streaming histogram of class probabilities (numpy or torch [C, ...]) above a minimum floor."""

    def __init__(self, floor_min: float):
        if not 0.0 < floor_min < 1.0:
            raise ValueError(f"class floor fit: minimum floor must be in (0, 1), got {floor_min}")
        self.edges = np.geomspace(floor_min, 1.0, _FLOOR_EDGES)
        self.counts = np.zeros(_FLOOR_EDGES, np.int64)  # counts[i]: elements in [edges[i], edges[i + 1])
        self.total = 0

    def add(self, x: Any) -> None:
        v = np.asarray(x.detach().float().cpu() if hasattr(x, "detach") else x, dtype=np.float32).ravel()
        if not np.all(np.isfinite(v)):
            raise ValueError("class floor fit: the class maps have non-finite values (NaN/inf): the teacher diverged?")
        bins = np.searchsorted(self.edges, v, side="right") - 1  # -1: below the minimum floor
        self.counts += np.bincount(bins[bins >= 0], minlength=_FLOOR_EDGES)[:_FLOOR_EDGES]
        self.total += v.size

    def floor(self, share: float) -> float:
        """The smallest edge that at most `share` of the elements reach, rounded up to 4 significant digits
        (the histogram's resolution, 0.17 % per edge at F = 0.001; the chain spec prints it exactly)."""
        if self.total == 0:
            raise ValueError("class floor fit: no class maps were sampled")
        reach = np.cumsum(self.counts[::-1])[::-1]  # reach[i]: elements >= edges[i]
        ok = np.flatnonzero(reach <= share * self.total)
        edge = float(self.edges[ok[0]]) if ok.size else 1.0
        floor = float(f"{edge:.4g}")
        if floor < edge:  # rounding went down: one unit up in the fourth significant digit
            floor = float(f"{floor + 10 ** (np.floor(np.log10(edge)) - 3):.4g}")
        return min(max(floor, float(self.edges[0])), 0.999)


def resolve_class_chains(codecs: Mapping[str, Any], floors: Mapping[str, float] | None) -> dict[str, Any]:
    """`codecs` ({family: CodecChain}) with every topkKfFpP chain replaced by topkKf<its fitted floor>;
    without a fitted floor for it, ValueError (a blob must never be written with an unresolved floor)."""
    from stores.chains import CodecChain, parse_chain

    out = {}
    for family, spec in codecs.items():
        chain = parse_chain(spec)
        if chain.transform == "topk" and len(chain.param) > 2:
            if not floors or family not in floors:
                raise ValueError(f"codec {chain.spec} for {family!r} needs the cache's fitted class floor "
                                 f"(static/{CLASS_FLOOR_STATIC}.npz, written by python -m pipeline.cache_teacher)")
            chain = CodecChain("topk", chain.lossless, (chain.param[0], float(floors[family])))
        out[family] = chain
    return out
