"""Stage 1 driver: build or resume a cache, in-process or on a dask cluster.

Work is split into blocks of `cache.block_size` consecutive records of the manifest's plan.
Blocks run in-process (`n_workers: 1`), on a local dask cluster (`n_workers > 1`, one process
each; on GPU machines one worker per GPU) or on an existing cluster (`scheduler: ADDRESS`).
Each block is one task; the scheduler reruns the task of a worker that dies, and a rerun block is
claimed and published safely (`stages.cache.claims`).

GPU machines: one worker process per GPU, each seeing only its GPU (dask-cuda's
LocalCUDACluster when installed, else CUDA_VISIBLE_DEVICES per worker), one task thread each and
the CPU cores split between them (OMP/MKL threads), so N workers never oversubscribe the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from stages.cache.plan import WRITERS, CacheJob, prepare_store, resolve_train_teacher
from stages.cache.worker import cache_block, cache_blocks
from stages.config import Params
from stages.detectors.resolved_teacher import ResolvedTeacher
from stages.training import resolve_device


def run_cache(
    params: Params, *, n_workers: int | None = None, scheduler: str = "", overwrite: bool = False, progress: bool = True,
    teacher: ResolvedTeacher | None = None,
) -> dict[str, Any]:
    """Build or resume the cache described by params; returns a summary with per-block stats.
    `teacher`: params' teacher as the entry point resolved it (else it is resolved here, once)."""
    params = replace(params, cache=replace(params.cache, path=resolved_cache_path(params.cache.path)))
    resolve_device(params.cache.device, "cache.device")  # one this machine lacks: refused here, naming the field
    teacher = teacher or resolve_train_teacher(params)
    job, manifest = prepare_store(params, overwrite=overwrite, teacher=teacher)
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
            for s in cache_blocks(job, todo, teacher):
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


def resolved_cache_path(path: str) -> str:
    """cache.path with its `..` and symlinked parents resolved BEFORE any check: `D/cache/../ds/train`
    with D/cache missing would pass the non-empty check (the kernel cannot walk through a missing
    folder) and, once D/cache is created, name the dataset's image folder. The last component is
    kept as written, so a symlink there is still seen (and refused for --overwrite)."""
    if "://" in path:  # an object-store URL: no local resolution
        return path
    p = Path(path).expanduser()
    if p.name in ("", ".", ".."):
        return str(p.resolve())
    return str(p.parent.resolve() / p.name)


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
            with _children_ignore_sigint():
                if resolve_device(job.device).type == "cuda":
                    cluster = stack.enter_context(_gpu_cluster(n_workers))
                else:
                    cluster = stack.enter_context(
                        LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
                    )
            client = stack.enter_context(Client(cluster))
        futures = client.map(cache_block, [job] * len(todo), todo, pure=False)
        try:
            for future in as_completed(futures):
                stats.append(future.result())
                bar.update(1)
        except KeyboardInterrupt:
            _quiet_shutdown(None if scheduler else client)
            raise
    return stats


def _quiet_shutdown(own_client) -> None:
    """Ctrl-C: the cluster is closed next, and its processes log every task cancelled, claim released
    late and worker killed on the way: noise before the entry point's one "interrupted" line. Silence
    this process and the workers of our own local cluster (never those of a shared scheduler)."""
    logging.disable(logging.CRITICAL)
    if own_client is not None:
        with contextlib.suppress(Exception):
            own_client.run(logging.disable, logging.CRITICAL)  # on every worker of the local cluster


@contextlib.contextmanager
def _children_ignore_sigint():
    """Worker processes started inside inherit an ignored SIGINT. A terminal's Ctrl-C reaches every
    process of its group, and workers interrupted on their own print tracebacks and warnings while
    the main process, which closes them anyway, prints its one line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def gpu_worker_env(gpu: int, n_workers: int, cpus: int | None = None) -> dict[str, str]:
    """Environment of the worker of GPU `gpu`: that GPU only, and its share of the CPU cores."""
    threads = str(max(1, (cpus or os.cpu_count() or 1) // n_workers))
    return {"CUDA_VISIBLE_DEVICES": str(gpu), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def _gpu_cluster(n_workers: int):
    """One single-threaded worker process per GPU."""
    try:
        from dask_cuda import LocalCUDACluster  # sets CUDA_VISIBLE_DEVICES and CPU affinity per worker

        return LocalCUDACluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=None)
    except ImportError:
        pass
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {i: {"cls": Nanny, "options": {"nthreads": 1, "env": gpu_worker_env(i, n_workers)}}
               for i in range(n_workers)}
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}})


def _default_workers(params: Params) -> int:
    if resolve_device(params.cache.device).type == "cuda":
        return max(1, torch.cuda.device_count())
    return params.cache.n_workers

