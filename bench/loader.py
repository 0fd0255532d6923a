"""Stage 2 loaders: records per second in one worker process, Zarr vs WebDataset, dense float32
decode in the worker ("before") vs compact codecs decoded on the training device ("after").

What a loader worker does per record, per side (alternated round by round, each reading every
record of the store once):

  zarr            `ZarrCacheReader.get(image_id, view, compact=...)` in a seeded random order
                  (random access, what `CachedViewDataset` does per item)
  wds             the shards streamed in order through webdataset's pipeline with the cache's own
                  sample reader (``wds.DataPipeline(wds.SimpleShardList(shards), shard_samples)``, as
                  `wds_batches` does: members read at the sidecar's offsets, no Python tar walk), each
                  sample through `stores.wds_store.decode_sample(..., compact=...)`, which checks
                  the sample's crc32c against its shard's sidecar first (sha256 for
                  shards written before the sidecar had crc32c)
  zarr fpn-only   the same two reading only the fpn family (what an SSIM / feature-MSE student
  wds fpn-only    needs): both readers skip the other families' bytes (WebDataset reads only the
                  selected members at the sidecar's offsets, `shard_samples_of`)

  compact=False   "before": every target decoded to float32 numpy maps in the worker (the numpy
                  reference decode, with the dense int8c / fp16 codecs)
  compact=True    "after": the lossless stage and framing only (`stores.codecs.unpack`), the parts
                  handed on as they are stored, index parts still delta-coded (``defer_delta``, as the
                  stage-2 loaders do); the cumsum, dequantise and scatter run on the training device

  device decode   (after stores only) `stages.distill.device_decode.decode_on_device` of every
                  record's compact parts with torch on THIS machine's CPU, one thread: the work
                  moved off the loader worker; on a GPU it is a few kernels per record

Stores:
  <scale> teacher   the benchmark set cached by the real caching loop from the random teacher
                    (demo targets and codecs, params.yaml)
  800x1344 synth    records with RetinaNet COCO shapes at an 800x1344 image: FPN 256 ch, cls 9x80,
                    box 9x4 at strides 8..128 (P3 100x168 ... P7 7x11), `bench.synth_targets`
                    contents, encoded by `stores.encode_record` and written by the real Zarr and
                    WebDataset writers, once with the dense int8c / fp16 codecs (BEFORE_CODECS,
                    read with compact=False) and once with the default codecs (`CacheParams`,
                    read with compact=True)
  800x1344 demo     the same with the demo teacher's shapes (FPN 64 ch, 6 classes): ~1.8 MB per
                    record with the defaults, the size class of the demo teacher's real records
                    (1.5 MB; i.i.d. synthetic class maps keep more top-k entries)

One process, one thread (the figure a DataLoader worker gets; multiply by workers).
"""

from __future__ import annotations

import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from bench.common import (
    Settings,
    interleaved,
    make_parser,
    md_table,
    median,
    paired_ratio,
    print_table,
    settings_from,
    setup_torch,
    workdir,
    write_result,
)
from bench.fixtures import built_cache, fixture
from bench.synth_targets import STRIDES, level_sizes, retinanet_record
from stages.cache.basis import cpca_families
from stages.cache.targets import record_meta
from stages.config import CacheParams
from stages.data.batching import padded_size
from stages.data.views import View
from stages.distill.device_decode import record_to_device
from stages.distill.loader import tune_malloc
from stores import Manifest, encode_record, open_reader, open_writer
from stores.base import target_family
from stores.cache_basis import BASIS_STATIC, BasisFit
from stores.manifest import MANIFEST_NAME, SCHEMA_VERSION, sha256_file
from stores.wds_store import decode_sample, shard_samples_of

NAME = "loader"
BIG_HW = (800, 1344)
BIG_RECORDS = 6
BIG_BLOCK = 2
DEVICE_SIDE = "device decode (cpu torch)"


# the dense set "int8c/int8c/fp16": every map stored whole, int8 codes (boxes fp16), decoded in the worker
BEFORE_CODECS = {"fpn": "int8c+zstd", "cls": "int8c+zstd", "box": "fp16+zstd"}


def store_bases(root: Path, zarr_writer, manifest: Manifest, bases: dict) -> Manifest:
    """A cache's cpca bases stored as stage 1 stores them: a static item, its sha256 in the manifest."""
    zarr_writer.write_static(BASIS_STATIC, bases)
    manifest = replace(manifest, statics={BASIS_STATIC: sha256_file(root / "static" / f"{BASIS_STATIC}.npz")})
    manifest.save(root / MANIFEST_NAME)
    return manifest


def synthetic_store(root: Path, records: int, hw: tuple[int, int] = BIG_HW, seed: int = 0,
                    fpn_channels: int = 256, num_classes: int = 80, codecs: dict | None = None) -> Path:
    """A RetinaNet-shaped cache (both formats) of `records` records of hw-sized images, built once,
    with `codecs` (default: today's `CacheParams` defaults for fpn, cls, box)."""
    if (root / "manifest.json").exists():
        return root
    codecs = dict(codecs) if codecs else {f: CacheParams().codecs[f] for f in ("fpn", "cls", "box")}
    key = View(min(hw), max(hw), False).key
    plan = [(i + 1, key) for i in range(records)]
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        fingerprint={"synthetic": f"retinanet-{hw[0]}x{hw[1]}", "codecs": codecs, "seed": seed},
        plan=plan,
        block_size=BIG_BLOCK,
        levels=len(STRIDES),
        meta={"note": "bench.loader synthetic store"},
    )
    writers = [open_writer(root, manifest, fmt) for fmt in ("zarr", "wds")]
    rng = np.random.default_rng(seed)
    records = {key: retinanet_record(rng, hw, fpn_channels=fpn_channels, num_classes=num_classes) for key in plan}
    bases = None
    ks = cpca_families(codecs)
    if ks:  # a cpca chain: the cache's one basis, fitted on its records as stage 1 would
        fit = BasisFit()
        for arrays in records.values():
            for name, arr in arrays.items():
                if target_family(name) in ks:
                    fit.add(name, arr)
        bases = fit.bases(max(ks.values()))
        store_bases(root, writers[0], manifest, bases)
    for block in range(manifest.num_blocks()):
        encoded = []
        for image_id, view in manifest.block_records(block):
            arrays = records[(image_id, view)]
            meta = record_meta(image_id, view, hw, padded_size(*hw), STRIDES)
            if meta["level_sizes"] != [list(s) for s in level_sizes(*hw)]:
                raise RuntimeError("synthetic maps and record meta disagree on the level sizes")
            encoded.append(encode_record(image_id, view, meta, arrays, codecs, num_classes=num_classes, bases=bases))
        for w in writers:
            w.write_block(block, encoded)
    return root


def _held_bytes(rec) -> int:
    """Bytes a worker hands on: float32 maps (reference decode) or compact parts."""
    return sum(a.nbytes for a in rec["arrays"].values())


def _bytes_by_family(reader, keys) -> dict[str, float]:
    """Stored blob bytes per target family, mean per record."""
    out: dict[str, float] = {}
    for image_id, view in keys:
        for name, blob in reader.get_encoded(image_id, view).blobs.items():
            fam = target_family(name)
            out[fam] = out.get(fam, 0.0) + len(blob) / len(keys)
    return out


FPN_ONLY = {"fpn-only": ["fpn"]}  # what an SSIM / feature-MSE student reads


def measure_store(root: Path, settings: Settings, compact: bool = True,
                  target_sets: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Records/s per worker of both readers; `compact`: hand on parts (after) or float32 maps (before).
    Every target is read ("zarr", "wds"), and each of `target_sets` ({label: families}, default the
    fpn-only set) as a stage-2 run whose losses read only those families reads it ("zarr <label>",
    "wds <label>": the other families' bytes are skipped by both readers).
    The process gets the malloc tuning a stage-2 loader worker gets (`tune_malloc`)."""
    tune_malloc()
    zarr_reader = open_reader(root, "zarr")
    wds_reader = open_reader(root, "wds")
    keys = zarr_reader.keys()
    order = list(keys)
    random.Random(0).shuffle(order)
    shards = wds_reader.shard_paths()
    sets: dict[str, list[str] | None] = {"all": None, **(FPN_ONLY if target_sets is None else target_sets)}
    held = dict.fromkeys(sets, 0)

    def zarr_side(label):
        def run():
            n = 0
            for image_id, view in order:
                n += _held_bytes(zarr_reader.get(image_id, view, targets=sets[label], compact=compact,
                                                 defer_delta=compact))
            held[label] = n
        return run

    def wds_side(label):
        targets = sets[label]

        def run():
            count = 0
            pipeline = wds.DataPipeline(wds.SimpleShardList(shards), shard_samples_of(targets))  # as `wds_batches`
            for sample in pipeline:
                decode_sample(sample, targets, compact=compact, defer_delta=compact)
                count += 1
            if count != len(keys):
                raise RuntimeError(f"webdataset streamed {count} records of {len(keys)} from {root}")
        return run

    sides = {}
    for label in sets:
        suffix = "" if label == "all" else f" {label}"
        sides[f"zarr{suffix}"], sides[f"wds{suffix}"] = zarr_side(label), wds_side(label)
    compacts = [zarr_reader.get(i, v, compact=True, defer_delta=True).arrays for i, v in keys] if compact else []
    if compact:
        cpu = torch.device("cpu")

        def device_side():
            for rec in compacts:
                record_to_device(rec, cpu)
        sides[DEVICE_SIDE] = device_side
    cpu_s: dict[str, list[float]] = {name: [] for name in sides}

    def cpu_timed(name, fn):  # CPU seconds of this process: what one worker costs on a core of its own
        def run():
            t0 = time.process_time()
            fn()
            cpu_s[name].append(time.process_time() - t0)
        return run

    timing = interleaved({name: cpu_timed(name, fn) for name, fn in sides.items()}, settings.rounds)
    n = len(keys)
    cpu_rate = {name: n / median(ts[1:] or ts) for name, ts in cpu_s.items()}  # the first call is the warm-up
    stored = sum(p.stat().st_size for p in (root / "wds").glob("*.tar"))
    return {
        "records": n,
        "compact": compact,
        "codecs": zarr_reader.manifest.fingerprint.get("codecs"),
        "stored_mb_per_record": stored / n / 1e6,
        "stored_mb_by_family": {f: b / 1e6 for f, b in _bytes_by_family(zarr_reader, keys).items()},
        # what the worker hands on: float32 maps (compact=False) or the compact parts (compact=True)
        "decoded_mb_per_record": held["all"] / n / 1e6,
        "decoded_mb_per_record_by_set": {label: b / n / 1e6 for label, b in held.items()},
        "target_sets": sets,
        "records_per_s": {side: n / s for side, s in timing["median_s"].items() if side != DEVICE_SIDE},
        # the dequantise / scatter the training device does, here on this CPU (compact stores only)
        "device_decode_records_per_s": n / timing["median_s"][DEVICE_SIDE] if compact else None,
        # records per CPU-second of the worker process: steadier than wall time on a shared machine
        "records_per_cpu_s": {k: v for k, v in cpu_rate.items() if k != DEVICE_SIDE},
        "device_decode_records_per_cpu_s": cpu_rate.get(DEVICE_SIDE),
        "ratio_wds_vs_zarr": 1.0 / paired_ratio(timing, "wds", "zarr"),
        "ratio_wds_vs_zarr_fpn_only": (1.0 / paired_ratio(timing, "wds fpn-only", "zarr fpn-only")
                                       if "fpn-only" in sets else None),
        "timing": timing,
    }


def _one_thread() -> None:
    torch.set_num_threads(1)


def measure_store_apart(root: Path, settings: Settings, **kwargs) -> dict[str, Any]:
    """`measure_store` in a fresh spawned process with one torch thread, as a DataLoader worker is:
    not inside a benchmark process whose heap a teacher and a student have just churned (realscale's
    in-process figures varied 10-20 % from run to run)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=_one_thread) as pool:
        return pool.submit(measure_store, root, settings, **kwargs).result()


def summary_md(result: dict) -> str:
    rows = []
    for store, r in result["results"]["stores"].items():
        rps = r["records_per_s"]
        cpu = r.get("records_per_cpu_s", {})
        rows.append([store, "compact parts" if r.get("compact") else "float32 maps", r["records"],
                     r["stored_mb_per_record"], r["decoded_mb_per_record"], rps["zarr"], rps["wds"],
                     cpu.get("zarr"), cpu.get("wds"), r["ratio_wds_vs_zarr"], rps["zarr fpn-only"],
                     rps["wds fpn-only"], r.get("device_decode_records_per_s")])
    table = md_table(["store", "worker hands on", "records", "stored MB/rec", "handed-on MB/rec", "zarr rec/s",
                      "wds rec/s", "zarr rec/CPU-s", "wds rec/CPU-s", "wds / zarr", "zarr fpn-only rec/s",
                      "wds fpn-only rec/s", "device decode rec/s (CPU torch)"], rows)
    return (table + "\n\nPer worker process (one thread); rec/s medians over rounds, wds / zarr the median "
            "per-round throughput ratio; rec/CPU-s = records per CPU-second of the worker process (what a "
            "worker with a core of its own would do; steadier than wall time on a loaded machine). *before*: the dense codecs (fpn and cls int8c, box fp16), every map decoded to float32 "
            "in the worker; *after*: the default codecs, the worker only undoes zstd and the framing "
            "(wds also checks each sample's crc32c) and the training device dequantises (the last column is "
            "that work on this CPU, one torch thread). A student reading only FPN maps skips the other "
            "families' bytes with both readers.")


def main(argv: list[str] | None = None) -> dict:
    args = make_parser(NAME, __doc__).parse_args(argv)
    settings = settings_from(args, argv)
    env = setup_torch(settings)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"stores": {}}
    with workdir(settings) as work:
        work = Path(work)
        arch = settings.archs[0]
        fix = fixture(work, settings.scale, arch, settings.images, settings.batch)
        with torch.no_grad():
            cache = built_cache(fix)
        out["stores"][f"{settings.scale.name} teacher ({arch}, {fix.padded_size[0]}x{fix.padded_size[1]})"] = (
            measure_store(cache, settings))
        before = synthetic_store(work / "synthetic-800x1344-before", BIG_RECORDS, codecs=BEFORE_CODECS)
        out["stores"]["800x1344 synthetic, before (dense int8c / fp16 codecs, CPU decode)"] = measure_store(
            before, settings, compact=False)
        after = synthetic_store(work / "synthetic-800x1344", BIG_RECORDS)
        out["stores"]["800x1344 synthetic, after (default codecs, device decode)"] = measure_store(after, settings)
        demo = synthetic_store(work / "synthetic-800x1344-demo", 2 * BIG_RECORDS, fpn_channels=64, num_classes=6)
        out["stores"]["800x1344 synthetic, demo-teacher shapes (FPN 64, 6 classes), default codecs"] = (
            measure_store(demo, settings))
    rows = [[s, r["records_per_s"]["zarr"], r["records_per_s"]["wds"], r["ratio_wds_vs_zarr"],
             r["stored_mb_per_record"]] for s, r in out["stores"].items()]
    print_table(f"{NAME} ({settings.scale.name})", ["store", "zarr rec/s", "wds rec/s", "wds/zarr", "stored MB/rec"],
                rows)
    path = write_result(NAME, settings, env, out, time.perf_counter() - t0)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
