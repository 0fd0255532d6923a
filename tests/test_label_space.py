"""Label spaces and mappings; real-COCO details: crowd ignore regions, EXIF, sparse ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models._meta import _COCO_CATEGORIES

from stages.detectors.label_space import LabelSpace, map_labels, slice_classes, torchvision_coco, unnamed

SPARSE = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 90, "name": "toothbrush"}]


def test_torchvision_space_is_indexed_by_category_id():
    space = torchvision_coco()
    assert space.size == 91 and space.ids[0] is None and space.ids[12] is None  # background, 'N/A'
    m = map_labels(space, SPARSE, "t.pt", "a.json")
    assert m.index == (1, 3, 90) and m.by == "id"
    frcnn = map_labels(torchvision_coco(faster_rcnn=True), SPARSE, "t.pt", "a.json")
    assert frcnn.index == (0, 2, 89)  # output l + 1 is category l + 1: background is not in the space


def test_mmdet_space_maps_by_name_ignoring_case_and_spaces():
    names = [n for n in _COCO_CATEGORIES if n not in ("N/A", "__background__")]
    space = LabelSpace("mmdet", (None,) * 80, tuple(names))
    cats = [{"id": 7, "name": "Dining_Table"}, {"id": 2, "name": "person"}]
    assert map_labels(space, cats, "t", "a").index == (names.index("dining table"), 0)
    with pytest.raises(ValueError, match=r"no class for 'widget' \(id 3\)"):
        map_labels(space, [{"id": 3, "name": "widget"}], "t", "a")


def test_unnamed_space_needs_the_same_count_and_names_both_files():
    assert map_labels(unnamed(3), SPARSE, "t.pt", "a.json").index == (0, 1, 2)
    with pytest.raises(ValueError, match=r"teacher t\.pt vs dataset a\.json: the teacher predicts 6 classes"):
        map_labels(unnamed(6), SPARSE, "t.pt", "a.json")


def test_retinanet_slice_keeps_each_anchor_block():
    a, k = 9, 5
    w = torch.arange(a * k, dtype=torch.float32).reshape(a * k, 1, 1, 1)
    sd = {"head.classification_head.cls_logits.weight": w, "head.classification_head.cls_logits.bias": w.flatten()}
    out = slice_classes(sd, "retinanet", a, k, (4, 1))
    expect = [anchor * k + c for anchor in range(a) for c in (4, 1)]  # row a*K + k, per anchor
    assert out["head.classification_head.cls_logits.bias"].tolist() == expect


# ---------------------------------------------------------------- real COCO details


def _write(tmp_path: Path, anns: list[dict], size=(40, 30), exif: int | None = None) -> tuple[Path, Path]:
    images = tmp_path / "img"
    images.mkdir(exist_ok=True)
    im = Image.new("RGB", size, (10, 20, 30))
    kwargs = {}
    if exif is not None:
        tags = Image.Exif()
        tags[0x0112] = exif
        kwargs["exif"] = tags
    im.save(images / "a.jpg", **kwargs)
    data = {  # no info / licenses; segmentation fields; sparse ids
        "images": [{"id": 5, "file_name": "a.jpg"}],
        "annotations": anns,
        "categories": [{"id": 18, "name": "dog"}, {"id": 90, "name": "toothbrush"}],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return images, ann


def test_crowd_becomes_an_ignore_region_through_views(tmp_path):
    from stages.data.batching import ViewDataset, collate
    from stages.data.coco import CocoDataset
    from stages.data.views import View

    anns = [
        {"id": 1, "image_id": 5, "category_id": 90, "bbox": [2, 2, 10, 10], "iscrowd": 0,
         "segmentation": [[2, 2, 12, 2, 12, 12]]},
        {"id": 2, "image_id": 5, "category_id": 18, "bbox": [20, 5, 100, 10], "iscrowd": 1,
         "segmentation": {"counts": "abc", "size": [30, 40]}},
    ]
    images, ann = _write(tmp_path, anns)
    ds = CocoDataset(images, ann)
    sample = ds[0]
    assert sample.labels.tolist() == [1] and ds.label_to_cat_id(1) == 90
    np.testing.assert_array_equal(sample.crowd_boxes, [[20, 5, 40, 15]])  # clipped to the 40 px width
    item = ViewDataset(ds, [View(60, 80, True)])[0]  # x2 (30 -> 60 px high), flipped: 80 px wide
    np.testing.assert_allclose(item["crowd_boxes"].numpy(), [[0, 10, 40, 30]])
    batch = collate([item])
    assert "crowd_boxes" in batch["targets"][0]


def test_exif_transpose_is_opt_in(tmp_path):
    from stages.data.coco import CocoDataset

    images, ann = _write(tmp_path, [], size=(40, 30), exif=6)  # 6: rotate 90 degrees to display
    plain = CocoDataset(images, ann)
    assert plain.load(5).image.shape[:2] == (30, 40) and plain.image_size(5) == (30, 40)
    turned = CocoDataset(images, ann, exif_transpose=True)
    assert turned.load(5).image.shape[:2] == (40, 30) and turned.image_size(5) == (40, 30)


def _iof(anchor, box):
    ix = max(0.0, min(anchor[2], box[2]) - max(anchor[0], box[0]))
    iy = max(0.0, min(anchor[3], box[3]) - max(anchor[1], box[1]))
    return ix * iy / ((anchor[2] - anchor[0]) * (anchor[3] - anchor[1]))


def test_ignore_crowd_marks_only_covered_negatives():
    from stages.detectors.base import IGNORE, ignore_crowd

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 20], 1)
    matched = torch.where(torch.rand(200, generator=g) < 0.2, 0, -1)
    crowd = torch.tensor([[10.0, 10.0, 60.0, 50.0]])
    out = ignore_crowd(anchors, matched, crowd)
    for i in range(200):  # the reference: IoF written out per anchor
        covered = _iof(anchors[i].tolist(), crowd[0].tolist()) > 0.5
        expect = IGNORE if (matched[i] < 0 and covered) else int(matched[i])
        assert int(out[i]) == expect
    assert (out == IGNORE).any()


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "gfl"])
def test_crowd_region_gets_no_classification_gradient(arch):
    from stages.config import ModelParams
    from stages.detectors.build import build_detector
    from stages.detectors.contract import flatten_levels

    torch.manual_seed(0)
    det = build_detector(ModelParams(arch=arch, backbone="resnet18", fpn_channels=16, head_convs=1), 3)
    images = torch.rand(1, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1]),
                "crowd_boxes": torch.tensor([[64.0, 0.0, 128.0, 128.0]])}]
    out = det(images, [(128, 128)])
    for m in out.cls_logits:
        m.retain_grad()
    prepared = det.prepare_targets(targets, images.device)
    losses = det.compute_losses(out, prepared)
    losses["cls"].backward()
    grad = flatten_levels([m.grad for m in out.cls_logits], det.num_classes)[0]  # [N, K]
    # the expectation, independent of ignore_crowd: plain negatives (no crowd given) inside the region
    anchors, plain = det.matches(out, [{k: v for k, v in t.items() if k != "crowd_boxes"} for t in prepared])
    crowd = targets[0]["crowd_boxes"][0]
    inside = (anchors[:, 2].clamp(max=crowd[2]) - anchors[:, 0].clamp(min=crowd[0])).clamp(min=0) * (
        anchors[:, 3].clamp(max=crowd[3]) - anchors[:, 1].clamp(min=crowd[1])).clamp(min=0)
    area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    ignored = (plain[0] < 0) & (inside / area > 0.5)
    assert ignored.sum() > 0 and grad[ignored].abs().max() == 0
    assert grad[(plain[0] == -1) & ~ignored].abs().max() > 0  # ordinary negatives still learn


def test_predict_writes_the_datasets_own_sparse_category_ids(tmp_path):
    """Detections carry 0-based labels; results must carry the json's ids (18, 90), not 0/1."""
    from types import SimpleNamespace

    from stages.data.coco import CocoDataset
    from stages.data.views import View
    from stages.evaluation import predict

    anns = [{"id": 1, "image_id": 5, "category_id": 90, "bbox": [2, 2, 10, 10]}]
    images, ann = _write(tmp_path, anns)

    class TwoBoxes(torch.nn.Module):  # a detector whose output is known: label 0 and label 1
        def forward(self, images, sizes, with_detections=False):
            det = {"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 12.0, 12.0]]),
                   "scores": torch.tensor([0.5, 0.9]), "labels": torch.tensor([0, 1])}
            return SimpleNamespace(detections=[det] * images.shape[0])

    results = predict(TwoBoxes(), CocoDataset(images, ann), View(30, 40), 1, torch.device("cpu"), progress=False)
    assert [r["category_id"] for r in results] == [18, 90]
    assert results[1]["bbox"] == [2.0, 2.0, 10.0, 10.0]
