"""Hostile and unlucky inputs through the real CLI (`python -m pipeline.<stage>` subprocesses):
each is refused or survived with ONE line on stderr naming the file / field and the fix, never
"internal error", never a result built on the wrong thing.

- a checkpoint described without any dataset (inspect_teacher);
- a pickle given as model.pretrained_backbone (refused unread);
- a full disk during a checkpoint save (simulated with RLIMIT_FSIZE: writes fail with EFBIG, the
  errno a file size limit gives; ENOSPC takes the same path), leaving no temporary file;
- a power-loss NUL tail in train_log.csv (the resume drops it and goes on);
- COCO file_names that lead outside the image folder;
- a truncated val image (refused before training, not after it);
- evaluate of a student checkpoint (its notes say "student");
- torch's thread count (train.threads, the affinity mask) applied and printed.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from tests.cache_fixtures import tiny_params, write_params

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher

ROOT = Path(__file__).resolve().parents[1]


def cli(module: str, params: Path, *args: str, env: dict | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", f"pipeline.{module}", "--params", str(params), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn)


def last_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The error line (progress bars and notes may come before it on stderr)."""
    err = proc.stderr.strip()
    assert proc.returncode == 1 and "Traceback" not in err and "internal error" not in err, (proc.returncode, err)
    line = err.splitlines()[-1]
    assert line.startswith("error: ") and all(n in line for n in needles), (needles, err)
    return line


def teacher_params(tiny_coco, tiny_teacher, tmp_path: Path, **train):
    """train_teacher params over tiny_coco: the tiny teacher's architecture, 2 steps, a checkpoint per step."""
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path)
    t = params.teacher
    t = replace(t, checkpoint=str(tmp_path / "teacher" / "model.pt"), train=replace(t.train, **train))
    return replace(params, teacher=t)


class EvilPickle:
    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_inspect_teacher_describes_a_checkpoint_without_a_dataset(tiny_coco, tiny_teacher, tmp_path):
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path)
    nowhere = tmp_path / "no-dataset"
    params = replace(params, data=replace(params.data, train_ann=str(nowhere / "instances_train.json"),
                                          train_images=str(nowhere / "train")))
    path = write_params(params, tmp_path / "p.yaml")
    proc = cli("inspect_teacher", path, str(tiny_teacher))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "kdcache checkpoint" in out and "arch retinanet" in out and "6 class outputs" in out, out
    assert "unmatched: none" in out and "label map: not computed (no dataset at data.train_ann" in out, out
    # a dataset named on the command line: the label map is added
    proc = cli("inspect_teacher", path, str(tiny_teacher), "--set", f"data.train_ann={tiny_coco.train_ann}",
               "--set", f"data.train_images={tiny_coco.train_images}")
    assert proc.returncode == 0 and f"label map onto {tiny_coco.train_ann}" in proc.stdout, proc.stderr


def test_pickle_as_pretrained_backbone_is_refused_unread(tiny_coco, tiny_teacher, tmp_path):
    evil, marker = tmp_path / "resnet.pth", tmp_path / "PWNED"
    evil.write_bytes(pickle.dumps({"conv1.weight": EvilPickle(marker)}))
    params = teacher_params(tiny_coco, tiny_teacher, tmp_path)
    params = replace(params, teacher=replace(params.teacher, model=replace(params.teacher.model,
                                                                             pretrained_backbone=str(evil))))
    proc = cli("train_teacher", write_params(params, tmp_path / "p.yaml"))
    last_line(proc, str(evil), "model.pretrained_backbone", "not a weights-only checkpoint")
    assert not marker.exists(), "the pickle ran"


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_leaves_no_temp(tiny_coco, tiny_teacher, tmp_path):
    params = teacher_params(tiny_coco, tiny_teacher, tmp_path)
    proc = cli("train_teacher", write_params(params, tmp_path / "p.yaml"), preexec_fn=_file_size_limit(1 << 20))
    folder = Path(params.teacher.checkpoint).parent
    last_line(proc, str(folder / "last.pt"), "the disk is full", "rerun")
    left = sorted(p.name for p in folder.iterdir())
    assert not [n for n in left if ".tmp-" in n] and "last.pt" not in left, left


def test_a_torn_train_log_tail_is_dropped_on_resume(tiny_coco, tiny_teacher, tmp_path):
    """A power loss after the checkpoint at step 1: the log's last row became NUL bytes. The rerun
    resumes from the checkpoint and says what it dropped. (The first run also shows that an
    exponent lr and train.threads reach the run.)"""
    params = teacher_params(tiny_coco, tiny_teacher, tmp_path)
    path = write_params(params, tmp_path / "p.yaml")
    proc = cli("train_teacher", path, "--set", "teacher.train.lr=2e-3", "--set", "teacher.train.threads=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch CPU threads: 1 (teacher.train.threads=1)" in proc.stdout, proc.stdout
    folder = Path(params.teacher.checkpoint).parent
    final = torch.load(folder / "model.pt", weights_only=True)
    assert final["params"]["teacher"]["train"]["lr"] == 0.002
    # the state a power loss between step 1's checkpoint and the next leaves: last.pt at step 1, the
    # log's step-2 row replaced by the NUL bytes of a file extended but never written
    (folder / "model.pt").unlink()
    last = torch.load(folder / "last.pt", weights_only=True)
    torch.save(last | {"step": 1}, folder / "last.pt")
    log = folder / "train_log.csv"
    lines = log.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3 and lines[2].startswith(b"2,"), lines
    log.write_bytes(b"".join(lines[:2]) + b"\0" * len(lines[2]))
    proc = cli("train_teacher", path, "--set", "teacher.train.lr=2e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropped 1 torn line(s)" in proc.stderr and "checkpoint at step 1" in proc.stderr, proc.stderr
    rows = log.read_text().splitlines()
    assert "\0" not in log.read_text() and [r.split(",")[0] for r in rows] == ["step", "1", "2"], rows


def test_file_names_outside_the_image_folder_are_refused(tiny_coco, tiny_teacher, tmp_path):
    """evaluate on a val json whose file_name climbs out of data.val_images (to an image that
    exists); with one CPU in the affinity mask and no OMP_NUM_THREADS, torch gets one thread."""
    data = json.loads(tiny_coco.val_ann.read_text())
    victim = sorted(tiny_coco.train_images.iterdir())[0]
    data["images"][1]["file_name"] = f"../{victim.parent.name}/{victim.name}"
    bad = tmp_path / "val.json"
    bad.write_text(json.dumps(data))
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path)
    params = replace(params, data=replace(params.data, val_ann=str(bad)))
    path = write_params(params, tmp_path / "p.yaml")
    image_id = data["images"][1]["id"]
    proc = cli("evaluate", path, "--out", str(tmp_path / "m.json"), env={"OMP_NUM_THREADS": None},
               preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    last_line(proc, str(bad), f"image id {image_id}", repr(data["images"][1]["file_name"]), "outside")
    assert "torch CPU threads: 1 (auto: 1 CPUs available / 1 local process(es))" in proc.stdout, proc.stdout
    assert not (tmp_path / "m.json").exists()
    # an absolute file_name: the same refusal, in-process (the same CocoDataset check)
    from stages.data.coco import CocoDataError, CocoDataset

    data["images"][1]["file_name"] = str(victim)
    bad.write_text(json.dumps(data))
    try:
        CocoDataset(tiny_coco.val_images, bad)
    except CocoDataError as err:
        assert f"image id {image_id}: file_name {str(victim)!r} leads outside" in str(err), err
    else:
        raise AssertionError("an absolute file_name was accepted")


def test_a_truncated_val_image_stops_a_student_before_training(tiny_coco, tiny_teacher, tmp_path):
    """...and, once the image is whole again, evaluate of the student's checkpoint calls it a
    student in its note (the architecture note compares it with student.model)."""
    val = tmp_path / "val"
    shutil.copytree(tiny_coco.val_images, val)
    victim = sorted(val.iterdir())[2]
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path)
    params = replace(params, data=replace(params.data, val_images=str(val)),
                     distill=replace(params.distill, teacher="online", losses={"mse": 1.0}))
    path = write_params(params, tmp_path / "p.yaml")
    out = tmp_path / "student"
    proc = cli("train_student", path, "--out", str(out))
    last_line(proc, str(victim), "unreadable image", "image id")
    assert not (out / "last.pt").exists() and not (out / "train_log.csv").exists(), "training started"
    victim.write_bytes(whole)
    proc = cli("train_student", path, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli("evaluate", path, "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "m.json"),
               "--set", "student.model.fpn_channels=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    note = next(line for line in proc.stderr.splitlines() if line.startswith("note:"))
    assert note.startswith(f"note: student {out / 'model.pt'}") and "(student.model: 4)" in note, note
    assert "teacher" not in note, note
