"""Check a cache folder end to end (`verify_store`) and summarise it (`store_summary`).

verify_store checks, for every format present (zarr/, wds/): the manifest is present and
loadable, every static item (static/<name>.npz, e.g. the teacher head) matches the sha256 the
manifest records and loads, every planned block is complete (done marker / renamed shard), the stored records are
the plan's records for the block, every blob's sha256 matches the block's marker / sidecar,
(decode=True) every blob decodes, every store / marker / sidecar records the manifest's fingerprint
digest (`stores.provenance`: a store copied from another teacher's cache fails), and the zarr index
arrays agree with the plan (image_id, view) and the checksummed record metas (image_size,
level_sizes), so a flipped byte there is caught too. Each error names the format, block, image id, view and
file, and the report lists missing blocks so a rerun of cache_teacher can complete them.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from stores.base import REBUILD, StoreError, load_codec_bases, meta_bytes, target_family
from stores.codecs import BlobDecodeError, blob_info, decode
from stores.manifest import MANIFEST_NAME, STORE_ENTRIES, Manifest
from stores.provenance import store_digest_errors, zarr_index_errors
from stores.url import as_path
from stores.wds_store import WdsCacheReader, shard_path, sidecar_path
from stores.zarr_store import ZarrCacheReader, marker_path

FORMATS = ("zarr", "wds")


@dataclass
class VerifyReport:
    ok: bool
    n_records: int  # records that passed every check (summed over the formats checked)
    errors: list[str] = field(default_factory=list)
    missing_blocks: list[int] = field(default_factory=list)  # union over the formats checked
    damaged_blocks: list[int] = field(default_factory=list)  # complete blocks with an error (invalidate_blocks)
    formats: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # harmless leftovers (temp files of killed writers)
    per_format: dict[str, dict] = field(default_factory=dict)  # format -> {n_records, missing_blocks}

    def summary(self) -> str:
        state = "OK" if self.ok else f"FAILED ({len(self.errors)} errors)"
        miss = f", missing blocks {self.missing_blocks}" if self.missing_blocks else ""
        return f"{state}: {self.n_records} records verified in {', '.join(self.formats) or 'no format'}{miss}"


def _present_formats(root: Path) -> list[str]:
    return [f for f in FORMATS if (root / f).exists()]


def verify_store(
    root: str | Path, *, decode: bool = True, progress: bool = False, formats: list[str] | None = None
) -> VerifyReport:
    root = as_path(root)
    report = VerifyReport(ok=False, n_records=0)
    path = root / MANIFEST_NAME
    if not path.exists():
        report.errors.append(f"{path}: manifest missing: not a cache folder, or never built; run {REBUILD}")
        return report
    try:
        manifest = Manifest.load(path)
    except ValueError as err:
        report.errors.append(str(err))
        return report
    report.formats = list(formats) if formats is not None else _present_formats(root)
    if not report.formats:
        report.errors.append(f"{root}: neither zarr/ nor wds/ exists: run {REBUILD}")
        return report
    missing: set[int] = set()
    for fmt in report.formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}: expected one of {FORMATS}")
        decoder = _blob_decoder(root, manifest) if decode else None
        n_ok, miss = (_verify_zarr if fmt == "zarr" else _verify_wds)(root, manifest, report, decoder, progress)
        report.n_records += n_ok
        report.per_format[fmt] = {"n_records": n_ok, "missing_blocks": miss}
        missing.update(miss)
    report.missing_blocks = sorted(missing)
    report.damaged_blocks.sort()
    _verify_statics(root, manifest, report)
    _verify_extras(root, manifest, report)
    for fmt in report.formats:
        for p in (root / fmt).glob("*.tmp-*"):
            report.warnings.append(f"leftover temp file {p} (from an interrupted writer): safe to delete")
    report.ok = not report.errors
    return report


def _blob_decoder(root: Path, manifest: Manifest):
    """decode(blob) with the cache's PCA bases attached; without usable bases (reported once by
    `_verify_statics`) the cpca blobs are checksummed but not decoded, not reported one by one."""
    try:
        bases = load_codec_bases(root, manifest)
    except StoreError:
        bases = None

    def decoder(blob: bytes) -> None:
        if bases is None and blob_info(blob)["chain"].startswith("cpca"):
            return
        decode(blob, bases)

    return decoder


def _verify_statics(root: Path, manifest: Manifest, report: VerifyReport) -> None:
    """Every static item the manifest records (and the head, when it is a cached target) exists,
    matches its recorded sha256 and loads without pickle; unrecorded .npz files are named too."""
    expected = dict(manifest.statics)
    if "head" in manifest.fingerprint.get("targets", []) and "head" not in expected:
        expected["head"] = ""
    for name, digest in sorted(expected.items()):
        path = root / "static" / f"{name}.npz"
        fix = f"rerun {REBUILD} to rewrite it"
        if not path.exists():
            report.errors.append(f"[static] {path} is missing; {fix}")
            continue
        if not digest:
            report.errors.append(f"[static] {path} is not recorded in {root / MANIFEST_NAME}; {fix}")
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            report.errors.append(f"[static] {path} checksum mismatch (damaged); {fix}")
            continue
        try:
            with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:  # a file or an object
                for k in z.files:
                    z[k]
        except Exception as err:
            report.errors.append(f"[static] {path} does not load ({type(err).__name__}); {fix}")
    if (root / "static").exists():
        for p in sorted((root / "static").iterdir()):
            if p.suffix == ".npz" and p.stem not in expected:
                report.warnings.append(f"[static] {p} is not recorded in the manifest (not written by this cache)")


def _verify_extras(root: Path, manifest: Manifest, report: VerifyReport) -> None:
    """Files the plan does not account for (a block number past the plan, a foreign entry in the
    cache folder): harmless to the readers, named as warnings so nothing in the folder goes unseen."""
    n = manifest.num_blocks()
    extra = [p for p in sorted(root.iterdir()) if p.name not in STORE_ENTRIES and ".tmp-" not in p.name]
    extra += [p for p in (root / "zarr" / "done").glob("block-*.json") if _number(p.stem) >= n]
    extra += [p for p in (root / "wds").glob("shard-*") if _number(p.name.split(".")[0]) >= n]
    for p in extra:
        report.warnings.append(f"{p} is not part of this cache's plan ({n} blocks): not read; safe to remove")


def _number(stem: str) -> int:
    try:
        return int(stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _blocks(manifest: Manifest, progress: bool, desc: str):
    blocks = range(manifest.num_blocks())
    if progress:
        from tqdm import tqdm

        return tqdm(blocks, desc=desc, unit="block")
    return blocks


def _tracked(report: VerifyReport, blocks):
    """The blocks, noting in report.damaged_blocks each one whose check added an error (the
    generator resumes after the loop body, `continue` included)."""
    for b in blocks:
        n = len(report.errors)
        yield b
        if len(report.errors) > n and b not in report.damaged_blocks:
            report.damaged_blocks.append(b)


def _missing_error(fmt: str, root: Path, missing: list[int]) -> str:
    shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
    return f"[{fmt}] {len(missing)} planned blocks not written ({shown}) in {root / fmt}: rerun {REBUILD} to complete them"


def _check_record(fmt, block, expected, rec_meta_raw, blobs, digest, where, errors, decode_blobs) -> bool:
    """Compare one stored record to its marker entry; append errors; True if it passed."""
    image_id, view = expected
    tag = f"[{fmt}] block {block} image {image_id} view {view}"
    ok = True
    if digest is None:
        errors.append(f"{tag}: not listed in the block's marker ({where})")
        return False
    if hashlib.sha256(rec_meta_raw).hexdigest() != digest.get("meta_sha256"):
        errors.append(f"{tag}: meta checksum mismatch in {where}")
        ok = False
    want = digest.get("sha256", {})
    if set(want) != set(blobs):
        errors.append(f"{tag}: targets {sorted(blobs)} differ from the marker's {sorted(want)} in {where}")
        ok = False
    for name, blob in sorted(blobs.items()):
        if name in want and hashlib.sha256(blob).hexdigest() != want[name]:
            errors.append(f"{tag}: target {name} checksum mismatch in {where}")
            ok = False
        elif decode_blobs:
            try:
                decode_blobs(blob)
            except BlobDecodeError as err:
                errors.append(f"{tag}: target {name} does not decode ({err}) in {where}")
                ok = False
    return ok


def _open_reader(fmt, root, manifest, report, make):
    """(reader, completed blocks, missing blocks) of one format; an unopenable store is reported and
    counts as every block missing (reader None)."""
    try:
        reader = make()
    except StoreError as err:
        report.errors.append(f"[{fmt}] {err}")
        return None, set(), list(range(manifest.num_blocks()))
    done = reader.completed_blocks()
    missing = [b for b in range(manifest.num_blocks()) if b not in done]
    if missing:
        report.errors.append(_missing_error(fmt, root, missing))
    foreign = store_digest_errors(root, manifest, fmt, done)  # copied from another cache: checksums agree
    report.errors.extend(foreign)
    report.damaged_blocks.extend(sorted({b for b in done for e in foreign if f"block {b}:" in e}))
    return reader, done, missing


def _verify_zarr(root, manifest, report, decode_blobs, progress) -> tuple[int, list[int]]:
    reader, done, missing = _open_reader("zarr", root, manifest, report, lambda: ZarrCacheReader(root))
    if reader is None:
        return 0, missing
    store = reader.store
    n_ok = 0
    metas: dict[int, bytes] = {}
    for b in _tracked(report, _blocks(manifest, progress, "verify zarr")):
        if b not in done:
            continue
        where_marker = marker_path(store, b)
        try:
            marker = json.loads(where_marker.read_text())
        except (OSError, ValueError) as err:
            report.errors.append(f"[zarr] block {b}: done marker {where_marker} unreadable ({err}); delete it and rerun {REBUILD}")
            continue
        expected = manifest.block_records(b)
        listed = {(d["image_id"], d["view"]): d for d in marker.get("records", [])}
        try:
            raw = reader.get_raw_block(b)
        except Exception:  # find the damaged records and files one element at a time
            raw = []
            for r in range(*manifest.block_range(b)):
                key = manifest.plan[r]
                meta_raw, fams, bad_files = reader.get_raw_record(r)
                for name, err in bad_files:
                    report.errors.append(
                        f"[zarr] block {b} image {key[0]} view {key[1]}: {reader.shard_file(name, b)} is "
                        f"corrupt ({err}); delete {where_marker} and rerun {REBUILD} to rewrite this block"
                    )
                raw.append((meta_raw, fams) if not bad_files else None)
        for r, (key, item) in enumerate(zip(expected, raw), start=manifest.block_range(b)[0]):
            if item is None:
                continue
            meta_raw, fams = item
            metas[r] = meta_raw
            blobs: dict[str, bytes] = {}
            bad = False
            for fam, value in fams.items():
                if not value:
                    continue
                try:
                    blobs.update(msgpack.unpackb(value, raw=False))
                except Exception as err:
                    report.errors.append(
                        f"[zarr] block {b} image {key[0]} view {key[1]}: {store}/targets/{fam}/c/{b} element "
                        f"corrupt ({type(err).__name__})"
                    )
                    bad = True
            where = f"{store} block {b} (marker {where_marker})"
            if _check_record("zarr", b, key, meta_raw, blobs, listed.get(key), where, report.errors, decode_blobs) and not bad:
                n_ok += 1
    for block, error in zarr_index_errors(reader, manifest, metas):
        report.errors.append(error)
        if block is not None and block not in report.damaged_blocks:
            report.damaged_blocks.append(block)
    return n_ok, missing


def _verify_wds(root, manifest, report, decode_blobs, progress) -> tuple[int, list[int]]:
    # verify checks (and reports) checksums itself
    reader, done, missing = _open_reader(
        "wds", root, manifest, report, lambda: WdsCacheReader(root, verify_checksums=False)
    )
    if reader is None:
        return 0, missing
    store = reader.store
    n_ok = 0
    for b in _tracked(report, _blocks(manifest, progress, "verify wds")):
        if b not in done:
            continue
        tar = shard_path(store, b)
        side = reader.sidecar(b)
        if side is None:
            report.errors.append(
                f"[wds] block {b}: sidecar {sidecar_path(store, b)} missing or unreadable, cannot check {tar}; "
                f"delete {tar} and rerun {REBUILD} to rewrite this block"
            )
            continue
        listed = {(d["image_id"], d["view"]): d for d in side.get("records", [])}
        expected = manifest.block_records(b)
        seen = []
        try:
            for rec in reader.iter_encoded([tar]):
                key = (rec.image_id, rec.view)
                seen.append(key)
                if key not in expected:
                    report.errors.append(f"[wds] block {b}: {tar} holds image {key[0]} view {key[1]}, not in this block's plan")
                    continue
                if _check_record("wds", b, key, meta_bytes(rec.meta), rec.blobs, listed.get(key), str(tar),
                                 report.errors, decode_blobs):
                    n_ok += 1
        except StoreError as err:
            report.errors.append(f"[wds] block {b}: {err}")
            continue
        absent = [k for k in expected if k not in seen]
        if absent:
            report.errors.append(
                f"[wds] block {b}: {tar} lacks {len(absent)} planned records (first: image {absent[0][0]} "
                f"view {absent[0][1]}); delete it and rerun {REBUILD} to rewrite this block"
            )
    return n_ok, missing


def invalidate_blocks(root: str | Path, blocks: list[int]) -> None:
    """Make `blocks` incomplete in every format present (zarr: remove the done marker; wds: the shard
    and its sidecar), so the next cache_teacher run recomputes them and only them. The zarr writer
    deletes a block's old shard files itself before rewriting it."""
    root = as_path(root)
    for b in blocks:
        if (root / "zarr").exists():
            marker_path(root / "zarr", b).unlink(missing_ok=True)
        if (root / "wds").exists():
            shard_path(root / "wds", b).unlink(missing_ok=True)
            sidecar_path(root / "wds", b).unlink(missing_ok=True)


def store_summary(root: str | Path, *, fmt: str | None = None, max_records: int | None = None) -> dict:
    """Facts for inspect_cache: records, views, per-target codec / bytes per image / ratio vs float32.

    Reads blob headers of up to `max_records` completed records (all by default) of `fmt`
    (default: zarr if present, else wds).
    """
    root = as_path(root)
    manifest = Manifest.load(root / MANIFEST_NAME)
    present = _present_formats(root)
    fmt = fmt or (present[0] if present else None)
    out: dict = {
        "root": str(root),
        "fingerprint_digest": manifest.fingerprint_digest(),
        "planned_records": len(manifest.plan),
        "blocks": manifest.num_blocks(),
        "block_size": manifest.block_size,
        "levels": manifest.levels,
        "formats": present,
        "codecs": manifest.fingerprint.get("codecs", {}),
        # once-per-cache items (teacher head, the cpca chains' PCA bases): bytes on disk, not per record
        "statics_bytes": {p.stem: p.stat().st_size for p in sorted((root / "static").glob("*.npz"))}
        if (root / "static").exists() else {},
        "created": manifest.meta,
        "format_read": fmt,
    }
    if fmt is None:
        out.update(records=0, views={}, targets={}, families={})
        return out
    reader = ZarrCacheReader(root) if fmt == "zarr" else WdsCacheReader(root)
    dropped = set(manifest.dropped)
    keys = [k for k in reader.keys() if k[0] not in dropped]  # placeholders of images the json no longer lists
    out["records"] = len(keys)
    out["dropped_images"] = len(dropped)
    out["completed_blocks"] = len(reader.completed_blocks())
    out["views"] = dict(sorted(Counter(v for _, v in keys).items()))
    out["images"] = len({i for i, _ in keys})
    sample = keys if max_records is None else keys[:max_records]
    stats: dict[str, dict] = defaultdict(lambda: {"n": 0, "stored_bytes": 0, "raw_float32_bytes": 0, "chains": Counter()})
    for image_id, view in sample:
        rec = reader.get_encoded(image_id, view)
        for name, blob in rec.blobs.items():
            info = blob_info(blob)
            s = stats[name]
            s["n"] += 1
            s["stored_bytes"] += len(blob)
            s["raw_float32_bytes"] += info["raw_bytes"]
            s["chains"][info["chain"]] += 1
    n = max(len(sample), 1)
    targets = {}
    families: dict[str, dict] = defaultdict(lambda: {"stored_bytes_per_record": 0.0, "raw_float32_bytes_per_record": 0.0})
    for name in sorted(stats):
        s = stats[name]
        targets[name] = {
            "codec": s["chains"].most_common(1)[0][0],
            "stored_bytes_per_record": s["stored_bytes"] / n,
            "raw_float32_bytes_per_record": s["raw_float32_bytes"] / n,
            "compression_ratio": s["raw_float32_bytes"] / max(s["stored_bytes"], 1),
        }
        f = families[target_family(name)]
        f["stored_bytes_per_record"] += s["stored_bytes"] / n
        f["raw_float32_bytes_per_record"] += s["raw_float32_bytes"] / n
    for f in families.values():
        f["compression_ratio"] = f["raw_float32_bytes_per_record"] / max(f["stored_bytes_per_record"], 1)
    total_stored = sum(s["stored_bytes"] for s in stats.values())
    total_raw = sum(s["raw_float32_bytes"] for s in stats.values())
    out["targets"] = targets
    out["families"] = dict(sorted(families.items()))
    out["sampled_records"] = len(sample)
    out["stored_bytes_per_record"] = total_stored / n
    out["raw_float32_bytes_per_record"] = total_raw / n
    out["compression_ratio"] = total_raw / max(total_stored, 1)
    out["disk_bytes"] = {f: sum(p.stat().st_size for p in (root / f).rglob("*") if p.is_file()) for f in present}
    return out
