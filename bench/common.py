"""Shared benchmark plumbing: scales, command line, machine facts, side-by-side timing, result files.

Benchmarks here are not timed tests: they compare two (or more) ways of doing the same work
*in one process, in one run*, alternating the sides round by round (A B, B A, A B, ...) and
reporting medians and the median of the per-round ratios. On a shared, noisy machine the absolute
times move a lot; a ratio of two sides measured seconds apart moves much less.

Every result file is ``<out>/<name>.json`` (``<name>-real.json`` for ``--scale real``) with the
machine it ran on (`machine_info`), the settings and the figures; `bench.summary` turns the JSON
files into ``SUMMARY.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from stages.config import ModelParams

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"


@dataclass(frozen=True)
class Scale:
    """The settings one `--scale` stands for (all benchmarks share them)."""

    name: str
    num_images: int  # training images of the benchmark dataset (each is cached under every view)
    image_sides: tuple[int, int]  # synthetic image sides are drawn from this range
    view: tuple[int, int]  # (min_size, max_size) of the cached views; each is used unflipped and flipped
    teacher: ModelParams
    student: ModelParams
    batch_size: int  # teacher batch (caching) and student batch (training)
    rounds: int  # timed rounds per side (after one untimed warm-up round)
    archs: tuple[str, ...]  # detector families measured (teacher and student share the arch)
    loader_workers: int  # DataLoader workers of the caching loop
    note: str = ""

    def models(self, arch: str) -> tuple[ModelParams, ModelParams]:
        return replace(self.teacher, arch=arch), replace(self.student, arch=arch)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["teacher"], d["student"] = _model_summary(self.teacher), _model_summary(self.student)
        return d


def _model_summary(m: ModelParams) -> dict[str, Any]:
    return {"backbone": m.backbone, "fpn_channels": m.fpn_channels, "head_convs": m.head_convs}


SCALES: dict[str, Scale] = {
    # the demo profile's models (params.yaml) on tiny synthetic images: a 2-core CPU runs all of
    # `make bench` in a few minutes
    "small": Scale(
        name="small",
        num_images=8,
        image_sides=(112, 160),
        view=(128, 192),
        teacher=ModelParams(arch="retinanet", backbone="resnet50", fpn_channels=64, head_convs=2),
        student=ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=32, head_convs=2),
        batch_size=4,
        rounds=7,
        archs=("retinanet",),
        loader_workers=0,
        note="demo models (params.yaml), 128x192 views",
    ),
    # COCO-scale models (profiles/coco.yaml) at 800x1333 views (800 px short side, padded to
    # 896 x 896..1152), RetinaNet and GFL, ResNet-50 -> ResNet-18. For a GPU machine.
    "real": Scale(
        name="real",
        num_images=16,
        image_sides=(480, 640),
        view=(800, 1333),
        teacher=ModelParams(arch="retinanet", backbone="resnet50", fpn_channels=256, head_convs=4),
        student=ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=256, head_convs=4),
        batch_size=4,
        rounds=5,
        archs=("retinanet", "gfl"),
        loader_workers=4,
        note="COCO-scale models (profiles/coco.yaml), 800x1333 views",
    ),
}


# ------------------------------------------------------------------------------------------------
# command line


def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes (run_all passes them through)."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="small",
                   help="small: demo models on tiny images (CPU, default); real: 800x1333 R50 -> R18 (GPU)")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds per side (default: the scale's)")
    p.add_argument("--images", type=int, default=0, help="dataset images (default: the scale's)")
    p.add_argument("--batch", type=int, default=0, help="batch size (default: the scale's)")
    p.add_argument("--archs", default="", help="comma-separated detector archs (default: the scale's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=int, default=-1,
                   help="torch intra-op threads; default 1 on CPU (per-core figures, steadier on a shared "
                        "machine), torch's own default on GPU machines")
    p.add_argument("--out", default=str(RESULTS_DIR), help="results folder (default bench/results)")
    p.add_argument("--workdir", default="", help="scratch folder for data, teacher and caches (default: a temp dir)")
    return p


@dataclass(frozen=True)
class Settings:
    """Parsed options with the scale's defaults filled in."""

    scale: Scale
    rounds: int
    images: int
    batch: int
    archs: tuple[str, ...]
    device: str
    threads: int
    out: Path
    workdir: Path | None
    reduced: bool  # fewer rounds or images than the scale's defaults: a smoke run, not a figure
    argv: tuple[str, ...] = ()  # the options as given (recorded, minus --workdir)

    def scale_dict(self) -> dict[str, Any]:
        d = self.scale.to_dict()
        d.update(rounds=self.rounds, num_images=self.images, batch_size=self.batch, archs=list(self.archs),
                 reduced=self.reduced)
        return d


def settings_from(args: argparse.Namespace, argv: Sequence[str] | None = None) -> Settings:
    scale = SCALES[args.scale]
    archs = tuple(a.strip() for a in args.archs.split(",") if a.strip()) or scale.archs
    for a in archs:
        if a not in ("retinanet", "fcos", "gfl"):
            raise SystemExit(f"error: --archs: {a!r} is not a dense arch (retinanet, fcos, gfl)")
    for opt in ("rounds", "images", "batch"):
        if getattr(args, opt) < 0:
            raise SystemExit(f"error: --{opt} must be >= 0 (0 = the scale's default)")
    rounds = args.rounds or scale.rounds
    images = args.images or scale.num_images
    batch = args.batch or scale.batch_size
    if images < batch:
        raise SystemExit(f"error: --images {images} cannot fill one batch of {batch}: raise --images or lower --batch")
    return Settings(
        scale=scale,
        rounds=rounds,
        images=images,
        batch=batch,
        archs=archs,
        device=args.device,
        threads=args.threads,
        out=Path(args.out),
        workdir=Path(args.workdir) if args.workdir else None,
        reduced=rounds < scale.rounds or images < scale.num_images,
        argv=tuple(_without_workdir(sys.argv[1:] if argv is None else argv)),
    )


def _without_workdir(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workdir":
            skip = True
        elif not a.startswith("--workdir="):
            out.append(a)
    return out


def setup_torch(settings: Settings) -> dict[str, Any]:
    """Resolve the device and thread counts (recorded in every result)."""
    import numcodecs.blosc
    import torch

    from stages.training import resolve_device

    device = resolve_device(settings.device)
    threads = settings.threads
    if threads < 0:
        threads = 0 if device.type == "cuda" else 1
    if threads > 0:
        torch.set_num_threads(threads)
        # blosc compresses with its own thread pool: one thread keeps "MB/s per core" honest
        numcodecs.blosc.set_nthreads(threads)
    torch.manual_seed(0)
    return {"device": str(device), "torch_threads": torch.get_num_threads(),
            "blosc_threads": numcodecs.blosc.get_nthreads()}


@contextmanager
def workdir(settings: Settings):
    """The scratch folder: --workdir (kept, shared between benchmarks) or a temp dir (removed)."""
    if settings.workdir is not None:
        settings.workdir.mkdir(parents=True, exist_ok=True)
        yield settings.workdir
        return
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as d:
        yield Path(d)


# ------------------------------------------------------------------------------------------------
# machine facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout.strip()
    except OSError:
        return ""


def machine_info(device: str) -> dict[str, Any]:
    """What the figures came from: CPU, cores, library versions, device, load."""
    import numcodecs
    import numpy
    import torch
    import torchvision
    import zarr

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
    }
    return info


# ------------------------------------------------------------------------------------------------
# side-by-side timing


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def interleaved(sides: Mapping[str, Callable[[], Mapping[str, float] | float | None]], rounds: int,
                warmup: int = 1) -> dict[str, Any]:
    """Run every side once per round, alternating the order, and collect its times.

    A side is a callable doing one unit of work. It returns its own timing, either seconds or a
    mapping of named parts in seconds (their sum is the total), or None to be timed from outside.
    Round r runs the sides in the given order when r is even and reversed when r is odd, so a
    slow drift of the machine's load hits every side alike. `warmup` rounds run first and are
    not recorded (imports, allocator, first-call caches).

    Returns {"rounds", "order", "seconds": {side: [total per round]}, "parts": {side: {part: [..]}},
    "median_s": {side: median total}}.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(sides)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    parts: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    order_log: list[list[str]] = []
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        if r >= warmup:
            order_log.append(list(order))
        for name in order:
            t0 = time.perf_counter()
            got = sides[name]()
            elapsed = time.perf_counter() - t0
            if got is None:
                split = {"total": elapsed}
            elif isinstance(got, Mapping):
                split = {k: float(v) for k, v in got.items()}
            else:
                split = {"total": float(got)}
            if r < warmup:
                continue
            seconds[name].append(sum(split.values()))
            for k, v in split.items():
                parts[name].setdefault(k, []).append(v)
    return {
        "rounds": rounds,
        "order": order_log,
        "seconds": seconds,
        "parts": parts,
        "median_s": {n: median(seconds[n]) for n in names},
    }


def paired_ratio(timing: Mapping[str, Any], num: str, den: str, part: str | None = None) -> float:
    """Median over rounds of time(num) / time(den), measured in the same round (robust to drift)."""
    a = timing["parts"][num][part] if part else timing["seconds"][num]
    b = timing["parts"][den][part] if part else timing["seconds"][den]
    return median([x / y for x, y in zip(a, b) if y > 0])


# ------------------------------------------------------------------------------------------------
# results


def result_path(out: Path, name: str, scale: str) -> Path:
    return out / (f"{name}.json" if scale == "small" else f"{name}-{scale}.json")


def write_result(name: str, settings: Settings, env: Mapping[str, Any], results: Mapping[str, Any],
                 wall_s: float) -> Path:
    """Write ``<out>/<name>[-<scale>].json`` and regenerate ``<out>/SUMMARY.md``."""
    from bench.summary import write_summary

    payload = {
        "benchmark": name,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python -m bench." + name, *settings.argv]),
        "machine": machine_info(env["device"]) | {"torch_threads": env["torch_threads"],
                                                  "blosc_threads": env["blosc_threads"]},
        "scale": settings.scale_dict(),
        "wall_s": round(wall_s, 2),
        "results": results,
    }
    settings.out.mkdir(parents=True, exist_ok=True)
    path = result_path(settings.out, name, settings.scale.name)
    path.write_text(dump_json(_rounded(payload)) + "\n")
    write_summary(settings.out)
    return path


def _rounded(x: Any) -> Any:
    """Floats to 6 significant digits: the JSON stays readable and diffs stay small."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_rounded(v) for v in x]
    return x


def dump_json(x: Any, indent: int = 0) -> str:
    """JSON with one key per line but lists of plain values on one line (readable diffs)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(x, dict):
        if not x:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {dump_json(v, indent + 1)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(x, list | tuple):
        if all(not isinstance(v, dict | list | tuple) for v in x):
            return json.dumps(list(x))
        return "[\n" + ",\n".join(inner + dump_json(v, indent + 1) for v in x) + "\n" + pad + "]"
    return json.dumps(x)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (numbers formatted by `fmt`)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:  # NaN
            return "–"
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.3g}"
        return f"{v:.2e}"
    return str(v)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n{title}\n" + md_table(headers, rows), flush=True)
