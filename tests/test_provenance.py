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


# -- stage 2 trusts only what the manifest vouches for -------------------------------------------------


@pytest.fixture(scope="module")
def other_teachers_cache(tiny_cache, tmp_path_factory) -> Path:
    """The same cache params over ANOTHER teacher (other weights): same plan and blocks, other targets."""
    root = tmp_path_factory.mktemp("other_teacher")
    teacher = make_teacher(root / "model.pt", CocoDataset.from_params(tiny_cache.data).num_classes, seed=1)
    params = replace(tiny_cache, teacher=replace(tiny_cache.teacher, checkpoint=str(teacher)),
                     cache=replace(tiny_cache.cache, path=str(root / "cache")))
    build_cache(params)
    return root / "cache"


def offline(params, **distill):
    return replace(params, distill=replace(params.distill, teacher="offline", **distill),
                   train=replace(params.train, steps=1))


def test_stores_copied_from_another_teachers_cache_are_refused(tiny_cache, other_teachers_cache, tmp_path):
    params = copy_cache(tiny_cache, tmp_path)
    root = Path(params.cache.path)
    for fmt in ("zarr", "wds"):  # checksums in their markers / sidecars all agree with their blobs
        shutil.rmtree(root / fmt)
        shutil.copytree(other_teachers_cache / fmt, root / fmt)
    path = write_params(params, tmp_path / "p.yaml")
    proc = subprocess.run([sys.executable, "-m", "pipeline.inspect_cache", "--params", str(path), "--verify"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)["verify"]
    assert proc.returncode == 1 and report["ok"] is False
    assert any(f"{root / 'zarr'} was written for another cache" in e for e in report["errors"]), report["errors"]
    assert any("[wds] block 0:" in e and "written for another cache" in e for e in report["errors"]), report["errors"]

    student = write_params(offline(params, losses={"mse": 1.0}), tmp_path / "s.yaml")
    proc = subprocess.run([sys.executable, "-m", "pipeline.train_student", "--params", str(student), "--out",
                           str(tmp_path / "run")], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    err = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert err.startswith(f"error: [zarr] {root / 'zarr'} was written for another cache"), err
    with torch_threads(1), pytest.raises(ValueError, match=r"\[wds\] block 0: .*shard-000000.tar was written for another"):
        train_student(offline(params, losses={"mse": 1.0}, source="wds"), None, tmp_path / "run_wds", progress=False)
    assert not (tmp_path / "run" / "model.pt").exists() and not (tmp_path / "run_wds").exists()


def bomb(path: Path, like: Path, declared: int) -> None:
    """`like`'s npz with its first member replaced by one DECLARING `declared` float32 zeros (deflated
    to a few hundred kB): what np.load would allocate before any check."""
    import zipfile

    import numpy as np
    from numpy.lib import format as npy_format

    with np.load(like, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    first = next(iter(arrays))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        with out.open(f"{first}.npy", "w", force_zip64=True) as f:
            npy_format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (declared,)})
            zeros = bytes(1 << 24)
            for _ in range(declared * 4 // len(zeros)):
                f.write(zeros)
        for k, v in list(arrays.items())[1:]:
            with out.open(f"{k}.npy", "w") as f:
                npy_format.write_array(f, v)


def test_foreign_or_hostile_head_is_refused_before_it_is_loaded(tiny_cache, other_teachers_cache, tmp_path):
    import tracemalloc

    params = offline(copy_cache(tiny_cache, tmp_path), losses={"crosskd": 1.0})
    root = Path(params.cache.path)
    head = root / "static" / "head.npz"
    shutil.copy(other_teachers_cache / "static" / "head.npz", head)  # another teacher's head
    with torch_threads(1), pytest.raises(ValueError, match=r"head.npz does not match the sha256 .* replaced by another"):
        train_student(params, None, tmp_path / "run", progress=False)

    # a ~0.27 GB declaration in a small file, with its sha256 even recorded: refused from the zip headers
    bomb(head, other_teachers_cache / "static" / "head.npz", 64 << 20)
    assert head.stat().st_size < 1_000_000
    from stores.manifest import Manifest, sha256_file

    manifest = Manifest.load(root / "manifest.json")
    replace(manifest, statics={**manifest.statics, "head": sha256_file(head)}).save(root / "manifest.json")
    tracemalloc.start()
    try:
        with torch_threads(1), pytest.raises(ValueError, match=r"head.npz: array .* declares float32\[67108864\]"):
            train_student(params, None, tmp_path / "run", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak} bytes allocated: the bomb was inflated before the check"


def test_flipped_bytes_in_the_zarr_index_fail_verify_and_repair(tiny_cache, tmp_path):
    from stores.verify import verify_store
    from tests.cache_fixtures import run_main

    params = copy_cache(tiny_cache, tmp_path)
    root = Path(params.cache.path)
    for rel in ("zarr/index/image_id/c/0", "zarr/index/level_sizes/c/1/0/0"):
        chunk = root / rel
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit
        chunk.write_bytes(bytes(data))
    report = verify_store(root)
    assert not report.ok, "a flipped byte in zarr/index/ passes verify"
    assert any("index" in e for e in report.errors), report.errors
    assert run_main(params, tmp_path, "--repair") == ""
    assert verify_store(root).ok
