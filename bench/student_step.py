"""Stage 2 step time: a student trained against the cache (offline) vs against a live teacher (online).

Each side is a real stage 2 run assembled by `stages.distill.run.build_run` (student, KD losses,
teacher source, batches) and stepped like `stages.training.train_loop` does: next batch, GT + KD
losses (bf16 autocast on CUDA), backward, gradient clipping, AdamW step. Sides, alternated round
by round, every side on the same batch in a round (one seeded sampler):

  offline baseline   no KD: GT loss only (the student's own cost)
  offline cskd       CSKD against cached FPN / class / box maps (decoded from the Zarr store)
  online cskd        CSKD against the live teacher (forward + target extraction every step)
  offline crosskd    CrossKD: cached class / box maps and tower statistics; the teacher's head
                     (rebuilt from the cache) runs live on the student's tower features
  online crosskd     CrossKD against the live teacher (its own head)

Time per step is split into `data` (next batch: image decode + resize, and in offline mode the
cache read + decode; DataLoader workers would overlap it) and `compute` (everything else).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    Settings,
    interleaved,
    md_table,
    median,
    paired_ratio,
    print_table,
    write_result,
)
from bench.fixtures import Fixture, built_cache, measure_archs
from stages.distill.run import build_run
from stages.training import make_optimizer

NAME = "student_step"
SIDES = {
    "offline baseline": ("offline", {}),
    "offline cskd": ("offline", {"cskd": 1.0}),
    "online cskd": ("online", {"cskd": 1.0}),
    "offline crosskd": ("offline", {"crosskd": 1.0}),
    "online crosskd": ("online", {"crosskd": 1.0}),
}
METHODS = ("cskd", "crosskd")


def make_side(fix: Fixture, cache: Path, mode: str, losses: dict[str, float], device: torch.device):
    """One training step of the run `mode`/`losses` per call; returns {'data': s, 'compute': s}."""
    params = fix.params(cache, distill={"teacher": mode, "source": "zarr", "losses": losses},
                        train={"device": str(device)})
    run = build_run(params, None)
    cfg = params.train
    trainable = [p for m in (run.student, run.kd) for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg)
    run.student.train()
    run.kd.train()
    batches = run.make_batches(0)
    use_amp = cfg.amp and device.type == "cuda"

    def step() -> dict[str, float]:
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            total = sum(run.step_loss(batch).values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"data": t1 - t0, "compute": time.perf_counter() - t1}

    return step


def measure_arch(fix: Fixture, settings: Settings, device: torch.device) -> dict[str, Any]:
    with torch.no_grad():
        cache = built_cache(fix)
    sides = {name: make_side(fix, cache, mode, losses, device) for name, (mode, losses) in SIDES.items()}
    timing = interleaved(sides, settings.rounds)
    step = {n: {"total": timing["median_s"][n], "data": median(timing["parts"][n]["data"]),
                "compute": median(timing["parts"][n]["compute"])} for n in SIDES}
    ratios = {}
    for m in METHODS:
        ratios[f"online/offline {m}"] = paired_ratio(timing, f"online {m}", f"offline {m}")
        ratios[f"online/offline {m} (compute)"] = paired_ratio(timing, f"online {m}", f"offline {m}", "compute")
        ratios[f"offline {m}/baseline"] = paired_ratio(timing, f"offline {m}", "offline baseline")
    return {"batch_size": fix.batch_size, "padded_size": list(fix.padded_size),
            "teacher": f"{fix.teacher_cfg.arch} {fix.teacher_cfg.backbone}",
            "student": f"{fix.student_cfg.arch} {fix.student_cfg.backbone}",
            "step_s": step, "ratios": ratios, "timing": timing}


def summary_md(result: dict) -> str:
    parts = []
    for arch, r in result["results"]["archs"].items():
        rows = [[side, s["total"], s["data"], s["compute"]] for side, s in r["step_s"].items()]
        table = md_table(["side", "s/step", "data s", "compute s"], rows)
        ratios = md_table(["ratio (median of per-round ratios)", "value"], [[k, v] for k, v in r["ratios"].items()])
        parts.append(f"**{arch}**: teacher {r['teacher']}, student {r['student']}, batch {r['batch_size']} at "
                     f"{r['padded_size'][0]}x{r['padded_size'][1]}\n\n{table}\n\n{ratios}")
    return ("\n\n".join(parts) + "\n\nonline/offline > 1: the live teacher costs that factor per step. "
            "CrossKD offline still runs the teacher's head (from the cache) on the student's tower features.")


def main(argv: list[str] | None = None) -> dict:
    settings, env, out, t0 = measure_archs(NAME, __doc__, argv, measure_arch)
    for arch, r in out["archs"].items():
        print_table(f"{NAME} {arch} ({settings.scale.name}, {env['device']})", ["side", "s/step", "data s", "compute s"],
                    [[n, s["total"], s["data"], s["compute"]] for n, s in r["step_s"].items()])
        print_table("ratios", ["ratio", "value"], [[k, v] for k, v in r["ratios"].items()])
    path = write_result(NAME, settings, env, out, time.perf_counter() - t0)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
