"""`dvc exp run` itself on a tiny profile of the real dvc.yaml and .gitignore.

`dvc exp run -S experiments.cskd.losses.cskd=2.0` must rerun only that student and the report,
and `dvc exp show` must list the experiment with its AP (and per-step time, and the cache's
fidelity): the metrics files are git-tracked, so the experiment's commit holds them (when they
lived only under the git-ignored runs/ with cache: false, every experiment's metrics read "!").
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.test_dvc_reuse import make_project, ran, run

DVC = [sys.executable, "-m", "dvc"]


def stdout(cmd: list[str], work, env) -> str:
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def exp_rows(work, env) -> list[dict]:
    """`dvc exp show --json` as flat rows: {name, params, metrics} per commit / experiment."""
    rows = []

    def add(rev: dict) -> None:
        data = rev.get("data") or {}
        params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
        metrics = {path: m.get("data") for path, m in (data.get("metrics") or {}).items()}
        rows.append({"name": rev.get("name") or rev.get("rev"), "params": params, "metrics": metrics})
        for exp in rev.get("experiments") or []:
            for child in exp.get("revs") or []:
                add(child)

    for entry in json.loads(stdout([*DVC, "exp", "show", "--json"], work, env)):
        add(entry)
    return rows


def test_exp_run_reruns_one_student_and_exp_show_lists_its_ap(tmp_path):
    work, env = make_project(tmp_path)
    run([*DVC, "repro"], work, env)
    tracked = run(["git", "status", "--porcelain", "--untracked-files=all"], work, env)
    for path in ("runs/students/cskd/metrics.json", "runs/students/cskd/train_log.csv", "runs/cache_report.json"):
        assert path in tracked, f"{path} must be left to git (not ignored), so experiment commits hold it"
    assert "model.pt" not in tracked and "cache/teacher" not in tracked, "dvc outs stay out of git"
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "baseline"], work, env)

    out = run([*DVC, "exp", "run", "-n", "cskd2", "-S", "experiments.cskd.losses.cskd=2.0"], work, env)
    assert ran(out) == {"train_student@cskd", "export_student", "report"}

    rows = exp_rows(work, env)
    exp = [r for r in rows if r["name"] == "cskd2"]
    assert exp, f"experiment not listed: {[r['name'] for r in rows]}"
    metrics = exp[0]["metrics"]
    student = metrics.get("runs/students/cskd/metrics.json")
    assert student is not None, f"no metrics for the experiment's student (dvc shows '!'): {sorted(metrics)}"
    assert isinstance(student["AP"], float) and isinstance(student["sec_per_step"], float)
    assert exp[0]["params"]["experiments"]["cskd"]["losses"]["cskd"] == 2.0
    assert metrics.get("runs/cache_report.json"), "the cache's size / fidelity is in every experiment"
    baseline = [r for r in rows if r["name"] not in ("cskd2", "workspace")]
    assert baseline and baseline[0]["metrics"].get("runs/students/cskd/metrics.json") is not None
    table = stdout([*DVC, "exp", "show", "--csv"], work, env)
    header, *lines = table.strip().splitlines()
    column = "runs/students/cskd/metrics.json:AP"
    assert column in header.split(","), header
    ap = header.split(",").index(column)
    assert all(line.split(",")[ap] not in ("!", "") for line in lines if "cskd2" in line), table
    plots = stdout([*DVC, "plots", "diff", "--json", "cskd2"], work, env)
    assert "runs/students/cskd/train_log.csv" in plots
