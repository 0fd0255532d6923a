"""Teacher checkpoints: read safely, recognise what they hold, build the zoo detector from them.

Three formats, told apart by their keys (no `teacher.model` needed to describe them):
  kdcache      {'model', 'model_params', 'num_classes'[, 'categories']} written by train_teacher;
  torchvision  a raw state_dict (torchvision's COCO checkpoints, or a raw zoo state_dict), or a
               torchvision-references training checkpoint {'model': state_dict, ...};
  mmdet        {'meta', 'state_dict'} of mmdetection 2.x / 3.x (RetinaNet, GFL).
`read_checkpoint` is the one function that reads a checkpoint file: it reads the bytes once, takes
their sha256 and loads those same bytes, so a `TeacherFile`'s digest is the digest of the weights it
holds (a file replaced a moment later cannot slip in between). `open_teacher` gives a `TeacherFile`;
nothing here is cached, each call reads the file: a run resolves its teacher once
(`stages.detectors.resolved_teacher.ResolvedTeacher`) and passes that object down. `build_teacher`
builds the zoo detector from a `TeacherFile` with the class rows sliced to a `LabelMap` (see
`label_space`), so the teacher predicts exactly the dataset's categories. The by-path helpers at the
end (`load_teacher`, `load_mapped_teacher`, `teacher_model_params`, `teacher_report`) read the file
once per call, for one-shot tools (evaluate, inspect_teacher) and tests.
Files are read with `torch.load(weights_only=True)`; mmdet's non-tensor meta objects become inert
stubs (`mmdet_import.safe_load`), never unpickled code.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from stages.config import ModelParams, from_dict, to_dict
from stages.detectors import mmdet_import, torchvision_import
from stages.detectors.base import Detector
from stages.detectors.build import ARCH_FIELDS, build_to_load, load_weights
from stages.detectors.label_space import LabelMap, LabelSpace, map_labels, slice_classes, unnamed

KNOBS = ("score_thresh", "nms_thresh", "detections_per_img")  # inference settings params may change
_SAID: set[str] = set()  # notes already printed (a note, not a checkpoint: nothing is cached here)


@dataclass(frozen=True, eq=False)
class TeacherFile:
    """What a checkpoint file holds, in the zoo's terms."""

    path: str
    sha256: str  # of the bytes the weights were loaded from (what a cache's fingerprint records)
    format: str  # 'kdcache' | 'torchvision' | 'mmdet'
    name: str  # e.g. 'torchvision retinanet_resnet50_fpn_v2'
    model: ModelParams  # the zoo architecture that holds these weights
    num_outputs: int  # class outputs (Faster R-CNN: without background)
    label_space: LabelSpace
    weights: dict[str, Tensor] = field(repr=False)
    unmatched: list[str] = field(default_factory=list)  # file keys mapped onto nothing (ignored)
    missing: list[str] = field(default_factory=list)  # zoo keys the file does not fill

    def describe(self) -> str:
        m = self.model
        head = "no dense head" if m.arch == "faster_rcnn" else f"{m.head_convs} head convs"
        variant = f" ({m.variant})" if m.variant else ""
        return (f"{self.format} checkpoint: {self.name}: arch {m.arch}{variant}, backbone {m.backbone}, "
                f"FPN {m.fpn_channels}, {head}, {self.num_outputs} class outputs, label space "
                f"{self.label_space.describe()}")


def say(line: str) -> None:
    """One informational line on stderr, once per process (params are loaded several times)."""
    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr)


def read_checkpoint(checkpoint: str | Path) -> tuple[dict, str]:
    """(the checkpoint dict, the sha256 of its file): the file is read once, and what is loaded is
    exactly what was hashed."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(
            f"teacher checkpoint {path} not found: train it (python -m pipeline.train_teacher) or set teacher.checkpoint"
        )
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        state = mmdet_import.safe_load(path, data)
    except ValueError as err:
        raise ValueError(f"teacher checkpoint {err}") from None
    except Exception as err:  # truncated file, foreign pickle, ...
        raise ValueError(f"teacher checkpoint {path} is not readable ({type(err).__name__}); retrain or replace it") from None
    if not isinstance(state, dict):
        raise ValueError(f"teacher checkpoint {path} holds a {type(state).__name__}, not a checkpoint or state_dict")
    return state, digest


def open_teacher(checkpoint: str | Path, fallback: ModelParams | None = None) -> TeacherFile:
    """Read and recognise `checkpoint` (every call reads the file). `fallback` (params'
    teacher.model) supplies the inference knobs of imported checkpoints."""
    tf = _open(Path(checkpoint))
    if fallback is not None and tf.format != "kdcache":
        knobs = {k: getattr(fallback, k) for k in KNOBS}
        if tf.label_space.kind == "unnamed":  # a raw zoo state_dict: anchors are not in the weights
            knobs["anchor_size"] = fallback.anchor_size
        tf = replace(tf, model=replace(tf.model, **knobs))
    return tf


def _open(path: Path) -> TeacherFile:
    state, digest = read_checkpoint(path)
    where = f"teacher checkpoint {path}"
    if "model" in state and "model_params" in state:
        try:
            model = from_dict(ModelParams, state["model_params"], "model_params")
            k = int(state["num_classes"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{where}: damaged kdcache checkpoint ({err}); retrain it") from None
        cats = state.get("categories")
        space = unnamed(k)
        if isinstance(cats, list) and len(cats) == k and all(isinstance(c, dict) for c in cats):
            space = LabelSpace("kdcache", tuple(int(c["id"]) for c in cats), tuple(str(c["name"]) for c in cats))
        return _checked(TeacherFile(str(path), digest, "kdcache", f"kdcache {model.arch}", model, k, space,
                                    state["model"]))
    try:
        if mmdet_import.is_mmdet(state):
            rec, weights, unmatched = mmdet_import.convert(state)
            fmt = "mmdet"
        else:
            weights = state["model"] if isinstance(state.get("model"), dict) else state
            weights = torchvision_import.upgrade_keys({str(k): v for k, v in weights.items() if isinstance(v, Tensor)})
            rec, unmatched, fmt = torchvision_import.recognise(weights), [], "torchvision"
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if rec is None:
        keys = ", ".join(list(map(str, state))[:4])
        raise ValueError(f"{where}: not a detector checkpoint this project knows (first keys: {keys}); expected a "
                         "kdcache checkpoint, a torchvision detection state_dict or an mmdetection checkpoint")
    model = ModelParams(**rec.fields, anchor_size=32)
    return _checked(TeacherFile(str(path), digest, fmt, rec.name, model, rec.num_outputs, rec.label_space, weights,
                                unmatched))


def _checked(tf: TeacherFile) -> TeacherFile:
    """Fill `missing` / `unmatched` against the zoo model (built on the meta device: no memory)."""
    import torch

    with torch.device("meta"):
        model = build_to_load(tf.model, tf.num_outputs)
    own = model.state_dict()
    missing = [k for k in own if k not in tf.weights and not k.endswith("num_batches_tracked")]
    return replace(tf, missing=missing, unmatched=tf.unmatched + [k for k in tf.weights if k not in own])


def architecture(tf: TeacherFile, fallback: ModelParams | None = None, role: str = "teacher") -> dict[str, Any]:
    """The teacher's ModelParams as a dict, recognised from the file. Where `fallback` (params'
    `<role>.model`) describes another architecture, one line on stderr says the file wins."""
    if fallback is not None:
        fields = [f for f in ARCH_FIELDS + ("variant",) if f != "reg_max" or tf.model.arch == "gfl"]
        differ = [f"{f}={getattr(tf.model, f)!r} ({role}.model: {getattr(fallback, f)!r})"
                  for f in fields if getattr(tf.model, f) != getattr(fallback, f)]
        if differ:
            say(f"note: {role} {tf.path} is a {tf.name} with {', '.join(differ)}; "
                "using the checkpoint's architecture")
    return to_dict(tf.model)


def build_teacher(tf: TeacherFile, arch: dict, num_classes: int,
                  label_index: list[int] | tuple[int, ...] | None = None) -> Detector:
    """The teacher on the CPU, built as `arch` (`architecture`'s dict, or a cache's) with the file's
    weights; `label_index` (a LabelMap's index) slices its class outputs to the dataset's
    categories, so the result has len(label_index) classes, which must equal `num_classes`."""
    checkpoint = tf.path
    cfg = from_dict(ModelParams, arch)
    differ = [f for f in ARCH_FIELDS + ("variant",) if getattr(cfg, f) != getattr(tf.model, f)]
    if differ:
        f = differ[0]
        raise ValueError(f"teacher checkpoint {checkpoint} has {f}={getattr(tf.model, f)!r} but the cache / params say "
                         f"{getattr(cfg, f)!r}; rebuild the cache for this checkpoint")
    if tf.missing:
        raise ValueError(f"teacher checkpoint {checkpoint} ({tf.name}) lacks {len(tf.missing)} weights "
                         f"{tf.missing[:3]}; a partial or damaged file")
    weights, k = tf.weights, tf.num_outputs
    if label_index is not None and tuple(label_index) != tuple(range(k)):
        bad = [i for i in label_index if not 0 <= int(i) < k]
        if bad:
            raise ValueError(f"teacher checkpoint {checkpoint}: label map index {bad[0]} is outside its {k} outputs")
        weights = slice_classes(weights, cfg.arch, 9 if cfg.arch == "retinanet" else 1, k, tuple(label_index))
        k = len(label_index)
    if num_classes != k:
        raise ValueError(f"teacher checkpoint {checkpoint} predicts {k} classes but {num_classes} were asked for; "
                         "the dataset's categories and the teacher's label space differ (python -m pipeline.inspect_teacher)")
    parts = ("backbone.", "neck.", "bbox_head.", "head.", "rpn.", "roi_heads.")
    foreign = [key for key in tf.unmatched if key.startswith(parts)]
    if foreign:  # model weights we would silently drop: another architecture than recognised
        raise ValueError(f"teacher checkpoint {checkpoint} ({tf.name}): {len(foreign)} weights match no zoo layer "
                         f"{foreign[:3]}; python -m pipeline.inspect_teacher {checkpoint} lists them")
    model = build_to_load(cfg, k)
    load_weights(model, weights, f"teacher checkpoint {checkpoint} ({tf.name})")
    return model


def report_lines(tf: TeacherFile, lmap: LabelMap | None = None, categories: list[dict] | None = None,
                 ann_file: str | Path = "") -> list[str]:
    """What `inspect_teacher` prints (and cache_teacher before it starts): what was recognised, the
    mapping onto the dataset (when given), and the keys nothing matched."""
    lines = [f"teacher {tf.path}: {tf.describe()}"]
    if lmap is not None and categories is not None:
        lines.append(f"label map onto {ann_file} ({len(categories)} categories): {lmap.describe(categories)}")
    if tf.unmatched or tf.missing:
        lines.append(f"unmatched: {len(tf.unmatched)} checkpoint keys used by no zoo layer {tf.unmatched[:6]}; "
                     f"{len(tf.missing)} zoo weights missing from the file {tf.missing[:6]}")
    else:
        lines.append("unmatched: none (every checkpoint weight has a place in the zoo model, and every zoo weight a value)")
    return lines


# ------------------------------------------------------------------------------------------------
# by path, for one-shot tools and tests: each call reads the file once


def teacher_model_params(checkpoint: str | Path, fallback: ModelParams | None = None,
                         role: str = "teacher") -> dict[str, Any]:
    return architecture(open_teacher(checkpoint, fallback), fallback, role)


def load_teacher(checkpoint: str | Path, arch: dict, num_classes: int,
                 label_index: list[int] | tuple[int, ...] | None = None) -> Detector:
    return build_teacher(open_teacher(checkpoint), arch, num_classes, label_index)


def load_mapped_teacher(checkpoint: str | Path, fallback: ModelParams, categories: list[dict],
                        ann_file: str | Path, role: str = "teacher") -> tuple[Detector, dict, LabelMap]:
    """(teacher predicting the dataset's categories, its arch dict, the label map), refusals first.
    `role` names the checkpoint's kind in notes (evaluate also loads students this way)."""
    tf = open_teacher(checkpoint, fallback)
    arch = architecture(tf, fallback, role)
    lmap = map_labels(tf.label_space, categories, str(checkpoint), str(ann_file))
    return build_teacher(tf, arch, len(lmap.index), lmap.index), arch, lmap


def teacher_report(checkpoint: str | Path, fallback: ModelParams | None, categories: list[dict] | None = None,
                   ann_file: str | Path = "") -> list[str]:
    """`report_lines` of the file; ValueError if its classes cannot map onto `categories`."""
    tf = open_teacher(checkpoint, fallback)
    lmap = None if categories is None else map_labels(tf.label_space, categories, str(checkpoint), str(ann_file))
    return report_lines(tf, lmap, categories, ann_file)
