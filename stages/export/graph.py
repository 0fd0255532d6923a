"""ONNX and TorchScript exports of `Deployable`: one trace, two containers.

Both come from the tracer (`torch.jit.trace`, which the TorchScript-based ONNX exporter runs too):
torchvision's detection post-processing is written for it (`_topk_min`, the NMS coordinate trick,
`_shape_as_tensor`), so the number of boxes above the score threshold and after NMS stays a graph
value. `torch.export` (and the dynamo ONNX exporter, torch's default since 2.9) would have to carry
those data-dependent counts as unbacked symbols through every top-k and slice of that code, and
refuses them; the tracer has shipped with every torch from 1.x to 2.14, so the same call works on
the torch 2.11 of the GPU machine. ONNX: opset 17, `dynamo=False`; torchvision registers its NMS
symbolic (ONNX NonMaxSuppression) on import.

The example input is a real val image on which the detector finds something: a trace takes the
branches its example takes, and an example with no box above the threshold would record
torchvision's early "no boxes" return instead of NMS.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor

from stages.export.deployable import INPUT_NAMES, OUTPUT_NAMES, Deployable
from stages.export.ownership import MARK, write_whole

OPSET = 17
DYNAMIC_AXES = {"image": {2: "height", 3: "width"}, "boxes": {0: "detections"}, "scores": {0: "detections"},
                "labels": {0: "detections"}}


def pick_example(model: Deployable, examples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The first (image, original_size) with at least one detection; ValueError if none has one."""
    with torch.no_grad():
        for image, size in examples:
            if len(model(image, size)[1]):
                return image, size
    raise ValueError(f"the student detects nothing above its score_thresh ({model.detector.score_thresh}) on "
                     f"{len(examples)} val images, so no trace can record its NMS: train it longer, or lower "
                     "student.model.score_thresh")


@contextlib.contextmanager
def _quiet_trace():
    """The tracer warns about Python ints and torch.tensor constants in torchvision's code; the
    test that runs exports at other input sizes is what says they do not matter here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_onnx(model: Deployable, example: tuple[Tensor, Tensor], out: Path, meta: dict) -> None:
    import onnx

    def write(tmp: Path) -> None:
        with _quiet_trace():
            torch.onnx.export(model, example, str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                              dynamic_axes=DYNAMIC_AXES)
        graph = onnx.load(str(tmp))
        prop = graph.metadata_props.add()
        prop.key, prop.value = MARK, json.dumps(meta, sort_keys=True)
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))

    write_whole(out, write)


def export_torchscript(model: Deployable, example: tuple[Tensor, Tensor], out: Path, meta: dict) -> None:
    def write(tmp: Path) -> None:
        with _quiet_trace():  # also torch.jit's deprecation notice: TorchScript still loads on 2.11-2.14
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(tmp), _extra_files={f"{MARK}.json": json.dumps(meta, sort_keys=True)})

    write_whole(out, write)
