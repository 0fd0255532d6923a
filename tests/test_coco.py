"""CocoDataset: validation at construction, image decoding, box cleaning, label mapping."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image

from stages.data.coco import CocoDataError, CocoDataset


def _write(tmp_path, images=None, annotations=None, categories=None, pixels=None, raw=None):
    """A small COCO dataset under tmp_path; returns (images_dir, ann_file)."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    if images is None:
        images = [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 20, "height": 50},
        ]
    for im in images:
        if "width" in im and not (img_dir / im["file_name"]).exists():
            arr = np.full((im["height"], im["width"], 3), 100, np.uint8) if pixels is None else pixels
            Image.fromarray(arr).save(img_dir / im["file_name"])
    if categories is None:
        categories = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    if annotations is None:
        annotations = [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 12], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [20, 5, 5, 5], "iscrowd": 0},
        ]
    ann = tmp_path / "ann.json"
    if raw is not None:
        ann.write_text(raw)
    else:
        ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return img_dir, ann


def test_basic_load_and_label_mapping(tmp_path):
    ds = CocoDataset(*_write(tmp_path))
    assert ds.image_ids == [1, 2]
    assert len(ds) == 2
    assert [c["id"] for c in ds.categories] == [3, 7]
    assert ds.num_classes == 2
    assert ds.label_to_cat_id(0) == 3 and ds.label_to_cat_id(1) == 7
    s = ds[0]
    assert s.image_id == 1 and s.file_name == "a.png"
    assert s.image.shape == (30, 40, 3) and s.image.dtype == np.uint8
    assert s.boxes.dtype == np.float32 and s.labels.dtype == np.int64
    np.testing.assert_allclose(s.boxes, [[2, 3, 12, 15], [20, 5, 25, 10]])
    assert s.labels.tolist() == [1, 0]
    empty = ds.load(2)
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)
    assert ds.image_path(2).name == "b.png"
    assert ds.coco.getAnnIds(imgIds=[1]) == [10, 11]
    assert ds.coco.anns[10]["area"] == 120.0  # filled in for COCOeval
    with pytest.raises(IndexError):
        ds[2]


def test_fingerprint_and_pickle(tmp_path):
    ds = CocoDataset(*_write(tmp_path))
    fp = ds.fingerprint()
    assert set(fp) == {"ann_sha256", "files_sha256", "num_images"} and fp["num_images"] == 2
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2.fingerprint() == fp
    np.testing.assert_array_equal(ds2[0].boxes, ds[0].boxes)
    assert ds2.coco.getImgIds() == [1, 2]
    # a changed image file changes files_sha256
    Image.fromarray(np.zeros((50, 20, 3), np.uint8)).save(tmp_path / "images" / "b.png", compress_level=0)
    assert (
        CocoDataset(tmp_path / "images", tmp_path / "ann.json").fingerprint()["files_sha256"]
        != fp["files_sha256"]
    )


@pytest.mark.parametrize(
    "raw, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"images": [], "categories": []}), "'annotations'"),
        (json.dumps({"annotations": [], "categories": []}), "'images'"),
        (json.dumps({"images": [], "annotations": []}), "'categories'"),
        (json.dumps({"images": {}, "annotations": [], "categories": []}), "must be a list"),
    ],
)
def test_malformed_file(tmp_path, raw, match):
    with pytest.raises(CocoDataError, match=match) as info:
        CocoDataset(*_write(tmp_path, raw=raw))
    msg = str(info.value)
    assert "ann.json" in msg and "\n" not in msg


def test_missing_annotation_file(tmp_path):
    with pytest.raises(CocoDataError, match="not found"):
        CocoDataset(tmp_path, tmp_path / "nope.json")


def test_duplicate_image_id(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png", "width": 10, "height": 10},
        {"id": 1, "file_name": "b.png", "width": 10, "height": 10},
    ]
    with pytest.raises(CocoDataError, match="duplicate image id 1"):
        CocoDataset(*_write(tmp_path, images=images, annotations=[]))


def test_duplicate_annotation_id(tmp_path):
    anns = [
        {"id": 5, "image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5]},
        {"id": 5, "image_id": 1, "category_id": 3, "bbox": [0, 0, 6, 6]},
    ]
    with pytest.raises(CocoDataError, match="duplicate annotation id 5"):
        CocoDataset(*_write(tmp_path, annotations=anns))


def test_unknown_category(tmp_path):
    anns = [{"id": 5, "image_id": 1, "category_id": 4, "bbox": [0, 0, 5, 5]}]
    with pytest.raises(CocoDataError, match=r"annotation id 5 has unknown category_id 4 \(known: 3, 7\)"):
        CocoDataset(*_write(tmp_path, annotations=anns))


def test_unknown_image(tmp_path):
    anns = [{"id": 5, "image_id": 99, "category_id": 3, "bbox": [0, 0, 5, 5]}]
    with pytest.raises(CocoDataError, match="annotation id 5 points to unknown image_id 99"):
        CocoDataset(*_write(tmp_path, annotations=anns))


def test_bad_bbox_field(tmp_path):
    anns = [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [0, 0, "5", 5]}]
    with pytest.raises(CocoDataError, match="annotation id 5: 'bbox' must be 4 numbers"):
        CocoDataset(*_write(tmp_path, annotations=anns))


def test_missing_image_file(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png", "width": 10, "height": 10},
        {"id": 2, "file_name": "gone.png"},  # no width -> _write creates no file
    ]
    with pytest.raises(CocoDataError, match=r"missing, e\.g\. 'gone\.png' \(image id 2\)"):
        CocoDataset(*_write(tmp_path, images=images, annotations=[]))


def test_missing_images_dir(tmp_path):
    _, ann = _write(tmp_path)
    with pytest.raises(CocoDataError, match="image folder not found"):
        CocoDataset(tmp_path / "elsewhere", ann)


def test_truncated_png(tmp_path):
    img_dir, ann = _write(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(img_dir / "a.png")
    data = (img_dir / "a.png").read_bytes()
    (img_dir / "a.png").write_bytes(data[: len(data) // 2])
    ds = CocoDataset(img_dir, ann)  # construction does not decode
    with pytest.raises(CocoDataError, match=r"a\.png: unreadable image"):
        ds.load(1)
    ds.load(2)  # the other image is fine


def test_corrupt_file(tmp_path):
    img_dir, ann = _write(tmp_path)
    (img_dir / "b.png").write_bytes(b"this is not an image at all" * 10)
    ds = CocoDataset(img_dir, ann)
    with pytest.raises(CocoDataError, match=r"b\.png: unreadable image"):
        ds[1]


def test_size_mismatch(tmp_path):
    img_dir, ann = _write(tmp_path)
    Image.fromarray(np.zeros((31, 40, 3), np.uint8)).save(img_dir / "a.png")
    with pytest.raises(CocoDataError, match="image id 1"):
        CocoDataset(img_dir, ann).load(1)


def test_degenerate_boxes_warn_once_and_drop(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 10]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0.5, 10]},  # too thin
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, -4, 10]},  # negative
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [float("nan"), 5, 4, 10]},  # NaN
        {"id": 5, "image_id": 1, "category_id": 3, "bbox": [45, 5, 10, 10]},  # entirely outside (x >= 40)
        {"id": 6, "image_id": 1, "category_id": 3, "bbox": [39.5, 5, 10, 10]},  # 0.5 px left after clipping
    ]
    ds = CocoDataset(*_write(tmp_path, annotations=anns))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s = ds.load(1)
        ds.load(1)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 5, msgs  # once per bad annotation, not again on reload
    for aid in (2, 3, 4, 5, 6):
        assert sum(f"annotation id {aid}:" in m for m in msgs) == 1
    assert all("image id 1" in m for m in msgs)
    np.testing.assert_allclose(s.boxes, [[2, 2, 12, 12]])


def test_clipping(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [-5, -3, 20, 50]}]  # image is 40x30
    s = CocoDataset(*_write(tmp_path, annotations=anns)).load(1)
    np.testing.assert_allclose(s.boxes, [[0, 0, 15, 30]])
    assert s.labels.tolist() == [1]


def test_crowd_excluded(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 10, 10], "iscrowd": 1},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 10], "iscrowd": 0},
    ]
    ds = CocoDataset(*_write(tmp_path, annotations=anns))
    s = ds.load(1)
    np.testing.assert_allclose(s.boxes, [[2, 2, 12, 12]])
    assert s.labels.tolist() == [0]
    assert ds.coco.anns[1]["iscrowd"] == 1  # still there for COCOeval


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "1", "I;16"])
def test_mode_conversion(tmp_path, mode):
    img_dir, ann = _write(tmp_path)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    if mode == "I;16":
        im = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        assert im.mode == "I;16"
    else:
        im = Image.fromarray(rgb).convert(mode)
    im.save(img_dir / "a.png")
    arr = CocoDataset(img_dir, ann).load(1).image
    assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8
    if mode in ("L", "LA", "1", "I;16"):
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    if mode == "L":
        np.testing.assert_array_equal(arr[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    if mode == "RGBA":
        np.testing.assert_array_equal(arr, rgb)
    if mode == "I;16":
        np.testing.assert_array_equal(arr[..., 0], rgb[..., 0])


def test_tiny_coco_fixture(tiny_coco):
    ds = CocoDataset(tiny_coco.train_images, tiny_coco.train_ann)
    assert len(ds) == 8 and ds.num_classes == 6
    assert [c["id"] for c in ds.categories] == [1, 2, 3, 5, 7, 8]
    n = 0
    for s in ds:
        h, w = s.image.shape[:2]
        assert 96 <= h <= 128 and 96 <= w <= 128
        assert (s.boxes[:, 2] <= w).all() and (s.boxes[:, 3] <= h).all() and (s.boxes >= 0).all()
        n += len(s.boxes)
    assert n > 0
    assert len(CocoDataset(tiny_coco.val_images, tiny_coco.val_ann)) == 4
