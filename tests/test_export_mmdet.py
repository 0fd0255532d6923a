"""mmdet export: an mmdetection 3.x checkpoint (meta.dataset_meta.classes, meta.cfg, state_dict in
mmdet's key names) that kdcache's own mmdet import reads back into a detector with identical
outputs; the torchvision-style RetinaNet is refused (tested in test_export_onnx)."""

from __future__ import annotations

import pytest
import torch

from pipeline.export_student import main as export_main
from stages.data.batching import collate
from stages.data.views import View
from stages.detectors.build import build_to_load, load_detector, load_weights
from stages.detectors.checkpoint import open_teacher
from stages.detectors.mmdet_import import safe_load
from tests.export_fixtures import MAX_SIZE, MIN_SIZE, val_set
from tests.test_export_onnx import cli_args

pytest_plugins = ["tests.export_fixtures"]  # trained_students


@pytest.mark.parametrize("student", ["gfl_mmdet", "fcos"])
def test_mmdet_round_trip_through_kdcache_import_is_identical(student, trained_students, tiny_coco, tmp_path):
    out = tmp_path / f"{student}.pth"
    export_main(cli_args(tiny_coco, tmp_path, trained_students[student], "mmdet", out))
    raw = safe_load(out)
    dataset = val_set(tiny_coco)
    assert set(raw) == {"meta", "state_dict"}
    assert list(raw["meta"]["dataset_meta"]["classes"]) == [c["name"] for c in dataset.categories]
    assert all(k.split(".")[0] in ("backbone", "neck", "bbox_head") for k in raw["state_dict"])

    imported = open_teacher(out)
    assert imported.format == "mmdet" and imported.missing == [] and imported.unmatched == []
    original = load_detector(trained_students[student] / "model.pt").eval()
    assert imported.model.arch == original.arch and imported.num_outputs == original.num_classes
    # the thresholds are inference knobs the import takes from params, not from the weights
    model = build_to_load(imported.model, imported.num_outputs)
    load_weights(model, imported.weights, str(out))
    model.eval()
    for knob in ("score_thresh", "nms_thresh", "detections_per_img"):
        setattr(model, knob, getattr(original, knob))

    from stages.data.batching import ViewDataset

    items = ViewDataset(dataset, [View(MIN_SIZE, MAX_SIZE)])
    batch = collate([items[i] for i in range(len(items))])
    with torch.no_grad():
        a = original(batch["images"], batch["image_sizes"], with_detections=True)
        b = model(batch["images"], batch["image_sizes"], with_detections=True)
    for name in ("cls_logits", "box_reg", "quality"):
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True):
            assert torch.equal(x, y), name
    assert sum(len(d["scores"]) for d in a.detections) > 0
    for x, y in zip(a.detections, b.detections):
        assert all(torch.equal(x[k], y[k]) for k in ("boxes", "scores", "labels"))
