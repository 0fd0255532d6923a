"""Stage 1 throughput: the caching loop against the teacher's forward alone, on the same work.

Three sides, alternated round by round over the same (image, view) records, blocks, batches,
device and image loading (`stages.cache.worker`'s own loader: a prefetch thread, or DataLoader workers):

  teacher          loader -> teacher forward (no grad; bf16 autocast on CUDA), nothing kept
  teacher+det      the same plus post-processing to detections (what plain inference costs)
  caching          `stages.cache.worker.cache_blocks` over every block of a fresh store, as
                   `run_cache` runs in-process: forward, detections, candidates, target
                   extraction, quantise/sparsify, host copy, encoding on the encoder threads,
                   Zarr + WebDataset writes (block b written while block b + 1 computes), markers

The headline is throughput(caching) / throughput(teacher): 1.0 means caching costs nothing beyond
running the teacher. Store creation (manifest, fingerprint, static head weights) happens once per
cache, before the clock starts; the teacher is loaded once per process (in the warm-up round).
"""

from __future__ import annotations

import itertools
import shutil
import time
from typing import Any

import torch

from bench.common import (
    Settings,
    interleaved,
    median,
    paired_ratio,
    print_table,
    write_result,
)
from bench.fixtures import Fixture, measure_archs
from stages.cache.plan import CacheJob, prepare_store
from stages.cache.worker import _loader, block_batches, cache_blocks
from stages.data.batching import ViewDataset
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.detectors.build import load_detector
from stores.manifest import Manifest

NAME = "cache_throughput"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teacher_pass(teacher, dataset: CocoDataset, job: CacheJob, manifest: Manifest, device: torch.device,
                 detections: bool) -> float:
    """Seconds for the teacher alone over the manifest's records, blocks, batches and loader of
    `stages.cache.worker.compute_block`."""
    views = {View.from_dict(v).key: View.from_dict(v) for v in manifest.fingerprint["views"]}
    t0 = time.perf_counter()
    for block in range(manifest.num_blocks()):
        keys = manifest.block_records(block)
        items = ViewDataset.from_pairs(dataset, [(image_id, views[key]) for image_id, key in keys])
        # the caching loop's own loader (private, but the point is identical image loading)
        for batch in _loader(job, items, block_batches(keys, views, dataset, job.batch_size), device):
            images = batch["images"].to(device, non_blocking=True)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                teacher(images, batch["image_sizes"], with_detections=detections)
    _sync(device)
    return time.perf_counter() - t0


def measure_arch(fix: Fixture, settings: Settings, device: torch.device) -> dict[str, Any]:
    counter = itertools.count()
    block_stats: list[dict] = []
    base = fix.params(fix.root / "tp-plan", cache={"device": str(device)})
    job, manifest = prepare_store(base, overwrite=True)  # the plan the teacher-only sides follow
    dataset = CocoDataset(fix.images_dir, fix.ann_file)
    teacher = load_detector(fix.checkpoint).to(device).eval()

    def caching() -> dict[str, float]:
        path = fix.root / f"tp-{next(counter)}"
        fresh, fresh_manifest = prepare_store(fix.params(path, cache={"device": str(device)}), overwrite=True)
        t0 = time.perf_counter()
        stats = list(cache_blocks(fresh, range(fresh_manifest.num_blocks())))
        elapsed = time.perf_counter() - t0
        shutil.rmtree(path)
        if any(s["skipped"] for s in stats):
            raise RuntimeError(f"{path}: a block was skipped in a fresh store")
        block_stats.append({"bytes": sum(s["bytes"] for s in stats), "records": sum(s["records"] for s in stats)})
        loop = sum(s["teacher_seconds"] for s in stats)
        # loop: forward + extraction + device-side transform; other: waiting for images, encoders, writes
        return {"loop": loop, "other": elapsed - loop}

    sides = {
        "teacher": lambda: teacher_pass(teacher, dataset, job, manifest, device, False),
        "teacher+det": lambda: teacher_pass(teacher, dataset, job, manifest, device, True),
        "caching": caching,
    }
    timing = interleaved(sides, settings.rounds)
    records = len(manifest.plan)
    rps = {side: records / s for side, s in timing["median_s"].items()}
    return {
        "records": records,
        "images": len(dataset),
        "views": [v.key for v in fix.views],
        "padded_size": list(fix.padded_size),
        "batch_size": fix.batch_size,
        "blocks": manifest.num_blocks(),
        "loader_workers": fix.loader_workers,
        "targets": manifest.fingerprint["targets"],
        "codecs": manifest.fingerprint["codecs"],
        "records_per_s": rps,
        # >1 in time = slower; the throughput ratio is its inverse, per round
        "ratio_caching_vs_teacher": 1.0 / paired_ratio(timing, "caching", "teacher"),
        "ratio_caching_vs_teacher_det": 1.0 / paired_ratio(timing, "caching", "teacher+det"),
        "caching_loop_share": median([lp / (lp + o) for lp, o in zip(timing["parts"]["caching"]["loop"],
                                                                      timing["parts"]["caching"]["other"])]),
        "bytes_per_record": median([s["bytes"] / s["records"] for s in block_stats]),
        "timing": timing,
    }


def summary_md(result: dict) -> str:
    rows = []
    for arch, r in result["results"]["archs"].items():
        rps = r["records_per_s"]
        rows.append([arch, r["records"], rps["teacher"], rps["teacher+det"], rps["caching"],
                     r["ratio_caching_vs_teacher"], r["ratio_caching_vs_teacher_det"],
                     r["bytes_per_record"] / 1e3])
    from bench.common import md_table

    table = md_table(["arch", "records", "teacher only rec/s", "teacher+det rec/s", "caching rec/s",
                      "**caching / teacher**", "caching / teacher+det", "KB/record"], rows)
    return (table + "\n\nrec/s = (image, view) records per second, medians over rounds; ratios are medians of "
            "per-round ratios (1.0 = caching costs nothing beyond the teacher).")


def main(argv: list[str] | None = None) -> dict:
    settings, env, out, t0 = measure_archs(NAME, __doc__, argv, measure_arch)
    rows = [[a, r["records_per_s"]["teacher"], r["records_per_s"]["teacher+det"], r["records_per_s"]["caching"],
             r["ratio_caching_vs_teacher"], r["ratio_caching_vs_teacher_det"]] for a, r in out["archs"].items()]
    print_table(f"{NAME} ({settings.scale.name}, {env['device']})",
                ["arch", "teacher rec/s", "teacher+det rec/s", "caching rec/s", "caching/teacher", "caching/teacher+det"],
                rows)
    path = write_result(NAME, settings, env, out, time.perf_counter() - t0)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
