"""Speed/accuracy in the report: teacher and students timed side by side in one process, their AP
next to parameters, GFLOPs (torch's flop counter), latency and images/s, the machine named, the
AP-vs-latency plot, and the exported best student named."""

from __future__ import annotations

import json
import shutil

import torch
import yaml

from pipeline.export_student import main as export_main
from pipeline.report import main as report_main
from stages.data.views import View
from stages.detectors.build import load_detector
from stages.evaluation import evaluate
from stages.export.speed import count_gflops, val_batches
from tests.export_fixtures import MAX_SIZE, MIN_SIZE, val_set

pytest_plugins = ["tests.export_fixtures"]  # trained_students


def test_report_speed_accuracy_table_plot_and_best_export(trained_students, tiny_coco, tmp_path):
    dataset = val_set(tiny_coco)
    view = View(MIN_SIZE, MAX_SIZE)
    runs = {"teacher": trained_students["fcos"], "baseline": trained_students["retinanet"],
            "cskd": trained_students["gfl_mmdet"]}
    ap = {}
    for name, src in runs.items():
        dst = tmp_path / ("teacher" if name == "teacher" else f"students/{name}")
        dst.mkdir(parents=True)
        shutil.copy(src / "model.pt", dst / "model.pt")
        ap[name] = evaluate(load_detector(dst / "model.pt"), dataset, view, 4, torch.device("cpu"), progress=False)
        (dst / "metrics.json").write_text(json.dumps(ap[name]))
    params = {"data": {"val_images": str(tiny_coco.val_images), "val_ann": str(tiny_coco.val_ann),
                       "min_size": MIN_SIZE, "max_size": MAX_SIZE},
              "teacher": {"checkpoint": str(tmp_path / "teacher/model.pt"),
                          "model": {"arch": "fcos", "fpn_channels": 64, "head_convs": 1}},
              "student": {"out_dir": str(tmp_path / "students")},
              "experiments": {"baseline": {"losses": {}}, "cskd": {"losses": {"cskd": 1.0}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    common = ["--params", str(tmp_path / "params.yaml")]
    best = max(("baseline", "cskd"), key=lambda n: ap[n]["AP"])
    onnx_out = tmp_path / "export/best_student.onnx"
    export_main([str(tmp_path / "students"), "--best", "--format", "onnx", "--out", str(onnx_out), *common])
    report_main([*common, "--teacher-metrics", str(tmp_path / "teacher/metrics.json"), "--cache-report",
                 str(tmp_path / "none.json"), "--out", str(tmp_path / "report.md"), "--speed-out",
                 str(tmp_path / "speed.json"), "--speed-runs", "3", "--export", str(onnx_out)])

    table = json.loads((tmp_path / "speed.json").read_text())
    assert set(table["models"]) == {"teacher", "baseline", "cskd"} and table["device"] == "cpu"
    assert "torch threads" in table["machine"] and table["input"]["latency_runs"] == 3
    batch1, _ = val_batches(dataset, view)
    for name, m in table["models"].items():
        model = load_detector(runs[name] / "model.pt").eval()
        assert m["AP"] == ap[name]["AP"] and m["APs"] == ap[name]["APs"]
        assert m["params"] == sum(p.numel() for p in model.parameters())
        assert m["latency_ms"] > 0 and m["images_per_s"] > 0
        assert abs(m["gflops"] - count_gflops(model, *batch1)) < 1e-3
    # FLOPs scale with the FPN width: the FPN-64 FCOS costs more than the FPN-8 students
    assert table["models"]["teacher"]["gflops"] > max(table["models"][n]["gflops"] for n in ("baseline", "cskd"))
    report = (tmp_path / "report.md").read_text()
    assert "## Speed / accuracy" in report and table["machine"] in report
    assert all(f"| {n} |" in report for n in ("baseline", "cskd")) and "| **teacher** |" in report
    assert f"**{best}**" in report and str(onnx_out) in report
    assert (tmp_path / "report/speed_accuracy_cpu.png").stat().st_size > 1000
