"""Two students at once on one machine vs the same two one after the other, per thread setting.

Two `python -m pipeline.train_student` processes (the demo's student, offline feature MSE from one cache)
run one after the other and then at the same time, for each way of choosing torch's CPU threads:

  torch_default  train.threads = torch's own default (one per core, whatever else runs on the
                 machine), OMP_NUM_THREADS unset
  auto           train.threads = 0: the CPUs the process may use / local processes
                 (stages.devices.auto_threads); two unpinned jobs each see every core
  one            train.threads = 1 (each job its share of a 2-core machine, set by the user)
  auto_pinned    train.threads = 0, each job pinned to its own core (sched_setaffinity, as a
                 cluster scheduler's cgroup or `taskset -c` would): auto reads 1 CPU

Reported per setting: wall time of the pair (sequential and concurrent, process start and
evaluation included), the mean training step time (metrics.json sec_per_step) alone and at once,
and the ratios concurrent / sequential wall and concurrent / alone per step. Sharing two cores
fairly, a job with 2 threads should take at most ~2x per step at once and the pair's wall time
should not exceed the sequential one; spin-waiting threads show as ratios far above that.
The settings alternate within one run (order reversed each round), so their ratios are measured
side by side on the same (shared, noisy) machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.common import REPO, SCALES, _rounded, dump_json, machine_info, print_table
from bench.common import make_parser as bench_parser
from bench.fixtures import built_cache, fixture
from stages.config import to_dict

MODES = ("torch_default", "auto", "one", "auto_pinned")


def torch_default_threads() -> int:
    """torch's own default thread count in a fresh process with no OMP_NUM_THREADS."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def auto_unpinned() -> str:
    """What train.threads 0 resolves to in an unpinned process here (stages.devices.auto_threads)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", "from stages.devices import auto_threads; print(auto_threads())"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def write_params(fix, cache: Path, folder: Path, steps: int, threads: int) -> Path:
    params = fix.params(cache, train={"optimizer": "adamw", "lr": 1e-4, "batch_size": fix.batch_size,
                                      "warmup_steps": 0, "workers": 0, "device": "cpu", "steps": steps,
                                      "log_every": 1_000_000, "ckpt_every": 1_000_000, "threads": threads},
                        distill={"teacher": "offline", "losses": {"mse": 1.0}})
    raw = to_dict(params)
    raw["experiments"] = {"a": {"losses": {"mse": 1.0}}, "b": {"losses": {"mse": 1.0}}}
    path = folder / f"params-{threads}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def start(params: Path, name: str, out: Path, cpu: int | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [sys.executable, "-m", "pipeline.train_student", "--params", str(params), "--experiment", name,
           "--out", str(out), "--overwrite"]
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=pin)


def finish(proc: subprocess.Popen, out: Path) -> dict:
    log, _ = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"train_student failed:\n{log[-3000:]}")
    threads_line = next((line for line in log.splitlines() if line.startswith("torch CPU threads")), "")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"sec_per_step": metrics["sec_per_step"], "threads": threads_line}


def pair(params: Path, work: Path, concurrent: bool, pinned: bool) -> dict:
    """Both students, at once or one after the other: wall time and each one's step time."""
    cpus = sorted(os.sched_getaffinity(0))
    outs = {n: work / f"run-{n}" for n in ("a", "b")}
    cpu = {n: (cpus[i % len(cpus)] if pinned else None) for i, n in enumerate(outs)}
    t0 = time.perf_counter()
    if concurrent:
        procs = {n: start(params, n, outs[n], cpu[n]) for n in outs}
        runs = {n: finish(p, outs[n]) for n, p in procs.items()}
    else:
        runs = {n: finish(start(params, n, outs[n], cpu[n]), outs[n]) for n in outs}
    return {"wall_s": time.perf_counter() - t0, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    p = bench_parser("concurrent_students", __doc__)
    p.add_argument("--steps", type=int, default=20, help="training steps per student (default 20)")
    p.add_argument("--modes", default=",".join(MODES), help=f"thread settings to measure (default {','.join(MODES)})")
    args = p.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or any(m not in MODES for m in modes):
        raise SystemExit(f"error: --modes: choose from {', '.join(MODES)}")
    scale = SCALES[args.scale]
    images = args.images or scale.num_images
    batch = args.batch or scale.batch_size
    rounds = args.rounds if args.rounds > 0 else 1
    work = Path(args.workdir or "/tmp/kdcache-bench-concurrent")
    work.mkdir(parents=True, exist_ok=True)
    fix = fixture(work, scale, "retinanet", images, batch)
    cache = built_cache(fix)
    default = torch_default_threads()
    threads = {"torch_default": default, "auto": 0, "one": 1, "auto_pinned": 0}
    params = {m: write_params(fix, cache, work, args.steps, threads[m]) for m in modes}
    load_before = os.getloadavg()
    samples: dict[str, dict[str, list]] = {m: {"sequential": [], "concurrent": []} for m in modes}
    t0 = time.perf_counter()
    for r in range(rounds):
        order = modes if r % 2 == 0 else tuple(reversed(modes))
        for mode in order:
            for how in (("sequential", "concurrent") if r % 2 == 0 else ("concurrent", "sequential")):
                res = pair(params[mode], work / mode, how == "concurrent", mode == "auto_pinned")
                samples[mode][how].append(res)
                print(f"round {r} {mode} {how}: {res['wall_s']:.1f}s "
                      f"{[round(x['sec_per_step'], 3) for x in res['runs'].values()]}", flush=True)
    results = {}
    for mode in modes:
        seq, conc = samples[mode]["sequential"], samples[mode]["concurrent"]
        step_alone = statistics.median(x["sec_per_step"] for s in seq for x in s["runs"].values())
        step_both = statistics.median(x["sec_per_step"] for s in conc for x in s["runs"].values())
        wall_seq = statistics.median(s["wall_s"] for s in seq)
        wall_conc = statistics.median(s["wall_s"] for s in conc)
        results[mode] = {
            "train_threads": threads[mode], "threads_log": seq[0]["runs"]["a"]["threads"],
            "threads_log_concurrent": conc[0]["runs"]["a"]["threads"],
            "wall_sequential_s": wall_seq, "wall_concurrent_s": wall_conc,
            "wall_concurrent_over_sequential": wall_conc / wall_seq,
            "step_alone_s": step_alone, "step_concurrent_s": step_both,
            "step_concurrent_over_alone": step_both / step_alone,
        }
    if "torch_default" in results:
        base = results["torch_default"]["step_concurrent_s"]
        for mode in modes:
            results[mode]["step_concurrent_vs_torch_default"] = results[mode]["step_concurrent_s"] / base
    env = {"machine": machine_info("cpu"), "cpus_available": len(os.sched_getaffinity(0)),
           "torch_default_threads": default, "auto_threads_unpinned": auto_unpinned(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "note": "shared machine: other jobs ran during the measurement (see loadavg); compare the ratios "
                   "within this run, not absolute seconds"}
    settings = {"scale": scale.name, "images": images, "batch": batch, "steps": args.steps, "rounds": rounds,
                "student": to_dict(scale.student), "losses": {"mse": 1.0}, "seconds": time.perf_counter() - t0}
    path = write_json(Path(args.out) / "concurrent_students.json", {
        "benchmark": "concurrent_students", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python -m bench.concurrent_students", *(argv if argv is not None else sys.argv[1:])]),
        "settings": settings, "environment": env, "results": results})
    print_table("two students: concurrent vs sequential", ["threads", "train.threads", "wall seq s", "wall conc s",
                "conc/seq", "step alone s", "step conc s", "conc/alone"],
                [[m, r["train_threads"], r["wall_sequential_s"], r["wall_concurrent_s"],
                  r["wall_concurrent_over_sequential"], r["step_alone_s"], r["step_concurrent_s"],
                  r["step_concurrent_over_alone"]] for m, r in results.items()])
    print(f"wrote {path}")


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_json(_rounded(payload)) + "\n")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
