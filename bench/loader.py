"""Stage 2 loaders: decoded cache records per second in one worker process, Zarr vs WebDataset.

Sides, alternated round by round, each reading every record of the store once:

  zarr            `ZarrCacheReader.get(image_id, view)` in a seeded random order (random access,
                  what `CachedViewDataset` does per item): every target decoded
  wds             `webdataset.WebDataset(shards)` streamed in order (as `wds_batches` does),
                  each sample through `stores.wds_store.decode_sample`: every target decoded
  zarr fpn-only   the same two reading only the fpn family (what an SSIM / feature-MSE
  wds fpn-only    student needs): Zarr skips the other families' bytes, WebDataset reads them

on two stores:
  <scale> teacher  the benchmark set cached by the real caching loop from the random teacher
                   (demo targets and codecs)
  800x1344 synth   records with RetinaNet COCO shapes at an 800x1344 image: FPN 256 ch, cls 9x80,
                   box 9x4 at strides 8..128 (P3 100x168 ... P7 7x11), trained-like contents
                   (`bench.synth_targets`), encoded with the default codecs (`CacheParams`) by
                   `stores.encode_record` and written by the real Zarr and WebDataset writers

One process, one thread (the figure a DataLoader worker gets; multiply by workers).
"""

from __future__ import annotations

import random
import time
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
    paired_ratio,
    print_table,
    settings_from,
    setup_torch,
    workdir,
    write_result,
)
from bench.fixtures import built_cache, fixture
from bench.synth_targets import STRIDES, level_sizes, retinanet_record
from stages.cache.targets import record_meta
from stages.config import CacheParams
from stages.data.batching import padded_size
from stages.data.views import View
from stores import Manifest, encode_record, open_reader, open_writer
from stores.manifest import SCHEMA_VERSION
from stores.wds_store import decode_sample

NAME = "loader"
BIG_HW = (800, 1344)
BIG_RECORDS = 6
BIG_BLOCK = 2


def synthetic_store(root: Path, records: int, hw: tuple[int, int] = BIG_HW, seed: int = 0,
                    fpn_channels: int = 256, num_classes: int = 80) -> Path:
    """A RetinaNet-shaped cache (both formats) of `records` records of hw-sized images, built once."""
    if (root / "manifest.json").exists():
        return root
    codecs = {f: CacheParams().codecs[f] for f in ("fpn", "cls", "box")}
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
    for block in range(manifest.num_blocks()):
        encoded = []
        for image_id, view in manifest.block_records(block):
            arrays = retinanet_record(rng, hw, fpn_channels=fpn_channels, num_classes=num_classes)
            meta = record_meta(image_id, view, hw, padded_size(*hw), STRIDES)
            if meta["level_sizes"] != [list(s) for s in level_sizes(*hw)]:
                raise RuntimeError("synthetic maps and record meta disagree on the level sizes")
            encoded.append(encode_record(image_id, view, meta, arrays, codecs))
        for w in writers:
            w.write_block(block, encoded)
    return root


def _decoded_bytes(rec) -> int:
    return sum(a.nbytes for a in rec["arrays"].values())


def measure_store(root: Path, settings: Settings) -> dict[str, Any]:
    zarr_reader = open_reader(root, "zarr")
    wds_reader = open_reader(root, "wds")
    keys = zarr_reader.keys()
    order = list(keys)
    random.Random(0).shuffle(order)
    shards = wds_reader.shard_paths()
    decoded = {"all": 0, "fpn": 0}

    def zarr_side(targets):
        def run():
            n = 0
            for image_id, view in order:
                n += _decoded_bytes(zarr_reader.get(image_id, view, targets=targets))
            decoded["fpn" if targets else "all"] = n
        return run

    def wds_side(targets):
        def run():
            n, count = 0, 0
            for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
                n += _decoded_bytes(decode_sample(sample, targets))
                count += 1
            if count != len(keys):
                raise RuntimeError(f"webdataset streamed {count} records of {len(keys)} from {root}")
        return run

    sides = {"zarr": zarr_side(None), "wds": wds_side(None), "zarr fpn-only": zarr_side(["fpn"]),
             "wds fpn-only": wds_side(["fpn"])}
    timing = interleaved(sides, settings.rounds)
    stored = sum(p.stat().st_size for p in (root / "wds").glob("*.tar"))
    n = len(keys)
    return {
        "records": n,
        "stored_mb_per_record": stored / n / 1e6,
        "decoded_mb_per_record": decoded["all"] / n / 1e6,
        "decoded_fpn_mb_per_record": decoded["fpn"] / n / 1e6,
        "records_per_s": {side: n / s for side, s in timing["median_s"].items()},
        "ratio_wds_vs_zarr": 1.0 / paired_ratio(timing, "wds", "zarr"),
        "ratio_wds_vs_zarr_fpn_only": 1.0 / paired_ratio(timing, "wds fpn-only", "zarr fpn-only"),
        "timing": timing,
    }


def summary_md(result: dict) -> str:
    rows = []
    for store, r in result["results"]["stores"].items():
        rps = r["records_per_s"]
        rows.append([store, r["records"], r["stored_mb_per_record"], r["decoded_mb_per_record"], rps["zarr"],
                     rps["wds"], r["ratio_wds_vs_zarr"], rps["zarr fpn-only"], rps["wds fpn-only"],
                     rps["zarr"] * r["decoded_mb_per_record"]])
    table = md_table(["store", "records", "stored MB/rec", "decoded MB/rec", "zarr rec/s", "wds rec/s",
                      "wds / zarr", "zarr fpn-only rec/s", "wds fpn-only rec/s", "zarr decoded MB/s"], rows)
    return (table + "\n\nPer worker process (one thread); rec/s medians over rounds, wds / zarr the median "
            "per-round throughput ratio. A student reading only FPN maps skips the other families' bytes with "
            "Zarr; WebDataset streams them anyway.")


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
        big = synthetic_store(work / "synthetic-800x1344", BIG_RECORDS)
        out["stores"]["800x1344 synthetic (RetinaNet COCO shapes)"] = measure_store(big, settings)
    rows = [[s, r["records_per_s"]["zarr"], r["records_per_s"]["wds"], r["ratio_wds_vs_zarr"],
             r["stored_mb_per_record"]] for s, r in out["stores"].items()]
    print_table(f"{NAME} ({settings.scale.name})", ["store", "zarr rec/s", "wds rec/s", "wds/zarr", "stored MB/rec"],
                rows)
    path = write_result(NAME, settings, env, out, time.perf_counter() - t0)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
