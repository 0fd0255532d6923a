"""COCO evaluation of any zoo detector with pycocotools' COCOeval.

Images are shown under one View (as in training); detections are mapped back to the original
image frame and to the dataset's category ids before COCOeval, so the numbers are comparable
with any other COCO-format evaluation of the same json.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from stages.data.batching import ViewDataset, collate
from stages.data.coco import CocoDataset
from stages.data.views import View

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def predict(model, dataset: CocoDataset, view: View, batch_size: int, device: torch.device, progress: bool = True):
    """COCO result dicts (bbox as xywh in original pixels, category_id, score) for every image."""
    model.eval()
    loader = torch.utils.data.DataLoader(
        ViewDataset(dataset, [view], mode="all"), batch_size=batch_size, shuffle=False, collate_fn=collate
    )
    results = []
    for batch in tqdm(loader, desc="evaluate", disable=not progress):
        out = model(batch["images"].to(device), batch["image_sizes"], with_detections=True)
        for det, image_id, orig in zip(out.detections, batch["image_ids"], batch["orig_sizes"]):
            boxes = view.boxes_to_original(det["boxes"].float().cpu().numpy(), tuple(orig))
            for box, score, label in zip(boxes, det["scores"].tolist(), det["labels"].tolist()):
                x1, y1, x2, y2 = (float(v) for v in box)
                results.append(
                    {
                        "image_id": int(image_id),
                        "category_id": dataset.label_to_cat_id(int(label)),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(score),
                    }
                )
    return results


def coco_metrics(dataset: CocoDataset, results: list[dict]) -> dict:
    """{'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'} in percent plus 'per_class' {name: AP}."""
    names = {c["id"]: c["name"] for c in dataset.categories}
    empty = {k: 0.0 for k in METRIC_NAMES} | {"per_class": {n: 0.0 for n in names.values()}, "num_detections": 0}
    if not results:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its table; we return numbers
        dt = dataset.coco.loadRes(results)
        ev = COCOeval(dataset.coco, dt, "bbox")
        ev.params.imgIds = list(dataset.image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval says -1 where the val set has no object of that size: report null, not a fake 0
    metrics = {k: (round(float(v) * 100, 3) if v >= 0 else None) for k, v in zip(METRIC_NAMES, ev.stats[:6])}
    # precision: [IoU thresholds, recall points, classes, area ranges, max dets]; area 'all', 100 dets
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        per_class[names[cat_id]] = round(float(np.mean(p[p > -1])) * 100, 3) if (p > -1).any() else 0.0
    return metrics | {"per_class": per_class, "num_detections": len(results)}


def evaluate(model, dataset: CocoDataset, view: View, batch_size: int, device: torch.device, progress=True) -> dict:
    return coco_metrics(dataset, predict(model, dataset, view, batch_size, device, progress))
