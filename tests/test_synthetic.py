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
        ".make_dataset.json",  # the record of what it wrote (stages.data.dataset_record)
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


# ---------------------------------------------------------------------------------------- more classes
# sha256 of instances_train.json written by the generator before `textures`/`colours` existed
# (commit 1162906) for seed 0, 4 train / 1 val images, sides 112-192, min_object 16 (the demo's
# settings): the default six-class set must stay byte-identical so the demo's data does not change.
_SIX_CLASS_TRAIN_JSON_SHA256 = "2230eed8a58447c4990d63d71c145a382918294bb9406956556d53de2dd3234d"


def test_default_set_unchanged_by_class_knobs(tmp_path):
    import hashlib

    from stages.data.synthetic import class_specs

    out = generate(tmp_path / "d", seed=0, num_train=4, num_val=1, min_side=112, max_side=192, min_object=16,
                   progress=False)
    assert hashlib.sha256((tmp_path / "d/annotations/instances_train.json").read_bytes()).hexdigest() == (
        _SIX_CLASS_TRAIN_JSON_SHA256)
    explicit = generate(tmp_path / "e", seed=0, num_train=4, num_val=1, min_side=112, max_side=192,
                        min_object=16, textures=1, colours=1, progress=False)
    assert _files(tmp_path / "d") == _files(tmp_path / "e")
    assert out["per_class"] == explicit["per_class"]
    specs = class_specs()
    assert [s.name for s in specs] == CLASSES and [s.category_id for s in specs] == CATEGORY_IDS


def test_shape_texture_colour_classes(tmp_path):
    from stages.data.synthetic import class_specs

    specs = class_specs(textures=2, colours=2)
    assert len(specs) == 24
    assert len({s.name for s in specs}) == 24 and len({s.category_id for s in specs}) == 24
    assert len({(s.shape, s.texture, s.colour) for s in specs}) == 24
    ids = [s.category_id for s in specs]
    assert ids == sorted(ids) and ids != list(range(1, 25))  # ascending, non-contiguous
    for shape in range(6):  # each shape comes with two different textures, in both colours
        own = [s for s in specs if s.shape == shape]
        assert len({s.texture for s in own}) == 2 and {s.colour for s in own} == {0, 1}
    assert [(s.shape, s.texture) for s in specs[:6]] == [(k, k) for k in range(6)]  # the default six first
    assert len(class_specs(textures=1, colours=4)) == 24 and len(class_specs(textures=6, colours=6)) == 216

    out = generate(tmp_path, seed=5, num_train=12, num_val=2, min_side=160, max_side=200, min_object=12,
                   textures=2, colours=2, progress=False)
    ds = CocoDataset(out["train_images"], out["train_ann"])
    assert [c["id"] for c in ds.categories] == ids and [c["name"] for c in ds.categories] == [s.name for s in specs]
    raw = json.loads(ds.ann_file.read_text())
    used = {a["category_id"] for a in raw["annotations"]}
    assert used <= set(ids) and len(used) >= 12, sorted(used)  # many classes drawn from 12 images
    assert sum(out["per_class"]["train"].values()) == out["num_annotations"]["train"]


def test_colour_families_are_a_reliable_cue():
    """With colours >= 2, a class's main colour stays in its hue family (colorsys as the oracle)."""
    import colorsys

    from stages.data.synthetic_classes import _family_colours

    rng = np.random.default_rng(0)
    for n in (2, 3):
        for colour in range(n):
            for _ in range(200):
                a, b = _family_colours(colour, n, rng)
                for rgb in (a, b):
                    h, s, _v = colorsys.rgb_to_hsv(*(rgb / 255.0))
                    dist = abs((h - colour / n + 0.5) % 1.0 - 0.5)  # circular hue distance to the centre
                    assert dist < 0.5 / n, (n, colour, h)  # never across the half-way hue to a neighbour
                    assert s > 0.3


def test_class_knob_errors(tmp_path):
    with pytest.raises(ValueError, match="textures"):
        generate(tmp_path, num_train=1, textures=7, progress=False)
    with pytest.raises(ValueError, match="colours"):
        generate(tmp_path, num_train=1, colours=0, progress=False)


def test_make_dataset_cli_class_knobs(tmp_path):
    from pipeline.make_dataset import main

    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  synthetic:\n    out: {tmp_path / 'ds'}\n    num_train: 2\n    num_val: 1\n"
                      "    min_side: 96\n    max_side: 100\n    textures: 2\n    colours: 2\n")
    main(["--params", str(params)])
    ds = CocoDataset(tmp_path / "ds/train", tmp_path / "ds/annotations/instances_train.json")
    assert ds.num_classes == 24


def test_synth20_profile_has_20_plus_classes():
    from pathlib import Path

    from pipeline.params import load_params
    from stages.data.synthetic import class_specs

    p = load_params(Path(__file__).resolve().parents[1] / "profiles/synth20.yaml")
    s = p.data.synthetic
    assert len(class_specs(s.textures, s.colours)) >= 20
    assert s.min_side > 112 and s.max_side > 192  # larger images than the demo's
    demo = load_params(Path(__file__).resolve().parents[1] / "params.yaml")

    def pixels(q):  # training pixels the teacher sees (steps x batch x view area)
        return q.teacher.train.steps * q.teacher.train.batch_size * q.data.min_size * q.data.max_size

    assert pixels(p) > 2 * pixels(demo)  # trained clearly longer than the demo teacher, in pixels seen


def test_synth20coco_profile_is_coco_shaped_on_the_synth20_data():
    from pathlib import Path

    from pipeline.params import load_params

    root = Path(__file__).resolve().parents[1]
    p, synth20 = load_params(root / "profiles/synth20coco.yaml"), load_params(root / "profiles/synth20.yaml")
    t = p.teacher.model
    assert (t.arch, t.backbone, t.fpn_channels, t.head_convs) == ("retinanet", "resnet50", 256, 4)  # COCO's shape
    assert p.data == synth20.data  # the data its body was trained on
    assert t.pretrained_backbone == synth20.teacher.checkpoint and t.backbone == synth20.teacher.model.backbone
    assert p.student.model.anchor_size == t.anchor_size  # per-anchor KD losses need equal anchors
    assert p.teacher.checkpoint != synth20.teacher.checkpoint and p.cache.path != synth20.cache.path
