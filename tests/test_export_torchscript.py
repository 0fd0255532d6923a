"""TorchScript export: the traced whole detector, loaded by plain torch.jit.load, gives kdcache's
eval-mode detections (boxes within 1e-2 px, scores within 1e-4, category ids) and the same AP."""

from __future__ import annotations

import pytest
import torch

from pipeline.export_student import main as export_main
from stages.evaluation import coco_metrics
from tests.export_fixtures import assert_same_detections, deployed_results, reference_results, val_set
from tests.test_export_onnx import cli_args

pytest_plugins = ["tests.export_fixtures"]  # trained_students


def test_torchscript_gives_kdcache_detections_and_ap(trained_students, tiny_coco, tmp_path):
    out = tmp_path / "retinanet.ts"
    export_main(cli_args(tiny_coco, tmp_path, trained_students["retinanet"], "torchscript", out))
    export_main(cli_args(tiny_coco, tmp_path, trained_students["retinanet"], "torchscript", out))  # its own: replaced
    model = torch.jit.load(str(out))

    def run(image, size):
        with torch.no_grad():
            return [t.numpy() for t in model(torch.from_numpy(image), torch.from_numpy(size))]

    dataset = val_set(tiny_coco)
    ref = reference_results(trained_students["retinanet"], dataset)
    got = deployed_results(run, dataset)
    assert_same_detections(ref, got)
    assert coco_metrics(dataset, got)["AP"] == pytest.approx(coco_metrics(dataset, ref)["AP"], abs=1e-6)
    with pytest.raises(ValueError, match="is a kdcache torchscript export"):  # not the onnx export's to replace
        export_main(cli_args(tiny_coco, tmp_path, trained_students["retinanet"], "onnx", out))
