"""COCO evaluation: perfect detections score 100, none score 0, and the entry point writes the JSON."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.evaluate import main as evaluate_main
from stages.config import ModelParams
from stages.data.coco import CocoDataset
from stages.detectors.build import build_detector, checkpoint_dict
from stages.evaluation import METRIC_NAMES, coco_metrics


def ground_truth_as_results(dataset: CocoDataset) -> list[dict]:
    results = []
    for image_id in dataset.image_ids:
        sample = dataset.load(image_id)
        for (x1, y1, x2, y2), label in zip(sample.boxes.tolist(), sample.labels.tolist()):
            results.append({"image_id": image_id, "category_id": dataset.label_to_cat_id(label),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 0.9})
    return results


def test_perfect_and_empty_detections(tiny_coco):
    dataset = CocoDataset(tiny_coco.val_images, tiny_coco.val_ann)
    perfect = coco_metrics(dataset, ground_truth_as_results(dataset))
    assert perfect["AP"] == pytest.approx(100.0, abs=1e-6) and perfect["AP50"] == pytest.approx(100.0)
    present = {dataset.categories[int(label)]["name"] for i in dataset.image_ids for label in dataset.load(i).labels}
    assert all(perfect["per_class"][name] == pytest.approx(100.0) for name in present)
    empty = coco_metrics(dataset, [])
    assert all(empty[k] == 0.0 for k in METRIC_NAMES) and empty["num_detections"] == 0
    shifted = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2], *r["bbox"][1:]]) for r in ground_truth_as_results(dataset)]
    assert coco_metrics(dataset, shifted)["AP"] < 20.0, "boxes moved by their own width mostly miss"


def test_evaluate_entry_point_writes_metrics(tiny_coco, tmp_path):
    dataset = CocoDataset(tiny_coco.val_images, tiny_coco.val_ann)
    cfg = ModelParams(arch="fcos", backbone="resnet18", fpn_channels=8, head_convs=1)
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    torch.save(checkpoint_dict(build_detector(cfg, dataset.num_classes), cfg), ckpt)
    out = tmp_path / "metrics.json"
    (tmp_path / "p.yaml").write_text("{}\n")
    evaluate_main(["--checkpoint", str(ckpt), "--out", str(out), "--set", f"data.val_images={tiny_coco.val_images}",
                   "--set", f"data.val_ann={tiny_coco.val_ann}", "--set", "data.min_size=96",
                   "--set", "data.max_size=128", "--params", str(tmp_path / "p.yaml")])
    metrics = json.loads(out.read_text())
    assert set(METRIC_NAMES) <= set(metrics) and "per_class" in metrics and metrics["checkpoint"] == str(ckpt)
    with pytest.raises(SystemExit, match="not found"):
        evaluate_main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out), "--params", str(tmp_path / "p.yaml")])
