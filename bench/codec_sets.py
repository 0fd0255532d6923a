"""Which codec set per family? Gradient fidelity and bytes of whole codec sets on a trained teacher.

    python -m bench.codec_sets [--view 800,1344] [--images 2] [--warm-steps 6] [--teacher demo]

The rate-distortion table (`bench.rate_distortion`) varies one family at a time on the bench's random
teacher; this varies whole sets (fpn / cls / box chains) on a trained teacher (`bench.realscale`'s
rows: demo = runs/teacher/model.pt, or its last.pt while it trains), at an 800x1344 view,
with `stages.fidelity.measure_gradient_fidelity`: per KD method the cosine between the loss's
gradient w.r.t. the student's outputs with cached vs live targets (min over images) and the relative
loss error (max), and the stored bytes per record; the default set's records are then written to a
real Zarr + WebDataset store and read back one worker (`bench.loader.measure_store`). The student and every method's trainable parts
are warmed `--warm-steps` AdamW steps on GT + all KD losses first (`bench.realscale.warm_up`).
Writes bench/results/codec_sets.json. CPU is fine (a few minutes at 2 images).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

from bench import loader as loader_bench
from bench import realscale as rs
from bench.common import RESULTS_DIR, dump_json, machine_info, make_parser, md_table, settings_from
from stages.cache.targets import record_meta
from stages.config import CacheParams
from stages.data.views import View
from stages.detectors.build import build_detector
from stages.fidelity import measure_gradient_fidelity
from stores import EncodedRecord

DENSE = {"fpn": "int8c+zstd", "cls": "int8c+zstd", "box": "fp16+zstd", "quality": "fp16+zstd"}
SETS = {
    "int8c/int8c/fp16": DENSE,
    "default": dict(CacheParams().codecs),
    "pca32/topk2f0.01/mask0.05": {"fpn": "pca32+zstd", "cls": "topk2f0.01+zstd", "box": "mask0.05+zstd"},
    "pca32/topk9f0.002/mask0.01": {"fpn": "pca32+zstd", "cls": "topk9f0.002+zstd", "box": "mask0.01+zstd"},
    "pca32/int8c/int8c": {"fpn": "pca32+zstd", "cls": "int8c+zstd", "box": "int8c+zstd"},
    "pca16/int8c/int8c": {"fpn": "pca16+zstd", "cls": "int8c+zstd", "box": "int8c+zstd"},
    "pca32/int8c/mask0.01": {"fpn": "pca32+zstd", "cls": "int8c+zstd", "box": "mask0.01+zstd"},
    # FPN candidates: one quantiser step per level + pcodec, SZ3; cls / box as pca32/topk9f0.002/int8c
    "pca32/topk9f0.002/int8c": {"fpn": "pca32+zstd", "cls": "topk9f0.002+zstd", "box": "int8c+zstd"},
    "pca64s0.2+pco/topk9f0.002/int8c": {"fpn": "pca64s0.2+pco", "cls": "topk9f0.002+zstd", "box": "int8c+zstd"},
    "pca64s0.25+pco/topk9f0.002/int8c": {"fpn": "pca64s0.25+pco", "cls": "topk9f0.002+zstd", "box": "int8c+zstd"},
}
# class-map candidates: the default set with another topk chain (every topk blob caps its background
# per anchor at the K-th kept value and keeps the dropped mass; int8c box codes are delta-filtered
# where that is smaller)
for _cls in ("topk9f0.01", "topk9f0.005", "topk16f0.01", "topk4f0.01", "topk24f0.01"):
    SETS[f"default+cls={_cls}"] = {**dict(CacheParams().codecs), "cls": f"{_cls}+zstd"}
if importlib.util.find_spec("pysz"):  # SZ3 is an optional extra (kdcache[sz])
    SETS["sz0.005/topk9f0.002/int8c"] = {"fpn": "sz0.005+none", "cls": "topk9f0.002+zstd", "box": "int8c+zstd"}


def measure(teacher_name: str, hw: tuple[int, int], images: int, warm_steps: int, work: Path,
            rounds: int = 3) -> dict:
    device = torch.device("cpu")
    spec = rs.TEACHERS[teacher_name]
    teacher, desc = rs.teacher_row(teacher_name, spec, device)
    if teacher is None:
        return {"teacher": desc}
    data = rs.render_set(work / f"sets-{hw[0]}x{hw[1]}-{images}", hw, images, spec["classes"], 900)
    warm_set = rs.render_set(work / "sets-warm", rs.WARM_HW, 4, spec["classes"], 901)
    torch.manual_seed(1)
    student = build_detector(spec["student"], teacher.num_classes).to(device).train()
    kd, index = rs.kd_modules(student, teacher, device)
    warm = rs.batches(warm_set, View(min(rs.WARM_HW), max(rs.WARM_HW), False), 2, device)
    rs.warm_up(student, kd, teacher, warm, warm_steps, index)
    big = rs.batches(data, View(min(hw), max(hw), False), 1, device)
    encoded: list = []
    res = measure_gradient_fidelity(teacher, student, kd, big, SETS, rs.TARGETS, index, sinks={"default": encoded})
    # the default set's records in a real Zarr + WebDataset store, read back by bench.loader (one worker)
    view = View(min(hw), max(hw), False)
    strides, padded = list(student.strides), tuple(big[0]["images"].shape[-2:])
    sized = [EncodedRecord(i + 1, view.key, record_meta(i + 1, view.key, hw, padded, strides), r.blobs)
             for i, r in enumerate(encoded)]
    store = rs.write_store(work / f"sets-store-{time.time_ns()}", sized, strides)
    settings = settings_from(make_parser("loader", "").parse_args(["--rounds", str(rounds)]), [])
    loader = {k: v for k, v in loader_bench.measure_store(store, settings).items() if k != "timing"}
    sets = {name: {"codecs": SETS[name], "bytes_per_record": r["bytes_per_record"],
                   "bytes_by_target": r["bytes_by_target"], "grad_cosine": r["grad_cosine"],
                   "loss_rel_err": r["loss_rel_err"]} for name, r in res.items()}
    return {"teacher": desc, "view": list(hw), "images": len(big), "warm_steps": warm_steps,
            "teacher_cls": res["int8c/int8c/fp16"]["teacher_cls"], "sets": sets, "loader_default_set": loader}


def summary_md(result: dict) -> str:
    rows = []
    for name, s in result.get("sets", {}).items():
        worst_cos = min(s["grad_cosine"].items(), key=lambda kv: kv[1])
        worst_err = max(s["loss_rel_err"].items(), key=lambda kv: kv[1])
        rows.append([name, s["bytes_per_record"] / 1e6, f"{worst_cos[1]:.4f} ({worst_cos[0]})",
                     f"{100 * worst_err[1]:.2f} % ({worst_err[0]})"])
    table = md_table(["codec set", "MB/record", "worst grad cosine", "worst loss rel err"], rows)
    ld = result.get("loader_default_set")
    if ld:
        rps, cpu = ld["records_per_s"], ld["records_per_cpu_s"]
        table += (f"\n\nDefault set, read back by one worker (compact parts): zarr {rps['zarr']:.0f} rec/s "
                  f"({cpu['zarr']:.0f} per CPU-s), wds {rps['wds']:.0f} rec/s ({cpu['wds']:.0f} per CPU-s).")
    return table


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="demo", choices=sorted(rs.TEACHERS))
    p.add_argument("--view", default="800,1344")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--warm-steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=5, help="loader rounds (bench.loader.measure_store)")
    p.add_argument("--workdir", default="/tmp/kdcache-codec-sets")
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    hw = tuple(int(v) for v in args.view.split(","))
    t0 = time.perf_counter()
    result = measure(args.teacher, hw, args.images, args.warm_steps, Path(args.workdir), args.rounds)
    out = {"benchmark": "codec_sets", "command": "python -m bench.codec_sets " + " ".join(argv or []),
           "machine": machine_info("cpu"), "wall_s": time.perf_counter() - t0, "results": result}
    path = Path(args.out) / "codec_sets.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_json(out, indent=1) + "\n")
    print(summary_md(result))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
