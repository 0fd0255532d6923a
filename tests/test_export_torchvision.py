"""torchvision export: a state_dict + a constructor module with torchvision's own RetinaNet / FCOS,
loaded in a process where kdcache cannot be imported (`python -I`, cwd outside the repo), gives
the detections of kdcache's eval mode on the val images."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pipeline.export_student import main as export_main
from stages.data.views import View
from stages.detectors.build import load_detector
from stages.export.run import deploy_input
from tests.export_fixtures import MAX_SIZE, MIN_SIZE, val_set
from tests.test_export_onnx import cli_args

pytest_plugins = ["tests.export_fixtures"]  # trained_students

# runs under `python -I` in tmp_path without the editable-install finder: torch and torchvision import,
# kdcache does not (checked first)
LOADER = """
import importlib.util, sys
# the venv holds kdcache as an editable install (a meta-path finder): drop it, as on a user's machine
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "")) + repr(f)]
import torch
for name in ("stages", "pipeline", "stores"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        sys.exit(f"{name} is importable: the test would not show a torch+torchvision-only load")
spec = importlib.util.spec_from_file_location("student_tv", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
model = module.load(sys.argv[2])
images = torch.load(sys.argv[3], weights_only=True)
with torch.no_grad():
    found = model(images)
torch.save({"found": found, "category_ids": module.CATEGORY_IDS,
            "modules": sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("stages", "pipeline", "stores")})},
           sys.argv[4])
"""


@pytest.mark.parametrize("student", ["retinanet", "fcos"])
def test_torchvision_only_process_gives_kdcache_detections(student, trained_students, tiny_coco, tmp_path):
    out = tmp_path / f"{student}_tv.pt"
    export_main(cli_args(tiny_coco, tmp_path, trained_students[student], "torchvision", out))
    assert out.with_suffix(".py").exists()
    dataset = val_set(tiny_coco)
    inputs = [deploy_input(dataset, i, View(MIN_SIZE, MAX_SIZE))[0][0] for i in dataset.image_ids]
    torch.save(inputs, tmp_path / "images.pt")
    (tmp_path / "loader.py").write_text(LOADER)
    done = subprocess.run([sys.executable, "-I", "loader.py", str(out.with_suffix(".py")), str(out), "images.pt",
                           "found.pt"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = torch.load(tmp_path / "found.pt", weights_only=True)
    assert result["modules"] == [] and result["category_ids"] == [c["id"] for c in dataset.categories]
    kdcache = load_detector(trained_students[student] / "model.pt").eval()
    found_any = False
    for image, got in zip(inputs, result["found"]):
        batch = torch.nn.functional.pad(image, (0, -image.shape[2] % 128, 0, -image.shape[1] % 128))[None]
        with torch.no_grad():
            ref = kdcache(batch, [tuple(image.shape[1:])], with_detections=True).detections[0]
        assert len(got["scores"]) == len(ref["scores"])
        torch.testing.assert_close(got["boxes"], ref["boxes"], atol=1e-2, rtol=0)
        torch.testing.assert_close(got["scores"], ref["scores"], atol=1e-4, rtol=0)
        assert torch.equal(got["labels"], ref["labels"])
        found_any |= len(ref["scores"]) > 0
    assert found_any, "no detections: the comparison would be empty"
