"""Stale runs: a run folder records the params that produced it (run.json); a rerun with other
result-affecting params (lr, loss weight, architecture) is refused naming the field unless
--overwrite; resume continues only an identical run; empty train / val sets stop before work."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from stages.config import DataParams, ModelParams, TrainParams
from stages.data.coco import CocoDataset
from stages.detector_training import train_detector
from stages.distill.run import train_student
from stages.run_record import RECORD_NAME, RunMismatchError, check_run, student_record
from tests.cache_fixtures import subprocess_env, torch_threads, write_params

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=8, head_convs=1)
STEPS = TrainParams(steps=1, batch_size=2, warmup_steps=0, log_every=1, ckpt_every=1, lr=0.001, optimizer="adamw")


def student_params(tiny_cache, tmp_path, **train):
    params = replace(tiny_cache, distill=replace(tiny_cache.distill, losses={"mse": 1.0}),
                     student=replace(tiny_cache.student, out_dir=str(tmp_path / "students")),
                     train=replace(tiny_cache.train, steps=1, **train))
    return params


def train(params, out, **kw):
    with torch_threads(1):
        return train_student(params, None, out, progress=False, **kw)


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_student_rerun_with_other_params_is_refused(tiny_cache, tmp_path):
    params = student_params(tiny_cache, tmp_path)
    out = tmp_path / "run"
    train(params, out)
    record = json.loads((out / RECORD_NAME).read_text())["params"]
    assert record["train"]["lr"] == params.train.lr and record["distill"]["losses"] == {"mse": 1.0}
    before = snapshot(out)

    # the reported case from the command line: another lr into the same folder -> one line, exit 1
    path = write_params(params, tmp_path / "p.yaml")
    proc = subprocess.run([sys.executable, "-m", "pipeline.train_student", "--params", str(path), "--out", str(out),
                           "--set", "train.lr=0.05"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {out} was trained with train.lr=0.001, these params say 0.05") and "--overwrite" in err

    # a loss weight, an architecture change: the same one-line refusal, never a state_dict traceback
    heavier = replace(params, distill=replace(params.distill, losses={"mse": 2.0}))
    with pytest.raises(RunMismatchError, match=r"distill.losses.mse=1.0, these params say 2.0"):
        train(heavier, out)
    wider = replace(params, student=replace(params.student, model=replace(params.student.model, fpn_channels=16)))
    with pytest.raises(RunMismatchError, match=r"student.model.fpn_channels=8, these params say 16"):
        train(wider, out)
    assert snapshot(out) == before, "a refused rerun changes nothing (metrics.json keeps its own labels)"

    # what cannot change the result does not invalidate the run: device, workers, logging, other experiments
    same = replace(params, train=replace(params.train, device="cpu", log_every=5, ckpt_every=7),
                   experiments={"other": {"losses": {"ssim": 1.0}}})
    train(same, out)  # finished: nothing to train, evaluated again
    assert (out / "last.pt").read_bytes() == before["last.pt"]

    # --overwrite retrains from scratch under the new params and records them
    train(heavier, out, overwrite=True)
    assert json.loads((out / RECORD_NAME).read_text())["params"]["distill"]["losses"] == {"mse": 2.0}
    assert json.loads((out / "metrics.json").read_text())["losses"] == {"mse": 2.0}


def test_record_rules(tmp_path, tiny_cache):
    """check_run alone: a killed run (last.pt only) resumes only with identical params; results
    deleted by hand / by dvc leave nothing to protect; foreign files survive --overwrite."""
    record = student_record(tiny_cache, tiny_cache.distill, None)
    out = tmp_path / "run"
    check_run(out, record)
    (out / "last.pt").write_bytes(b"step 3")
    check_run(out, record)  # identical: resume
    other = {**record, "train": {**record["train"], "steps": 99}}
    with pytest.raises(RunMismatchError, match="train.steps"):
        check_run(out, other)
    (out / "last.pt").unlink()
    check_run(out, other)  # no results left: the stale record is replaced
    assert json.loads((out / RECORD_NAME).read_text())["params"]["train"]["steps"] == 99
    (out / "model.pt").write_bytes(b"x")
    (out / RECORD_NAME).unlink()
    with pytest.raises(RunMismatchError, match="no readable run.json"):
        check_run(out, record)
    # results no record proves to be ours: --overwrite deletes nothing
    with pytest.raises(RunMismatchError, match="no readable run.json, so nothing proves they are a student run"):
        check_run(out, record, overwrite=True)
    assert (out / "model.pt").read_bytes() == b"x"
    check_run(out / "fresh", record)
    (out / "fresh" / "model.pt").write_bytes(b"x")
    (out / "fresh" / "mine.txt").write_text("keep")
    check_run(out / "fresh", record, overwrite=True)
    assert sorted(p.name for p in (out / "fresh").iterdir()) == ["mine.txt", RECORD_NAME]


def test_teacher_rerun_with_other_lr_is_refused(tiny_coco, tmp_path):
    data = DataParams(train_images=str(tiny_coco.train_images), train_ann=str(tiny_coco.train_ann),
                      val_images=str(tiny_coco.val_images), val_ann=str(tiny_coco.val_ann), min_size=96, max_size=128)
    ckpt = tmp_path / "teacher" / "model.pt"
    with torch_threads(1):
        train_detector(TEACHER, STEPS, data, ckpt, {}, progress=False)
        before = ckpt.read_bytes()
        with pytest.raises(RunMismatchError, match=r"teacher was trained with teacher.train.lr=0.001, these params say 0.01"):
            train_detector(TEACHER, replace(STEPS, lr=0.01), data, ckpt, {}, progress=False)
        with pytest.raises(RunMismatchError, match=r"teacher.model.head_convs=1, these params say 2"):
            train_detector(replace(TEACHER, head_convs=2), STEPS, data, ckpt, {}, progress=False)
        assert ckpt.read_bytes() == before
        train_detector(TEACHER, replace(STEPS, lr=0.01), data, ckpt, {}, progress=False, overwrite=True)
    assert json.loads((ckpt.parent / RECORD_NAME).read_text())["params"]["teacher"]["train"]["lr"] == 0.01


def test_empty_train_or_val_set_is_an_error(tiny_cache, tiny_coco, tmp_path):
    data = json.loads(Path(tiny_coco.val_ann).read_text())
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**data, "images": [], "annotations": []}))
    assert len(CocoDataset(tiny_coco.val_images, empty)) == 0
    params = student_params(tiny_cache, tmp_path)
    no_val = replace(params, data=replace(params.data, val_ann=str(empty)))
    with pytest.raises(ValueError, match=r"empty.json \(data.val_ann\) lists no images"):
        train(no_val, tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists(), "refused before any training"
    from stages.cache.plan import prepare_store

    no_train = replace(params, data=replace(params.data, train_ann=str(empty)),
                       cache=replace(params.cache, path=str(tmp_path / "cache")))
    with pytest.raises(ValueError, match=r"empty.json \(data.train_ann\) lists no images"):
        prepare_store(no_train)
    assert not (tmp_path / "cache").exists()
