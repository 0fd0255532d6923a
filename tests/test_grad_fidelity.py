"""Gradient fidelity (stages.fidelity): leaf outputs, codec round trip, per-target errors, and
the cosine between KD-loss gradients with cached vs live targets, on tiny seeded detectors.

Oracles: a lossless codec must give cosine 1 and loss error 0 for every method; the streamed
cosine must equal torch's own cosine of the concatenated gradients; the round trip must equal the
store's numpy reference (`stores.codecs.encode` / `decode`); per-target errors must equal numpy's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.config import DistillParams, ModelParams, to_dict
from stages.detectors.build import build_detector
from stages.distill.run import loss_context, run_from_index
from stages.distill.teacher_source import live_records, records_to_targets
from stages.fidelity import (
    gradient_fidelity,
    leaf_outputs,
    measure_gradient_fidelity,
    roundtrip,
    target_errors,
)
from stages.losses.registry import LOSS_NAMES, build_kd_losses
from stores.codecs import decode, encode

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher (inspect_cache test)

TARGETS = ["fpn", "cls", "box", "detections", "candidates", "tower_stats"]
LOSSLESS = {"fpn": "raw+zstd", "cls": "raw+zstd", "box": "raw+zstd", "quality": "raw+zstd"}
LOSSY = {"fpn": "int8c+zstd", "cls": "int8c+zstd", "box": "fp16+zstd", "quality": "fp16+zstd"}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    t_cfg = ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=16, head_convs=2, anchor_size=16)
    s_cfg = ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=8, head_convs=2, anchor_size=16)
    teacher = build_detector(t_cfg, 3).eval()
    student = build_detector(s_cfg, 3).train()
    distill = DistillParams()
    ctx = loss_context(student, to_dict(t_cfg), 3, teacher.box_dim, teacher.has_quality)
    kd = {}
    for m in LOSS_NAMES:
        torch.manual_seed(2)
        kd[m] = build_kd_losses({m: 1.0}, ctx, distill).train()
    index = run_from_index(distill, "retinanet", t_cfg.head_convs)
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 128, 128, generator=g)
    sizes = [(128, 128), (100, 120)]
    gt = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [50.0, 10.0, 90.0, 30.0]]), "labels": torch.tensor([0, 2])},
          {"boxes": torch.tensor([[10.0, 10.0, 30.0, 44.0]]), "labels": torch.tensor([1])}]
    batch = {"images": images, "image_sizes": sizes, "targets": gt}
    return teacher, student, kd, index, batch


def test_leaf_outputs_are_detached_leaves_with_the_same_values(setup):
    _, student, _, _, batch = setup
    with torch.no_grad():
        out = student(batch["images"], batch["image_sizes"])
    copy, leaves = leaf_outputs(out)
    n_maps = (len(out.fpn) + len(out.cls_logits) + len(out.box_reg) + len(out.quality)
              + sum(len(lv) for t in (out.cls_tower, out.reg_tower) for lv in t.pre + t.post))
    assert len(leaves) == n_maps
    assert all(x.is_leaf and x.requires_grad for x in leaves)
    assert all(torch.equal(a, b) for a, b in zip(copy.fpn, out.fpn))
    assert torch.equal(copy.cls_tower.pre[0][0], out.cls_tower.pre[0][0])
    assert copy.anchors is out.anchors and copy.image_sizes == out.image_sizes


def test_roundtrip_is_the_store_reference_and_target_errors_match_numpy(setup):
    teacher, _, _, _, batch = setup
    _, live = live_records(teacher, batch["images"], batch["image_sizes"], batch["targets"], TARGETS)
    sink: list = []
    sizes, cached = roundtrip(live, LOSSY, teacher.num_classes, sink)
    assert len(sink) == 2 and set(sizes[0]) == set(live[0])
    for rec, dec, size in zip(live, cached, sizes):
        x = rec["fpn.0"].numpy()
        blob = encode(x, "int8c+zstd")
        assert size["fpn.0"] == len(blob)
        np.testing.assert_array_equal(dec["fpn.0"].numpy(), decode(blob))
        np.testing.assert_array_equal(dec["cand.index"].numpy(), rec["cand.index"].numpy())  # ints: exact
    errors = target_errors(live, cached)
    for family in ("fpn", "cls", "box"):
        cos, err = [], 0.0
        for rec, dec in zip(live, cached):
            a = np.concatenate([rec[n].numpy().ravel() for n in rec if n.startswith(family + ".")]).astype(np.float64)
            b = np.concatenate([dec[n].numpy().ravel() for n in rec if n.startswith(family + ".")]).astype(np.float64)
            cos.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
            err = max(err, float(np.abs(a - b).max()))
        assert errors[family]["cosine_min"] == pytest.approx(min(cos), abs=1e-9)
        assert errors[family]["max_abs_error"] == pytest.approx(err, rel=1e-6)
    assert errors["fpn"]["max_abs_error"] > 0 and errors["cand"]["max_abs_error"] == 0


def test_lossless_cache_gives_identical_gradients_for_every_method(setup):
    teacher, student, kd, index, batch = setup
    res = measure_gradient_fidelity(teacher, student, kd, [batch], {"raw": LOSSLESS}, TARGETS, index)["raw"]
    assert set(res["grad_cosine"]) == set(LOSS_NAMES)
    for m in LOSS_NAMES:
        assert res["grad_cosine"][m] == pytest.approx(1.0, abs=1e-9), m
        assert res["loss_rel_err"][m] == 0.0, m
        assert res["per_batch"][0][m]["grad_norm_live"] > 0, m  # every method really has a gradient here
    assert res["records"] == 2 and res["bytes_per_record"] == pytest.approx(sum(res["bytes_by_target"].values()))
    assert 0 <= res["teacher_cls"]["frac_ge_0.01"] <= 1


def test_streamed_cosine_equals_torch_cosine_of_the_concatenated_gradients(setup):
    teacher, student, kd, index, batch = setup
    padded = tuple(batch["images"].shape[-2:])
    _, live = live_records(teacher, batch["images"], batch["image_sizes"], batch["targets"], TARGETS)
    g = torch.Generator().manual_seed(7)
    noisy = [{n: (t + 0.3 * t.std() * torch.randn(t.shape, generator=g) if n.startswith(("fpn.", "box.")) else t)
              for n, t in rec.items()} for rec in live]
    strides = list(student.strides)
    t_live = records_to_targets(live, padded, strides, teacher.head, index)
    t_noisy = records_to_targets(noisy, padded, strides, teacher.head, index)
    with torch.no_grad():
        out = student(batch["images"], batch["image_sizes"])
    res = gradient_fidelity({m: kd[m] for m in ("mse", "ssim", "crosskd")}, out, t_live, t_noisy, batch["targets"])
    for m in ("mse", "ssim", "crosskd"):
        vecs, values = [], []
        for targets in (t_live, t_noisy):
            copy, leaves = leaf_outputs(out)
            value = kd[m](copy, targets, batch["targets"])["kd_total"]
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
            vecs.append(torch.cat([(gr if gr is not None else torch.zeros_like(x)).flatten().double()
                                   for gr, x in zip(grads, leaves)]))
            values.append(float(value.detach()))
        expected = float(F.cosine_similarity(vecs[0], vecs[1], dim=0))
        assert res[m]["grad_cosine"] == pytest.approx(expected, abs=1e-9), m
        assert res[m]["grad_cosine"] < 0.9999, m  # the noise is felt
        assert res[m]["loss_rel_err"] == pytest.approx(abs(values[1] - values[0]) / abs(values[0]), rel=1e-6), m


# ------------------------------------------------------------------------------------------------
# inspect_cache --fidelity: the same figures for a real cache's records


def test_inspect_cache_reports_gradient_fidelity_of_a_lossless_cache(tiny_coco, tiny_teacher, tmp_path, capsys):
    import json

    from pipeline import inspect_cache
    from stages.data.coco import CocoDataset
    from stages.detectors.build import checkpoint_dict
    from tests.cache_fixtures import build_cache, tiny_params, torch_threads, write_params

    lossless = {f: "raw+zstd" for f in ("fpn", "cls", "box", "quality")}
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path / "c", codecs=lossless,
                         views=tiny_params(tiny_coco, tiny_teacher, ".").cache.views[:1], format="zarr")
    build_cache(params)
    path = write_params(params, tmp_path / "inspect.yaml")
    # A student whose class logits vary across anchors (std ~1). The tiny teacher is untrained, its
    # candidate scores all at the prior 0.01 (+-7e-6); an untrained student sits at the same prior,
    # so Rank Mimicking's KL between the two softmaxes is ~2e-7: the float32 round-off of its own
    # log-softmax terms (~3 x 1.2e-7), and its relative error would measure that round-off (0.12 on
    # an AMD EPYC), not the cache. Away from the prior the KL is ~1e-1 and the ratio means something.
    torch.manual_seed(0)
    student = build_detector(params.student.model, CocoDataset(tiny_coco.train_images, tiny_coco.train_ann).num_classes)
    with torch.no_grad():
        for conv in student.head.classification_head.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight)
    ckpt = tmp_path / "student.pt"
    torch.save(checkpoint_dict(student, params.student.model), ckpt)
    capsys.readouterr()
    with torch_threads(1):
        inspect_cache.main(["--params", str(path), "--fidelity", "2", "--student", str(ckpt)])
    grads = json.loads(capsys.readouterr().out)["fidelity_gradients"]
    assert grads["student"] == str(ckpt)
    measured = set(grads["grad_cosine"])
    assert {"mse", "cosine", "ssim", "cskd"} <= measured and measured | set(grads["skipped"]) == set(LOSS_NAMES)
    for m in measured:  # the live re-run batches differently from the caching loop: float noise only
        assert grads["grad_cosine"][m] == pytest.approx(1.0, abs=1e-5), m
        assert grads["loss_rel_err"][m] < 1e-4, m
