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
