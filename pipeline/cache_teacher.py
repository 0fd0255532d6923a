"""Stage 1: run the teacher once over the training set and cache its targets.

Reads `teacher.checkpoint`, `data.train_*` and the `cache` section (views, targets, codecs,
format, block size, workers). Writes `cache.path` (manifest.json + Zarr and/or WebDataset
shards). Safe to rerun: finished blocks are kept, only missing ones are computed, and a
complete cache is left untouched. A cache built from other params is refused (the message
names the differing field); pass --overwrite to rebuild it. A dataset json that gained images
keeps the cached blocks and appends blocks for the new images (removed images become dropped
placeholders); the manifest records each dataset version (docs/cache-format.md §13).

Parallelism: in-process with cache.n_workers 1; a local dask cluster with n_workers > 1 (one
worker per GPU on GPU machines); --scheduler tcp://HOST:8786 uses an existing dask cluster.

Errors (missing or unreadable checkpoint, unknown target or codec, a mismatched or damaged
store, a full disk) exit with status 1 and one line naming the file / field and the fix; a full
disk or a kill leaves the finished blocks in place for the rerun.
"""

from __future__ import annotations

import json

from pipeline.params import make_parser, params_from_args, positive_int
from stages.cache.plan import resolve_train_teacher
from stages.cache.repair import repair_cache
from stages.cache.run import resolved_cache_path, run_cache
from stores.base import StoreError
from stores.manifest import CacheMismatchError
from stores.receipt import check_receipt_path, write_receipt
from stores.url import as_path, is_url, probe


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("cache_teacher", __doc__)
    parser.add_argument("--scheduler", default="", help="address of an existing dask scheduler (default: cache.scheduler)")
    parser.add_argument("--workers", type=positive_int, default=None, help="local dask workers (default: cache.n_workers)")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing cache at cache.path first "
                        "(only a folder holding a kdcache cache and nothing else)")
    parser.add_argument("--repair", action="store_true", help="verify the cache first and recompute every block "
                        "verify names as damaged (inspect_cache --verify lists them); damaged zarr metadata and an "
                        "unreadable manifest.json are restored from the params first (stages.cache.repair)")
    parser.add_argument("--stats", help="write per-block timing/size stats as JSON here")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    remote = is_url(params.cache.path)  # dvc tracks a local receipt in place of a cache at a URL
    try:
        if remote:
            check_receipt_path(params.cache.receipt)
            probe(as_path(params.cache.path))  # list + write + delete a probe object: one line if refused
        teacher = resolve_train_teacher(params)  # the checkpoint is read here, once, and passed down
        for line in teacher.report():  # what the teacher is and how its classes map, before any work
            print(line, flush=True)
        if args.repair and not args.overwrite:
            for line in repair_cache(params, as_path(resolved_cache_path(params.cache.path))):  # stages.cache.repair
                print(line, flush=True)
        summary = run_cache(params, n_workers=args.workers, scheduler=args.scheduler, overwrite=args.overwrite,
                            teacher=teacher)
        if remote:
            write_receipt(params.cache.receipt, params.cache.path)
            print(f"receipt {params.cache.receipt}: {params.cache.path} (stores.receipt)", flush=True)
    except CacheMismatchError as err:
        raise SystemExit(f"error: {err}; or pass --overwrite to replace it") from None
    except (ValueError, OSError, StoreError) as err:  # bad inputs, disk full, damaged store: one line each
        raise SystemExit(f"error: {err}") from None
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(summary, f, indent=2)
    done = summary["computed_blocks"]
    print(f"cache {summary['root']}: {summary['records']} records in {summary['blocks']} blocks "
          f"({done} computed now, {summary['blocks'] - done} already complete) in {summary['seconds']:.1f}s")


if __name__ == "__main__":
    from pipeline.cli import run

    run(main, interrupted="the finished blocks in cache.path are kept; rerun python -m pipeline.cache_teacher to compute only the missing ones")
