"""A command destroys or overwrites only what a record it wrote proves is its own, of the same kind.

Through the real CLIs: a student never replaces a teacher's run (nor a teacher a student's), a
cache --overwrite never deletes hidden files no manifest vouches for, make_dataset recognises its
output by its own record (not by `NNNNNN.png` names), cache.path is resolved before it is checked,
and a run folder is never the cache or an image folder."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import cli
from stages.config import TrainParams
from stages.detector_training import train_detector
from stages.distill.run import train_student
from tests.cache_fixtures import TEACHER_MODEL, run_main, subprocess_env, torch_threads, write_params

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache

ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = TrainParams(steps=1, batch_size=2, warmup_steps=0, log_every=1, ckpt_every=1, lr=0.001, optimizer="adamw")


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"pipeline.{module}", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert err.startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def in_process(module: str, argv: list[str]) -> str:
    main = importlib.import_module(f"pipeline.{module}").main
    with pytest.raises(SystemExit) as stop:
        cli.run(lambda: main(argv), argv=argv)
    return str(stop.value.code)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_runs_keep_to_their_own_kind(tiny_cache, tmp_path):
    """train_student --out <a teacher's folder> [--overwrite] and train_teacher --overwrite with the
    checkpoint inside a student's folder are refused, naming the kind of run that is there."""
    teacher_ckpt = tmp_path / "teacher" / "model.pt"
    student_dir = tmp_path / "student"
    params = replace(tiny_cache, distill=replace(tiny_cache.distill, losses={"mse": 1.0}),
                     train=replace(tiny_cache.train, steps=1))
    with torch_threads(1):
        train_detector(TEACHER_MODEL, ONE_STEP, params.data, teacher_ckpt, {}, progress=False)
        train_student(params, None, student_dir, progress=False)
    teacher_files, student_files = files_of(teacher_ckpt.parent), files_of(student_dir)
    path = write_params(params, tmp_path / "p.yaml")

    err = one_line(run_cli("train_student", "--params", str(path), "--out", str(teacher_ckpt.parent), "--overwrite"),
                   "holds a teacher run", "--overwrite replaces only a student run")
    assert "data.train_ann" not in err
    err = in_process("train_student", ["--params", str(path), "--out", str(teacher_ckpt.parent)])
    assert "holds a teacher run" in err and "refusing to train a student into it" in err, err
    assert files_of(teacher_ckpt.parent) == teacher_files, "the teacher's run is untouched"

    one_line(run_cli("train_teacher", "--params", str(path), "--set", f"teacher.checkpoint={student_dir}/model.pt",
                     "--overwrite"), "holds a student run", "--overwrite replaces only a teacher run")
    assert files_of(student_dir) == student_files, "the student's run is untouched"


def test_cache_overwrite_keeps_hidden_files_no_manifest_vouches_for(tiny_cache, tmp_path):
    """A folder without a kdcache manifest holds nothing provably ours: hidden entries whose names
    kdcache also uses (`.claims/`, `*.tmp-*`) survive cache_teacher --overwrite."""
    folder = tmp_path / "mine"
    (folder / ".claims").mkdir(parents=True)
    (folder / ".claims" / "notes.txt").write_text("my notes")
    (folder / ".report.tmp-v2").write_text("draft")
    params = replace(tiny_cache, cache=replace(tiny_cache.cache, path=str(folder), format="zarr"))
    assert run_main(params, tmp_path, "--overwrite") == ""
    assert (folder / ".claims" / "notes.txt").read_text() == "my notes"
    assert (folder / ".report.tmp-v2").read_text() == "draft"
    assert (folder / "manifest.json").exists(), "the cache was built beside them"


def test_make_dataset_knows_its_output_by_its_record(tmp_path):
    """A user's train/000001.png is not make_dataset's because of its name; its own output (listed in
    .make_dataset.json) is rewritten byte for byte; a file edited since is somebody's work."""
    none = tmp_path / "none.yaml"
    none.write_text("{}\n")
    user = tmp_path / "photos"
    (user / "train").mkdir(parents=True)
    (user / "train" / "000001.png").write_bytes(b"my holiday photo")

    def argv(out: Path) -> list[str]:
        return ["--params", str(none), "--set", f"data.synthetic.out={out}", "--set", "data.synthetic.num_train=2",
                "--set", "data.synthetic.num_val=1"]

    one_line(run_cli("make_dataset", *argv(user)), "train/000001.png (not written by make_dataset)")
    assert (user / "train" / "000001.png").read_bytes() == b"my holiday photo"
    assert sorted(p.name for p in user.rglob("*")) == ["000001.png", "train"], "nothing was added"

    own = tmp_path / "synthetic"
    from pipeline import make_dataset

    make_dataset.main(argv(own))
    first = files_of(own)
    make_dataset.main(argv(own))  # its own output: rewritten, same bytes
    assert files_of(own) == first
    (own / "val" / "000001.png").write_bytes(b"edited by hand")
    err = in_process("make_dataset", argv(own))
    assert "val/000001.png (changed since make_dataset wrote it)" in err, err
    assert (own / "val" / "000001.png").read_bytes() == b"edited by hand"


def test_cache_path_is_resolved_before_the_folder_check(tiny_cache, tmp_path):
    """cache.path=D/cache/../ds/train with D/cache missing names the image folder: refused as a
    non-empty folder that is not a cache (the kernel cannot walk through a missing D/cache, so an
    unresolved check saw nothing there)."""
    d = tmp_path / "d"
    images = d / "ds" / "train"
    shutil.copytree(tiny_cache.data.train_images, images)
    before = files_of(images)
    params = replace(tiny_cache, cache=replace(tiny_cache.cache, path=f"{d}/cache/../ds/train"))
    path = write_params(params, tmp_path / "p.yaml")
    one_line(run_cli("cache_teacher", "--params", str(path)), f"{images} is not empty and is not a kdcache cache")
    assert files_of(images) == before and not (d / "cache").exists()


def test_run_folder_is_never_the_cache_or_an_image_folder(tiny_cache, tmp_path):
    params = replace(tiny_cache, distill=replace(tiny_cache.distill, losses={"mse": 1.0}))
    path = write_params(params, tmp_path / "p.yaml")
    one_line(run_cli("train_student", "--params", str(path), "--out", params.cache.path),
             "is inside the cache folder cache.path=")
    err = in_process("train_student", ["--params", str(path), "--out", params.data.train_images])
    assert "is the image folder data.train_images" in err, err
    err = in_process("train_teacher", ["--params", str(path), "--set",
                                       f"teacher.checkpoint={params.data.val_images}/teacher.pt"])
    assert "is the image folder data.val_images" in err, err
    assert not any(p.suffix == ".pt" for p in Path(params.data.val_images).iterdir())
    assert json.loads((Path(params.cache.path) / "manifest.json").read_text())
