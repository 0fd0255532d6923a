"""Stage 1 driver: build or resume a cache, in-process or on a dask cluster.

Work is split into blocks of `cache.block_size` consecutive records of the manifest's plan.
Blocks run in-process (`n_workers: 1`), on a local dask cluster (`n_workers > 1`, one process
each; on GPU machines one worker per GPU) or on an existing cluster (`scheduler: ADDRESS`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from tqdm import tqdm

from stages.cache.plan import WRITERS, CacheJob, prepare_store
from stages.cache.worker import cache_block, cache_blocks
from stages.config import Params
from stages.training import resolve_device


def run_cache(
    params: Params, *, n_workers: int | None = None, scheduler: str = "", overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Build or resume the cache described by params; returns a summary with per-block stats."""
    job, manifest = prepare_store(params, overwrite=overwrite)
    done = set.intersection(*[WRITERS[f](job.root, manifest).completed_blocks() for f in job.formats])
    todo = [b for b in range(manifest.num_blocks()) if b not in done]
    t0 = time.perf_counter()
    stats: list[dict[str, Any]] = []
    scheduler = scheduler or params.cache.scheduler
    n_workers = n_workers or _default_workers(params)
    with tqdm(total=len(todo), desc="cache blocks", unit="block", disable=not progress) as bar:
        if todo and (scheduler or n_workers > 1):
            stats = _run_dask(job, todo, scheduler, n_workers, bar)
        else:
            for s in cache_blocks(job, todo):
                stats.append(s)
                bar.update(1)
    return {
        "root": job.root,
        "blocks": manifest.num_blocks(),
        "computed_blocks": sum(not s["skipped"] for s in stats),
        "records": len(manifest.plan),
        "seconds": time.perf_counter() - t0,
        "fingerprint_digest": job.digest,
        "stats": sorted(stats, key=lambda s: s["block"]),
    }


def _run_dask(job: CacheJob, todo: list[int], scheduler: str, n_workers: int, bar) -> list[dict[str, Any]]:
    """One task per block on an existing scheduler or a local cluster of single-threaded processes."""
    import dask
    from distributed import Client, LocalCluster, as_completed

    stats = []
    with contextlib.ExitStack() as stack:
        if scheduler:
            client = stack.enter_context(Client(scheduler))
        else:
            # DataLoader workers are children of the dask worker: allowed only if it is not daemonic
            stack.enter_context(dask.config.set({"distributed.worker.daemon": job.loader_workers == 0}))
            cluster = stack.enter_context(
                LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
            )
            client = stack.enter_context(Client(cluster))
        futures = client.map(cache_block, [job] * len(todo), todo, pure=False)
        for future in as_completed(futures):
            stats.append(future.result())
            bar.update(1)
    return stats


def _default_workers(params: Params) -> int:
    if resolve_device(params.cache.device).type == "cuda":
        return max(1, torch.cuda.device_count())
    return params.cache.n_workers

