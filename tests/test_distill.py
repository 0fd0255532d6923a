"""Stage 2: offline (cache) vs online (live teacher) equivalence, manifest refusal, sources, coverage."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from stages.cache.plan import open_reader
from stages.cache.run import run_cache
from stages.config import Params, ViewParams
from stages.detector_training import train_detector
from stages.distill.run import build_run, train_student
from stages.training import train_loop
from stores.codecs import decode_compact
from stores.manifest import CacheMismatchError
from tests.cache_fixtures import tiny_params

LOSSES = {"mse": 1.0, "cosine": 1.0, "cskd": 1.0, "ssim": 2.0, "crosskd": 1.0, "rm": 4.0, "pfi": 1.5}


@pytest.fixture(scope="module")
def lossless(tiny_coco, tmp_path_factory) -> Params:
    """A tiny trained-for-2-steps teacher and a lossless (raw) cache of it."""
    root = tmp_path_factory.mktemp("distill")
    checkpoint = root / "teacher" / "model.pt"
    params = tiny_params(tiny_coco, checkpoint, root, codecs={f: "raw+none" for f in ("fpn", "cls", "box", "quality")})
    # a teacher that took two real steps, so its predictions are not the initial prior everywhere
    train_detector(params.teacher.model, params.teacher.train, params.data, checkpoint, {}, progress=False)
    run_cache(params, progress=False)
    return params


def with_losses(params: Params, mode: str, losses=LOSSES, source="zarr") -> Params:
    return replace(params, distill=replace(params.distill, teacher=mode, losses=dict(losses), source=source))


def test_offline_lossless_equals_online(lossless):
    offline = build_run(with_losses(lossless, "offline"), None)
    online = build_run(with_losses(lossless, "online"), None)
    online.student.load_state_dict(offline.student.state_dict())
    online.kd.load_state_dict(offline.kd.state_dict())
    b_off, b_on = next(offline.make_batches(0)), next(online.make_batches(0))
    assert b_off["image_ids"] == b_on["image_ids"] and b_off["views"] == b_on["views"]
    torch.testing.assert_close(b_off["images"], b_on["images"])
    l_off, l_on = offline.step_loss(b_off), online.step_loss(b_on)
    assert set(l_off) == set(l_on)
    assert {name.split("/")[0] for name in l_on} >= set(LOSSES), "every method contributed a term"
    for name in l_on:
        torch.testing.assert_close(l_off[name], l_on[name], rtol=1e-5, atol=1e-6, msg=name)


def test_offline_lossless_and_online_take_the_same_first_steps(lossless, tmp_path):
    runs = {}
    for mode in ("offline", "online"):
        runs[mode] = build_run(with_losses(lossless, mode, {"cskd": 1.0, "rm": 4.0, "pfi": 1.5}), None)
    runs["online"].student.load_state_dict(runs["offline"].student.state_dict())
    runs["online"].kd.load_state_dict(runs["offline"].kd.state_dict())
    for mode, run in runs.items():
        train_loop(modules={"model": run.student, "kd": run.kd}, step_loss=run.step_loss,
                   make_batches=run.make_batches, cfg=lossless.train, out_dir=tmp_path / mode, checkpoint_meta={},
                   device=run.device, progress=False)
    off, on = runs["offline"].student.state_dict(), runs["online"].student.state_dict()
    for key in off:
        torch.testing.assert_close(off[key].float(), on[key].float(), rtol=1e-4, atol=1e-6, msg=key)
    # the steps really moved the student: not a vacuous comparison
    fresh = build_run(with_losses(lossless, "offline", {"cskd": 1.0}), None).student.state_dict()
    assert any(not torch.equal(fresh[k], off[k]) for k in off if off[k].is_floating_point())


def test_cache_for_other_views_is_refused(lossless):
    other = replace(lossless, cache=replace(lossless.cache, views=[ViewParams(96, 128, False)]))
    with pytest.raises(CacheMismatchError, match="views"):
        build_run(with_losses(other, "offline"), None)


def test_wds_source_streams_the_same_records(lossless):
    wds_run = build_run(with_losses(lossless, "offline", {"mse": 1.0}, source="wds"), None)
    batch = next(wds_run.make_batches(0))
    assert len(batch["image_ids"]) == lossless.train.batch_size
    zarr = open_reader(lossless.cache.path, "zarr")
    for image_id, view, arrays in zip(batch["image_ids"], batch["views"], batch["teacher"]):
        expected = zarr.get(image_id, view, targets=["fpn"])["arrays"]
        for name in expected:  # the loader hands on compact parts (stores.codecs.CompactArray)
            assert (decode_compact(arrays[name]) == expected[name]).all(), name
    wds_loss = wds_run.step_loss(batch)
    assert torch.isfinite(sum(wds_loss.values()))


def test_train_student_writes_metrics_and_resumes(lossless, tmp_path):
    params = replace(lossless, experiments={"cskd": {"losses": {"cskd": 1.0}}})
    out = tmp_path / "cskd"
    metrics = train_student(params, "cskd", out, progress=False)
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"} <= set(metrics)
    assert json.loads((out / "metrics.json").read_text())["losses"] == {"cskd": 1.0}
    rows = (out / "train_log.csv").read_text().splitlines()
    assert rows[0].startswith("step,lr,sec_per_step,loss") and len(rows) == 1 + params.train.steps
    mtime = (out / "last.pt").stat().st_mtime_ns
    train_student(params, "cskd", out, progress=False)  # finished: resumes at the end, trains nothing
    assert (out / "last.pt").stat().st_mtime_ns == mtime


def test_unknown_experiment_and_loss_are_named(lossless):
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        build_run(lossless, "nope")
    from stages.config import ConfigError

    with pytest.raises(ConfigError, match="valid"):
        build_run(with_losses(lossless, "offline", {"kd_magic": 1.0}), None)
