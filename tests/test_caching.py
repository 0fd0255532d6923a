"""Stage 1 end to end on the tiny cache: plan and fingerprint, refusal of a mismatched store, the
records (extent, candidates, detections, tower stats), Zarr == WebDataset, one-line errors."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from stages.cache.plan import build_manifest, open_reader, plan_records
from stages.config import ViewParams
from stages.data.batching import padded_size
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.detectors.build import load_detector
from stages.distill.teacher_source import teacher_head_from_cache
from tests.cache_fixtures import (
    all_records,
    assert_same_records,
    build_cache,
    copy_cache,
    make_teacher,
    run_main,
)

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache




def test_plan_every_view_or_a_seeded_subset():
    views = [View(96, 128, False), View(96, 128, True), View(112, 160, False)]
    plan = plan_records([5, 2, 9], views, 0, seed=0)
    assert plan == [(i, v.key) for i in (2, 5, 9) for v in views]
    sub = plan_records([5, 2, 9], views, 2, seed=0)
    assert sub == plan_records([9, 2, 5], views, 2, seed=0), "independent of the id order"
    assert [i for i, _ in sub] == [2, 2, 5, 5, 9, 9] and len(set(sub)) == 6
    assert plan_records([2, 5, 9], views, 2, seed=1) != sub or plan_records([2, 5, 9], views, 2, seed=2) != sub


def test_same_params_same_manifest(tiny_cache):
    a, b = build_manifest(tiny_cache), build_manifest(tiny_cache)
    assert a.to_dict() == b.to_dict()
    stored = open_reader(tiny_cache.cache.path, "zarr").manifest
    assert stored.comparable() == a.comparable() and stored.fingerprint_digest() == a.fingerprint_digest()
    fp = stored.fingerprint
    assert fp["teacher_arch"]["backbone"] == "resnet18" and fp["codecs"]["fpn"] == "int8c+zstd"
    assert len(stored.plan) == 16 and stored.num_blocks() == 4


@pytest.mark.parametrize(
    "change, field",
    [
        ("checkpoint", "teacher_weights"),
        ("views", "views"),
        ("targets", "targets"),
        ("codecs", "codecs.fpn"),
    ],
)
def test_changed_inputs_refuse_the_store_naming_the_field(tiny_cache, tiny_coco, tmp_path, change, field):
    params = copy_cache(tiny_cache, tmp_path)
    cache = params.cache
    if change == "checkpoint":  # same architecture, other weights
        ckpt = make_teacher(tmp_path / "other.pt", CocoDataset(tiny_coco.train_images, tiny_coco.train_ann).num_classes,
                            seed=1)
        params = replace(params, teacher=replace(params.teacher, checkpoint=str(ckpt)))
    elif change == "views":
        params = replace(params, cache=replace(cache, views=[ViewParams(96, 128, False), ViewParams(112, 160, False)]))
    elif change == "targets":
        params = replace(params, cache=replace(cache, targets=[t for t in cache.targets if t != "tower_stats"]))
    else:
        params = replace(params, cache=replace(cache, codecs={**cache.codecs, "fpn": "fp16+zstd"}))
    msg = run_main(params, tmp_path)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert f"different {field}" in msg and cache.path in msg and "--overwrite" in msg, msg


def test_overwrite_rebuilds_with_the_new_params(tiny_cache, tmp_path):
    params = copy_cache(tiny_cache, tmp_path)
    params = replace(params, cache=replace(params.cache, codecs={"fpn": "fp16+zstd"}, targets=["fpn", "detections"],
                                           format="zarr"))
    assert "different targets" in run_main(params, tmp_path)
    assert run_main(params, tmp_path, "--overwrite") == ""
    reader = open_reader(params.cache.path, "zarr")
    assert reader.manifest.fingerprint["codecs"]["fpn"] == "fp16+zstd" and len(reader) == 16
    assert not (tmp_path / "cache" / "wds").exists(), "--overwrite starts from an empty folder"
    rec = reader.get(*reader.keys()[0])
    assert sorted({n.split(".")[0] for n in rec.arrays}) == ["det", "fpn"]


def test_records_extent_candidates_detections_tower(tiny_cache):
    coco = CocoDataset(tiny_cache.data.train_images, tiny_cache.data.train_ann)
    reader = open_reader(tiny_cache.cache.path, "zarr")
    meta = reader.manifest.meta
    strides, num_anchors = meta["strides"], meta["num_anchors"]
    index = reader.index_arrays()
    records = all_records(tiny_cache.cache.path, "zarr")
    assert sorted(records) == sorted(reader.manifest.plan)
    padded_seen = set()
    for r, (image_id, view_key) in enumerate(reader.manifest.plan):
        rec = records[(image_id, view_key)]
        m, a = rec["meta"], rec["arrays"]
        sample = coco.load(image_id)
        image, boxes = View.from_key(view_key).apply(sample.image, sample.boxes)
        h, w = image.shape[:2]
        assert m["image_size"] == [h, w] and m["padded_size"] == list(padded_size(h, w))
        padded_seen.add(tuple(m["padded_size"]))
        sizes = [[math.ceil(h / s), math.ceil(w / s)] for s in strides]
        assert m["level_sizes"] == sizes
        assert index["image_id"][r] == image_id and index["image_size"][r].tolist() == [h, w]
        assert index["level_sizes"][r].tolist() == sizes
        for lv, (hl, wl) in enumerate(sizes):
            assert a[f"fpn.{lv}"].shape == (16, hl, wl)
            assert a[f"cls.{lv}"].shape == (num_anchors * meta["num_classes"], hl, wl)
            assert a[f"box.{lv}"].shape == (num_anchors * 4, hl, wl)
        # candidates: CSR over this image's GTs, indices in the anchors of its padded size
        off, idx, score = a["cand.offsets"], a["cand.index"], a["cand.score"]
        anchors = sum((m["padded_size"][0] // s) * (m["padded_size"][1] // s) * num_anchors for s in strides)
        assert len(off) == len(boxes) + 1 and off[0] == 0 and np.all(np.diff(off) >= 0)
        assert off[-1] == len(idx) == len(score) and len(idx) > 0
        assert idx.min() >= 0 and idx.max() < anchors and np.all((score >= 0) & (score <= 1))
        # detections (view pixels) and tower statistics
        det = a["det.boxes"]
        assert det.ndim == 2 and det.shape[1] == 4 and len(det) == len(a["det.scores"]) == len(a["det.labels"]) > 0
        assert det.min() >= 0 and np.all(det[:, 2] <= w + 1e-3) and np.all(det[:, 3] <= h + 1e-3)
        assert a["det.labels"].dtype == np.int64 and a["det.labels"].max() < meta["num_classes"]
        for branch in ("cls", "reg"):
            t = a[f"tower.{branch}"]  # [layers, levels, (count, sum, sumsq), C]
            assert t.shape == (2, len(sizes), 3, 16) and t.dtype == np.float32
            for lv, (hl, wl) in enumerate(sizes):
                assert np.all(t[:, lv, 0] == hl * wl)
            t = t.astype(np.float64)
            assert np.all(t[:, :, 2] >= t[:, :, 1] ** 2 / t[:, :, 0] * (1 - 1e-5) - 1e-6), "sum of squares >= (sum)^2 / n"
    assert len(padded_seen) > 1, "the fixture views give several padded sizes"


def test_zarr_and_wds_hold_the_same_records(tiny_cache):
    assert_same_records(all_records(tiny_cache.cache.path, "zarr"), all_records(tiny_cache.cache.path, "wds"),
                        "zarr vs wds")


def test_static_head_rebuilds_the_teacher_head(tiny_cache):
    reader = open_reader(tiny_cache.cache.path, "wds")
    fp = reader.manifest.fingerprint
    head = teacher_head_from_cache(reader, fp["teacher_arch"], reader.manifest.meta["num_classes"])
    teacher = load_detector(tiny_cache.teacher.checkpoint)
    for k, v in teacher.head.state_dict().items():
        assert torch.equal(head.state_dict()[k], v), k


@pytest.mark.parametrize(
    "override, needle",
    [
        (("teacher", "checkpoint", "missing.pt"), "teacher checkpoint"),
        (("cache", "targets", ["fpn", "logits"]), "cache.targets: unknown target 'logits'"),
        (("cache", "targets", []), "cache.targets is empty"),
        (("cache", "codecs", {"fpn": "fp8+zstd"}), "cache.codecs.fpn: bad codec chain 'fp8+zstd'"),
        (("cache", "codecs", {"det": "fp16+zstd"}), "cache.codecs: 'det' is not a dense target family"),
        (("cache", "checkpoint_garbage", None), "bad.pt"),
    ],
)
def test_errors_are_one_line(tiny_cache, tmp_path, override, needle):
    section, key, value = override
    params = replace(tiny_cache, cache=replace(tiny_cache.cache, path=str(tmp_path / "cache")))
    if key == "checkpoint_garbage":
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
        params = replace(params, teacher=replace(params.teacher, checkpoint=str(tmp_path / "bad.pt")))
    elif section == "teacher":
        params = replace(params, teacher=replace(params.teacher, checkpoint=str(tmp_path / value)))
    else:
        params = replace(params, cache=replace(params.cache, **{key: value}))
    msg = run_main(params, tmp_path)
    assert msg.startswith("error: ") and "\n" not in msg and needle in msg, msg
    if section == "teacher":
        assert str(tmp_path / value) in msg and "train_teacher" in msg
    assert not (tmp_path / "cache").exists(), "nothing is written before the inputs are valid"


def test_raw_state_dict_teacher_described_by_params(tiny_cache, tmp_path):
    """A torchvision-style state_dict (no architecture inside) + teacher.model: the same records."""
    raw = tmp_path / "raw.pt"
    torch.save(load_detector(tiny_cache.teacher.checkpoint).state_dict(), raw)
    params = replace(tiny_cache, teacher=replace(tiny_cache.teacher, checkpoint=str(raw)),
                     cache=replace(tiny_cache.cache, path=str(tmp_path / "cache"), format="wds"))
    manifest = build_manifest(params)
    assert manifest.fingerprint["teacher_arch"] == build_manifest(tiny_cache).fingerprint["teacher_arch"]
    assert manifest.plan == build_manifest(tiny_cache).plan
    build_cache(params)
    assert_same_records(all_records(params.cache.path, "wds"), all_records(tiny_cache.cache.path, "wds"), "raw teacher")
