"""``SUMMARY.md`` from the result JSON files of a results folder (every benchmark calls this).

    python -m bench.summary [RESULTS_DIR]

The summary is a pure function of the JSON files: one section per file, in benchmark order,
each with the machine it ran on and the benchmark's own table (its module's `summary_md`).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

BENCHMARKS = ("cache_throughput", "rate_distortion", "loader", "student_step", "n_experiments", "realscale", "views")
TITLES = {
    "cache_throughput": "Stage 1: caching loop vs teacher forward",
    "rate_distortion": "Codecs: bytes, speed and fidelity against the live teacher",
    "loader": "Stage 2 loaders: decoded records per second per worker process",
    "student_step": "Stage 2: student step time, offline (cache) vs online (live teacher)",
    "n_experiments": "Total compute for N students: cached vs online",
    "realscale": "Real scale (800x1344): bytes, loader and KD-gradient fidelity per teacher",
    "views": "More views for the same disk: 4 views x compact codecs vs 2 views",
}


def result_files(out: Path, name: str) -> list[Path]:
    """`<name>.json` then `<name>-<scale>.json` files (no prefix confusion between benchmarks)."""
    files = [out / f"{name}.json"] if (out / f"{name}.json").exists() else []
    return files + sorted(out.glob(f"{name}-*.json"))


def machine_line(result: dict) -> str:
    m, s = result["machine"], result["scale"]
    device = m["gpu"] or m["device"]
    reduced = " — **reduced smoke run (fewer rounds/images), not a figure**" if s.get("reduced") else ""
    return (f"*{m['cpu_model']}, {m['cpu_cores']} cores, device {device}, torch {m['torch']} "
            f"({m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''}), load average at the end "
            f"{m['load_average_1m']}; scale `{s['name']}` ({s['note']}), {s['rounds']} rounds; "
            f"{result['created']}, {result['wall_s']:.0f} s; commit {m['git_commit'] or '?'}*{reduced}")


def build_summary(out: Path) -> str:
    lines = [
        "# kdcache benchmarks",
        "",
        "Generated from the JSON files in this folder (`make bench` = `python -m bench.run_all`; "
        "`python -m bench.summary` rebuilds this page). What each benchmark measures and how to read "
        "it: [bench/README.md](../README.md). Ratios come from sides run alternately in one process "
        "(median of per-round ratios); absolute times are from the machine named under each table.",
        "",
    ]
    for name in BENCHMARKS:
        for path in result_files(out, name):
            try:
                result = json.loads(path.read_text())
                body = importlib.import_module(f"bench.{name}").summary_md(result).rstrip()
                head = machine_line(result)
                scale = result["scale"]["name"]
            except (ValueError, KeyError, TypeError) as err:  # a file from an older layout: say so, go on
                lines += [f"## {TITLES[name]} (`{path.name}`)", "",
                          f"(cannot summarise {path.name}: {type(err).__name__}: {err}; rerun python -m bench.{name})", ""]
                continue
            lines += [f"## {TITLES[name]} (`{path.name}`, scale {scale})", "", head, "", body, ""]
    return "\n".join(lines).rstrip() + "\n"


def write_summary(out: Path) -> Path:
    path = Path(out) / "SUMMARY.md"
    path.write_text(build_summary(Path(out)))
    return path


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results"
    print(f"wrote {write_summary(folder)}")
