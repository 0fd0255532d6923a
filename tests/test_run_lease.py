"""One writer per run folder: two train_student processes into one --out cannot both proceed.

The second is refused by the first's lease (`run.lease`, created exclusively), not by a POSIX lock
and not by the params check (both runs have identical params, so without the lease the second
would "resume" alongside the first). A lease of a dead process on this host is taken over; any
other lease is refused naming its holder."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from stages.run_lease import LEASE_NAME, RunLeaseError, acquire, release, run_lease
from tests.cache_fixtures import subprocess_env, write_params

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache

ROOT = Path(__file__).resolve().parents[1]


def test_two_concurrent_students_into_one_folder(tiny_cache, tmp_path):
    # long enough that the first still trains while the second starts up (it is killed afterwards)
    params = replace(tiny_cache, distill=replace(tiny_cache.distill, losses={"mse": 1.0}),
                     train=replace(tiny_cache.train, steps=100000, ckpt_every=100000, log_every=1))
    path = write_params(params, tmp_path / "p.yaml")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.train_student", "--params", str(path), "--out", str(out)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 240
        lease = None
        while lease is None:  # the first one holds the lease (and trains for much longer than this test)
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run never took its lease"
            assert not (out / "train_log.csv").exists() or (out / LEASE_NAME).exists(), "it trains without a lease"
            time.sleep(0.2)
            with contextlib.suppress(OSError, ValueError):
                lease = json.loads((out / LEASE_NAME).read_text())
        assert lease["pid"] == first.pid and lease["host"] == socket.gethostname()
        second = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run must still be running for this test to mean anything"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    err = second.stderr.strip()
    assert second.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {out} is in use by another student run") and f"pid {first.pid}" in err, err
    assert f"delete {out / LEASE_NAME}" in err, err
    # the killed run left its lease: same host, dead pid -> taken over by the next run
    taken = acquire(out, "student")
    assert taken["pid"] == os.getpid() and json.loads((out / LEASE_NAME).read_text())["run_id"] == taken["run_id"]
    release(out, taken)
    assert not (out / LEASE_NAME).exists()


def test_lease_rules(tmp_path):
    folder = tmp_path / "run"
    with run_lease(folder, "student") as lease:
        with pytest.raises(RunLeaseError, match=f"in use by another student run {lease['run_id'][:12]}"):
            acquire(folder, "student")  # a live pid on this host: refused
    assert not folder.exists(), "a folder the run created and left empty is removed"

    folder.mkdir()
    other_host = {"run_id": "a" * 32, "host": "some-other-host", "pid": 1, "kind": "teacher", "started": "then"}
    (folder / LEASE_NAME).write_text(json.dumps(other_host))
    with pytest.raises(RunLeaseError, match=r"pid 1 on host some-other-host.*delete .*run.lease"):
        acquire(folder, "student")  # another host: its pid cannot be checked from here
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / LEASE_NAME).write_text(json.dumps({**other_host, "host": socket.gethostname(),
                                                 "pid": int(dead.stdout)}))
    lease = acquire(folder, "student")  # this host, a pid that no longer exists: stale, taken over
    assert json.loads((folder / LEASE_NAME).read_text())["run_id"] == lease["run_id"]
    release(folder, {"run_id": "not-ours"})
    assert (folder / LEASE_NAME).exists(), "release never deletes another run's lease"
