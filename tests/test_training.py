"""The shared training loop: determinism, exact resume after a crash, schedule, sampler, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from stages.config import DataParams, ModelParams, TrainParams
from stages.data.batching import ViewDataset
from stages.data.coco import CocoDataset
from stages.detector_training import make_loader, to_device, train_detector, train_views
from stages.detectors.build import build_detector, load_detector
from stages.training import EpochBatchSampler, load_checkpoint, lr_at, train_loop

MODEL = ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=8, head_convs=1, anchor_size=16)
CFG = TrainParams(steps=4, batch_size=2, warmup_steps=2, log_every=1, ckpt_every=2, lr=0.001, optimizer="adamw")


def data_params(tiny_coco) -> DataParams:
    return DataParams(train_images=str(tiny_coco.train_images), train_ann=str(tiny_coco.train_ann),
                      val_images=str(tiny_coco.val_images), val_ann=str(tiny_coco.val_ann), min_size=96, max_size=128)


def run(tiny_coco, out: Path, crash_at: int | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    coco = CocoDataset(tiny_coco.train_images, tiny_coco.train_ann)
    model = build_detector(MODEL, coco.num_classes)
    views = train_views(data_params(tiny_coco), flip=True)
    dataset = ViewDataset(coco, views, mode="all")
    calls = {"n": 0}

    def step_loss(batch):
        calls["n"] += 1
        if crash_at is not None and calls["n"] == crash_at:
            raise KeyboardInterrupt("simulated crash")
        images, targets = to_device(batch, torch.device("cpu"))
        return model(images, batch["image_sizes"], targets=targets).losses

    train_loop(modules={"model": model}, step_loss=step_loss,
               make_batches=lambda start: make_loader(dataset, len(coco), len(views), CFG, start),
               cfg=CFG, out_dir=out, checkpoint_meta={"note": "test"}, device=torch.device("cpu"), progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_deterministic_and_resume_after_crash_is_exact(tiny_coco, tmp_path):
    straight = run(tiny_coco, tmp_path / "a")
    again = run(tiny_coco, tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_coco, tmp_path / "c", crash_at=3)  # dies in step 3: the step-2 checkpoint survives
    assert load_checkpoint(tmp_path / "c" / "last.pt")["step"] == 2
    resumed = run(tiny_coco, tmp_path / "c")
    for key in straight:
        assert torch.equal(straight[key], again[key]), key
        assert torch.equal(straight[key], resumed[key]), key
    log = (tmp_path / "c" / "train_log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["1", "2", "3", "4"], "no duplicated rows after resume"


def test_lr_schedule():
    cfg = TrainParams(lr=0.1, steps=100, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1 * 0.001)
    assert lr_at(10, cfg) == pytest.approx(0.1)
    assert lr_at(100, cfg) == pytest.approx(0.1 * 0.02)
    assert lr_at(55, cfg) == pytest.approx(0.1 * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    step = TrainParams(lr=0.1, steps=100, warmup_steps=10, schedule="step")
    assert lr_at(69, step) == pytest.approx(0.1) and lr_at(71, step) == pytest.approx(0.01)
    assert lr_at(91, step) == pytest.approx(0.001)


def test_sampler_buckets_views_and_resume():
    buckets = {i: (128, 256) if i % 3 else (256, 128) for i in range(40)}
    sampler = EpochBatchSampler(20, 2, seed=1, num_views=2, bucket_of=buckets.__getitem__,
                                views_of=lambda image: [1] if image == 0 else [0, 1])
    it = iter(sampler)
    batches = [next(it) for _ in range(25)]  # more than one epoch
    for batch in batches:
        assert len(batch) == 2 and len({buckets[i] for i in batch}) == 1, "one padded size per batch"
    assert all(i != 0 for b in batches for i in b), "image 0 only under its allowed view 1"
    later = iter(EpochBatchSampler(20, 2, seed=1, num_views=2, bucket_of=buckets.__getitem__,
                                   views_of=lambda image: [1] if image == 0 else [0, 1], start_step=7))
    assert [next(later) for _ in range(18)] == batches[7:], "start_step resumes the same sequence"
    ranks = [EpochBatchSampler(20, 2, seed=1, rank=r, world=2) for r in (0, 1)]
    first = [next(iter(s)) for s in ranks]
    assert not set(first[0]) & set(first[1]), "DDP ranks get disjoint halves of each global batch"
    # DDP with buckets: rank r's batches are the r-th slices of the 1-process run's global batches
    # (same padded size across ranks), also when resumed at any step
    kw = dict(num_views=2, bucket_of=buckets.__getitem__, views_of=lambda image: [0, 1])
    single = iter(EpochBatchSampler(20, 4, seed=3, **kw))
    glob = [next(single) for _ in range(12)]
    for start in (0, 5):
        per_rank = [iter(EpochBatchSampler(20, 2, seed=3, rank=r, world=2, start_step=start, **kw)) for r in (0, 1)]
        for g in glob[start:]:
            a, b = next(per_rank[0]), next(per_rank[1])
            assert a + b == g and len({buckets[i] for i in g}) == 1
    with pytest.raises(ValueError, match="cannot fill one batch"):
        EpochBatchSampler(3, 4, seed=0)


def test_train_detector_checkpoint_records_architecture_params_and_step(tiny_coco, tmp_path):
    ckpt = tmp_path / "teacher" / "model.pt"
    train_detector(MODEL, CFG, data_params(tiny_coco), ckpt, {"marker": 1}, progress=False)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["model_params"]["backbone"] == "resnet18" and state["step"] == CFG.steps
    assert state["params"] == {"marker": 1} and len(state["categories"]) == state["num_classes"]
    model = load_detector(ckpt)
    assert model.arch == "retinanet" and model.fpn_channels == 8
    train_detector(MODEL, CFG, data_params(tiny_coco), ckpt, {"marker": 1}, progress=False)  # finished: no training
    rerun = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert all(torch.equal(state["model"][k], rerun["model"][k]) for k in state["model"])
