"""`dvc repro` on a tiny profile of the real dvc.yaml: which stages rerun after which change."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data": {"min_size": 96, "max_size": 128,
             "synthetic": {"out": "data/synthetic", "seed": 0, "num_train": 8, "num_val": 4, "min_side": 96,
                           "max_side": 128}},
    "teacher": {"model": {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 16, "head_convs": 2},
                "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "ckpt_every": 2}},
    # score_thresh 0: a 2-step student scores ~0.01, and the ONNX export traces NMS on a detected box
    "student": {"model": {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 8, "head_convs": 2,
                          "score_thresh": 0.0}},
    "cache": {"views": [{"min_size": 96, "max_size": 128, "flip": False}], "batch_size": 4, "block_size": 4},
    "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "ckpt_every": 2},
    "eval": {"batch_size": 4},
    "experiments": {"baseline": {"losses": {}}, "cskd": {"losses": {"cskd": 1.0}}},
}


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_project(work: Path) -> tuple[Path, dict]:
    """A git + dvc repo at `work` with the real code, dvc.yaml and .gitignore and the TINY params."""
    for name in ("pipeline", "stages", "stores"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, work / name)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)  # dvc needs every listed key
    params["experiments"] = TINY["experiments"]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(work),
               DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    run(["git", "init", "-q"], work, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], work, env)
    return work, env


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("dvcproj"))


def set_param(work: Path, path: str, value) -> None:
    params = yaml.safe_load((work / "params.yaml").read_text())
    node = params
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_reruns_only_what_changed(project):
    work, env = project
    dvc = [sys.executable, "-m", "dvc"]
    first = ran(run([*dvc, "repro"], work, env))
    students = {"train_student@baseline", "train_student@cskd"}
    assert first == {"make_dataset", "train_teacher", "evaluate_teacher", "cache_teacher", "inspect_cache",
                     "export_student", "report"} | students
    assert (work / "report.md").exists() and "cskd" in (work / "report.md").read_text()

    assert ran(run([*dvc, "repro"], work, env)) == set(), "nothing changed: nothing reruns"

    set_param(work, "experiments.cskd.losses.cskd", 2.0)  # one student's parameter
    assert ran(run([*dvc, "repro"], work, env)) == {"train_student@cskd", "export_student", "report"}

    set_param(work, "cache.n_workers", 2)  # execution-only setting: no rerun
    assert ran(run([*dvc, "repro"], work, env)) == set()

    set_param(work, "cache.codecs", {"fpn": "fp16+zstd"})  # codecs: the cache and everything after it
    assert ran(run([*dvc, "repro"], work, env)) == {"cache_teacher", "inspect_cache", "export_student",
                                                    "report"} | students
