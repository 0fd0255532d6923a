"""What both store formats share: the writer/reader interface, errors, locking, statics (and the
record API of `stores.records`, re-exported here).

A cache folder (``<root>``) holds ``manifest.json`` (stores.manifest), ``static/<name>.npz``
(dataset-level arrays: teacher head weights, tower statistics, the cpca chains' PCA bases
`stores.cache_basis`) and one folder per format:
``zarr/`` (stores.zarr_store) and ``wds/`` (stores.wds_store). Both formats hold the very same
blob bytes per target (`encode_record` encodes once; write the EncodedRecord to both writers).

Writers write whole blocks (``manifest.block_records(b)``), data first and a done marker last,
so a crashed or failed block is simply absent and a rerun redoes only the missing blocks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from stores.cache_basis import BASIS_STATIC, CacheBases
from stores.codecs import BlobDecodeError
from stores.manifest import MANIFEST_NAME, Manifest, atomic_write_bytes, check_compatible, sha256_file
from stores.records import (  # noqa: F401  (re-exported: the record API predates the split)
    DEFAULT_CHAIN,
    TARGET_ALIASES,
    DecodedRecord,
    EncodedRecord,
    blob_digests,
    chain_for,
    codec_inputs,
    decode_record,
    encode_record,
    meta_bytes,
    record_key,
    select_names,
    target_family,
    unpack_record,
    wanted_families,
)
from stores.url import as_path, is_remote, remove_tree, write_new

REBUILD = "python -m pipeline.cache_teacher"
_STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StoreError(RuntimeError):
    """Base of the store errors; messages name the file and the fix."""


class StoreWriteError(StoreError):
    """A block could not be written; no done marker was written, so a rerun redoes that block."""


class StoreReadError(StoreError):
    """Stored data is missing, truncated or corrupt; the message names the file and the fix."""


# ------------------------------------------------------------------------------------------------
# locking, manifest, statics


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``<root>/.lock`` (store creation, manifest checks) on a local
    disk. An object store has no locks: there every creation step is a conditional or idempotent
    write (`ensure_manifest`, `stores.zarr_layout`), and none is taken."""
    if is_remote(root):
        yield
        return
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
    if is_remote(root):  # no lock: create-if-absent, and whoever lost the race checks the winner's
        if write_new(path, json.dumps(manifest.to_dict(), indent=1, sort_keys=True).encode()):
            return
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


def load_codec_bases(root: Path, manifest: Manifest) -> CacheBases | None:
    """static/codec_basis.npz as `CacheBases`, if the manifest records one (its sha256 checked)."""
    want = manifest.statics.get(BASIS_STATIC)
    if not want:
        return None
    path = as_path(root) / "static" / f"{BASIS_STATIC}.npz"
    if path.exists() and sha256_file(path) != want:
        raise StoreReadError(f"{path} does not match the sha256 its manifest records (damaged or replaced): the "
                             f"cache's cpca feature maps cannot be decoded without it; rebuild with {REBUILD} --overwrite")
    return CacheBases(read_static(as_path(root), BASIS_STATIC))


def read_static(root: Path, name: str) -> dict[str, np.ndarray]:
    path = root / "static" / f"{name}.npz"
    if not path.exists():
        have = sorted(p.stem for p in (root / "static").glob("*.npz")) if (root / "static").exists() else []
        raise StoreReadError(
            f"cache {root} has no static item {name!r} (has: {', '.join(have) or 'none'}); "
            f"rebuild the cache with {REBUILD} with that target enabled"
        )
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
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
    if is_remote(path):
        remove_tree(path)
        return
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
        self.root = as_path(path)
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
        self.root = as_path(path)
        self.manifest: Manifest = load_manifest(self.root)
        self._index = self.manifest.record_index()
        self._completed: set[int] = set()
        self.refresh()

    def pin(self, manifest: Manifest) -> None:
        """Read `manifest`, an earlier dataset version of this cache (`Manifest.load_version`), instead
        of the latest: only its plan's blocks are listed and read."""
        self.manifest = manifest
        self._index = manifest.record_index()
        self.refresh()

    def refresh(self) -> None:
        """Re-scan which blocks are complete (a cache may grow while it is read). Only blocks of this
        reader's manifest count: blocks a writer appends later belong to a newer version."""
        n = self.manifest.num_blocks()
        self._completed = {b for b in self._scan_completed() if b < n}

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
        bases = self.codec_bases()
        try:
            return (unpack_record(rec, defer_delta=defer_delta, bases=bases) if compact
                    else decode_record(rec, bases=bases))
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

    def codec_bases(self) -> CacheBases | None:
        """The cache's PCA bases (cpca chains), read once and checked against the manifest's sha256;
        None for a cache without them."""
        if not hasattr(self, "_bases"):
            self._bases = load_codec_bases(self.root, self.manifest)
        return self._bases

    def static_names(self) -> list[str]:
        d = self.root / "static"
        return sorted(p.stem for p in d.glob("*.npz")) if d.exists() else []

    def __iter__(self) -> Iterator[DecodedRecord]:
        for image_id, view in self.keys():
            yield self.get(image_id, view)
