"""Cost of a detector next to its AP: parameters, GFLOPs, latency at batch 1, images/s at batch 8.

`measure_side_by_side` times every model in one process and interleaves them run by run (model
A, B, C, then A, B, C again, ...), so a noisy machine slows all of them alike and the ratios hold.
Inputs are real val images under the eval view, padded as kdcache's eval pads them; eval mode,
no grad, detections included (post-processing is part of the deployed cost). FLOPs are counted by
torch's own `torch.utils.flop_counter.FlopCounterMode` on one batch-1 forward (NMS and other
non-matmul work count 0 there). On CUDA every timing is bracketed by synchronisations.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

LATENCY_RUNS = 20  # batch-1 forwards timed per model (the median is reported)
THROUGHPUT_RUNS = 5  # batch-8 forwards timed per model
WARMUP = 3
BATCH = 8


def machine_name(device: torch.device) -> str:
    """What ran the timings: the GPU's name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads"


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: nn.Module, images: torch.Tensor, sizes: list[tuple[int, int]]) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, sizes, with_detections=True)
    return counter.get_total_flops() / 1e9


def _timer(model: nn.Module, images: torch.Tensor, sizes, device: torch.device) -> Callable[[], float]:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(images, sizes, with_detections=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return once


@torch.no_grad()
def measure_side_by_side(models: dict[str, nn.Module], batch1: tuple[torch.Tensor, list], batch8: tuple[torch.Tensor, list],
                         device: torch.device, latency_runs: int = LATENCY_RUNS,
                         throughput_runs: int = THROUGHPUT_RUNS, progress: bool = True) -> dict:
    """{'machine', 'device', 'input': {...}, 'models': {name: {params, gflops, latency_ms, images_per_s}}}."""
    if latency_runs < 1 or throughput_runs < 1:
        raise ValueError("latency_runs and throughput_runs must be >= 1")
    one = (batch1[0].to(device), batch1[1])
    many = (batch8[0].to(device), batch8[1])
    result = {name: {"params": count_params(m), "gflops": round(count_gflops(m.eval().cpu(), *batch1), 4)}
              for name, m in models.items()}
    for m in models.values():
        m.to(device).eval()
    b1 = {n: _timer(m, *one, device) for n, m in models.items()}
    b8 = {n: _timer(m, *many, device) for n, m in models.items()}
    for timers in (b1, b8):
        for _ in range(WARMUP):
            for t in timers.values():
                t()
    lat: dict[str, list[float]] = {n: [] for n in models}
    thr: dict[str, list[float]] = {n: [] for n in models}
    steps = latency_runs + throughput_runs
    with tqdm(total=steps * len(models), desc="speed", disable=not progress) as bar:
        for i in range(steps):
            timers, into = (b1, lat) if i < latency_runs else (b8, thr)
            for n, t in timers.items():  # interleaved: one run of each model, then the next round
                into[n].append(t())
                bar.update()
    for n in models:
        result[n]["latency_ms"] = round(statistics.median(lat[n]) * 1e3, 3)
        result[n]["images_per_s"] = round(len(batch8[1]) / statistics.median(thr[n]), 2)
    return {"machine": machine_name(device), "device": device.type,
            "input": {"batch1": list(batch1[0].shape), "batch8": list(batch8[0].shape),
                      "latency_runs": latency_runs, "throughput_runs": throughput_runs, "warmup": WARMUP},
            "models": result}


def val_batches(dataset, view, batch: int = BATCH) -> tuple[tuple[torch.Tensor, list], tuple[torch.Tensor, list]]:
    """(first val image alone, first `batch` val images) under `view`, padded as kdcache's eval pads."""
    from stages.data.batching import ViewDataset, collate

    items = ViewDataset(dataset, [view])
    if len(items) == 0:
        raise ValueError(f"{dataset.ann_file} lists no images to time the models on")
    first = collate([items[0]])
    several = collate([items[i % len(items)] for i in range(batch)])
    return (first["images"], first["image_sizes"]), (several["images"], several["image_sizes"])


def load_run_models(teacher_checkpoint, teacher_model, students_dir, names, dataset, val_ann) -> dict[str, nn.Module]:
    """The teacher (mapped onto the val set's categories, as evaluate does) and every trained student
    of `names` (a missing model.pt is skipped: that student is not run)."""
    from pathlib import Path

    from stages.detectors.build import load_detector
    from stages.detectors.checkpoint import load_mapped_teacher

    models: dict[str, nn.Module] = {}
    if Path(teacher_checkpoint).exists():
        models["teacher"] = load_mapped_teacher(teacher_checkpoint, teacher_model, dataset.categories, val_ann)[0]
    for name in names:
        ckpt = Path(students_dir) / name / "model.pt"
        if ckpt.exists():
            models[name] = load_detector(ckpt)
    return models
