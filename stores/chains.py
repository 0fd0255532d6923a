"""Codec chain grammar: ``"<transform>+<lossless>"`` strings, parsed into `CodecChain` values.

What each transform does to an array is in `stores.codecs` and `stores.transforms`, the blob framing in
`stores.blob_schema`; this module only names the chains and checks their parameters (so params can
be validated before any work).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

TRANSFORMS = ("raw", "fp16", "bitround", "int8c", "sparse", "u8p", "topk", "mask", "pca", "pcas", "cpca", "zfp", "sz")
HOST_TRANSFORMS = ("zfp", "sz")  # computed by `pack` on the host (no torch encoder / decoder)
INDEXED = ("sparse", "topk", "mask")  # transforms whose "idx" part is delta-filtered
# pco: pcodec (numcodecs.PCodec), 16-bit+ parts; bzstd / blz4: blosc bit-shuffle + zstd / LZ4HC, lz4:
# blosc byte-shuffle + LZ4HC, more bytes but faster to decode (stores.lossless has the measured trade)
LOSSLESS = ("zstd", "blosc", "pco", "bzstd", "blz4", "lz4", "none")

CODEC_CHAINS_FOR_BENCH = [
    "raw+none",
    "raw+zstd",
    "raw+blosc",
    "fp16+zstd",
    "fp16+blosc",
    "bitround10+zstd",
    "bitround7+zstd",
    "bitround7+blosc",
    "int8c+zstd",
    "int8c+blosc",
    "u8p+zstd",
    "sparse0.01+zstd",
    "sparse0.05+zstd",
]

_VALID_FORMS = (
    "'<transform>+<lossless>' with transform one of raw, fp16, bitroundN (N = 1..23 mantissa bits), "
    "int8c, sparseT (0 < T <= 1), u8p, topkKfF (K >= 1 classes per anchor, 0 < F < 1), topkKfFpP (the floor "
    "fitted per cache, >= F, so that a share P of the class elements pass it), maskT (0 <= T <= 1), "
    "pcaK (K >= 1), pcaKsS (K >= 1, S > 0), cpcaKsS (K >= 1, S > 0: the cache's own basis), zfpT (0 < T < 1), szT (0 < T < 1) and lossless one of zstd, blosc, "
    "pco, bzstd, blz4, lz4, none; e.g. 'fp16+zstd', 'int8c+zstd', 'topk2f0.01+zstd', 'mask0.05+zstd', 'pca64s0.3+pco'"
)

@dataclass(frozen=True)
class CodecChain:
    """A parsed chain. ``param`` is N for bitround, T for sparse / mask / zfp / sz, K for pca, (K, F)
    for topk ((K, F, P) for topkKfFpP, whose floor stage 1 fits per cache: blobs are written with the
    resolved (K, floor) chain), (K, S) for pcas (written pcaKsS) and cpca (cpcaKsS), None otherwise."""

    transform: str
    lossless: str
    param: float | int | tuple | None = None

    @property
    def spec(self) -> str:
        """Canonical string form (``parse_chain(c.spec) == c``)."""
        if self.transform == "bitround":
            head = f"bitround{self.param}"
        elif self.transform in ("sparse", "mask", "zfp", "sz"):
            head = f"{self.transform}{self.param:g}"
        elif self.transform == "pca":
            head = f"pca{self.param}"
        elif self.transform == "topk":
            head = f"topk{self.param[0]}f{self.param[1]:g}" + (f"p{self.param[2]:g}" if len(self.param) > 2 else "")
        elif self.transform == "pcas":
            head = f"pca{self.param[0]}s{self.param[1]:g}"
        elif self.transform == "cpca":
            head = f"cpca{self.param[0]}s{self.param[1]:g}"
        else:
            head = self.transform
        return f"{head}+{self.lossless}"

    @property
    def lossy(self) -> bool:
        return self.transform != "raw"

    def __str__(self) -> str:
        return self.spec


_RE_BITROUND = re.compile(r"^bitround(\d+)$")
_NUM = r"((?:\d+\.?\d*|\.\d+)(?:e-?\d+)?)"
_RE_SPARSE = re.compile(r"^sparse" + _NUM + "$")
_RE_TOPK = re.compile(r"^topk(\d+)f" + _NUM + "(?:p" + _NUM + ")?$")
_RE_MASK = re.compile(r"^mask" + _NUM + "$")
_RE_ZFP = re.compile(r"^zfp" + _NUM + "$")
_RE_PCA = re.compile(r"^pca(\d+)$")
_RE_PCAS = re.compile(r"^(c?)pca(\d+)s" + _NUM + "$")
_RE_SZ = re.compile(r"^sz" + _NUM + "$")


def parse_chain(spec: str | CodecChain) -> CodecChain:
    """Parse ``"<transform>+<lossless>"``; ValueError naming the bad spec and the valid forms."""
    if isinstance(spec, CodecChain):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"bad codec chain {spec!r}: expected a string {_VALID_FORMS}")
    text = spec.strip().lower()
    head, sep, lossless = text.partition("+")
    if not sep or "+" in lossless or lossless not in LOSSLESS:
        raise ValueError(f"bad codec chain {spec!r}: expected {_VALID_FORMS}")
    if head in ("raw", "fp16", "int8c", "u8p"):
        return CodecChain(head, lossless)
    m = _RE_BITROUND.match(head)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= 23:
            raise ValueError(f"bad codec chain {spec!r}: bitround keeps 1..23 mantissa bits, got {n}")
        return CodecChain("bitround", lossless, n)
    m = _RE_SPARSE.match(head)
    if m:
        t = float(m.group(1))
        if not 0.0 < t <= 1.0 or not math.isfinite(t):
            raise ValueError(f"bad codec chain {spec!r}: sparse threshold must be in (0, 1], got {t}")
        return CodecChain("sparse", lossless, t)
    return _parse_compact(spec, head, lossless)


def _parse_compact(spec: str, head: str, lossless: str) -> CodecChain:
    """The compact transforms (topk, mask, pca, pcas, zfp, sz)."""
    m = _RE_TOPK.match(head)
    if m:
        k, f = int(m.group(1)), float(m.group(2))
        if k < 1 or not 0.0 < f < 1.0:
            raise ValueError(f"bad codec chain {spec!r}: topkKfF needs K >= 1 and 0 < F < 1, got K={k}, F={f}")
        if m.group(3) is None:
            return CodecChain("topk", lossless, (k, f))
        share = float(m.group(3))  # topkKfFpP: the floor is fitted per cache (stores.cache_basis.class_floor)
        if not 0.0 < share < 1.0:
            raise ValueError(f"bad codec chain {spec!r}: topkKfFpP needs 0 < P < 1 (the share of class elements a "
                             f"cache keeps above its floor), got P={share}")
        return CodecChain("topk", lossless, (k, f, share))
    m = _RE_MASK.match(head)
    if m:
        t = float(m.group(1))
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"bad codec chain {spec!r}: mask threshold must be in [0, 1], got {t}")
        return CodecChain("mask", lossless, t)
    m = _RE_PCA.match(head)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise ValueError(f"bad codec chain {spec!r}: pca keeps K >= 1 components, got {k}")
        return CodecChain("pca", lossless, k)
    m = _RE_PCAS.match(head)
    if m:  # pcaKsS: a basis per map, in the blob; cpcaKsS: one basis per cache (stores.cache_basis)
        name, k, s = "cpca" if m.group(1) else "pcas", int(m.group(2)), float(m.group(3))
        if k < 1 or not 0.0 < s < 1e3:
            raise ValueError(f"bad codec chain {spec!r}: {m.group(1)}pcaKsS needs K >= 1 and 0 < S < 1000, got K={k}, S={s}")
        return CodecChain(name, lossless, (k, s))
    for regex, name, what in ((_RE_SZ, "sz", "sz error bound"), (_RE_ZFP, "zfp", "zfp tolerance")):
        m = regex.match(head)  # error-bounded float coders: one bound relative to max|x|
        if m:
            t = float(m.group(1))
            if not 0.0 < t < 1.0:
                raise ValueError(f"bad codec chain {spec!r}: {what} (relative to max|x|) must be in (0, 1)")
            return CodecChain(name, lossless, t)
    raise ValueError(f"bad codec chain {spec!r}: unknown transform {head!r}; expected {_VALID_FORMS}")


def effective_chain(array: np.ndarray, chain: CodecChain | str) -> CodecChain:
    """The chain actually used for `array`: non-float arrays are forced to ``raw`` (exact)."""
    chain = parse_chain(chain)
    if chain.transform != "raw" and not np.issubdtype(np.asarray(array).dtype, np.floating):
        return CodecChain("raw", chain.lossless)
    return chain
