"""Total compute of N student experiments: cache once + N offline runs vs N online runs.

Nothing is timed here: the parts come from this scale's `cache_throughput` (seconds per cached
record) and `student_step` (seconds per step, offline and online, per KD method) results in the
same results folder, and the training schedule from the scale's profile:

  small   params.yaml: data.synthetic.num_train images x cache views records, train.steps steps
          of train.batch_size on one device
  real    profiles/coco.yaml: COCO train2017 (118,287 images) x cache views records,
          train.steps steps of train.batch_size per device on 8 devices (the README's torchrun)

  cached(N) = records x s/record + N x steps x devices x t_offline
  online(N) =                      N x steps x devices x t_online

Step times are scaled linearly from the benchmark's batch to the profile's. The break-even N is
where the two lines cross: cache cost / (steps x devices x (t_online - t_offline)).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Settings,
    make_parser,
    md_table,
    print_table,
    result_path,
    settings_from,
    setup_torch,
    write_result,
)
from pipeline.params import load_params

NAME = "n_experiments"
NS = (1, 5, 10, 20)
METHODS = ("cskd", "crosskd")
COCO_TRAIN2017_IMAGES = 118_287
PROFILES = {"small": ("params.yaml", None, 1), "real": ("profiles/coco.yaml", COCO_TRAIN2017_IMAGES, 8)}


def schedule(scale: str) -> dict[str, Any]:
    """Records to cache and device-steps per student of the scale's profile."""
    path, images, devices = PROFILES[scale]
    params = load_params(REPO / path)
    if images is None:
        images = params.data.synthetic.num_train
    views = len(params.cache.views)
    per_image = params.cache.views_per_image or views
    return {"profile": path, "images": images, "views": views, "records": images * min(per_image, views),
            "steps": params.train.steps, "batch_size": params.train.batch_size, "devices": devices}


def totals(cache_s: float, step_off: float, step_on: float, device_steps: int, ns=NS) -> dict[str, Any]:
    """Cached vs online seconds for each N, and the break-even N (inf if online is not slower)."""
    rows = {}
    for n in ns:
        cached = cache_s + n * device_steps * step_off
        online = n * device_steps * step_on
        rows[str(n)] = {"cached_s": cached, "online_s": online, "online_over_cached": online / cached}
    gain = device_steps * (step_on - step_off)
    return {"per_n": rows, "break_even_n": cache_s / gain if gain > 0 else float("inf")}


def load_parts(out: Path, scale: str) -> tuple[dict, dict]:
    parts = []
    for name in ("cache_throughput", "student_step"):
        path = result_path(out, name, scale)
        if not path.exists():
            raise SystemExit(f"error: {path} not found: run python -m bench.{name} --scale {scale} first "
                             "(make bench runs everything in order)")
        parts.append(json.loads(path.read_text()))
    return parts[0], parts[1]


def compute(settings: Settings) -> dict[str, Any]:
    cache_res, step_res = load_parts(settings.out, settings.scale.name)
    sched = schedule(settings.scale.name)
    out: dict[str, Any] = {"schedule": sched, "sources": {"cache_throughput": cache_res["created"],
                                                          "student_step": step_res["created"]}, "archs": {}}
    for arch, c in cache_res["results"]["archs"].items():
        s = step_res["results"]["archs"].get(arch)
        if s is None:
            continue
        per_record = 1.0 / c["records_per_s"]["caching"]
        batch_scale = sched["batch_size"] / s["batch_size"]
        device_steps = sched["steps"] * sched["devices"]
        cache_s = sched["records"] * per_record
        arch_out: dict[str, Any] = {"cache_s_per_record": per_record, "cache_s": cache_s,
                                    "baseline_student_s": device_steps * s["step_s"]["offline baseline"]["total"]
                                    * batch_scale, "methods": {}}
        for m in METHODS:
            off = s["step_s"][f"offline {m}"]["total"] * batch_scale
            on = s["step_s"][f"online {m}"]["total"] * batch_scale
            arch_out["methods"][m] = {"step_offline_s": off, "step_online_s": on} | totals(cache_s, off, on,
                                                                                         device_steps)
        out["archs"][arch] = arch_out
    return out


def unit_for(seconds: float) -> tuple[str, float]:
    """Hours for long totals, minutes for the CPU demo's short ones."""
    return ("h", 3600.0) if seconds > 3 * 3600 else ("min", 60.0)


def rows_of(a: dict[str, Any]) -> tuple[str, list[list[Any]]]:
    longest = max(v["online_s"] for mm in a["methods"].values() for v in mm["per_n"].values())
    unit, div = unit_for(longest)
    rows = [[m, int(n), v["cached_s"] / div, v["online_s"] / div, v["online_over_cached"]]
            for m, mm in a["methods"].items() for n, v in mm["per_n"].items()]
    return unit, rows


def summary_md(result: dict) -> str:
    r = result["results"]
    sched = r["schedule"]
    parts = [f"Schedule from `{sched['profile']}`: {sched['records']:,} records to cache ({sched['images']:,} images "
             f"x {sched['views']} views), {sched['steps']:,} steps x {sched['devices']} device(s) of batch "
             f"{sched['batch_size']} per student; time of the benchmark's device (its own thread count)."]
    for arch, a in r["archs"].items():
        unit, rows = rows_of(a)
        be = ", ".join(f"{m} {mm['break_even_n']:.2f}" for m, mm in a["methods"].items())
        div = 3600.0 if unit == "h" else 60.0
        parts.append(f"**{arch}**: caching {a['cache_s'] / div:.3g} {unit} once; break-even N: {be}\n\n"
                     + md_table(["method", "N students", f"cached {unit}", f"online {unit}", "online / cached"], rows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict:
    args = make_parser(NAME, __doc__).parse_args(argv)
    settings = settings_from(args, argv)
    env = setup_torch(settings)
    t0 = time.perf_counter()
    out = compute(settings)
    for arch, a in out["archs"].items():
        unit, rows = rows_of(a)
        print_table(f"{NAME} {arch} ({settings.scale.name})",
                    ["method", "N", f"cached {unit}", f"online {unit}", "online/cached"], rows)
    path = write_result(NAME, settings, env, out, time.perf_counter() - t0)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
