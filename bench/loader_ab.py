"""Loader records/s per worker, two source trees side by side (before / after a change).

Why a separate script: on a shared, loaded machine two runs minutes apart differ by more than most
changes do, so "before" and "after" are measured in alternating fresh processes, round by round,
and compared by their medians. Each process imports `stores` / `stages` from its own tree and reads
the given cache folders the way a stage-2 loader worker does, one thread:

  zarr   `ZarrCacheReader.get(image_id, view, compact=True)` over every record in a seeded random order
  wds    every shard streamed in order, each sample through `decode_sample(..., compact=True)` (which
         checks its crc32c against the sidecar)

A tree that has them uses the stage-2 loaders' fast paths (``defer_delta=True``, the sidecar-driven
`stores.wds_store.shard_samples`); an older tree reads as it did (webdataset's tar reader, index
cumsum in the worker). Rates are records per wall-second and per CPU-second of the process.

    mkdir -p /tmp/before && git archive <commit> stores stages bench | tar -x -C /tmp/before
    .venv/bin/python bench/loader_ab.py --before /tmp/before --rounds 6 --passes 30 \\
        runs/bench_work/realscale-store-demo runs/bench_work/realscale-store-coco
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _store_rates(root: str, passes: int, fast: bool) -> dict:
    import webdataset as wds

    from stores import open_reader, wds_store

    opts = {"compact": True, "defer_delta": True} if fast else {"compact": True}
    z, w = open_reader(root, "zarr"), open_reader(root, "wds")
    keys, shards = z.keys(), w.shard_paths()

    def zarr_pass():
        order = list(keys)
        random.Random(0).shuffle(order)
        for k in order:
            z.get(*k, **opts)
        return len(order)

    def wds_pass():
        src = (wds.DataPipeline(wds.SimpleShardList(shards), wds_store.shard_samples) if fast
               else wds.WebDataset(shards, shardshuffle=False, empty_check=False))
        n = 0
        for sample in src:
            wds_store.decode_sample(sample, **opts)
            n += 1
        if n != len(keys):
            raise RuntimeError(f"{root}: streamed {n} records of {len(keys)}")
        return n

    out = {}
    for name, run in (("zarr", zarr_pass), ("wds", wds_pass)):
        run()  # warm-up: files in the page cache, sidecars parsed
        t0, c0, n = time.perf_counter(), time.process_time(), 0
        for _ in range(passes):
            n += run()
        out[f"{Path(root).name} {name}"] = (n / (time.perf_counter() - t0), n / (time.process_time() - c0))
    return out


def _mb_per_record(root: str) -> float:
    """Stored MB per record of a cache folder: its WebDataset shards' bytes over the plan's records."""
    records = len(json.loads((Path(root) / "manifest.json").read_text())["plan"])
    return sum(p.stat().st_size for p in (Path(root) / "wds").glob("*.tar")) / records / 1e6


def side(tree: str, passes: int, roots: list[str]) -> dict:
    """One process: rates of both readers on every store (sys.path points at `tree` first)."""
    sys.path.insert(0, tree)
    from stages.distill.loader import tune_malloc
    from stores import wds_store

    tune_malloc()
    import numcodecs.blosc

    numcodecs.blosc.set_nthreads(1)  # one thread per worker, also for blosc parts (its pool would add cores)
    fast = "defer_delta" in inspect.signature(wds_store.decode_sample).parameters
    out = {}
    for root in roots:
        out.update(_store_rates(root, passes, fast))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="a source tree with stores/ and stages/ (git archive); required")
    ap.add_argument("--after", default=str(Path(__file__).resolve().parents[1]), help="default: this tree")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--passes", type=int, default=30, help="reads of every record per side and process")
    ap.add_argument("--side", nargs=2, metavar=("TREE", "PASSES"), help=argparse.SUPPRESS)
    ap.add_argument("roots", nargs="+", help="cache folders (with zarr/ and wds/)")
    args = ap.parse_args(argv)
    if args.side:
        print(json.dumps(side(args.side[0], int(args.side[1]), args.roots)))
        return {}
    roots = [str(Path(r).resolve()) for r in args.roots]
    if not args.before:
        ap.error("--before TREE is required (a source tree to compare with, e.g. from git archive)")
    res: dict[str, list[dict]] = {"before": [], "after": []}
    trees = [("before", args.before), ("after", args.after)]
    for r in range(args.rounds):
        for label, tree in trees if r % 2 == 0 else trees[::-1]:
            cmd = [sys.executable, __file__, "--side", tree, str(args.passes), *roots]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env={**os.environ, "PYTHONPATH": ""})
            if done.returncode:
                raise SystemExit(f"the {label} process failed ({tree}):\n{done.stderr[-2000:]}")
            res[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| store, reader | MB/record | before rec/s | after rec/s | before rec/CPU-s | after rec/CPU-s "
          "| after/before (CPU-s) |")
    print("|---|---|---|---|---|---|---|")
    for key in res["before"][0]:
        root = next(r for r in roots if key.startswith(Path(r).name + " "))
        b = [x[key] for x in res["before"]]
        a = [x[key] for x in res["after"]]
        bw, aw = statistics.median(v[0] for v in b), statistics.median(v[0] for v in a)
        bc, ac = statistics.median(v[1] for v in b), statistics.median(v[1] for v in a)
        print(f"| {key} | {_mb_per_record(root):.2f} | {bw:.1f} | {aw:.1f} | {bc:.1f} | {ac:.1f} | {ac / bc:.2f} |")
    print(f"medians of {args.rounds} alternating processes per side, {args.passes} passes each")
    return res


if __name__ == "__main__":
    main()
