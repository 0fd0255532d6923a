"""The Zarr store's layout on a disk or an object store: creating it, its arrays, its done markers.

`stores.zarr_store` reads and writes records; this module knows where things are and how a store
comes into being without rename or locks (`stores.commit` states the protocol):

- The store is created by one coordinator: on disk in a temp folder renamed into place; on an object
  store built in a local temp folder and uploaded object by object with the group's ``zarr.json``
  LAST, so a store whose ``zarr.json`` exists is complete (the index arrays included).
- A target family's array is created by the first writer that needs it; two writers creating it at
  once write the same ``zarr.json`` (deterministic from the manifest), so either may win.
- A block's done marker ``done/block-NNNNNN.json`` is written last; it names the block's shard
  objects with their sizes (``objects``), beside the sha256 of every blob.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, VLenBytesCodec
from zarr.core.dtype import VariableLengthBytes

from stores.url import abort_uploads, is_remote, local_temp_dir, upload_tree

try:
    from zarr.errors import UnstableSpecificationWarning
except ImportError:  # pragma: no cover
    UnstableSpecificationWarning = UserWarning

LAYOUT = "kdcache-zarr-family-vlen-sharded-v1"
SUBDIR = "zarr"


@contextlib.contextmanager
def quiet():
    """Silence zarr's warning that variable-length bytes have no ratified v3 spec (see zarr_store)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        yield


def zarr_url(path) -> str:
    """What zarr.open_* takes: a local path, or the URL (zarr builds its FsspecStore from it)."""
    return str(path)


def vlen_array(group: zarr.Group, name: str, n: int, block_size: int) -> zarr.Array:
    with quiet():
        return group.create_array(
            name,
            shape=(n,),
            dtype=VariableLengthBytes(),
            shards=(block_size,),
            chunks=(1,),
            serializer=VLenBytesCodec(),
            compressors=[Crc32cCodec()],  # blobs are compressed already; the crc catches corruption
            fill_value=b"",
        )


def require_family(group: zarr.Group, name: str, n: int, block_size: int) -> None:
    """Create targets/<name> unless it exists; a concurrent creator writing the same metadata wins too."""
    try:
        vlen_array(group, name, n, block_size)
    except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError, FileExistsError):
        pass


def marker_path(store, block: int):
    return store / "done" / f"block-{block:06d}.json"


def scan_markers(store) -> set[int]:
    """Blocks with a done marker (one listing of ``done/``)."""
    done = store / "done"
    if not is_remote(done) and not done.exists():
        return set()
    out = set()
    try:
        names = [p.name for p in done.glob("block-*.json")]
    except FileNotFoundError:
        return set()
    for name in names:
        try:
            out.add(int(name[len("block-"):-len(".json")]))
        except ValueError:
            continue
    return out


def store_attrs(store) -> dict:
    return json.loads((store / "zarr.json").read_text()).get("attributes", {}).get("kdcache", {})


def _build(where: str, manifest) -> None:
    """The store's group, index arrays and meta array at local folder `where`."""
    m = manifest
    views = sorted({v for _, v in m.plan})
    view_idx = {v: i for i, v in enumerate(views)}
    n, bs = len(m.plan), m.block_size
    g = zarr.open_group(where, mode="w", zarr_format=3)
    g.attrs["kdcache"] = {
        "layout": LAYOUT,
        "schema_version": m.schema_version,
        "num_records": n,
        "block_size": bs,
        "levels": m.levels,
        "views": views,
        "fingerprint_digest": m.fingerprint_digest(),
    }
    idx = g.require_group("index")
    a = idx.create_array("image_id", shape=(n,), dtype="int64", chunks=(bs,), fill_value=-1)
    a[:] = np.array([i for i, _ in m.plan], dtype=np.int64)
    a = idx.create_array("view", shape=(n,), dtype="int32", chunks=(bs,), fill_value=-1)
    a[:] = np.array([view_idx[v] for _, v in m.plan], dtype=np.int32)
    idx.create_array("image_size", shape=(n, 2), dtype="int32", chunks=(bs, 2), fill_value=-1)
    idx.create_array("level_sizes", shape=(n, m.levels, 2), dtype="int32", chunks=(bs, m.levels, 2), fill_value=-1)
    vlen_array(g, "meta", n, bs)
    g.require_group("targets")


def create_store(root, store, manifest) -> None:
    """Create the zarr store at `store` (under cache folder `root`) whole: temp folder + rename on
    disk; on an object store, built locally and uploaded with the group's zarr.json last."""
    if is_remote(store):
        with local_temp_dir("kdcache-zarr-") as tmp:
            _build(tmp, manifest)
            upload_tree(Path(tmp), store, last="zarr.json")
        return
    from stores.base import remove_path

    for stale in root.glob(f".{SUBDIR}.tmp-*"):  # a creator killed mid-way (the caller holds the lock)
        remove_path(stale)
    tmp = root / f".{SUBDIR}.tmp-{os.getpid()}"
    _build(str(tmp), manifest)
    (tmp / "done").mkdir()
    os.replace(tmp, store)


def block_objects(store, array_names: list[str], block: int) -> dict[str, int]:
    """{shard object relative to the store: size} of a block just written (for its done marker)."""
    out = {}
    for name in array_names:
        p = store / name / "c" / str(block)
        with contextlib.suppress(FileNotFoundError):
            out[f"{name}/c/{block}"] = int(p.stat().st_size)
    return out


def abort_block_uploads(store, block: int) -> list[str]:
    """Abort the multipart uploads of `block`'s shard objects that a killed writer left open."""
    tail = f"/c/{block}"
    return abort_uploads(store, lambda key: key.endswith(tail) or f"{tail}/" in key)
