from pathlib import Path

import pytest

from pipeline.params import load_params, make_parser
from stages.config import ConfigError, Params, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  steps: 7\nteacher:\n  model:\n    arch: gfl\n")
    p = load_params(f, ["train.lr=0.5", "cache.views=[{min_size: 64, max_size: 96, flip: true}]"])
    assert p.train.steps == 7 and p.train.lr == 0.5
    assert p.teacher.model.arch == "gfl"
    assert p.teacher.model.backbone == "resnet50"  # untouched default
    assert p.cache.views[0].flip is True and p.cache.views[0].min_size == 64
    with pytest.raises(AttributeError):
        p.train.steps = 3  # frozen


def test_unknown_key_names_key_and_valid_ones(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("train:\n  stepz: 7\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.stepz'.*valid keys here: .*steps"):
        load_params(f)
    f.write_text("{}\n")
    with pytest.raises(ConfigError, match="unknown key 'nosection'"):
        load_params(f, ["nosection.x=1"])


def test_bad_values(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("{}\n")
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_params(f, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="teacher.model.arch: 'yolo' is not one of"):
        load_params(f, ["teacher.model.arch=yolo"])
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        load_params(f, ["train.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    f.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(f)


def test_to_dict_round_trip_and_parser():
    p = Params()
    assert load_params.__name__ and to_dict(p)["cache"]["views"][0]["min_size"] == 160
    args = make_parser("x", "doc").parse_args(["--set", "a.b=1", "--set", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.params == "params.yaml"


def test_repo_params_yaml_loads():
    p = load_params(ROOT / "params.yaml")
    assert p.experiments, "params.yaml lists the demo's student experiments"


def test_coco_profile_loads():
    p = load_params(ROOT / "profiles" / "coco.yaml")
    assert (p.data.min_size, p.data.max_size) == (800, 1333) and p.cache.views[1].flip
    assert p.teacher.model.backbone == "resnet50" and p.student.model.backbone == "resnet18"


@pytest.mark.parametrize("override, field, rule", [
    ("train.steps=-1", "train.steps", "must be >= 1, got -1"),
    ("train.steps=0", "train.steps", "must be >= 1, got 0"),
    ("teacher.train.steps=0", "teacher.train.steps", "must be >= 1"),
    ("train.lr=0", "train.lr", "must be > 0"),
    ("train.lr=-0.1", "train.lr", "must be > 0"),
    ("train.lr=.nan", "train.lr", "must be a finite number"),
    ("train.batch_size=0", "train.batch_size", "must be >= 1"),
    ("train.warmup_steps=-1", "train.warmup_steps", "must be >= 0"),
    ("train.momentum=1.5", "train.momentum", "must be < 1"),
    ("train.ckpt_every=0", "train.ckpt_every", "must be >= 1"),
    ("cache.views=[]", "cache.views", "the list is empty"),
    ("cache.views_per_image=3", "cache.views_per_image", "3 is more than the 2 views listed"),
    ("cache.views_per_image=-1", "cache.views_per_image", "must be >= 0"),
    ("cache.block_size=0", "cache.block_size", "must be >= 1"),
    ("cache.batch_size=0", "cache.batch_size", "must be >= 1"),
    ("cache.n_workers=0", "cache.n_workers", "must be >= 1"),
    ("cache.views=[{min_size: 96, max_size: 64}]", "cache.views[0].max_size", "smaller than min_size"),
    ("cache.views=[{min_size: 96}, {min_size: 96}]", "cache.views", "listed twice"),
    ("data.min_size=0", "data.min_size", "must be >= 1"),
    ("student.model.fpn_channels=0", "student.model.fpn_channels", "must be >= 1"),
    ("teacher.model.score_thresh=2", "teacher.model.score_thresh", "must be <= 1"),
    ("distill.losses={cskd: -1}", "distill.losses.cskd", "must be >= 0"),
    ("distill.ssim.window=4", "distill.ssim.window", "odd integer"),
    ("distill.crosskd.reuse_index=0", "distill.crosskd.reuse_index", "-1"),
    ("eval.batch_size=0", "eval.batch_size", "must be >= 1"),
    ("data.synthetic.num_train=0", "data.synthetic.num_train", "must be >= 1"),
])
def test_impossible_values_are_refused_naming_the_field(tmp_path, override, field, rule):
    f = tmp_path / "p.yaml"
    f.write_text("{}\n")
    with pytest.raises(ConfigError) as info:
        load_params(f, [override])
    msg = str(info.value)
    assert msg.startswith(f"{f}: {field}") and rule in msg and "\n" not in msg, msg


def test_experiments_are_checked_when_resolved(tmp_path):
    from stages.distill.run import resolve_distill

    f = tmp_path / "p.yaml"
    f.write_text("experiments:\n  bad: {losses: {cskd: -2}}\n")
    with pytest.raises(ConfigError, match=r"experiments.bad.losses.cskd: must be >= 0"):
        resolve_distill(load_params(f), "bad")


def test_count_options_must_be_positive():
    import argparse

    from pipeline.params import positive_int

    assert positive_int("3") == 3
    for bad in ("0", "-2", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 1"):
            positive_int(bad)
