"""Typed configuration: one frozen dataclass per params.yaml section.

The stages take these value objects; `pipeline.params` reads params.yaml (plus `--set`
overrides) into them. `from_dict` rejects unknown keys naming the key and the valid ones, so a
typo in params.yaml fails loudly instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A params value or key is invalid; the message names the key path."""


@dataclass(frozen=True)
class SyntheticParams:
    """Generator settings for `python -m pipeline.make_dataset`."""

    out: str = "data/synthetic"
    seed: int = 0
    num_train: int = 240
    num_val: int = 60
    min_side: int = 128  # image sides are drawn from [min_side, max_side]
    max_side: int = 224
    min_object: float = 8.0  # smallest annotated object extent in px: 8 is hard; 16 suits a short CPU demo


@dataclass(frozen=True)
class DataParams:
    """A COCO-format dataset: image folders and instances json files."""

    train_images: str = "data/synthetic/train"
    train_ann: str = "data/synthetic/annotations/instances_train.json"
    val_images: str = "data/synthetic/val"
    val_ann: str = "data/synthetic/annotations/instances_val.json"
    # the view used to train the teacher and to evaluate (shorter side, longer-side cap)
    min_size: int = 160
    max_size: int = 256
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)


@dataclass(frozen=True)
class ModelParams:
    """A detector from the zoo (see stages.detectors.build)."""

    arch: Literal["retinanet", "fcos", "gfl", "faster_rcnn"] = "retinanet"
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet18"
    fpn_channels: int = 64  # FPN width knob: 256 is the paper setting, 32-64 for CPU demos
    head_convs: int = 4  # convs per head tower (cls and reg)
    reg_max: int = 16  # GFL: bins of the box-side distribution
    anchor_size: int = 32  # RetinaNet: P3 anchor size in px, doubling per level (torchvision: 32; 16 for tiny objects)
    num_classes: int = 0  # 0 = take it from the training annotations
    pretrained_backbone: str = ""  # optional local path to backbone weights (no downloads)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


@dataclass(frozen=True)
class TrainParams:
    """Optimisation settings, shared by the teacher's and the students' training loop."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    steps: int = 300
    batch_size: int = 4
    warmup_steps: int = 30
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    clip_grad: float = 10.0  # max grad norm; 0 disables clipping
    amp: bool = True  # autocast on CUDA only; ignored on CPU
    seed: int = 0
    workers: int = 0  # DataLoader worker processes
    flip: bool = True  # random horizontal flip (p=0.5) when training the teacher; students replay cached views
    ckpt_every: int = 100
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass(frozen=True)
class TeacherParams:
    model: ModelParams = field(default_factory=lambda: ModelParams(backbone="resnet50"))
    checkpoint: str = "runs/teacher/model.pt"  # written by train_teacher, read by cache_teacher
    train: TrainParams = field(default_factory=TrainParams)


@dataclass(frozen=True)
class StudentParams:
    model: ModelParams = field(default_factory=ModelParams)
    out_dir: str = "runs/students"  # one sub-folder per experiment name


@dataclass(frozen=True)
class ViewParams:
    """One cached view: resize so the shorter side is `min_size` (longer side <= max_size), then flip."""

    min_size: int = 160
    max_size: int = 256
    flip: bool = False


@dataclass(frozen=True)
class CacheParams:
    path: str = "cache/teacher"
    format: Literal["zarr", "wds", "both"] = "both"
    views: list[ViewParams] = field(
        default_factory=lambda: [ViewParams(160, 256, False), ViewParams(160, 256, True)]
    )
    views_per_image: int = 0  # 0 = every view; k > 0 = a seeded subset of k views per image
    targets: list[str] = field(
        default_factory=lambda: ["fpn", "cls", "box", "quality", "detections", "candidates", "tower_stats", "head"]
    )
    # codec chain per target, e.g. "fp16+zstd", "int8c+zstd", "bitround7+zstd", "sparse0.01+zstd"
    codecs: dict[str, str] = field(
        default_factory=lambda: {"fpn": "int8c+zstd", "cls": "int8c+zstd", "box": "fp16+zstd", "quality": "fp16+zstd"}
    )
    batch_size: int = 4
    loader_workers: int = 0
    block_size: int = 16  # images per block: the unit of parallel work, resume and sharding
    n_workers: int = 1  # dask workers of the local cluster (ignored with scheduler)
    scheduler: str = ""  # address of an existing dask scheduler; "" = local cluster
    device: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class CSKDParams:
    w_mse: float = 1.0
    w_cos: float = 0.5
    assistant: bool = True


@dataclass(frozen=True)
class SSIMParams:
    window: int = 11
    sigma: float = 1.5
    adapter: bool = False


@dataclass(frozen=True)
class CrossKDParams:
    # paper numbering (official `reused_teacher_head_idx`): the student's first N tower convs feed the
    # teacher head; -1 = the paper default (3; 2 for FCOS), clamped to the tower depth
    reuse_index: int = -1


@dataclass(frozen=True)
class DistillParams:
    teacher: Literal["offline", "online"] = "offline"
    source: Literal["zarr", "wds"] = "zarr"  # which store stage 2 reads in offline mode
    losses: dict[str, float] = field(default_factory=dict)  # {name: weight}; empty = no-KD baseline
    cskd: CSKDParams = field(default_factory=CSKDParams)
    ssim: SSIMParams = field(default_factory=SSIMParams)
    crosskd: CrossKDParams = field(default_factory=CrossKDParams)


@dataclass(frozen=True)
class EvalParams:
    batch_size: int = 8  # detections use the model's own score_thresh / nms_thresh


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    student: StudentParams = field(default_factory=StudentParams)
    cache: CacheParams = field(default_factory=CacheParams)
    distill: DistillParams = field(default_factory=DistillParams)
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)
    # named student experiments for dvc's foreach: {name: {losses: {...}, teacher: offline|online}}
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'params'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key '{where}{unknown[0]}'; valid keys here: {', '.join(names)}")
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            # a partial section keeps the parent's defaults (e.g. the teacher's resnet50), not the class's
            v = _merge(to_dict(_default_of(defaults[k])), v)
        kwargs[k] = _coerce(hints[k], v, f"{path}.{k}" if path else k)
    return cls(**kwargs)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _merge(base: dict, update: dict) -> dict:
    """One level only: nested sections merge again in their own from_dict, while mapping-valued
    keys (codecs, losses) are replaced whole, so a family can be left out on purpose."""
    return {**base, **update}


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config object (JSON/YAML-safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(item, v, f"{path}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value
