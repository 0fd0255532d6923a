"""Write report.md and report/*.png from the DAG's outputs: AP table (teacher, baseline, each
KD method, online vs offline), speed/accuracy (AP, parameters, GFLOPs, latency and images/s of the
teacher and every student, timed side by side in this process; again under CUDA when a GPU is
present), training curves, cache size per target and cache fidelity. The speed/accuracy table is
also written as dvc metrics (--speed-out)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.params import make_parser, params_from_args, positive_int
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.export.ownership import read_record
from stages.export.speed import LATENCY_RUNS, load_run_models, measure_side_by_side, val_batches
from stages.report import build_report
from stages.report_speed import speed_accuracy


def measure(params, args) -> list[dict]:
    """Speed/accuracy tables (CPU, then CUDA if present) of the teacher and the trained students."""
    val = CocoDataset.from_params(params.data, "val")
    models = load_run_models(params.teacher.checkpoint, params.teacher.model, params.student.out_dir,
                             list(params.experiments), val, params.data.val_ann)
    if not models:
        return []
    batch1, batch8 = val_batches(val, View(params.data.min_size, params.data.max_size))
    ap = {name: json.loads(p.read_text()) for name, p in
          [("teacher", Path(args.teacher_metrics))]
          + [(n, Path(params.student.out_dir) / n / "metrics.json") for n in params.experiments] if p.exists()}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [speed_accuracy(measure_side_by_side(models, batch1, batch8, d, args.speed_runs), ap) for d in devices]


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("report", __doc__)
    parser.add_argument("--teacher-metrics", default="runs/teacher_eval.json")
    parser.add_argument("--cache-report", default="runs/cache_report.json")
    parser.add_argument("--out", default="report.md")
    parser.add_argument("--speed-out", default="runs/speed_accuracy.json", help="speed/accuracy metrics JSON")
    parser.add_argument("--no-speed", action="store_true", help="skip timing the models (AP tables only)")
    parser.add_argument("--speed-runs", type=positive_int, default=LATENCY_RUNS,
                        help=f"batch-1 runs per model, median reported (default {LATENCY_RUNS})")
    parser.add_argument("--export", default="runs/export/best_student.onnx",
                        help="the exported best student the report names (if it exists)")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    out = Path(args.out)
    speed = [] if args.no_speed else measure(params, args)
    if speed:
        Path(args.speed_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.speed_out).write_text(json.dumps(speed[0] | ({"cuda": speed[1]} if len(speed) > 1 else {}),
                                                   indent=2, sort_keys=True) + "\n")
    record = read_record(Path(args.export)) if Path(args.export).exists() else None
    export = None
    if record:
        export = {"experiment": Path(record.get("source", "")).parent.name, "path": args.export,
                  "source_sha256": record.get("source_sha256", ""), "opset": record.get("opset")}
    text = build_report(Path(args.teacher_metrics), Path(params.student.out_dir), params.experiments,
                        Path(args.cache_report), out, out.parent / "report", speed=speed, export=export)
    print(text)


if __name__ == "__main__":
    from pipeline.cli import run

    run(main, interrupted="report.md may be partial; rerun python -m pipeline.report")
