"""Records: one (image, view)'s target arrays, encoded once into blobs for both store formats.

`encode_record` picks each target's codec chain (`chain_for`) and side inputs (`codec_inputs`) and
encodes it (`stores.codecs`); `decode_record` / `unpack_record` undo that (the numpy reference, or the
lossless stage only for decoding on the training device). `blob_digests` is what done markers and
sidecars record of a record. Re-exported by `stores.base`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stores.cache_basis import CacheBases, attach_basis
from stores.codecs import CodecChain, decode, encode, unpack

DEFAULT_CHAIN = "raw+zstd"


@dataclass(frozen=True)
class EncodedRecord:
    image_id: int
    view: str
    meta: dict
    blobs: dict[str, bytes]  # target name -> codecs blob


@dataclass(frozen=True)
class DecodedRecord:
    """A decoded record; also readable as a mapping: rec["meta"], rec["arrays"]."""

    image_id: int
    view: str
    meta: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if key in ("image_id", "view", "meta", "arrays"):
            return getattr(self, key)
        raise KeyError(key)

    def keys(self) -> tuple[str, ...]:
        return ("image_id", "view", "meta", "arrays")


def target_family(name: str) -> str:
    """'fpn.3' -> 'fpn', 'det.boxes' -> 'det', 'cand.index' -> 'cand'."""
    return name.split(".", 1)[0]


def chain_for(name: str, codecs: Mapping[str, CodecChain | str] | None) -> CodecChain | str:
    """The chain of target `name`: an entry for the exact name, else for its family, else raw+zstd."""
    codecs = codecs or {}
    if name in codecs:
        return codecs[name]
    return codecs.get(target_family(name), DEFAULT_CHAIN)


def codec_inputs(name: str, arrays: Mapping[str, Any], num_classes: int | None = None,
                 bases: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The side inputs of target `name`'s transform, picked from its record's `arrays` (numpy or
    torch): a class map ("cls.{l}") is grouped per anchor by `num_classes` (topk chains); a box /
    quality map ("box.{l}", "quality.{l}") is masked by the class map of its level (mask chains);
    a map with an entry in `bases` (the cache's, by target name) is coded against it (cpca chains)."""
    family, _, level = name.partition(".")
    if family == "cls":
        return {"classes": num_classes}
    if family in ("box", "quality"):
        return {"score": arrays.get(f"cls.{level}")}
    if bases is not None and name in bases:
        return {"basis": bases[name]}
    return {}


def meta_bytes(meta: Mapping) -> bytes:
    """Canonical JSON bytes of a record's meta (what both formats store, and hash)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def encode_record(
    image_id: int,
    view: str,
    meta: Mapping,
    arrays: Mapping[str, np.ndarray],
    codecs: Mapping[str, CodecChain | str] | None = None,
    num_classes: int | None = None,
    bases: Mapping[str, np.ndarray] | None = None,
) -> EncodedRecord:
    """Encode the target arrays of one (image_id, view) record, once for both formats.

    `codecs` is keyed by target family ("fpn" applies to "fpn.0".."fpn.4") or by exact name;
    targets without an entry use "raw+zstd"; integer arrays are always stored exactly.
    `meta` must be JSON-able; image_id and view are set in it. `num_classes` groups topk class
    maps per anchor (see `codec_inputs`); without it a cell's channels form one group. `bases`:
    the cache's PCA bases by target name, for cpca chains (`stores.cache_basis`).
    """
    meta = {**dict(meta), "image_id": int(image_id), "view": str(view)}
    try:
        meta_bytes(meta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"record meta of image {image_id} view {view} is not JSON-able: {err}") from None
    blobs = {}
    for name, arr in arrays.items():
        if not name or "/" in name or name.startswith("_"):
            raise ValueError(f"bad target name {name!r}: use e.g. 'fpn.0', 'det.boxes'")
        inputs = codec_inputs(name, arrays, num_classes, bases)
        if inputs.get("score") is not None:
            inputs["score"] = np.asarray(inputs["score"])
        blobs[name] = encode(np.asarray(arr), chain_for(name, codecs), **inputs)
    return EncodedRecord(int(image_id), str(view), meta, blobs)


def decode_record(rec: EncodedRecord, targets: Iterable[str] | None = None,
                  bases: CacheBases | None = None) -> DecodedRecord:
    """Decode every blob (or only those selected by `targets`: names or families); `bases`: the
    cache's PCA bases, which cpca blobs need (`CacheReader.codec_bases`)."""
    names = select_names(rec.blobs, targets)
    return DecodedRecord(rec.image_id, rec.view, dict(rec.meta), {n: decode(rec.blobs[n], bases) for n in names})


def unpack_record(rec: EncodedRecord, targets: Iterable[str] | None = None,
                  defer_delta: bool = False, bases: CacheBases | None = None) -> DecodedRecord:
    """Lossless stage only: arrays are `CompactArray`s (parts as stored), for decoding on the
    training device (`stages.distill.device_decode`); `defer_delta`: see `stores.codecs.unpack`;
    `bases`: attached to cpca blobs as in `decode_record`."""
    names = select_names(rec.blobs, targets)
    return DecodedRecord(rec.image_id, rec.view, dict(rec.meta),
                         {n: attach_basis(unpack(rec.blobs[n], defer_delta), bases) for n in names})


# config-level target names (CacheParams.targets, KDLosses.needs()) -> record families
TARGET_ALIASES = {"detections": "det", "candidates": "cand", "tower_stats": "tower"}


def wanted_families(targets: Iterable[str]) -> set[str]:
    """Families selected by `targets` (names like 'fpn.0', families like 'fpn', or aliases)."""
    out = set()
    for t in targets:
        out.add(TARGET_ALIASES.get(t, target_family(t)))
    return out


def select_names(names: Iterable[str], targets: Iterable[str] | None) -> list[str]:
    """The target names selected by `targets`: exact names ('fpn.0'), families ('fpn') or the
    config-level aliases ('detections' -> det.*, 'candidates' -> cand.*, 'tower_stats' -> tower.*)."""
    names = list(names)
    if targets is None:
        return names
    wanted = set(targets)
    families = {TARGET_ALIASES.get(t, t) for t in wanted}
    return [n for n in names if n in wanted or target_family(n) in families]


def blob_digests(rec: EncodedRecord) -> dict:
    """The checksum entry of one record in a done marker / sidecar."""
    return {
        "image_id": rec.image_id,
        "view": rec.view,
        "meta_sha256": hashlib.sha256(meta_bytes(rec.meta)).hexdigest(),
        "sha256": {n: hashlib.sha256(b).hexdigest() for n, b in sorted(rec.blobs.items())},
        "bytes": {n: len(b) for n, b in sorted(rec.blobs.items())},
    }


def record_key(image_id: int, view: str) -> str:
    """The WebDataset sample key of a record."""
    return f"{int(image_id):012d}_{view}"
