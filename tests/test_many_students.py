"""Many readers at once: two students train at the same time from one cache, which nobody recomputes.

- Local disk: two `python -m pipeline.train_student` processes started together on one cache both
  finish with their AP, and no file of the cache changed (the mechanism `dvc queue start -j 2` uses:
  each queued experiment is such a process, docs/many-students.md).
- A bucket (moto's S3 server on 127.0.0.1) with `cache.local`: the two processes stream the WebDataset
  shards through one node-local cache, so the server answers exactly one GET per shard object.
- `dvc exp run --queue` x 2 + `dvc queue start -j 2` itself (slow: real dvc, a tiny DAG), with
  `dvc exp show` listing each experiment's AP and the cache stage run once.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from stages.config import ViewParams
from tests.cache_fixtures import build_cache, file_mtimes, subprocess_env, write_params
from tests.s3_server import s3_root, s3_server  # noqa: F401  (fixtures)
from tests.test_dvc_exp import DVC, exp_rows
from tests.test_dvc_reuse import make_project, ran, run

pytest_plugins = ["tests.cache_fixtures"]
ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {"baseline": {"losses": {}}, "cskd": {"losses": {"cskd": 1.0}}}


def student_params(params, root: Path, **cache):
    train = replace(params.train, steps=2, batch_size=2, ckpt_every=2, log_every=1, warmup_steps=1)
    return replace(params, train=train, experiments=EXPERIMENTS, cache=replace(params.cache, **cache),
                   student=replace(params.student, out_dir=str(root / "students")))


def train_both(params_path: Path, source: str = "zarr") -> dict[str, dict]:
    """Both experiments as two processes started together; their metrics.json."""
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "pipeline.train_student", "--params", str(params_path), "--experiment", name,
         "--set", f"distill.source={source}"],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name in EXPERIMENTS}
    started = time.monotonic()
    outputs = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"student {name} failed:\n{outputs[name][-3000:]}"
    print(f"two students at once: {time.monotonic() - started:.1f}s")
    out_dir = Path(__import__("yaml").safe_load(params_path.read_text())["student"]["out_dir"])
    return {name: json.loads((out_dir / name / "metrics.json").read_text()) for name in EXPERIMENTS}


def test_two_students_train_at_once_from_one_local_cache(tiny_cache, tmp_path):
    params = student_params(tiny_cache, tmp_path)
    before = file_mtimes(params.cache.path)
    metrics = train_both(write_params(params, tmp_path / "params.yaml"))
    for name, m in metrics.items():
        assert m["experiment"] == name and isinstance(m["AP"], float) and m["teacher_mode"] == "offline"
    assert file_mtimes(params.cache.path) == before, "reading students wrote nothing into the cache"


def test_two_students_stream_a_bucket_through_one_node_local_cache(tiny_cache, tmp_path, s3_root, caplog):  # noqa: F811
    """The cache in a bucket, `cache.local` on this node's disk: each shard object is fetched once."""
    caplog.set_level(logging.INFO, logger="werkzeug")  # moto's server logs every request it answers
    params = student_params(tiny_cache, tmp_path, path=s3_root, format="wds",
                            views=[ViewParams(96, 128, False)], targets=["fpn", "cls", "box", "head"])
    build_cache(params)
    caplog.clear()
    params = replace(params, cache=replace(params.cache, local=replace(params.cache.local,
                                                                      path=str(tmp_path / "scratch"), max_gb=1)))
    metrics = train_both(write_params(params, tmp_path / "params.yaml"), source="wds")
    assert all(isinstance(m["AP"], float) for m in metrics.values())
    gets = [r.getMessage().split('"GET /', 1)[1].split(" ", 1)[0] for r in caplog.records
            if r.name == "werkzeug" and '"GET /' in r.getMessage()]
    shards = [g for g in gets if g.endswith(".tar")]
    assert shards, f"the students read no shard object: {gets}"
    assert sorted(shards) == sorted(set(shards)), f"a shard was fetched twice: {sorted(shards)}"
    assert {s.rsplit("/", 1)[1] for s in shards} == {f"shard-{b:06d}.tar" for b in range(2)}, shards
    cached = sorted(p.name for p in (tmp_path / "scratch" / "objects").iterdir() if p.suffix == ".tar")
    assert len(cached) == 2, cached


def queue_status(work, env) -> list[tuple[str, str]]:
    """(experiment name, status) rows of `dvc queue status`."""
    out = run([*DVC, "queue", "status"], work, env)
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and parts[0] != "Worker":
            rows.append((parts[1], parts[3] if parts[3] in ("Queued", "Running", "Success", "Failed") else parts[-1]))
    return rows


def workers(work, env) -> int:
    """Workers `dvc queue status` reports (active + idle)."""
    line = next((x for x in run([*DVC, "queue", "status"], work, env).splitlines() if x.startswith("Worker status")), "")
    return sum(int(n) for n in re.findall(r"(\d+) (?:active|idle)", line))


def start_workers(work, env, n: int) -> None:
    """`dvc queue start -j n`, repeated until n workers are up: workers started at the same instant can
    race on dvc's filesystem message broker and one exits at start-up (treeverse/dvc-task#73); a
    second `dvc queue start -j n` starts only the missing ones. The workers are daemons holding any
    inherited pipe open, so their output goes to the null device."""
    for _ in range(5):
        subprocess.run([*DVC, "queue", "start", "-j", str(n)], cwd=work, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120, check=True)
        time.sleep(3)
        if workers(work, env) >= n:
            return
    raise AssertionError(f"dvc queue start -j {n} did not bring up {n} workers")


@pytest.mark.slow
def test_dvc_queue_trains_two_students_at_once_and_exp_show_lists_each_ap(tmp_path):
    """`dvc exp run --queue` x 2 then `dvc queue start -j 2`: the two experiments run at the same time,
    neither reruns the cache stage, and `dvc exp show` lists both with their AP."""
    work, env = make_project(tmp_path)
    run([*DVC, "repro"], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "baseline"], work, env)
    for name, weight in (("cskd-half", 0.5), ("cskd-double", 2.0)):
        run([*DVC, "exp", "run", "--queue", "-n", name, "-S", f"experiments.cskd.losses.cskd={weight}"], work, env)
    try:
        start_workers(work, env, 2)
        both_running, deadline = False, time.monotonic() + 900
        while time.monotonic() < deadline:
            rows = queue_status(work, env)
            both_running |= sum(s == "Running" for _, s in rows) == 2
            if rows and all(s in ("Success", "Failed") for _, s in rows):
                break
            time.sleep(1)
        assert rows and all(s == "Success" for _, s in rows), rows
        assert both_running, "the two queued experiments never ran at the same time"
        for name in ("cskd-half", "cskd-double"):
            log = run([*DVC, "queue", "logs", name], work, env)
            assert ran(log) == {"train_student@cskd", "report"}, f"{name} ran {ran(log)}: the cache must be reused"
        rows = {r["name"]: r for r in exp_rows(work, env)}
        for name, weight in (("cskd-half", 0.5), ("cskd-double", 2.0)):
            assert name in rows, f"{name} not in dvc exp show: {sorted(rows)}"
            assert rows[name]["params"]["experiments"]["cskd"]["losses"]["cskd"] == weight
            assert isinstance(rows[name]["metrics"]["runs/students/cskd/metrics.json"]["AP"], float)
    finally:  # the workers are daemons: stop them whatever happened
        subprocess.run([*DVC, "queue", "stop", "--kill"], cwd=work, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
