"""The cache manifest: what a cache was built from (fingerprint), its plan and its block split.

``<root>/manifest.json`` is shared by both store formats under one cache folder. A cache is
reusable only by a run that asks for the same fingerprint, plan and block size; anything else
is refused with a `CacheMismatchError` that names the first differing field, so nobody trains a
student on targets from another teacher, dataset, view set or codec choice.

Fingerprint fields (all compared): ``schema_version``, ``teacher_weights`` (sha256 of the
checkpoint file), ``teacher_arch`` (dict), ``dataset`` (dict, e.g. CocoDataset.fingerprint()),
``views`` (list of view dicts), ``targets`` (list of target families), ``codecs`` (dict family ->
chain). Extra keys are allowed and compared too. ``meta`` (created_at, host, ...) is free
information and never compared.

Content that changes image by image is fingerprinted per block instead (``block_fingerprints``,
one digest per block of the plan: the block's images' bytes, entries and annotations), outside
the fingerprint and its digest: fixing one image makes only its block stale, and a rerun
recomputes that block alone while every other block, and the stores' recorded digest, stay valid.
``statics`` records the sha256 of each ``static/<name>.npz`` so verify can check them.
``dropped`` lists images the dataset no longer holds: their records keep their place in the plan
as empty placeholders, so deleting an image moves no block (only the block that held it changes);
new images' records are appended after the plan, in new blocks.

Versioning: ``versions`` lists each dataset version the cache has held (version number, sha256 of
the dataset json, records, blocks, dropped images); a run of stage 1 whose json changed what the
cache holds adds one. `Manifest.publish` writes the version's whole manifest first as
``versions/v<NNNNNN>.json`` with a conditional create (``If-None-Match: *`` on S3, ``O_EXCL`` on
disk), then ``manifest.json`` (the latest version) whole: two writers recording the same version
number with different content cannot both succeed (the loser gets `ManifestVersionConflict`),
and a reader that pinned version N reads ``versions/v<N>.json``, which never changes.

A destructive flag removes only what it recognises: `check_cache_folder` / `remove_store` delete a
folder only when it holds a kdcache manifest and nothing but store entries, and refuse to start a
new cache in a non-empty folder that is not one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stores.url import (  # noqa: F401  (atomic_write_bytes re-exported: callers import it from here)
    as_path,
    atomic_write_bytes,
    is_remote,
    remove_tree,
    write_new,
)

SCHEMA_VERSION = 2  # 2: dataset content per block (block_fingerprints), categories in the fingerprint
MANIFEST_NAME = "manifest.json"
VERSIONS_DIR = "versions"  # versions/v<NNNNNN>.json: the whole manifest of each dataset version, created once
FINGERPRINT_FIELDS = ("schema_version", "teacher_weights", "teacher_arch", "dataset", "views", "targets", "codecs")
_FIX = "rebuild it with python -m pipeline.cache_teacher (or point distill to the matching cache)"


class CacheMismatchError(ValueError):
    """A cache exists but was built from different inputs; the message names the field."""


def _create_whole(path, data: bytes) -> bool:
    """Create `path` holding `data` only if it does not exist, never visible half-written: one
    conditional PUT on an object store; on disk a temp file hard-linked into place (link fails if
    the name exists). True if this call created it."""
    if is_remote(path):
        return write_new(path, data)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    atomic_write_bytes(tmp, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


class ManifestVersionConflict(RuntimeError):
    """Another writer recorded the same dataset version of a cache with other content."""


def version_path(root, version: int):
    return as_path(root) / VERSIONS_DIR / f"v{int(version):06d}.json"


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_difference(have: Any, want: Any, path: str) -> tuple[str, Any, Any] | None:
    """(field path, cache value, asked value) of the first difference, or None if equal."""
    if isinstance(have, dict) and isinstance(want, dict):
        for key in list(have) + [k for k in want if k not in have]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in want:
                return sub, have[key], "<absent>"
            if key not in have:
                return sub, "<absent>", want[key]
            diff = _first_difference(have[key], want[key], sub)
            if diff:
                return diff
        return None
    if isinstance(have, list | tuple) and isinstance(want, list | tuple):
        for i, (a, b) in enumerate(zip(have, want)):
            diff = _first_difference(a, b, f"{path}[{i}]")
            if diff:
                return diff
        if len(have) != len(want):
            return f"{path} (length)", len(have), len(want)
        return None
    if _normal(have) != _normal(want):
        return path, have, want
    return None


def _normal(value: Any) -> Any:
    """JSON round-trip form, so a tuple equals a list and 1 equals 1.0 after loading."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    fingerprint: dict
    plan: list[tuple[int, str]]  # (image_id, view_key), sorted; record r = plan[r]
    block_size: int
    levels: int
    meta: dict = field(default_factory=dict)  # free information (created_at, ...), never compared
    block_fingerprints: list[str] = field(default_factory=list)  # per block: its images' content ([] = none)
    statics: dict[str, str] = field(default_factory=dict)  # static item name -> sha256 of static/<name>.npz
    # image ids the dataset no longer lists: their records keep their place in the plan (so no other
    # block moves) as empty placeholders that readers of the dataset never ask for
    dropped: list[int] = field(default_factory=list)
    # one entry per dataset version the cache held, oldest first: {"version", "dataset_sha256",
    # "records", "blocks", "dropped"} (the last is this manifest's); [] for a cache older than versioning
    versions: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        plan = [(int(i), str(v)) for i, v in self.plan]
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "block_fingerprints", [str(f) for f in self.block_fingerprints])
        object.__setattr__(self, "statics", {str(k): str(v) for k, v in self.statics.items()})
        object.__setattr__(self, "dropped", sorted({int(i) for i in self.dropped}))
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.block_fingerprints and len(self.block_fingerprints) != self.num_blocks():
            raise ValueError(f"block_fingerprints lists {len(self.block_fingerprints)} blocks, "
                             f"the plan has {self.num_blocks()}")
        if len(set(plan)) != len(plan):
            seen: set[tuple[int, str]] = set()
            dup = next(p for p in plan if p in seen or seen.add(p))
            raise ValueError(f"plan lists record {dup} twice")
        fp = dict(self.fingerprint)
        fp.setdefault("schema_version", self.schema_version)
        object.__setattr__(self, "fingerprint", fp)

    # -- blocks ---------------------------------------------------------------------------------
    def num_blocks(self) -> int:
        return (len(self.plan) + self.block_size - 1) // self.block_size

    def block_range(self, block: int) -> tuple[int, int]:
        """[start, stop) record numbers of `block`."""
        if not 0 <= block < self.num_blocks():
            raise IndexError(f"block {block} out of range: the plan has {self.num_blocks()} blocks")
        start = block * self.block_size
        return start, min(start + self.block_size, len(self.plan))

    def block_records(self, block: int) -> list[tuple[int, str]]:
        start, stop = self.block_range(block)
        return self.plan[start:stop]

    def record_index(self) -> dict[tuple[int, str], int]:
        """(image_id, view) -> record number."""
        return {key: i for i, key in enumerate(self.plan)}

    def fingerprint_digest(self) -> str:
        """sha256 of the canonical JSON of the fingerprint (a short id for logs and dvc)."""
        text = json.dumps(_normal(self.fingerprint), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "fingerprint": _normal(self.fingerprint),
            "plan": [[i, v] for i, v in self.plan],
            "block_size": self.block_size,
            "levels": self.levels,
            "meta": _normal(self.meta),
            "block_fingerprints": list(self.block_fingerprints),
            "statics": dict(sorted(self.statics.items())),
            "dropped": list(self.dropped),
            "versions": [dict(v) for v in self.versions],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        missing = [k for k in ("schema_version", "fingerprint", "plan", "block_size", "levels") if k not in data]
        if missing:
            raise ValueError(f"manifest lacks {', '.join(missing)}")
        return cls(
            schema_version=int(data["schema_version"]),
            fingerprint=dict(data["fingerprint"]),
            plan=[(int(i), str(v)) for i, v in data["plan"]],
            block_size=int(data["block_size"]),
            levels=int(data["levels"]),
            meta=dict(data.get("meta") or {}),
            block_fingerprints=list(data.get("block_fingerprints") or []),
            statics=dict(data.get("statics") or {}),
            dropped=list(data.get("dropped") or []),
            versions=list(data.get("versions") or []),
        )

    def save(self, path: str | Path) -> None:
        """Whole-object JSON write (temp file + os.replace on disk, one PUT on an object store)."""
        path = as_path(path)
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1, sort_keys=True).encode())

    # -- dataset versions -----------------------------------------------------------------------
    @property
    def version(self) -> int:
        """This manifest's dataset version (0 for a cache older than versioning)."""
        return int(self.versions[-1]["version"]) if self.versions else 0

    def with_new_version(self, dataset_sha256: str) -> Manifest:
        """This manifest with one more entry in `versions`: what it holds now, for that dataset json."""
        entry = {"version": self.version + 1, "dataset_sha256": dataset_sha256, "records": len(self.plan),
                 "blocks": self.num_blocks(), "dropped": list(self.dropped)}
        return replace(self, versions=[*self.versions, entry])

    def publish(self, root: str | Path) -> None:
        """Record this manifest's version: ``versions/v<N>.json`` created exclusively, then
        ``manifest.json`` whole. Re-publishing identical content is a no-op for the version file."""
        body = json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()
        if self.versions:
            path = version_path(root, self.version)
            if not _create_whole(path, body) and path.read_bytes() != body:
                raise ManifestVersionConflict(
                    f"cache {as_path(root)}: another writer recorded dataset version {self.version} with other "
                    f"content ({path}); rerun python -m pipeline.cache_teacher to add yours as the next version")
        atomic_write_bytes(as_path(root) / MANIFEST_NAME, body)

    @classmethod
    def load_version(cls, root: str | Path, version: int) -> Manifest:
        """The manifest of dataset version `version` of the cache at `root` (what a pinned reader reads)."""
        path = version_path(root, version)
        if not path.exists():
            raise FileNotFoundError(f"cache {as_path(root)} has no dataset version {version} ({path} missing); "
                                    f"its versions are listed in {MANIFEST_NAME}")
        return cls.load(path)

    @classmethod
    def latest_version(cls, root: str | Path) -> Manifest | None:
        """The newest readable ``versions/v<N>.json`` of the cache at `root` (None if there is none)."""
        folder = as_path(root) / VERSIONS_DIR
        names = sorted(p.name for p in folder.glob("v*.json")) if folder.exists() else []
        for name in reversed(names):
            try:
                return cls.load(folder / name)
            except (ValueError, OSError):
                continue
        return None

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = as_path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as err:
            raise ValueError(
                f"cache manifest {path} is unreadable ({err}); rerun python -m pipeline.cache_teacher --repair "
                "to rewrite it from the params (the stores are kept when they match them)"
            ) from None
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"cache manifest {path} is malformed ({err}); {_FIX}") from None

    def comparable(self) -> dict:
        """Everything `check_compatible` compares: fingerprint fields, plan, block_size, levels."""
        return {**_normal(self.fingerprint), "plan": [[i, v] for i, v in self.plan],
                "block_size": self.block_size, "levels": self.levels}


def check_compatible(manifest: Manifest, expected: dict | Manifest, store_path: str | Path) -> None:
    """Raise CacheMismatchError naming the first field where the cache differs from `expected`.

    `expected` is a fingerprint dict (optionally with ``plan``, ``block_size`` and ``levels``
    keys, which are then compared too) or a whole Manifest (fingerprint, plan, block_size,
    levels). Fingerprint fields are compared in the order of FINGERPRINT_FIELDS, then any
    other keys; for dicts and lists the message names the sub-key / index.
    """
    want = expected.comparable() if isinstance(expected, Manifest) else dict(expected)
    if "schema_version" not in want:
        want["schema_version"] = SCHEMA_VERSION
    have = manifest.comparable()
    order = [k for k in FINGERPRINT_FIELDS if k in have or k in want]
    order += [k for k in want if k not in order and k not in ("plan", "block_size", "levels")]
    order += [k for k in have if k not in order and k not in ("plan", "block_size", "levels")]
    order += [k for k in ("plan", "block_size", "levels") if k in want]
    for key in order:
        if key not in have:
            diff = (key, "<absent>", want[key])
        elif key not in want:
            diff = (key, have[key], "<absent>")
        elif key == "plan":
            diff = _plan_difference(have[key], want[key])
        else:
            diff = _first_difference(have[key], want[key], key)
        if diff:
            name, a, b = diff
            raise CacheMismatchError(
                f"cache {store_path} was built with a different {name}: cache has {_short(a)}, "
                f"you asked for {_short(b)}; {_FIX}"
            )


def _plan_difference(have: list, want: list) -> tuple[str, Any, Any] | None:
    have = [(int(i), str(v)) for i, v in have]
    want = [(int(i), str(v)) for i, v in want]
    for r, (a, b) in enumerate(zip(have, want)):
        if a != b:
            return f"plan (record {r})", f"image {a[0]} view {a[1]}", f"image {b[0]} view {b[1]}"
    if len(have) != len(want):
        return "plan (number of records)", len(have), len(want)
    return None


# what a cache folder may hold: the manifest, one folder per format, statics, and kdcache's own
# locks / claims / temp files (``.<name>.tmp-<pid>...`` of an interrupted atomic write)
STORE_ENTRIES = (MANIFEST_NAME, "zarr", "wds", "static", VERSIONS_DIR, ".lock", ".locks", ".claims")


class NotAStoreError(ValueError):
    """A folder a cache would be written into (or removed) is not recognisably a kdcache store."""


def _own_entry(name: str) -> bool:
    return name in STORE_ENTRIES or (name.startswith(".") and (".tmp-" in name or name.startswith(".kdcache-probe-")))


def foreign_entries(root: str | Path) -> list[str]:
    """Names in `root` that a kdcache store never writes (sorted); [] for a missing folder."""
    root = as_path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not _own_entry(p.name))


def is_store(root: str | Path) -> bool:
    """`root` holds a kdcache manifest (readable, or unreadable beside a format folder)."""
    root = as_path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
        return isinstance(data, dict) and "fingerprint" in data and "plan" in data
    except (OSError, ValueError):  # a damaged manifest: still ours if a format folder sits beside it
        return (root / "zarr").is_dir() or (root / "wds").is_dir()


def check_cache_folder(root: str | Path, *, overwrite: bool) -> None:
    """Refuse, in one line, to write a new cache into (or, with `overwrite`, to delete) a folder that
    is not a kdcache store holding nothing else. Missing and empty folders (prefixes) are always fine."""
    root = as_path(root)
    if not is_remote(root) and root.is_symlink() and overwrite:
        raise NotAStoreError(f"cache.path {root} is a symlink: --overwrite removes only a real cache folder; "
                             "point cache.path at the folder itself")
    if root.exists() and not root.is_dir():
        raise NotAStoreError(f"cache.path {root} is a file, not a folder: point cache.path elsewhere")
    if not root.exists():
        return
    foreign = foreign_entries(root)
    store = is_store(root)
    if store and (not foreign or not overwrite):  # resuming a store with extra files deletes nothing
        return
    named = [n for n in (MANIFEST_NAME, "zarr", "wds", "static") if (root / n).exists()]
    if not store and not foreign and not named:
        return  # empty, or only the locks / temp files of a creation that was interrupted
    listed = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
    if store:
        what = f"holds other files besides the cache ({listed})"
        fix = "move them out, or point cache.path at a folder of its own"
    else:
        what = (f"is not empty and is not a kdcache cache (no kdcache {MANIFEST_NAME}; "
                f"holds {', '.join(named + foreign[:5])}{' ...' if len(foreign) > 5 else ''})")
        fix = "point cache.path at a new or empty folder (or delete it yourself if it is a damaged cache)"
    action = "--overwrite will not delete it" if overwrite else "refusing to write a cache into it"
    raise NotAStoreError(f"cache.path {root} {what}: {action}; {fix}")


def remove_store(root: str | Path) -> None:
    """Delete a cache folder after `check_cache_folder(root, overwrite=True)` passed: only the
    entries a store holds are removed, then the (then empty) folder itself."""
    import shutil

    root = as_path(root)
    check_cache_folder(root, overwrite=True)
    if not root.exists() or not is_store(root):  # no kdcache manifest: nothing here is provably ours
        return
    if is_remote(root):  # a prefix has no folder to remove: delete the store's entries, object by object
        for p in root.iterdir():
            if _removable(p.name):
                remove_tree(p)
        return
    for p in root.iterdir():
        if _removable(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    if not any(root.iterdir()):  # a hidden file kdcache did not name is kept, and its folder with it
        root.rmdir()


# the temp names kdcache itself writes: atomic_write_bytes' `.<name>.tmp-<pid>-<random>` and a zarr
# store's `.zarr.tmp-<pid>`; another hidden `*.tmp-*` name is not proof that kdcache wrote it
_OWN_TEMP = re.compile(r"^\.(manifest\.json|zarr|wds)\.tmp-\d+(-[A-Za-z0-9_]+)?$|^\.kdcache-probe-")


def _removable(name: str) -> bool:
    return name in STORE_ENTRIES or bool(_OWN_TEMP.match(name))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def make_plan(image_ids, views) -> list[tuple[int, str]]:
    """Sorted plan of every (image_id, view_key); `views` is a list of keys or a callable
    image_id -> list of keys (per-image view subsets)."""
    plan = set()
    for image_id in image_ids:
        keys = views(image_id) if callable(views) else views
        plan.update((int(image_id), str(k)) for k in keys)
    return sorted(plan)
