"""Synthetic dataset: byte-identical determinism, order independence, content statistics, CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from stages.data.coco import CocoDataset
from stages.data.synthetic import CATEGORY_IDS, CLASSES, generate


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_byte_identical(tmp_path):
    a = generate(tmp_path / "a", seed=3, num_train=5, num_val=2, min_side=96, max_side=140, progress=False)
    b = generate(tmp_path / "b", seed=3, num_train=5, num_val=2, min_side=96, max_side=140, progress=False)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(fa) == [
        "annotations/instances_train.json",
        "annotations/instances_val.json",
        *[f"train/{i:06d}.png" for i in range(1, 6)],
        *[f"val/{i:06d}.png" for i in range(1, 3)],
    ]
    assert fa == fb
    assert a["num_annotations"] == b["num_annotations"]
    c = generate(tmp_path / "c", seed=4, num_train=5, num_val=2, min_side=96, max_side=140, progress=False)
    assert _files(tmp_path / "c")["train/000001.png"] != fa["train/000001.png"]
    assert c["out_dir"] == str(tmp_path / "c")


def test_order_independent(tmp_path):
    generate(tmp_path / "short", seed=1, num_train=2, num_val=1, min_side=96, max_side=128, progress=False)
    generate(tmp_path / "long", seed=1, num_train=4, num_val=1, min_side=96, max_side=128, progress=False)
    for name in ("train/000001.png", "train/000002.png", "val/000001.png"):
        assert (tmp_path / "short" / name).read_bytes() == (tmp_path / "long" / name).read_bytes()
    short = json.loads((tmp_path / "short/annotations/instances_train.json").read_text())
    long = json.loads((tmp_path / "long/annotations/instances_train.json").read_text())
    assert short["images"] == long["images"][:2]
    assert short["annotations"] == long["annotations"][: len(short["annotations"])]


def test_content_statistics(tmp_path):
    out = generate(tmp_path, seed=0, num_train=40, num_val=8, progress=False)
    assert len(CLASSES) >= 6 and len(CATEGORY_IDS) == len(CLASSES)
    assert CATEGORY_IDS != list(range(1, len(CLASSES) + 1))  # non-contiguous ids exercise the mapping
    assert all(n > 0 for n in out["per_class"]["train"].values()), out["per_class"]
    ds = CocoDataset(out["train_images"], out["train_ann"])
    assert [c["id"] for c in ds.categories] == CATEGORY_IDS
    assert [c["name"] for c in ds.categories] == CLASSES
    raw = json.loads(ds.ann_file.read_text())
    assert all(a["iscrowd"] == 0 for a in raw["annotations"])
    small = large = 0
    sizes = set()
    counts = []
    for img in raw["images"]:
        assert 128 <= img["height"] <= 224 and 128 <= img["width"] <= 224
        sizes.add((img["height"], img["width"]))
        anns = [a for a in raw["annotations"] if a["image_id"] == img["id"]]
        counts.append(len(anns))
        short = min(img["height"], img["width"])
        for a in anns:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
            side = max(w, h)
            small += side <= 14
            large += side >= 0.4 * short
    assert small >= 20 and large >= 3, (small, large)
    assert len(sizes) > 30  # varied sizes and aspect ratios
    assert np.mean(counts) >= 4 and max(counts) >= 8
    s = ds[0]  # loads cleanly through the validated loader
    assert s.image.shape[2] == 3 and len(s.boxes) == len(s.labels)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="min_side"):
        generate(tmp_path, min_side=200, max_side=100, progress=False)
    with pytest.raises(ValueError, match="num_train"):
        generate(tmp_path, num_train=0, progress=False)


def test_make_dataset_cli(tmp_path, capsys):
    from pipeline.make_dataset import main

    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  synthetic:\n    out: {tmp_path / 'ds'}\n    num_train: 3\n    num_val: 2\n")
    stats = main(
        [
            "--params",
            str(params),
            "--set",
            "data.synthetic.min_side=96",
            "--set",
            "data.synthetic.max_side=100",
        ]
    )
    assert stats["num_images"] == {"train": 3, "val": 2}
    assert len(CocoDataset(tmp_path / "ds/train", tmp_path / "ds/annotations/instances_train.json")) == 3
    assert "wrote 3 train / 2 val images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--params", str(params), "--set", "data.synthetic.bogus=1"])
    with pytest.raises(SystemExit):
        main(["--help"])


@pytest.mark.slow
def test_generation_speed(tmp_path):
    t0 = time.process_time()
    generate(tmp_path, seed=0, num_train=240, num_val=60, progress=False)
    assert time.process_time() - t0 < 20.0
