"""Do a cache folder's stores belong to its manifest? The fingerprint digest each store records.

Every store records the fingerprint digest of the manifest it was written for: the zarr store in
its group attributes (``zarr/zarr.json`` ``kdcache.fingerprint_digest``) and in every done marker,
the WebDataset store in every shard's sidecar. A `zarr/` or `wds/` folder copied in from another
teacher's cache carries the other cache's digest there, while its blobs' checksums (which the
markers and sidecars also hold) are perfectly consistent: only this comparison tells it apart.
Readers (stage 2) and `verify` refuse such a store, naming it.

Also here: the static head weights checked against the manifest's sha256 before use, and an
``.npz`` checked from its zip headers (member names, declared shapes and dtypes) BEFORE numpy
allocates anything, so a small compressed file cannot make the reader allocate gigabytes.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from stores.manifest import Manifest, sha256_file
from stores.url import as_path
from stores.wds_shards import shard_path, sidecar_path
from stores.zarr_store import marker_path

REBUILD = "python -m pipeline.cache_teacher"


def _zarr_digest_errors(root: Path, manifest: Manifest, blocks: set[int]) -> list[str]:
    want = manifest.fingerprint_digest()
    store = root / "zarr"
    errors = []
    try:
        attrs = json.loads((store / "zarr.json").read_text()).get("attributes", {}).get("kdcache", {})
    except (OSError, ValueError) as err:
        return [f"[zarr] {store / 'zarr.json'} is unreadable ({type(err).__name__}); rerun {REBUILD} --repair"]
    have = attrs.get("fingerprint_digest")
    if have != want:
        errors.append(f"[zarr] {store} was written for another cache (fingerprint {str(have)[:12]}, "
                      f"{root / 'manifest.json'} says {want[:12]}): it was copied from another teacher's cache "
                      f"or dataset; delete {store} and rerun {REBUILD}")
        return errors
    for b in sorted(blocks):
        path = marker_path(store, b)
        try:
            have = json.loads(path.read_text()).get("fingerprint_digest")
        except (OSError, ValueError, AttributeError):
            continue  # an unreadable marker is verify's own error (named there)
        if have != want:
            errors.append(f"[zarr] block {b}: done marker {path} was written for another cache (fingerprint "
                          f"{str(have)[:12]}, the manifest says {want[:12]}); delete it and rerun {REBUILD}")
    return errors


def _wds_digest_errors(root: Path, manifest: Manifest, blocks: set[int]) -> list[str]:
    want = manifest.fingerprint_digest()
    store = root / "wds"
    errors = []
    for b in sorted(blocks):
        side = sidecar_path(store, b)
        try:
            have = json.loads(side.read_text()).get("fingerprint_digest")
        except (OSError, ValueError, AttributeError):
            continue  # a missing sidecar is the reader's / verify's own error
        if have != want:
            errors.append(f"[wds] block {b}: {shard_path(store, b)} was written for another cache (its sidecar "
                          f"{side} records fingerprint {str(have)[:12]}, the manifest says {want[:12]}); delete "
                          f"both and rerun {REBUILD}")
    return errors


def store_digest_errors(root: str | Path, manifest: Manifest, fmt: str, blocks: set[int]) -> list[str]:
    """One message per store / completed block of `fmt` whose recorded fingerprint digest is not the
    manifest's ([] when all match)."""
    root = as_path(root)  # a local folder or an object-store URL (stores.url)
    return (_zarr_digest_errors if fmt == "zarr" else _wds_digest_errors)(root, manifest, blocks)


def check_store_provenance(reader) -> None:
    """Refuse (ValueError, the first store named) a reader's store not written for its manifest."""
    errors = store_digest_errors(reader.root, reader.manifest, reader.format, reader.completed_blocks())
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more)


def zarr_index_errors(reader, manifest: Manifest, metas: Mapping[int, bytes]) -> list[tuple[int | None, str]]:
    """(block or None, message) for each zarr index array that disagrees with what vouches for it:
    index/image_id and index/view are the manifest's plan; index/image_size and level_sizes of
    record r are its (checksummed) meta's, `metas` {record number: meta bytes}. A flipped byte in
    an index chunk either fails to decode or shows up here."""
    where = reader.store / "index"
    fix = f"rerun {REBUILD} --repair"
    try:
        index = reader.index_arrays()
        views = reader.views
    except Exception as err:  # any decode failure of a damaged chunk
        return [(None, f"[zarr] {where} is unreadable ({type(err).__name__}); {fix}")]
    out: list[tuple[int | None, str]] = []
    plan_ids = np.array([i for i, _ in manifest.plan], dtype=np.int64)
    plan_views = np.array([views.index(v) if v in views else -2 for _, v in manifest.plan], dtype=np.int64)
    for name, want in (("image_id", plan_ids), ("view", plan_views)):
        have = index[name]
        if have.shape != want.shape or not np.array_equal(have, want):
            out.append((None, f"[zarr] {where / name} does not match the manifest's plan (damaged); {fix}"))
    for r, raw in sorted(metas.items()):
        try:
            meta = json.loads(raw)
        except ValueError:
            continue  # the record's checksum names it
        for name in ("image_size", "level_sizes"):
            if meta.get(name) is not None and not np.array_equal(index[name][r], np.asarray(meta[name])):
                b = r // manifest.block_size
                out.append((b, f"[zarr] block {b}: {where / name} of record {r} is {index[name][r].tolist()}, "
                               f"its record says {meta[name]} (damaged); {fix}"))
                break
    return out


def npz_member_errors(path: str | Path, expected: Mapping[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """Check an .npz from its zip directory and .npy headers only: exactly the `expected` members
    ({name: (shape, dtype)}), each declaring that shape and dtype, and no member inflating to more
    than its declared array's bytes. Nothing is decompressed beyond a header."""
    path = as_path(path)  # a local file or an object (stores.url)
    try:
        with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as z:
            infos = {i.filename.removesuffix(".npy"): i for i in z.infolist()}
            if set(infos) != set(expected):
                extra = sorted(set(infos) - set(expected))[:3]
                missing = sorted(set(expected) - set(infos))[:3]
                return [f"{path} holds arrays {extra or ''} {missing and 'and lacks ' + str(missing) or ''} "
                        "other than the teacher head's"]
            errors = []
            for name, (shape, dtype) in expected.items():
                info = infos[name]
                with z.open(info) as f:
                    version = npy_format.read_magic(f)
                    reader = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
                    have_shape, _, have_dtype = reader(f, max_header_size=10000)
                if tuple(have_shape) != tuple(shape) or np.dtype(have_dtype) != np.dtype(dtype):
                    errors.append(f"{path}: array {name!r} declares {have_dtype}{list(have_shape)}, the teacher "
                                  f"head has {np.dtype(dtype)}{list(shape)}")
                elif info.file_size > np.dtype(dtype).itemsize * int(np.prod(shape)) + 4096:
                    errors.append(f"{path}: array {name!r} inflates to {info.file_size} bytes, more than its "
                                  "declared shape holds")
            return errors
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        return [f"{path} is not a readable npz ({type(err).__name__}: {err})"]


def check_head_static(root: str | Path, manifest: Manifest, expected: Mapping[str, tuple[tuple[int, ...], str]]) -> Path:
    """static/head.npz as the manifest vouches for it: its sha256 recorded and equal, and its
    members the teacher head's (names, shapes, dtypes from the zip headers): else ValueError."""
    path = as_path(root) / "static" / "head.npz"
    want = manifest.statics.get("head")
    fix = f"rerun {REBUILD} to rewrite it from the cache's teacher"
    if not path.exists():
        raise ValueError(f"{path} is missing: the teacher head (CrossKD / CSKD) comes from it; {fix}")
    if not want:
        raise ValueError(f"{path} is not recorded in {as_path(root) / 'manifest.json'}: nothing vouches it is this "
                         f"cache's teacher head; {fix}")
    if sha256_file(path) != want:
        raise ValueError(f"{path} does not match the sha256 {as_path(root) / 'manifest.json'} records (damaged or "
                         f"replaced by another teacher's head); {fix}")
    errors = npz_member_errors(path, expected)
    if errors:
        raise ValueError(f"{errors[0]}; {fix}")
    return path
