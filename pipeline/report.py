"""Write report.md and report/*.png from the DAG's outputs: AP table (teacher, baseline, each
KD method, online vs offline), training curves, cache size per target and cache fidelity."""

from __future__ import annotations

from pathlib import Path

from pipeline.params import make_parser, params_from_args
from stages.report import build_report


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("report", __doc__)
    parser.add_argument("--teacher-metrics", default="runs/teacher_eval.json")
    parser.add_argument("--cache-report", default="runs/cache_report.json")
    parser.add_argument("--out", default="report.md")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    out = Path(args.out)
    text = build_report(Path(args.teacher_metrics), Path(params.student.out_dir), params.experiments,
                        Path(args.cache_report), out, out.parent / "report")
    print(text)


if __name__ == "__main__":
    from pipeline.cli import run

    run(main, interrupted="report.md may be partial; rerun python -m pipeline.report")
