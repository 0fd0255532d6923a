"""The teacher is resolved once per process (`stages.detectors.resolved_teacher`): a cache_teacher
run reads the checkpoint file exactly once, stage 2 too; a worker that finds another file under the
checkpoint's name refuses it in one line; nothing caches checkpoints behind the caller's back.

The file reads are counted by wrapping `stages.detectors.checkpoint.read_checkpoint`, the one
function that reads a checkpoint file (every other path goes through it).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import pytest
import torch

from stages.detectors import checkpoint
from tests.cache_fixtures import TEACHER_MODEL, make_teacher, run_main, tiny_params, torch_threads

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The paths `read_checkpoint` is called with, in order, while the test runs."""
    seen: list[str] = []
    real = checkpoint.read_checkpoint

    def counting(path):
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(checkpoint, "read_checkpoint", counting)
    return seen


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cache_teacher_reads_the_checkpoint_once(tiny_coco, tiny_teacher, tmp_path, reads, capsys):
    """The whole in-process run: the teacher summary, planning (fingerprint, label map, manifest,
    head), and the worker's teacher all come from one read."""
    from stores.manifest import Manifest

    params = tiny_params(tiny_coco, tiny_teacher, tmp_path, format="zarr", targets=["fpn", "cls", "head"],
                         views=tiny_params(tiny_coco, tiny_teacher, ".").cache.views[:1])
    assert run_main(params, tmp_path) == ""
    assert "label map onto" in capsys.readouterr().out  # the report came from the same resolution
    assert reads == [str(tiny_teacher)]
    manifest = Manifest.load(tmp_path / "cache" / "manifest.json")
    # the digest of the bytes loaded is the file's sha256: caches built before still match
    assert manifest.fingerprint["teacher_weights"] == _sha256(tiny_teacher)
    reads.clear()
    assert run_main(params, tmp_path) == ""  # a rerun on the complete cache: one read again, no work
    assert reads == [str(tiny_teacher)]


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_stage_2_reads_the_checkpoint_once(tiny_coco, tiny_teacher, tmp_path, reads, mode):
    """Stage 2 assembles a run from one read: the cache check (offline) or the live teacher (online)."""
    from stages.cache.run import run_cache
    from stages.distill.run import build_run

    params = tiny_params(tiny_coco, tiny_teacher, tmp_path, format="zarr", targets=["fpn"],
                         views=tiny_params(tiny_coco, tiny_teacher, ".").cache.views[:1])
    params = replace(params, distill=replace(params.distill, teacher=mode, losses={"mse": 1.0}))
    if mode == "offline":
        with torch_threads(1):
            run_cache(params, progress=False)
        reads.clear()
    run = build_run(params, None)
    assert reads == [str(tiny_teacher)]
    assert run.student is not None


def test_a_worker_refuses_a_checkpoint_replaced_mid_run(tiny_coco, tmp_path):
    """What a dask worker does (no resolved teacher in its process): re-read the checkpoint and
    compare its sha256 with the manifest's. A file replaced after planning is refused in one line
    naming it, and no block is written."""
    from stages.cache import worker
    from stages.cache.plan import prepare_store
    from stages.detectors.resolved_teacher import TeacherChangedError
    from stores.zarr_store import ZarrCacheReader

    ckpt = make_teacher(tmp_path / "teacher.pt", 6, seed=0)
    params = tiny_params(tiny_coco, ckpt, tmp_path, format="zarr", targets=["fpn"])
    with torch_threads(1):
        job, manifest = prepare_store(params)
    make_teacher(ckpt, 6, seed=1)  # retrained under the same name while the run is going
    worker._WORKER.clear()  # a fresh worker process
    with pytest.raises(TeacherChangedError) as err:
        worker.cache_block(job, 0)
    msg = str(err.value)
    assert "\n" not in msg and str(ckpt) in msg and "changed during the run" in msg
    assert manifest.fingerprint["teacher_weights"][:12] in msg
    assert 0 not in ZarrCacheReader(job.root).completed_blocks()
    worker._WORKER.clear()


def test_the_unchanged_checkpoint_is_taken_by_a_worker(tiny_coco, tmp_path, reads):
    """The other side of the check: the same file (rewritten with the same bytes, a new mtime) is
    accepted, read once by the worker, and the block is written."""
    from stages.cache import worker
    from stages.cache.plan import prepare_store

    ckpt = make_teacher(tmp_path / "teacher.pt", 6, seed=0)
    params = tiny_params(tiny_coco, ckpt, tmp_path, format="zarr", targets=["fpn"])
    with torch_threads(1):
        job, _ = prepare_store(params)
        ckpt.write_bytes(ckpt.read_bytes())
        reads.clear()
        worker._WORKER.clear()
        stats = worker.cache_block(job, 0)
    worker._WORKER.clear()
    assert reads == [str(ckpt)] and stats["records"] > 0 and not stats["skipped"]


def test_nothing_caches_checkpoints(tmp_path):
    """A checkpoint replaced by another of the same size and mtime is seen as the new one (a cache
    keyed by path, size and mtime would hand back the old weights)."""
    path = make_teacher(tmp_path / "t.pt", 6, seed=0)
    first = checkpoint.open_teacher(path)
    stat = path.stat()
    make_teacher(path, 6, seed=1)
    assert path.stat().st_size == stat.st_size  # same architecture: same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = checkpoint.open_teacher(path)
    assert second.sha256 != first.sha256 and second.sha256 == _sha256(path)
    key = "head.classification_head.cls_logits.weight"
    assert not torch.equal(first.weights[key], second.weights[key])


def test_resolved_teacher_is_the_file_mapped_onto_the_dataset(tiny_coco, tiny_teacher, reads):
    """One read gives the arch, the label map, the report and a detector; mapping it onto another
    split reads nothing."""
    from stages.data.coco import CocoDataset
    from stages.detectors.resolved_teacher import resolve_teacher

    train = CocoDataset(tiny_coco.train_images, tiny_coco.train_ann)
    val = CocoDataset(tiny_coco.val_images, tiny_coco.val_ann)
    teacher = resolve_teacher(tiny_teacher, TEACHER_MODEL, train.categories, tiny_coco.train_ann)
    on_val = teacher.onto(val.categories, tiny_coco.val_ann)
    det = teacher.build()
    assert reads == [str(tiny_teacher)]
    assert teacher.sha256 == _sha256(tiny_teacher) and teacher.format == "kdcache"
    assert teacher.arch["arch"] == "retinanet" and teacher.arch["fpn_channels"] == 16
    assert det.num_classes == teacher.num_classes == train.num_classes
    assert on_val.label_map.index == tuple(range(val.num_classes)) and on_val.sha256 == teacher.sha256
    assert any(line.startswith("label map onto") for line in teacher.report())


@pytest.mark.slow  # ~1 min on a shared 2-core machine; the fast equivalent runs cache_block as a worker does
def test_cache_teacher_on_dask_refuses_a_checkpoint_replaced_mid_run(tiny_coco, tmp_path, monkeypatch):
    """End to end on a local dask cluster (real worker processes): the checkpoint is replaced after
    the driver planned the cache, before the workers start; the run stops with one line naming it."""
    from stages.cache import run as cache_run

    ckpt = make_teacher(tmp_path / "teacher.pt", 6, seed=0)
    params = tiny_params(tiny_coco, ckpt, tmp_path, format="zarr", targets=["fpn"], n_workers=2,
                         views=tiny_params(tiny_coco, ckpt, ".").cache.views[:1])
    real = cache_run._run_dask

    def replace_then_run(job, *args, **kwargs):
        make_teacher(ckpt, 6, seed=1)  # retrained under the same name while the run is going
        return real(job, *args, **kwargs)

    monkeypatch.setattr(cache_run, "_run_dask", replace_then_run)
    msg = run_main(params, tmp_path)
    assert msg.startswith(f"error: teacher checkpoint {ckpt} changed during the run") and "\n" not in msg, msg
