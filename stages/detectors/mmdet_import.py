"""mmdetection 2.x / 3.x checkpoints (RetinaNet, GFL, FCOS) onto the zoo, read without running pickled code.

An mmdet checkpoint is {'meta': {...}, 'state_dict': {...}, ...}. Class names are in
`meta['CLASSES']` (2.x) or `meta['dataset_meta']['classes']` (3.x). Key names (mmdet's
ResNet / FPN / heads, read from its source) map onto ours:

  backbone.<resnet key>                       -> backbone.body.<resnet key>   (same ResNet names)
  neck.lateral_convs.i.conv.{weight,bias}     -> backbone.fpn.inner_blocks.i.0.*
  neck.fpn_convs.i.conv.* (i < 3 / 3 / 4)     -> backbone.fpn.layer_blocks.i.0.* / extra_blocks.p6 / .p7
  RetinaNet: bbox_head.{cls,reg}_convs.i.conv -> head.{classification,regression}_head.conv.i.0
             bbox_head.retina_cls / retina_reg -> head.classification_head.cls_logits / regression_head.bbox_reg
  GFL:       bbox_head.{cls,reg}_convs.i.conv.weight / .gn.* -> head.*.conv.(3i) / .(3i+1)  (conv, GN, ReLU)
             bbox_head.gfl_cls / gfl_reg      -> head.classification_head.cls_logits / regression_head.bbox_reg
             bbox_head.scales.i.scale         -> head.scales.i.scale
  FCOS:      towers as GFL (their convs have no bias: zero), conv_cls / conv_reg / conv_centerness
             -> cls_logits / bbox_reg / bbox_ctrness, scales.i.scale -> head.scales.i.scale

The zoo's 'mmdet' variant reproduces what differs from torchvision: RetinaNet's P6 from C5
('on_input'), P7 = conv(P6) without a ReLU (RetinaNet, GFL), unrounded anchors, FCOS's per-level
scales; 'mmdet_caffe' adds the caffe-style ResNet (config `style='caffe'`: stride in the first 1x1
conv, BGR 0-255 input). FCOS is taken only in its `norm_on_bbox` + `centerness_on_reg` form (the
'center-normbbox-centeronreg' configs, read from the config text in meta); the first FCOS config
(exp regression, centerness on the cls tower) is refused.

Reading: `torch.load(weights_only=True)` first. mmdet 3.x also stores mmengine objects (message
hub, history buffers) that the safe unpickler refuses; then every global the file names (listed
by torch without unpickling) is allow-listed as an inert stub that keeps no data and runs no
code, and the file is loaded again with weights_only=True. Tensors come back; the stubs are dropped.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from stages.detectors.label_space import LabelSpace, unnamed
from stages.detectors.torchvision_import import Recognised, resnet_name

STUB_MODULE_OK = re.compile(r"^[A-Za-z_][\w.]*$")


class _Inert:
    """Stands in for any pickled object that is not a tensor or a plain container: keeps nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *args, **kwargs):  # pickled functions (REDUCE) return another inert object
        return _Inert()


def _stub(full_name: str) -> type:
    module, _, name = full_name.rpartition(".")
    return type(name, (_Inert,), {"__module__": module, "__qualname__": name})


def safe_load(path: str | Path, data: bytes | None = None) -> object:
    """torch.load(weights_only=True); if the file names non-tensor globals, load it again with each
    of them allow-listed as an inert stub (never imported, never called with effect). `data`: the
    file's bytes, already read (every attempt loads them, not the file again; `path` names it)."""

    def source():
        return io.BytesIO(data) if data is not None else path

    try:
        return torch.load(source(), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(source())
        except Exception:  # legacy (non-zip) format: its globals cannot be listed without unpickling
            raise ValueError(f"{path}: holds non-tensor objects and is not in torch's zip format; re-save its "
                             "state_dict and meta with a recent torch") from None
        bad = [n for n in names if not STUB_MODULE_OK.match(n)]
        if bad or not names:
            raise ValueError(f"{path}: refused by the safe loader ({str(first).splitlines()[0][:120]})") from None
        with torch.serialization.safe_globals([_stub(n) for n in names]):
            return torch.load(source(), map_location="cpu", weights_only=True)


def is_mmdet(state: dict) -> bool:
    sd = state.get("state_dict")
    return isinstance(sd, dict) and any(str(k).startswith("bbox_head.") for k in sd) and any(
        str(k).startswith("neck.") for k in sd
    )


def classes_of(meta: object) -> list[str] | None:
    """Class names from mmdet 2.x meta['CLASSES'] or 3.x meta['dataset_meta']['classes']."""
    if not isinstance(meta, dict):
        return None
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), dict):
        names = meta["dataset_meta"].get("classes")
    if isinstance(names, str):
        names = [names]
    if isinstance(names, list | tuple) and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def _config_text(meta: object) -> str:
    """The config text mmdet stores: meta['config'] (2.x) or meta['cfg'] (mmengine 3.x)."""
    if not isinstance(meta, dict):
        return ""
    cfg = meta.get("config", meta.get("cfg"))
    return cfg if isinstance(cfg, str) else ""


def convert(state: dict) -> tuple[Recognised, dict[str, Tensor], list[str]]:
    """(what it is, zoo-named weights, mmdet keys left unmatched) for an mmdet checkpoint dict."""
    sd = {str(k): v for k, v in state["state_dict"].items() if isinstance(v, Tensor)}
    meta = state.get("meta")
    head = ("retinanet" if "bbox_head.retina_cls.weight" in sd else "gfl" if "bbox_head.gfl_cls.weight" in sd
            else "fcos" if "bbox_head.conv_centerness.weight" in sd else "")
    if not head:
        raise ValueError("mmdetection checkpoint with an unknown head (bbox_head.* keys): RetinaNet (retina_cls), "
                         "GFL (gfl_cls) and FCOS (conv_centerness) map onto the zoo")
    text = _config_text(meta)
    if head == "fcos" and not all(re.search(rf"{flag}\s*=\s*True", text) for flag in ("norm_on_bbox", "centerness_on_reg")):
        raise ValueError("mmdetection FCOS without norm_on_bbox=True and centerness_on_reg=True in its meta config "
                         "(exp box regression / centerness on the cls tower are not in the zoo); use a "
                         "'center-normbbox-centeronreg' FCOS checkpoint")
    caffe = bool(re.search(r"style\s*=\s*['\"]caffe['\"]", text))
    out: dict[str, Tensor] = {}
    unmatched: list[str] = []
    rules = _rules(head)
    for key, value in sd.items():
        new = None
        for rx, repl in rules:
            m = rx.match(key)
            if m:
                new = repl(m) if callable(repl) else m.expand(repl)
                break
        if new is None:
            unmatched.append(key)
        else:
            out[new] = value
    if head == "fcos":  # mmdet's tower convs feed GN and have no bias; torchvision's have one: zero
        for key in [k for k in out if re.match(r"^head\.\w+_head\.conv\.\d+\.weight$", k) and out[k].dim() == 4]:
            out.setdefault(key[: -len("weight")] + "bias", out[key].new_zeros(out[key].shape[0]))
    def rows(key: str) -> int:
        if key not in out:
            raise ValueError(f"lacks the mmdet weight mapped to {key}: a partial or damaged file")
        return out[key].shape[0]

    backbone = resnet_name(sd, "backbone.")
    fpn = rows("backbone.fpn.inner_blocks.0.0.weight")
    convs = len({k.split(".")[2] for k in sd if k.startswith("bbox_head.cls_convs.")})
    cls_rows, reg_rows = rows("head.classification_head.cls_logits.weight"), rows("head.regression_head.bbox_reg.weight")
    if head == "retinanet":
        outputs, reg_max = cls_rows // max(reg_rows // 4, 1), 16
    else:
        outputs, reg_max = cls_rows, (reg_rows // 4 - 1 if head == "gfl" else 16)
    names = classes_of(meta)
    if names is not None and len(names) != outputs:
        raise ValueError(f"mmdetection meta lists {len(names)} classes but the head predicts {outputs}")
    space = LabelSpace("mmdet", (None,) * outputs, tuple(names)) if names is not None else unnamed(outputs)
    fields = {"arch": head, "backbone": backbone, "fpn_channels": fpn, "head_convs": convs, "reg_max": reg_max,
              "variant": "mmdet_caffe" if caffe else "mmdet"}
    version = "3.x" if isinstance(meta, dict) and "dataset_meta" in meta else "2.x"
    return Recognised(fields, outputs, space, f"mmdetection {version} {head}"), out, unmatched


def _gfl_tower(m: re.Match) -> str:
    branch = "classification_head" if m.group(1) == "cls" else "regression_head"
    index = 3 * int(m.group(2)) + (0 if m.group(3) == "conv" else 1)
    return f"head.{branch}.conv.{index}.{m.group(4)}"


def _fpn(m: re.Match) -> str:
    i = int(m.group(1))
    target = f"layer_blocks.{i}.0" if i < 3 else {3: "extra_blocks.p6", 4: "extra_blocks.p7"}.get(i, f"?{i}")
    return f"backbone.fpn.{target}.{m.group(2)}"


def _rules(head: str) -> list[tuple[re.Pattern, object]]:
    common = [
        (re.compile(r"^backbone\.(.+)$"), r"backbone.body.\1"),
        (re.compile(r"^neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$"), r"backbone.fpn.inner_blocks.\1.0.\2"),
        (re.compile(r"^neck\.fpn_convs\.([0-4])\.conv\.(weight|bias)$"), _fpn),
    ]
    if head == "retinanet":
        return common + [
            (re.compile(r"^bbox_head\.cls_convs\.(\d+)\.conv\.(weight|bias)$"), r"head.classification_head.conv.\1.0.\2"),
            (re.compile(r"^bbox_head\.reg_convs\.(\d+)\.conv\.(weight|bias)$"), r"head.regression_head.conv.\1.0.\2"),
            (re.compile(r"^bbox_head\.retina_cls\.(weight|bias)$"), r"head.classification_head.cls_logits.\1"),
            (re.compile(r"^bbox_head\.retina_reg\.(weight|bias)$"), r"head.regression_head.bbox_reg.\1"),
        ]
    if head == "fcos":
        return common + [
            (re.compile(r"^bbox_head\.(cls|reg)_convs\.(\d+)\.(conv|gn)\.(weight|bias)$"), _gfl_tower),
            (re.compile(r"^bbox_head\.conv_cls\.(weight|bias)$"), r"head.classification_head.cls_logits.\1"),
            (re.compile(r"^bbox_head\.conv_reg\.(weight|bias)$"), r"head.regression_head.bbox_reg.\1"),
            (re.compile(r"^bbox_head\.conv_centerness\.(weight|bias)$"), r"head.regression_head.bbox_ctrness.\1"),
            (re.compile(r"^bbox_head\.scales\.(\d+)\.scale$"), r"head.scales.\1.scale"),
        ]
    return common + [
        (re.compile(r"^bbox_head\.(cls|reg)_convs\.(\d+)\.(conv|gn)\.(weight|bias)$"), _gfl_tower),
        (re.compile(r"^bbox_head\.gfl_cls\.(weight|bias)$"), r"head.classification_head.cls_logits.\1"),
        (re.compile(r"^bbox_head\.gfl_reg\.(weight|bias)$"), r"head.regression_head.bbox_reg.\1"),
        (re.compile(r"^bbox_head\.scales\.(\d+)\.scale$"), r"head.scales.\1.scale"),
    ]


def to_mmdet(weights: dict[str, Tensor], arch: str) -> dict[str, Tensor]:
    """Inverse key map (zoo -> mmdet names): what tests and users build mmdet-named files with."""
    out = {}
    for key, value in weights.items():
        if key.endswith("num_batches_tracked") and not key.startswith("backbone.body."):
            continue
        new = _inverse(key, arch)
        if new is not None:
            out[new] = value
    return out


def _inverse(key: str, arch: str) -> str | None:
    if key.startswith("backbone.body."):
        return "backbone." + key[len("backbone.body."):]
    if m := re.match(r"^backbone\.fpn\.inner_blocks\.(\d+)\.0\.(\w+)$", key):
        return f"neck.lateral_convs.{m.group(1)}.conv.{m.group(2)}"
    if m := re.match(r"^backbone\.fpn\.layer_blocks\.(\d+)\.0\.(\w+)$", key):
        return f"neck.fpn_convs.{m.group(1)}.conv.{m.group(2)}"
    if m := re.match(r"^backbone\.fpn\.extra_blocks\.p([67])\.(\w+)$", key):
        return f"neck.fpn_convs.{int(m.group(1)) - 3}.conv.{m.group(2)}"
    branch = {"classification_head": "cls", "regression_head": "reg"}
    if arch == "retinanet":
        if m := re.match(r"^head\.(\w+)_head\.conv\.(\d+)\.0\.(\w+)$", key):
            return f"bbox_head.{branch[m.group(1) + '_head']}_convs.{m.group(2)}.conv.{m.group(3)}"
        return {"head.classification_head.cls_logits.weight": "bbox_head.retina_cls.weight",
                "head.classification_head.cls_logits.bias": "bbox_head.retina_cls.bias",
                "head.regression_head.bbox_reg.weight": "bbox_head.retina_reg.weight",
                "head.regression_head.bbox_reg.bias": "bbox_head.retina_reg.bias"}.get(key)
    if arch == "fcos" and re.match(r"^head\.\w+_head\.conv\.\d+\.bias$", key) and int(key.split(".")[3]) % 3 == 0:
        return None  # mmdet's FCOS tower convs have no bias
    if m := re.match(r"^head\.(\w+)_head\.conv\.(\d+)\.(\w+)$", key):
        i = int(m.group(2))
        part = "conv" if i % 3 == 0 else "gn"
        return f"bbox_head.{branch[m.group(1) + '_head']}_convs.{i // 3}.{part}.{m.group(3)}"
    if m := re.match(r"^head\.scales\.(\d+)\.scale$", key):
        return f"bbox_head.scales.{m.group(1)}.scale"
    if arch == "fcos":
        names = {"classification_head.cls_logits": "conv_cls", "regression_head.bbox_reg": "conv_reg",
                 "regression_head.bbox_ctrness": "conv_centerness"}
        m = re.match(r"^head\.(\w+\.\w+)\.(weight|bias)$", key)
        return f"bbox_head.{names[m.group(1)]}.{m.group(2)}" if m and m.group(1) in names else None
    return {"head.classification_head.cls_logits.weight": "bbox_head.gfl_cls.weight",
            "head.classification_head.cls_logits.bias": "bbox_head.gfl_cls.bias",
            "head.regression_head.bbox_reg.weight": "bbox_head.gfl_reg.weight",
            "head.regression_head.bbox_reg.bias": "bbox_head.gfl_reg.bias"}.get(key)
