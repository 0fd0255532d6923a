"""What both store formats share: records, the writer/reader interface, errors, locking, statics.

A cache folder (``<root>``) holds ``manifest.json`` (stores.manifest), ``static/<name>.npz``
(dataset-level arrays: teacher head weights, tower statistics) and one folder per format:
``zarr/`` (stores.zarr_store) and ``wds/`` (stores.wds_store). Both formats hold the very same
blob bytes per target (`encode_record` encodes once; write the EncodedRecord to both writers).

Writers write whole blocks (``manifest.block_records(b)``), data first and a done marker last,
so a crashed or failed block is simply absent and a rerun redoes only the missing blocks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stores.codecs import BlobDecodeError, CodecChain, decode, encode, unpack
from stores.manifest import MANIFEST_NAME, Manifest, atomic_write_bytes, check_compatible

DEFAULT_CHAIN = "raw+zstd"
REBUILD = "python -m pipeline.cache_teacher"
_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StoreError(RuntimeError):
    """Base of the store errors; messages name the file and the fix."""


class StoreWriteError(StoreError):
    """A block could not be written; no done marker was written, so a rerun redoes that block."""


class StoreReadError(StoreError):
    """Stored data is missing, truncated or corrupt; the message names the file and the fix."""


# ------------------------------------------------------------------------------------------------
# records


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


def codec_inputs(name: str, arrays: Mapping[str, Any], num_classes: int | None = None) -> dict[str, Any]:
    """The side inputs of target `name`'s transform, picked from its record's `arrays` (numpy or
    torch): a class map ("cls.{l}") is grouped per anchor by `num_classes` (topk chains); a box /
    quality map ("box.{l}", "quality.{l}") is masked by the class map of its level (mask chains)."""
    family, _, level = name.partition(".")
    if family == "cls":
        return {"classes": num_classes}
    if family in ("box", "quality"):
        return {"score": arrays.get(f"cls.{level}")}
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
) -> EncodedRecord:
    """Encode the target arrays of one (image_id, view) record, once for both formats.

    `codecs` is keyed by target family ("fpn" applies to "fpn.0".."fpn.4") or by exact name;
    targets without an entry use "raw+zstd"; integer arrays are always stored exactly.
    `meta` must be JSON-able; image_id and view are set in it. `num_classes` groups topk class
    maps per anchor (see `codec_inputs`); without it a cell's channels form one group.
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
        inputs = codec_inputs(name, arrays, num_classes)
        if inputs.get("score") is not None:
            inputs["score"] = np.asarray(inputs["score"])
        blobs[name] = encode(np.asarray(arr), chain_for(name, codecs), **inputs)
    return EncodedRecord(int(image_id), str(view), meta, blobs)


def decode_record(rec: EncodedRecord, targets: Iterable[str] | None = None) -> DecodedRecord:
    """Decode every blob (or only those selected by `targets`: names or families)."""
    names = select_names(rec.blobs, targets)
    return DecodedRecord(rec.image_id, rec.view, dict(rec.meta), {n: decode(rec.blobs[n]) for n in names})


def unpack_record(rec: EncodedRecord, targets: Iterable[str] | None = None,
                  defer_delta: bool = False) -> DecodedRecord:
    """Lossless stage only: arrays are `CompactArray`s (parts as stored), for decoding on the
    training device (`stages.distill.device_decode`); `defer_delta`: see `stores.codecs.unpack`."""
    names = select_names(rec.blobs, targets)
    return DecodedRecord(rec.image_id, rec.view, dict(rec.meta),
                         {n: unpack(rec.blobs[n], defer_delta) for n in names})


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


# ------------------------------------------------------------------------------------------------
# locking, manifest, statics


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``<root>/.lock`` (store creation, manifest checks)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_manifest(root: Path, manifest: Manifest) -> None:
    """Write `manifest` into a new cache folder, or check an existing one against it."""
    path = root / MANIFEST_NAME
    if path.exists():
        existing = Manifest.load(path)
        check_compatible(existing, manifest, root)
    else:
        manifest.save(path)


def load_manifest(root: Path) -> Manifest:
    path = root / MANIFEST_NAME
    if not path.exists():
        raise StoreReadError(f"no cache at {root} (no {MANIFEST_NAME}): build it with {REBUILD}")
    try:
        return Manifest.load(path)
    except ValueError as err:
        raise StoreReadError(str(err)) from None


def write_static(root: Path, name: str, arrays: Mapping[str, np.ndarray]) -> None:
    """``<root>/static/<name>.npz`` (np.savez, no pickled objects), written atomically."""
    if not _STATIC_NAME.match(name):
        raise ValueError(f"bad static name {name!r}: letters, digits, '_', '.', '-' only")
    buf = io.BytesIO()
    clean = {}
    for key, arr in arrays.items():
        a = np.asarray(arr)
        if a.dtype == object:
            raise ValueError(f"static {name!r}: array {key!r} has dtype object; store numeric arrays only")
        clean[key] = a
    np.savez(buf, **clean)
    try:
        atomic_write_bytes(root / "static" / f"{name}.npz", buf.getvalue())
    except OSError as err:
        raise StoreWriteError(_write_failure(f"static item {name!r}", root, err, None)) from err


def read_static(root: Path, name: str) -> dict[str, np.ndarray]:
    path = root / "static" / f"{name}.npz"
    if not path.exists():
        have = sorted(p.stem for p in (root / "static").glob("*.npz")) if (root / "static").exists() else []
        raise StoreReadError(
            f"cache {root} has no static item {name!r} (has: {', '.join(have) or 'none'}); "
            f"rebuild the cache with {REBUILD} with that target enabled"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as err:
        raise StoreReadError(
            f"static item {path} is corrupt ({type(err).__name__}: {err}); delete it and rerun {REBUILD}"
        ) from None


def _write_failure(what: str, root: Path, err: OSError, finished: int | None) -> str:
    kept = f"; {finished} finished blocks are kept" if finished is not None else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while writing {what} of {root}: free space and rerun{kept}"
    return f"could not write {what} of {root} ({err}): fix the cause and rerun to redo it{kept}"


def remove_path(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


# ------------------------------------------------------------------------------------------------
# the interface


class CacheWriter(ABC):
    """Writes whole blocks of one format under a cache folder.

    Opening a folder that already holds a manifest checks it against `manifest` (fingerprint,
    plan, block_size, levels) and raises CacheMismatchError naming the first differing field.
    Several writers (processes) may write different blocks of one store at the same time.
    """

    format: str = ""

    def __init__(self, path: str | Path, manifest: Manifest):
        self.root = Path(path)
        self.manifest = manifest
        try:
            with root_lock(self.root):
                ensure_manifest(self.root, manifest)
                self._open_store()
        except OSError as err:
            raise StoreWriteError(_write_failure(f"the {self.format} store", self.root, err, None)) from err

    @abstractmethod
    def _open_store(self) -> None:
        """Create this format's folder if needed (called under the root lock)."""

    @abstractmethod
    def completed_blocks(self) -> set[int]: ...

    @abstractmethod
    def _write_block(self, block: int, records: list[EncodedRecord], digests: dict) -> None:
        """Write the data, then the done marker LAST (holding `digests`)."""

    @abstractmethod
    def _discard_block(self, block: int) -> None:
        """Remove the partial files of a failed block (best effort; must not raise)."""

    def write_block(self, block: int, records: list[EncodedRecord]) -> None:
        """Write block `block` (its records in plan order). A completed block is left alone (no-op).

        On OSError (disk full, ...) raises StoreWriteError and writes no marker: a rerun redoes
        this block only.
        """
        expected = self.manifest.block_records(block)
        got = [(r.image_id, r.view) for r in records]
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise ValueError(
                f"block {block} must hold the plan's records {expected[0]}..{expected[-1]} in order "
                f"({len(expected)} records); got {len(got)} records, first difference at position {first}"
            )
        for r in records:
            sizes = r.meta.get("level_sizes")
            if sizes is not None and len(sizes) != self.manifest.levels:
                raise ValueError(
                    f"image {r.image_id} view {r.view}: meta level_sizes has {len(sizes)} levels, "
                    f"the manifest says {self.manifest.levels}"
                )
        if block in self.completed_blocks():
            return
        digests = {
            "format": self.format,
            "block": block,
            "fingerprint_digest": self.manifest.fingerprint_digest(),
            "records": [blob_digests(r) for r in records],
        }
        try:
            self._write_block(block, records, digests)
        except OSError as err:
            self._discard_block(block)
            finished = len(self.completed_blocks())
            raise StoreWriteError(_write_failure(f"block {block}", self.root, err, finished)) from err

    def write_static(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Dataset-level arrays (teacher head weights, tower stats) as ``static/<name>.npz``."""
        write_static(self.root, name, arrays)

    def missing_blocks(self) -> list[int]:
        done = self.completed_blocks()
        return [b for b in range(self.manifest.num_blocks()) if b not in done]

    def close(self) -> None:  # noqa: B027 (optional hook, nothing to flush by default)
        """Nothing to flush (every block is complete on return); for symmetry and `with`."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CacheReader(ABC):
    """Random access to the completed records of one format of a cache folder."""

    format: str = ""

    def __init__(self, path: str | Path):
        self.root = Path(path)
        self.manifest: Manifest = load_manifest(self.root)
        self._index = self.manifest.record_index()
        self._completed: set[int] = set()
        self.refresh()

    def refresh(self) -> None:
        """Re-scan which blocks are complete (a cache may grow while it is read)."""
        self._completed = self._scan_completed()

    @abstractmethod
    def _scan_completed(self) -> set[int]: ...

    def completed_blocks(self) -> set[int]:
        return set(self._completed)

    def keys(self) -> list[tuple[int, str]]:
        """(image_id, view) of every completed record, in plan order."""
        out = []
        for b in sorted(self._completed):
            out.extend(self.manifest.block_records(b))
        return out

    def __len__(self) -> int:
        return sum(len(self.manifest.block_records(b)) for b in self._completed)

    def __contains__(self, key: tuple[int, str]) -> bool:
        r = self._index.get((int(key[0]), str(key[1])))
        return r is not None and r // self.manifest.block_size in self._completed

    def locate(self, image_id: int, view: str) -> tuple[int, int]:
        """(record number, block) of a completed record; KeyError / StoreReadError otherwise."""
        r = self._index.get((int(image_id), str(view)))
        if r is None:
            raise KeyError(f"image {image_id} view {view} is not in the plan of cache {self.root}")
        b = r // self.manifest.block_size
        if b not in self._completed:
            self.refresh()
            if b not in self._completed:
                raise StoreReadError(
                    f"image {image_id} view {view} is in block {b}, which is not written yet in "
                    f"{self.root / self.format}: rerun {REBUILD} to complete the cache"
                )
        return r, b

    @abstractmethod
    def get_encoded(self, image_id: int, view: str, targets: Iterable[str] | None = None) -> EncodedRecord:
        """The stored blobs of one record (all, or those selected by target names / families)."""

    def get(self, image_id: int, view: str, targets: Iterable[str] | None = None,
            compact: bool = False, defer_delta: bool = False) -> DecodedRecord:
        """One record, decoded to numpy maps (the reference decode), or with ``compact=True`` only
        unpacked (lossless stage): arrays are `CompactArray`s for decoding on the training device
        (``defer_delta``: index parts stay delta-coded for the device's cumsum, `stores.codecs.unpack`)."""
        rec = self.get_encoded(image_id, view, targets)
        try:
            return unpack_record(rec, defer_delta=defer_delta) if compact else decode_record(rec)
        except BlobDecodeError as err:
            raise StoreReadError(
                f"image {image_id} view {view}: a stored blob does not decode ({err}) in "
                f"{self.describe_location(image_id, view)}; {self.fix_hint(image_id, view)}"
            ) from None

    def describe_location(self, image_id: int, view: str) -> str:
        return str(self.root / self.format)

    def fix_hint(self, image_id: int, view: str) -> str:
        return f"rerun {REBUILD} after deleting the damaged block"

    def read_static(self, name: str) -> dict[str, np.ndarray]:
        return read_static(self.root, name)

    def static_names(self) -> list[str]:
        d = self.root / "static"
        return sorted(p.stem for p in d.glob("*.npz")) if d.exists() else []

    def __iter__(self) -> Iterator[DecodedRecord]:
        for image_id, view in self.keys():
            yield self.get(image_id, view)
