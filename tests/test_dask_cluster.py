"""Stage 1 on a real dask cluster of separate processes: `dask scheduler` + two `dask worker`
processes (`--nthreads 1 --nworkers 1`), `python -m pipeline.cache_teacher --scheduler ADDRESS`.

One worker process is SIGKILLed while it runs a block; the run must still finish, and the store
must equal the single-process reference (`tiny_cache`, built in-process uninterrupted with one
torch thread) value for value, with every record once, every block marked, no temp file left.
Claims go through the scheduler (distributed.Lock); the lease of the dead worker's claims times
out after 3 s here (DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_TIMEOUT) instead of 30 s.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stores.verify import verify_store
from tests.cache_fixtures import all_records, assert_same_records, subprocess_env, tiny_params, write_params

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache

ROOT = Path(__file__).resolve().parents[1]
DASK = str(Path(sys.executable).parent / "dask")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env() -> dict[str, str]:
    return {**subprocess_env(), "PYTHONPATH": str(ROOT),
            "DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_TIMEOUT": "3s",
            "DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_VALIDATION_INTERVAL": "500ms"}


@pytest.fixture
def cluster(tmp_path):
    """(address, {pid: Popen}) of a scheduler and two single-threaded worker processes (no nanny:
    the process we kill is the worker itself, and nothing restarts it)."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    procs = []
    logs = []

    def start(*args):
        log = open(tmp_path / f"dask-{len(procs)}.log", "wb")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen([DASK, *args], cwd=ROOT, env=cluster_env(), stdout=log, stderr=log))

    start("scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard")
    for i in range(2):
        start("worker", address, "--nthreads", "1", "--nworkers", "1", "--no-nanny", "--no-dashboard",
              "--name", f"w{i}")
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
        yield address, {p.pid: p for p in procs[1:]}
    finally:
        for p in reversed(procs):  # only the processes this fixture started
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def kill_a_busy_worker(address: str, run: subprocess.Popen, first_block_out, timeout: float) -> int:
    """SIGKILL a dask worker that is executing a block task, once `first_block_out()` says a block's
    marker is in the store (so the kill lands mid-run, not before the first block). Returns its pid."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        deadline = time.monotonic() + timeout
        while True:
            assert run.poll() is None, f"finished before the kill: {run.stdout.read().decode()[-3000:]}"
            if time.monotonic() > deadline:
                run.kill()
                pytest.fail(f"no block started in time: {run.communicate()[0].decode()[-3000:]}")
            if first_block_out():
                busy = client.run(lambda dask_worker: (os.getpid(), dask_worker.state.executing_count))
                pids = [pid for pid, executing in busy.values() if executing]
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    return pids[0]
            time.sleep(0.02)


def test_worker_killed_mid_block_store_equals_single_process(cluster, tiny_cache, tiny_coco, tiny_teacher, tmp_path):
    address, workers = cluster
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path)
    root = Path(params.cache.path)
    cmd = [sys.executable, "-m", "pipeline.cache_teacher", "--params", str(write_params(params, tmp_path / "p.yaml")),
           "--scheduler", address, "--stats", str(tmp_path / "stats.json")]
    run = subprocess.Popen(cmd, cwd=ROOT, env=cluster_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed = None
    try:
        killed = kill_a_busy_worker(address, run, lambda: any((root / "zarr" / "done").glob("block-*.json")), 120)
        out, _ = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    text = out.decode()
    assert run.returncode == 0, text[-4000:]
    assert killed in workers and workers[killed].wait(timeout=10) == -signal.SIGKILL
    stats = json.loads((tmp_path / "stats.json").read_text())["stats"]
    print(f"killed worker pid {killed}; blocks by pid: {[(s['block'], s['pid'], s['skipped']) for s in stats]}")
    assert sorted({s["block"] for s in stats}) == [0, 1, 2, 3]
    written = [s for s in stats if not s["skipped"]]
    assert all(s["pid"] in workers and s["torch_threads"] == 1 for s in written)
    assert all(s["teacher_loads"] == 1 for s in written), "each worker process loads the teacher once"
    # the store: complete, no temp file of the dead writer, value for value the single-process cache
    report = verify_store(root)
    assert report.ok and not report.missing_blocks, report.errors
    leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial")]
    assert not leftovers, leftovers
    for fmt in ("zarr", "wds"):
        assert_same_records(all_records(root, fmt), all_records(tiny_cache.cache.path, fmt), fmt)
