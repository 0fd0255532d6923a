"""`cache_teacher --repair`: make a damaged cache whole again, never worse.

Order matters; nothing is deleted before every check that could refuse has passed:

1. The manifest is a pure function of the params (fingerprint, plan, block split), so it is
   rebuilt from them first. An unreadable manifest.json is restored from it, but only when the
   stores prove they were built for exactly that manifest: the zarr store's recorded fingerprint
   digest and index (its plan), every done marker's and sidecar's digest. The fitted statics the
   blocks were coded with (cpca basis, class floors, which the blobs name) are re-recorded as they
   are; the teacher head is not: the run that follows rewrites it from the teacher.
2. A readable manifest is checked against the params (fields, plan, block size) BEFORE anything
   is invalidated: a manifest with swapped plan entries is refused with every block intact.
3. Array metadata (each array's zarr.json: shape, chunk / shard shape, codecs) and the index
   arrays written once at creation (image_id, view) are compared with a template store built
   from the manifest by the writer's own code, and restored from it where they differ, so the
   repaired store is byte-identical to a fresh build (a damaged shape would make zarr drop writes
   silently: an out-of-range slice is a no-op).
4. Then verify names the damaged blocks, and only those are made incomplete for the run that
   follows to recompute.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import zarr

from stages.cache.fingerprint import keep_cached_plan
from stages.cache.plan import build_manifest
from stages.config import Params
from stages.data.coco import CocoDataset
from stores.manifest import (
    MANIFEST_NAME,
    CacheMismatchError,
    Manifest,
    atomic_write_bytes,
    check_compatible,
    sha256_file,
)
from stores.provenance import store_digest_errors
from stores.verify import invalidate_blocks, verify_store
from stores.wds_shards import sidecar_path
from stores.zarr_layout import create_store, require_family, scan_markers

REBUILD = "python -m pipeline.cache_teacher --overwrite"


def repair_cache(params: Params, root: Path) -> list[str]:
    """Repair the cache at `root` (built from `params`); returns the lines to print."""
    if not (root / MANIFEST_NAME).exists() and not (root / "zarr").exists() and not (root / "wds").exists():
        return []  # nothing there: the run builds it
    dataset = CocoDataset.from_params(params.data, "train")
    expected = build_manifest(params, dataset)
    lines = []
    try:
        cached = Manifest.load(root / MANIFEST_NAME)
    except (ValueError, FileNotFoundError):
        cached = restore_manifest(root, expected)
        lines.append(f"repair: {root / MANIFEST_NAME} was unreadable: rewritten from the params (the stores' "
                     f"recorded fingerprint digest and plan match them)")
    check_compatible(cached, keep_cached_plan(cached, expected, dataset), root)  # before anything is touched
    restored = restore_zarr_metadata(root, cached)
    if restored:
        lines.append(f"repair: restored {len(restored)} damaged zarr metadata / index files from the manifest "
                     f"({', '.join(restored[:4])}{' ...' if len(restored) > 4 else ''})")
    report = verify_store(root)
    if report.damaged_blocks:
        invalidate_blocks(root, report.damaged_blocks)
    lines.append(f"repair: {len(report.damaged_blocks)} damaged blocks {report.damaged_blocks[:20]} will be "
                 f"recomputed, {len(report.missing_blocks)} missing ones completed")
    return lines


def restore_manifest(root: Path, expected: Manifest) -> Manifest:
    """Write `expected` as the cache's manifest when the stores prove they belong to it (else
    CacheMismatchError, nothing written)."""
    fix = f"the stores cannot vouch for a manifest rebuilt from these params; rebuild with {REBUILD}"
    formats = [f for f in ("zarr", "wds") if (root / f).exists()]
    if not formats:
        raise CacheMismatchError(f"cache manifest {root / MANIFEST_NAME} is unreadable and no store is left; {fix}")
    for fmt in formats:
        blocks = scan_markers(root / "zarr") if fmt == "zarr" else _wds_blocks(root)
        errors = store_digest_errors(root, expected, fmt, blocks)
        errors += _plan_errors(root, expected, fmt, blocks)
        if errors:
            raise CacheMismatchError(f"cache manifest {root / MANIFEST_NAME} is unreadable: {errors[0]}; {fix}")
    # fitted statics (the cpca basis, the class floors) are what the blocks were coded with (their blobs
    # name them): kept, not refitted; the teacher head is not re-recorded: the run rewrites it from the teacher
    statics = {p.stem: sha256_file(p) for p in sorted((root / "static").glob("*.npz")) if p.stem != "head"}
    manifest = replace(expected, statics=statics)
    manifest.save(root / MANIFEST_NAME)
    return manifest


def _wds_blocks(root: Path) -> set[int]:
    out = set()
    for p in (root / "wds").glob("shard-*.tar"):
        try:
            out.add(int(p.name[len("shard-"):-len(".tar")]))
        except ValueError:
            continue
    return out


def _plan_errors(root: Path, manifest: Manifest, fmt: str, blocks: set[int]) -> list[str]:
    """The store's own record of its plan against `manifest.plan`: zarr's index arrays and
    num_records / block_size attributes; each wds sidecar's record list."""
    if fmt == "zarr":
        store = root / "zarr"
        try:
            group = zarr.open_group(str(store), mode="r")
            attrs = dict(group.attrs).get("kdcache", {})
            ids = group["index/image_id"][...].tolist()
            views = [attrs["views"][v] for v in group["index/view"][...].tolist()]
        except Exception as err:  # a damaged store cannot vouch
            return [f"[zarr] {store} index unreadable ({type(err).__name__})"]
        if (attrs.get("num_records"), attrs.get("block_size")) != (len(manifest.plan), manifest.block_size):
            return [f"[zarr] {store} holds {attrs.get('num_records')} records in blocks of {attrs.get('block_size')}"]
        if list(zip(ids, views)) != [tuple(p) for p in manifest.plan]:
            return [f"[zarr] {store}/index lists another plan"]
        return []
    errors = []
    for b in sorted(blocks):
        try:
            side = json.loads(sidecar_path(root / "wds", b).read_text())
            listed = [(int(r["image_id"]), str(r["view"])) for r in side.get("records", [])]
        except (OSError, ValueError, KeyError, TypeError):
            errors.append(f"[wds] block {b}: sidecar unreadable")
            continue
        if b >= manifest.num_blocks() or listed != manifest.block_records(b):
            errors.append(f"[wds] block {b}: its sidecar lists other records than the plan's")
    return errors


def restore_zarr_metadata(root: Path, manifest: Manifest) -> list[str]:
    """Restore every array's zarr.json and index/image_id, index/view from a template store built from
    `manifest` by the writer's own code; returns the restored paths (relative to zarr/). The group's
    own zarr.json (its recorded fingerprint digest) is never rewritten: a store of another cache
    must stay recognisable as such."""
    store = root / "zarr"
    if not (store / "zarr.json").exists():
        return []
    families = sorted(p.name for p in (store / "targets").iterdir() if p.is_dir()) if (store / "targets").exists() else []
    restored = []
    with tempfile.TemporaryDirectory(prefix="kdcache-repair-") as tmp:
        template = Path(tmp) / "zarr"
        create_store(Path(tmp), template, manifest)
        group = zarr.open_group(str(template), mode="r+")
        for family in families:
            require_family(group["targets"], family, len(manifest.plan), manifest.block_size)
        for want in sorted(template.rglob("*")):
            rel = want.relative_to(template)
            if not want.is_file() or rel.as_posix() == "zarr.json":
                continue
            is_meta = want.name == "zarr.json"
            is_index = rel.parts[:2] in (("index", "image_id"), ("index", "view"))
            if not (is_meta or is_index):
                continue
            have = store / rel
            if have.is_file() and have.read_bytes() == want.read_bytes():
                continue
            if have.is_dir():
                shutil.rmtree(have)
            atomic_write_bytes(have, want.read_bytes())
            restored.append(rel.as_posix())
    return restored
