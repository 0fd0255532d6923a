"""One export: refuse what cannot be written exactly (before any work), then write the format.

Formats: onnx, torchscript (the traced whole detector, see `graph`), torchvision (state_dict +
constructor module), mmdet (mmdetection 3.x checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from stages.data.batching import image_to_tensor
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.export.deployable import Deployable
from stages.export.graph import OPSET, export_onnx, export_torchscript, pick_example
from stages.export.mmdet_format import export_mmdet, mmdet_mismatch
from stages.export.ownership import record, refuse_foreign
from stages.export.student import Student
from stages.export.torchvision_format import export_torchvision, torchvision_mismatch

FORMATS = ("onnx", "torchscript", "torchvision", "mmdet")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "torchvision": ".pt", "mmdet": ".pth"}
EXAMPLE_IMAGES = 8  # val images tried, in order, for a trace example with a detection


def deploy_input(dataset: CocoDataset, image_id: int, view: View) -> tuple[Tensor, Tensor]:
    """(image [1, 3, h, w] float in [0, 1] resized by the eval view, original (H, W) int64): the
    preprocessing a caller of the ONNX / TorchScript export does."""
    sample = dataset.load(image_id)
    image, _ = view.apply(sample.image, sample.boxes)
    return image_to_tensor(image)[None], torch.tensor(sample.image.shape[:2], dtype=torch.int64)


def refusal(student: Student, fmt: str) -> str | None:
    """Why `student` cannot be exported as `fmt`, or None."""
    if fmt not in FORMATS:
        return f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}"
    if fmt in ("onnx", "torchscript") and not student.detector.dense:
        return (f"{student.cfg.arch}: the whole-graph exports cover the dense detectors (retinanet, fcos, gfl); "
                "its two-stage ROI heads are not traced here")
    if fmt == "torchvision":
        return torchvision_mismatch(student)
    if fmt == "mmdet":
        return mmdet_mismatch(student)
    return None


def export_student(student: Student, fmt: str, out: Path, val: CocoDataset | None = None) -> list[Path]:
    """Write `out` (and, for torchvision, its .py module); return the paths written."""
    why = refusal(student, fmt)
    if why:
        raise ValueError(f"cannot export {student.checkpoint} as {fmt}: {why}")
    refuse_foreign(out, fmt)
    if fmt == "torchvision":
        refuse_foreign(out.with_suffix(".py"), "torchvision-module")
        if out.suffix == ".py":
            raise ValueError(f"--out {out}: the weights file needs another suffix than .py (e.g. .pt)")
    meta = record(fmt, student.sha256, source=str(student.checkpoint), arch=student.cfg.arch, min_size=student.min_size, max_size=student.max_size,
                  categories=student.categories)
    if fmt == "torchvision":
        return [out, export_torchvision(student, out, meta)]
    if fmt == "mmdet":
        export_mmdet(student, out, meta)
        return [out]
    if val is None or len(val) == 0:
        raise ValueError("onnx / torchscript exports trace the detector on val images: data.val_ann lists none")
    view = View(student.min_size, student.max_size)
    model = Deployable(student.detector, student.category_ids)
    examples = [deploy_input(val, i, view) for i in val.image_ids[:EXAMPLE_IMAGES]]
    example = pick_example(model, examples)
    meta.update(inputs="image float32 [1,3,h,w] RGB in [0,1] resized by the eval view; original_size int64 [2] (H, W)",
                outputs="boxes float32 [N,4] xyxy original pixels; scores float32 [N]; labels int64 [N] category ids")
    if fmt == "onnx":
        export_onnx(model, example, out, meta | {"opset": OPSET})
    else:
        export_torchscript(model, example, out, meta)
    return [out]
