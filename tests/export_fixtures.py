"""Session fixture for the export tests: tiny students trained a few steps on tiny_coco. PYTEST_DONT_REWRITE

Register with `pytest_plugins = ["tests.export_fixtures"]`. Each student is a run folder holding
the model.pt a training run writes (weights, model_params, categories), trained by the zoo's own
GT-loss loop (`train_detector`) just long enough for scores to clear the 0.05 threshold.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.config import DataParams, ModelParams, TrainParams

MIN_SIZE, MAX_SIZE = 96, 128
STUDENTS = {
    # torchvision-mappable RetinaNet (4 tower convs), the ONNX / TorchScript / AP parity student
    "retinanet": (ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=8, head_convs=4, anchor_size=16,
                                score_thresh=0.02), 10),
    # FCOS whose head GroupNorm has torchvision's 32 groups (FPN 64)
    "fcos": (ModelParams(arch="fcos", backbone="resnet18", fpn_channels=64, head_convs=1), 4),
    # GFL in mmdetection's layout (mmdet round trip, ONNX of the distribution decoding)
    "gfl_mmdet": (ModelParams(arch="gfl", backbone="resnet18", fpn_channels=8, head_convs=1, variant="mmdet",
                                score_thresh=0.01), 6)  # GFL scores start near 0.01,
}


def data_params(tiny_coco) -> DataParams:
    return DataParams(train_images=str(tiny_coco.train_images), train_ann=str(tiny_coco.train_ann),
                      val_images=str(tiny_coco.val_images), val_ann=str(tiny_coco.val_ann),
                      min_size=MIN_SIZE, max_size=MAX_SIZE)


@pytest.fixture(scope="session")
def trained_students(tmp_path_factory, tiny_coco) -> dict[str, Path]:
    from stages.detector_training import train_detector

    root = tmp_path_factory.mktemp("export_students")
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (model, steps) in STUDENTS.items():
            train = TrainParams(optimizer="adamw", lr=0.005, steps=steps, batch_size=2, warmup_steps=1,
                                log_every=100, ckpt_every=1000, flip=False)
            train_detector(model, train, data_params(tiny_coco), root / name / "model.pt", {}, progress=False)
            runs[name] = root / name
    finally:
        torch.set_num_threads(threads)
    return runs


def val_set(tiny_coco):
    from stages.data.coco import CocoDataset

    return CocoDataset(tiny_coco.val_images, tiny_coco.val_ann)


def reference_results(run: Path, dataset, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE) -> list[dict]:
    """kdcache's eval mode (stages.evaluation.predict), one image per batch: COCO result dicts."""
    from stages.data.views import View
    from stages.detectors.build import load_detector
    from stages.evaluation import predict

    model = load_detector(run / "model.pt")
    return predict(model, dataset, View(min_size, max_size), 1, torch.device("cpu"), progress=False)


def deployed_results(run_image, dataset, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE) -> list[dict]:
    """COCO result dicts from an exported graph: `run_image(image, original_size) -> boxes, scores, labels`
    (numpy), fed exactly the documented preprocessing: PIL-bilinear view resize, RGB / 255."""
    import numpy as np

    from stages.data.views import View

    view, out = View(min_size, max_size), []
    for image_id in dataset.image_ids:
        sample = dataset.load(image_id)
        resized, _ = view.apply(sample.image, sample.boxes)
        image = (resized.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        boxes, scores, labels = run_image(np.ascontiguousarray(image), np.array(sample.image.shape[:2], dtype=np.int64))
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            out.append({"image_id": int(image_id), "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(score)})
    return out


def assert_same_detections(ref: list[dict], got: list[dict], box_tol: float = 1e-2, score_tol: float = 1e-4) -> None:
    """Per image, the same number of detections and each reference one matched by one of the same
    category, box corners within box_tol px and score within score_tol (order-free: near-equal
    scores may swap places between runtimes)."""
    assert ref, "the reference found nothing: the comparison would be empty"
    by_image: dict[int, list[dict]] = {}
    for r in got:
        by_image.setdefault(r["image_id"], []).append(r)
    for image_id in {r["image_id"] for r in ref} | set(by_image):
        want = [r for r in ref if r["image_id"] == image_id]
        have = list(by_image.get(image_id, []))
        assert len(want) == len(have), f"image {image_id}: {len(want)} reference detections, {len(have)} exported"
        for r in want:
            match = next((h for h in have if h["category_id"] == r["category_id"]
                          and abs(h["score"] - r["score"]) <= score_tol
                          and max(abs(a - b) for a, b in zip(_corners(h), _corners(r))) <= box_tol), None)
            assert match is not None, f"image {image_id}: no exported match for {r}"
            have.remove(match)


def _corners(r: dict) -> list[float]:
    x, y, w, h = r["bbox"]
    return [x, y, x + w, y + h]
