"""Typed configuration: one frozen dataclass per params.yaml section.

The stages take these value objects; `pipeline.params` reads params.yaml (plus `--set`
overrides) into them. `from_dict` rejects unknown keys naming the key and the valid ones, so a
typo in params.yaml fails loudly instead of silently falling back to a default, and checks every
value against its rule in `stages.param_rules` (one line naming the field).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

# callers import ConfigError from here; the value rules live in stages.param_rules
from stages.param_rules import ConfigError, check_values


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
    # classes = 6 shapes x textures per shape x colour families (stages.data.synthetic.class_specs); 1, 1: six
    textures: int = 1
    colours: int = 1


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
    # rotate images by their EXIF Orientation tag before use; off by default, as COCO's boxes are in
    # the stored pixel frame (pycocotools and torchvision never transpose)
    exif_transpose: bool = False
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
    # optional local path to ResNet weights (no downloads): a torchvision ResNet state_dict, or a kdcache
    # detector checkpoint whose backbone body is taken (e.g. the demo teacher's, for a wider-FPN teacher)
    pretrained_backbone: str = ""
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    # layout of the weights: '' = the zoo's own (torchvision v1 for retinanet/fcos); 'tv_v1' / 'tv_v2' =
    # torchvision's COCO detectors (v2 RetinaNet: GN head, P6 from C5, GIoU; Faster R-CNN: P2..P6);
    # 'mmdet' = mmdetection's RetinaNet / GFL / FCOS necks, anchors, heads; 'mmdet_caffe' the same on a caffe-style
    # ResNet (stride in the 1x1 conv, BGR 0-255 input). Set by checkpoint import (inspect_teacher)
    variant: Literal["", "tv_v1", "tv_v2", "mmdet", "mmdet_caffe"] = ""


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
    # torch CPU threads of each process (torch.set_num_threads; inter-op threads too): 0 = auto, the
    # CPUs this process may use (affinity mask, cgroup cpu quota) / local processes (torchrun's
    # LOCAL_WORLD_SIZE), at least 1, capped by OMP_NUM_THREADS when set. Two jobs on one machine
    # whose threads outnumber its cores spin-wait on each other: give each its share
    threads: int = 0
    # torchrun: BatchNorm statistics over the global batch (SyncBatchNorm) instead of each rank's
    # slice; the zoo's ResNets train BN, so without it results depend on the process count
    sync_bn: bool = True
    dist_timeout_s: int = 300  # torchrun: a collective waiting longer (a dead rank) fails the job


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
class LocalCacheParams:
    """A node-local copy of a remote cache's shard objects on scratch disk (stores.local_cache): the
    loader workers and processes of one node fetch each shard once and read it from local disk."""

    path: str = ""  # a scratch folder on the node's own disk; "" = read the store directly
    max_gb: float = 50.0  # least recently used shards are evicted to stay under this size


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
    # codec chain per target family (stores.codecs), e.g. "int8c+zstd", "pca32+zstd", "topk9f0.002+zstd",
    # "mask0.05+zstd". Defaults from bench/codec_sets + bench/realscale (figures in
    # bench/results/realscale.json, choices in docs/codecs.md): fpn cpca64s0.25+lz4 (the cache's one PCA
    # basis, fitted by stage 1 on `basis_images` images, one quantiser step per level: CSKD / SSIM loss
    # error < 1 %; its int16 codes stored as int8 + escapes under LZ4: a third of the decode time of a
    # per-record basis under pcodec, pca64s0.25+pco, for 3 % (COCO shape) to 34 % (FPN-64 teachers) more
    # FPN bytes; no basis in the records); cls topk24f0.015+lz4 (every class >= 0.015, up to 24 per
    # anchor, under LZ4: a floor of 0.01 kept 64 % of the demo teacher's class elements, whose zstd decode
    # was half a worker's time; at 0.015 the class maps are 14-38 % smaller and decode 2-4x faster, CrossKD loss
    # error 0.08-0.80 % on the trained rows (0.10-0.48 % at 0.01; 1.6 % at 0.02); top-9 dropped real
    # mass on ambiguous anchors of the synth20 teacher, CrossKD error 1.7 %); box int8c+lz4
    # (delta-filtered codes; masks cost CSKD its box gradient; LZ4 instead of zstd: 25-30 % more box
    # bytes, ~40 % of the decode time). Together, against pca64s0.25+pco / topk24f0.01+zstd / int8c+zstd:
    # 2.1-2.4x the loader records/s at 8-22 % more bytes. Figures: bench/results/realscale.json.
    codecs: dict[str, str] = field(
        default_factory=lambda: {"fpn": "cpca64s0.25+lz4", "cls": "topk24f0.015+lz4", "box": "int8c+lz4",
                                 "quality": "int8c+zstd"}
    )
    batch_size: int = 4
    loader_workers: int = 0
    block_size: int = 16  # images per block: the unit of parallel work, resume and sharding
    n_workers: int = 1  # dask workers of the local cluster (ignored with scheduler)
    scheduler: str = ""  # address of an existing dask scheduler; "" = local cluster
    device: str = "auto"
    seed: int = 0
    # images (spread over the plan) from which a new cache fits its PCA basis for cpcaKsS chains
    # (stores.cache_basis); an existing cache keeps the basis it was built with
    basis_images: int = 16
    # with cache.path a URL: stage 2 keeps the shards it reads on the node's scratch disk (see above)
    local: LocalCacheParams = field(default_factory=LocalCacheParams)
    # with cache.path a URL, cache_teacher writes here a small JSON receipt (the URL, the manifest's digest,
    # the completed blocks): the local file dvc tracks as stage 1's output, in place of the cache folder
    # (dvc.yaml's cache/teacher), so dvc sees when the cache in the bucket changed. Unused for a local path
    receipt: str = "cache/teacher"


@dataclass(frozen=True)
class CSKDParams:
    w_mse: float = 1.0
    w_cos: float = 0.5
    assistant: bool = True
    # official get_rois / fg masks scale GT boxes by (padded map width / unpadded image width), which
    # stretches boxes on padded images; False (default) uses 1/stride, True reproduces the official code
    official_box_scaling: bool = False
    # official Distillbranch terms on the head towers; the teacher's tower maps come from running its
    # frozen head (cache static 'head') on the cached FPN maps
    tower: bool = True


@dataclass(frozen=True)
class SSIMParams:
    window: int = 11
    sigma: float = 1.5
    adapter: bool = False
    minmax: Literal["map", "channel"] = "map"  # min-max rescaling per image map (paper) or per channel
    levels: Literal["sum", "mean"] = "sum"  # reduction over FPN levels (paper: sum of per-level means)
    half: bool = True  # (1 - SSIM) / 2 (default) or 1 - SSIM
    # a map side shorter than the window: skip smoothing along it (pytorch-msssim, the oracle) or
    # replicate-pad it to the window (see stages/losses/ssim.py)
    short_side: Literal["skip", "pad"] = "skip"


@dataclass(frozen=True)
class CrossKDParams:
    # paper numbering (official `reused_teacher_head_idx`): the student's first N tower convs feed the
    # teacher head; -1 = the paper default (3; 2 for FCOS), clamped to the tower depth
    reuse_index: int = -1
    # GFL only: the GIoU KD term on crossed boxes (2.0) with KL weight 3.0, as the later official GFL
    # config; False = the first official GFL config (KL 4.0, no GIoU KD term)
    gfl_giou: bool = False


@dataclass(frozen=True)
class RMParams:
    scores: Literal["logits", "probs"] = "logits"  # what the rank softmax runs over (see losses/rank_mimic)
    temperature: float = 1.0
    # L_RM's 1/M: every GT object (the paper's M; one-candidate GTs add KL 0) or only GTs with >= 2 candidates
    mean_over: Literal["objects", "ranked"] = "objects"


@dataclass(frozen=True)
class DistillParams:
    teacher: Literal["offline", "online"] = "offline"
    source: Literal["zarr", "wds"] = "zarr"  # which store stage 2 reads in offline mode
    losses: dict[str, float] = field(default_factory=dict)  # {name: weight}; empty = no-KD baseline
    cskd: CSKDParams = field(default_factory=CSKDParams)
    ssim: SSIMParams = field(default_factory=SSIMParams)
    crosskd: CrossKDParams = field(default_factory=CrossKDParams)
    rm: RMParams = field(default_factory=RMParams)


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
    obj = cls(**kwargs)
    check_values(obj, path)
    return obj


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
