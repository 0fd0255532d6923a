"""report.md: AP table with deltas and n/a sizes, the online/offline pair, cache tables, plots."""

from __future__ import annotations

import json

from stages.report import build_report

AP = {"AP": 5.0, "AP50": 10.0, "AP75": 4.0, "APs": 5.5, "APm": 6.0, "APl": None}


def write_student(root, name, ap, sec):
    out = root / name
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps(AP | {"AP": ap}))
    rows = ["step,lr,sec_per_step,loss,cls,box,cskd/neck"] + [f"{s},0.001,{sec},{3 - s / 10},1,1,{1 / s}"
                                                              for s in (10, 20, 30)]
    (out / "train_log.csv").write_text("\n".join(rows) + "\n")


def test_report_tables_and_plots(tmp_path):
    students = tmp_path / "students"
    write_student(students, "baseline", 2.0, 0.2)
    write_student(students, "cskd", 3.5, 0.3)
    write_student(students, "cskd_online", 3.6, 0.45)
    (tmp_path / "teacher.json").write_text(json.dumps(AP | {"AP": 6.0}))
    cache = {"summary": {"records": 4, "images": 2, "codecs": {"fpn": "int8c+zstd"}, "stored_bytes_per_record": 2048,
                         "compression_ratio": 3.0, "disk_bytes": {"zarr": 9000},
                         "families": {"fpn": {"stored_bytes_per_record": 1000, "raw_float32_bytes_per_record": 4000,
                                              "compression_ratio": 4.0}}},
             "fidelity": {"fpn": {"cosine": 0.99999, "max_abs_error": 0.1, "rel_kd_loss_error": 1e-3}},
             "fidelity_gradients": {"grad_cosine": {"cskd": 0.9987}, "loss_rel_err": {"cskd": 2.5e-3},
                                    "student": "untrained resnet18 (seed 0)"}}
    (tmp_path / "cache.json").write_text(json.dumps(cache))
    experiments = {"baseline": {"losses": {}}, "cskd": {"losses": {"cskd": 1.0}},
                   "cskd_online": {"losses": {"cskd": 1.0}, "teacher": "online"}, "missing": {"losses": {"ssim": 2.0}}}
    md = tmp_path / "report.md"
    text = build_report(tmp_path / "teacher.json", students, experiments, tmp_path / "cache.json", md, tmp_path / "report")
    assert md.read_text() == text
    assert "| cskd | offline | cskd 1 | 3.50 | 10.00 | 4.00 | 5.50 | 6.00 | n/a | +1.50 | 0.300 |" in text
    assert "| **teacher** | – | – | 6.00 |" in text and "| missing | offline | (not run) |" in text
    assert "online/offline step time = 1.50x" in text
    assert "| cskd | 0.99870 | 2.50e-03 |" in text and "untrained resnet18 (seed 0)" in text
    assert "| fpn | int8c+zstd | 1,000 | 4,000 | 4.0x |" in text and "| fpn | 0.99999 |" in text
    for png in ("ap.png", "training_curves.png", "cache_bytes.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
