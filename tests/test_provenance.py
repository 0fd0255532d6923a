"""A run is identified by the content it consumed, not by paths: run.json records the teacher's
sha256, the cache's fingerprint digest and per-block content, and the training set's content
(annotation json sha256 + image names and sizes). A finished run whose consumed content changed
is refused on rerun (naming what changed), never kept with rc 0."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from stages.config import TrainParams
from stages.data.coco import CocoDataset
from stages.detector_training import train_detector
from stages.distill.run import train_student
from stages.run_record import RECORD_NAME, RunMismatchError
from tests.cache_fixtures import (
    TEACHER_MODEL,
    build_cache,
    copy_cache,
    make_teacher,
    subprocess_env,
    torch_threads,
    write_params,
)

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache

ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = TrainParams(steps=1, batch_size=2, warmup_steps=0, log_every=1, ckpt_every=1, lr=0.001, optimizer="adamw")


def relabel(ann: Path) -> None:
    """Every box gets the next category (what a relabelling pass does; image files unchanged)."""
    data = json.loads(ann.read_text())
    ids = sorted(c["id"] for c in data["categories"])
    for a in data["annotations"]:
        a["category_id"] = ids[(ids.index(a["category_id"]) + 1) % len(ids)]
    ann.write_text(json.dumps(data))


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def private_setup(tiny_cache, tmp_path):
    """Params over a private copy of the annotation json, the teacher and the cache (to change them)."""
    ann = tmp_path / "instances_train.json"
    shutil.copy(tiny_cache.data.train_ann, ann)
    teacher = tmp_path / "teacher" / "model.pt"
    teacher.parent.mkdir()
    shutil.copy(tiny_cache.teacher.checkpoint, teacher)
    params = copy_cache(tiny_cache, tmp_path)  # same content: its fingerprint and blocks still match
    return replace(params, data=replace(params.data, train_ann=str(ann)),
                   teacher=replace(params.teacher, checkpoint=str(teacher)),
                   distill=replace(params.distill, losses={"mse": 1.0}), train=replace(params.train, steps=1))


def test_student_rerun_on_changed_content_is_refused(tiny_cache, tmp_path):
    params = private_setup(tiny_cache, tmp_path)
    out = tmp_path / "student"
    with torch_threads(1):
        train_student(params, None, out, progress=False)
    record = json.loads((out / RECORD_NAME).read_text())
    ds = CocoDataset.from_params(params.data, "train").fingerprint()
    assert record["inputs"]["train_data"] == ds
    assert record["inputs"]["teacher_sha256"] == json.loads(
        (Path(params.cache.path) / "manifest.json").read_text())["fingerprint"]["teacher_weights"]
    before = snapshot(out)

    # every box relabelled, the cache refreshed (its stale blocks recomputed): the reported case, by CLI
    relabel(Path(params.data.train_ann))
    summary = build_cache(params)
    assert summary["computed_blocks"] > 0, "the refresh recomputed the relabelled blocks"
    path = write_params(params, tmp_path / "p.yaml")
    proc = subprocess.run([sys.executable, "-m", "pipeline.train_student", "--params", str(path), "--out", str(out)],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {out} was trained on other content: data.train_ann's content (sha256) changed"), err
    assert "pass --overwrite to retrain" in err, err
    assert snapshot(out) == before, "nothing of the finished run was rewritten (metrics.json included)"

    # the teacher retrained in place (same path) and its cache rebuilt
    make_teacher(Path(params.teacher.checkpoint), CocoDataset.from_params(params.data).num_classes, seed=1)
    build_cache(params, overwrite=True)
    with pytest.raises(RunMismatchError, match=r"other content: teacher.checkpoint's content \(sha256\) changed"):
        with torch_threads(1):
            train_student(params, None, out, progress=False)
    assert snapshot(out) == before
    with torch_threads(1):  # --overwrite retrains on the new content and records it
        train_student(params, None, out, progress=False, overwrite=True)
    assert json.loads((out / RECORD_NAME).read_text())["inputs"]["train_data"] == CocoDataset.from_params(
        params.data).fingerprint()


def test_online_student_records_the_teacher_checkpoint(tiny_cache, tmp_path):
    params = private_setup(tiny_cache, tmp_path)
    params = replace(params, distill=replace(params.distill, teacher="online"))
    out = tmp_path / "student"
    with torch_threads(1):
        train_student(params, None, out, progress=False)
        make_teacher(Path(params.teacher.checkpoint), CocoDataset.from_params(params.data).num_classes, seed=1)
        with pytest.raises(RunMismatchError, match=r"teacher.checkpoint's content \(sha256\) changed"):
            train_student(params, None, out, progress=False)


def test_teacher_rerun_after_relabel_is_refused(tiny_cache, tmp_path):
    params = private_setup(tiny_cache, tmp_path)
    ckpt = tmp_path / "new_teacher" / "model.pt"
    with torch_threads(1):
        train_detector(TEACHER_MODEL, ONE_STEP, params.data, ckpt, {}, progress=False)
    before = snapshot(ckpt.parent)
    relabel(Path(params.data.train_ann))
    with torch_threads(1), pytest.raises(RunMismatchError, match=r"other content: data.train_ann's content"):
        train_detector(TEACHER_MODEL, ONE_STEP, params.data, ckpt, {}, progress=False)
    assert snapshot(ckpt.parent) == before
