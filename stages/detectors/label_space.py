"""Label spaces: which category each of a teacher's class outputs stands for, and the mapping
of those outputs onto a dataset's categories.

A teacher checkpoint numbers its classes in its own space:
  torchvision COCO  91 outputs, index = COCO category id, 'N/A' placeholders at unused ids and
                    '__background__' at 0 (Faster R-CNN: 0 is the real background class, so our
                    0-based label l is category id l + 1);
  mmdetection       contiguous classes, names in the checkpoint's meta (no ids);
  kdcache           the categories it was trained on (ids and names), or K unnamed classes.
The mapping is applied once, when the teacher is loaded: its classification rows are sliced to
the dataset's categories in the dataset's order (sorted by id, as `CocoDataset` numbers labels),
so cached targets, KD losses, CrossKD's cached head and evaluation all see dataset classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LabelMap", "LabelSpace", "map_labels", "slice_classes", "torchvision_coco"]


def _norm(name: str) -> str:
    """Names compare case-, space-, '_'- and '-'-insensitively ('dining table' == 'dining_table')."""
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


@dataclass(frozen=True)
class LabelSpace:
    """What each class output of a checkpoint means: ids[i] (COCO category id or None), names[i].

    `kind` is 'torchvision-coco91', 'mmdet' (names only), 'kdcache' (ids and names) or 'unnamed'
    (K classes, nothing known: only a dataset with exactly K categories fits, in its own order).
    """

    kind: str
    ids: tuple[int | None, ...]
    names: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.names)

    def describe(self) -> str:
        if self.kind == "torchvision-coco91":
            return f"torchvision COCO ({self.size} outputs, index = category id)"
        if self.kind == "mmdet":
            return f"mmdetection classes from meta ({self.size} names)"
        if self.kind == "kdcache":
            return f"{self.size} categories recorded in the checkpoint"
        return f"{self.size} unnamed classes"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "ids": list(self.ids), "names": list(self.names)}


def torchvision_coco(faster_rcnn: bool = False) -> LabelSpace:
    """torchvision's COCO list; Faster R-CNN's output 0 is background, so the space drops it."""
    from torchvision.models._meta import _COCO_CATEGORIES

    entries = list(enumerate(_COCO_CATEGORIES))
    if faster_rcnn:
        entries = entries[1:]
    ids = tuple(None if n in ("N/A", "__background__") else i for i, n in entries)
    return LabelSpace("torchvision-coco91", ids, tuple(n for _, n in entries))


def unnamed(k: int) -> LabelSpace:
    return LabelSpace("unnamed", (None,) * k, tuple(f"class{i}" for i in range(k)))


@dataclass(frozen=True)
class LabelMap:
    """index[j] = the teacher output that becomes dataset label j (dataset categories sorted by id)."""

    space: LabelSpace
    index: tuple[int, ...]
    by: str  # 'id', 'name' or 'order'

    @property
    def identity(self) -> bool:
        return self.index == tuple(range(self.space.size))

    def to_dict(self) -> dict:
        """What the manifest's fingerprint records (so a cache and a student agree on the mapping)."""
        return {"teacher_space": self.space.kind, "teacher_outputs": self.space.size, "by": self.by,
                "index": list(self.index)}

    def describe(self, categories: list[dict], limit: int = 4) -> str:
        pairs = [f"{c['name']}(id {c['id']})<-{self.index[j]}" for j, c in enumerate(categories[:limit])]
        more = f", ... {len(categories) - limit} more" if len(categories) > limit else ""
        kept = f"{len(self.index)} of {self.space.size} outputs kept"
        return f"by {self.by}: {', '.join(pairs)}{more} ({kept})"


def map_labels(space: LabelSpace, categories: list[dict], teacher_file: str, ann_file: str) -> LabelMap:
    """Map the teacher's outputs onto `categories` (dicts with 'id' and 'name', dataset order).

    torchvision and kdcache spaces match by category id and require the names to agree; mmdet
    spaces match by name; an unnamed space fits only a dataset of exactly its size. Anything
    the teacher cannot predict raises ValueError in one line naming both files and the categories.
    """
    where = f"teacher {teacher_file} vs dataset {ann_file}"
    if space.kind == "unnamed":
        if space.size != len(categories):
            raise ValueError(
                f"{where}: the teacher predicts {space.size} classes, the dataset has {len(categories)} "
                f"categories; use the dataset the teacher was trained on, or a checkpoint that records its classes"
            )
        return LabelMap(space, tuple(range(space.size)), "order")
    if space.kind == "mmdet":
        by_name = {_norm(n): i for i, n in enumerate(space.names)}
        missing = [c for c in categories if _norm(c["name"]) not in by_name]
        if missing:
            raise ValueError(f"{where}: the teacher has no class for {_list(missing)}; "
                             f"its classes: {_names(space.names)}")
        return LabelMap(space, tuple(by_name[_norm(c["name"])] for c in categories), "name")
    by_id = {cid: i for i, cid in enumerate(space.ids) if cid is not None}
    missing = [c for c in categories if c["id"] not in by_id]
    if missing:
        raise ValueError(f"{where}: the teacher has no output for category {_list(missing)} "
                         f"(its label space: {space.describe()})")
    clash = [(c, space.names[by_id[c["id"]]]) for c in categories if _norm(c["name"]) != _norm(space.names[by_id[c["id"]]])]
    if clash:
        c, theirs = clash[0]
        raise ValueError(
            f"{where}: category id {c['id']} is {c['name']!r} in the dataset but {theirs!r} for the teacher "
            f"({len(clash)} such ids); use the teacher's category ids and names"
        )
    return LabelMap(space, tuple(by_id[c["id"]] for c in categories), "id")


def _list(cats: list[dict], limit: int = 5) -> str:
    shown = ", ".join(f"{c['name']!r} (id {c['id']})" for c in cats[:limit])
    return shown + (f" and {len(cats) - limit} more" if len(cats) > limit else "")


def _names(names, limit: int = 6) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _rows(t: Tensor, groups: int, per_group: int, keep: list[int]) -> Tensor:
    """Rows of a [groups * per_group, ...] tensor laid out group-major, keeping `keep` in each group."""
    return t.reshape(groups, per_group, *t.shape[1:])[:, keep].reshape(groups * len(keep), *t.shape[1:])


def slice_classes(weights: dict[str, Tensor], arch: str, num_anchors: int, num_outputs: int,
                  index: tuple[int, ...]) -> dict[str, Tensor]:
    """The zoo state_dict with the classification layer cut to `index` (in that order).

    RetinaNet: cls_logits rows are anchor-major (a * K + k, torchvision's and mmdet's view
    [A, K]): every anchor keeps the same classes. FCOS / GFL: one row per class. Faster R-CNN:
    cls_score keeps background row 0 then 1 + index; bbox_pred keeps the same rows, 4 each.
    """
    out = dict(weights)
    keep = list(index)
    if arch in ("retinanet", "fcos", "gfl"):
        for key in ("head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"):
            out[key] = _rows(weights[key], num_anchors if arch == "retinanet" else 1, num_outputs, keep)
    elif arch == "faster_rcnn":
        rows = [0] + [i + 1 for i in keep]
        for part in ("weight", "bias"):
            cls = f"roi_heads.box_predictor.cls_score.{part}"
            box = f"roi_heads.box_predictor.bbox_pred.{part}"
            out[cls] = weights[cls][rows]
            out[box] = weights[box][torch.tensor([4 * r + j for r in rows for j in range(4)])]
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return out
