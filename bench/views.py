"""More views for the same disk: a student trained on a cache of >= 4 views per image
(scales x flips) with compact codecs vs one trained on today's 2 views with the dense int8c/int8c/fp16 codecs.

    python -m bench.views [--images 48] [--steps 80] [--seeds 0,1] [--method cskd|cskd-notower|ssim|mse|pfi]
                          [--scales4 96,128] [--codecs4 default|compact|FAMILY=CHAIN,...] [--targets all]

A fixed set of views is the known weakness of cached distillation (the student overfits a frozen
teacher on a few inputs); smaller records make more views affordable. Both sides use the demo
profile (params.yaml: data/synthetic, the demo teacher runs/teacher/model.pt or its last.pt, its
R18 student, the KD method `--method` with the demo's weight), the first N training images, the
same steps and seeds, and cache the targets that method reads (`--targets all`: the demo's); only
the cache differs:

  2 views   (128x192, flip / no flip), codecs fpn int8c, cls int8c, box fp16 (the dense set `int8c/int8c/fp16`)
  4 views   `--scales4` short sides (long side cap 1.5x), flip / no flip; codecs `--codecs4`
            (default: `CacheParams().codecs` when it differs from the dense set, else the
            compact set; FAMILY=CHAIN pairs are laid over the defaults)

The student's loader (stages/distill: `CachedViewDataset` + `stages.training.EpochBatchSampler`)
visits every training image once per epoch, under one view drawn uniformly (seeded) from the views
the cache holds for it, and batches only records of one padded size; with the same seed both sides
see the same image order and the same initial student, only the drawn view differs. The bench
replays that sampler for each run and reports how often each cached view was drawn.

Reported: disk bytes of each Zarr store (all files), their ratio, the students' val AP / AP50
(pycocotools COCOeval on the demo val set) per seed with mean, sample std, min and max per side,
the per-seed (paired) differences and their mean. Goal: disk(4 views) <= disk(2 views) and
AP(4) >= AP(2); `AP_delta_within_noise` says whether the mean difference lies inside two standard
errors of the difference of the two side means (seed noise). Writes bench/results/views.json and
SUMMARY.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, make_parser, md_table, settings_from, setup_torch, workdir, write_result
from bench.fixtures import trained_checkpoint
from bench.realscale import CODEC_SETS
from pipeline.params import load_params
from stages.config import CacheParams, Params, from_dict, to_dict
from stages.training import EpochBatchSampler

NAME = "views"
DENSE_SET = "int8c/int8c/fp16"  # the 2-view side's codecs: every map stored whole, fpn / cls int8c, box fp16
TWO_VIEWS = [{"min_size": 128, "max_size": 192, "flip": False}, {"min_size": 128, "max_size": 192, "flip": True}]
SCALES4 = (96, 128)  # short sides of the 4-view cache (long side cap 1.5x), each flipped and not


def four_views(scales=SCALES4) -> list[dict]:
    return [{"min_size": s, "max_size": s * 3 // 2, "flip": f} for s in scales for f in (False, True)]


FOUR_VIEWS = four_views()
# what each method's offline student reads (head: CSKD's tower terms run the static teacher head on the
# cached FPN; the per-image tower_stats record is CrossKD's alone, stages.distill.run.targets_for)
METHOD_TARGETS = {"cskd": ["fpn", "cls", "box", "head"], "ssim": ["fpn"], "mse": ["fpn"],
                  "pfi": ["fpn", "cls"], "cskd-notower": ["fpn", "cls", "box"]}
METHOD_WEIGHTS = {"cskd": 1.0, "ssim": 2.0, "mse": 1.0, "pfi": 1.5, "cskd-notower": 1.0}  # params.yaml experiments
# variants: (loss name, distill overrides); cskd-notower = CSKD without its tower (Distillbranch) terms,
# so it reads only the FPN, class and box maps (no teacher head, no tower statistics)
METHOD_LOSS = {"cskd-notower": ("cskd", {"cskd": {"tower": False}})}


def subset(folder: Path, ann: Path, n: int) -> Path:
    """The first n images of a COCO json (and their annotations), written to folder."""
    data = json.loads(ann.read_text())
    keep = {im["id"] for im in sorted(data["images"], key=lambda im: im["id"])[:n]}
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    out = folder / f"instances_train_{n}.json"
    folder.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, sort_keys=True))
    return out


def side_params(base: Params, work: Path, name: str, ann: Path, ckpt: Path, views: list, codecs: dict,
                steps: int, seed: int, targets: list[str], method: str) -> Params:
    raw = to_dict(base)
    raw["data"]["train_ann"] = str(ann)
    raw["teacher"]["checkpoint"] = str(ckpt)
    raw["cache"].update(path=str(work / f"cache-{name}"), format="zarr", views=views, codecs=codecs,
                        views_per_image=0, n_workers=1, targets=targets)
    loss, overrides = METHOD_LOSS.get(method, (method, {}))
    raw["distill"].update(teacher="offline", source="zarr", losses={loss: METHOD_WEIGHTS[method]})
    for section, values in overrides.items():
        raw["distill"][section].update(values)
    raw["train"].update(steps=steps, seed=seed, ckpt_every=10 * steps, warmup_steps=min(20, steps // 5))
    raw["student"]["out_dir"] = str(work / "students")
    return from_dict(Params, raw)


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "zarr").rglob("*") if p.is_file())


def view_draws(params: Params, steps: int) -> dict:
    """The cached views a student run of `params` is handed in its `steps` batches: train_student's own
    sampler (EpochBatchSampler over CachedViewDataset, same seed, batch size and padded-size buckets)."""
    from stages.cache.plan import open_reader
    from stages.data.coco import CocoDataset
    from stages.data.views import View
    from stages.distill.loader import CachedViewDataset

    views = [View(v.min_size, v.max_size, v.flip) for v in params.cache.views]
    coco = CocoDataset.from_params(params.data, "train")
    data = CachedViewDataset(coco, views, open_reader(params.cache.path, "zarr"), targets=[])
    sampler = EpochBatchSampler(len(coco), params.train.batch_size, params.train.seed, num_views=len(views),
                                views_of=data.views_of, bucket_of=data.bucket_of)
    counts, pairs = [0] * len(views), set()
    for _, batch in zip(range(steps), sampler):
        for index in batch:
            counts[index % len(views)] += 1
            pairs.add(index)
    return {"per_view": {v.key: c for v, c in zip(views, counts)}, "samples": sum(counts),
            "distinct_image_views": len(pairs), "distinct_images": len({i // len(views) for i in pairs})}


def spread(values: list[float]) -> dict:
    """Mean, sample std (0 for one value), min and max of per-seed figures."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(NAME, __doc__)
    parser.add_argument("--steps", type=int, default=100, help="student steps per run (demo: 150)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--codecs4", default="", help="codec set of the 4-view cache (see bench.realscale)")
    parser.add_argument("--scales4", default=",".join(map(str, SCALES4)),
                        help="short sides of the 4-view cache (each flipped and not; long side cap 1.5x)")
    parser.add_argument("--method", default="cskd", choices=sorted(METHOD_TARGETS), help="the students' KD loss")
    parser.add_argument("--targets", default="",
                        help="cached targets of both caches (default: what --method reads; 'all': the demo's)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="the demo profile")
    args = parser.parse_args(argv)
    args.images = args.images or 64
    args.batch = args.batch or 1
    settings = settings_from(args, argv)
    env = setup_torch(settings)
    from stages.cache.run import run_cache
    from stages.distill.run import train_student

    t0 = time.perf_counter()
    base = load_params(Path(args.params))
    ann = Path(base.data.train_ann)
    if not ann.exists():
        raise SystemExit(f"error: {ann} missing: make the demo data with `python -m pipeline.make_dataset`")
    ckpt, how = trained_checkpoint(REPO / base.teacher.checkpoint)
    if ckpt is None:
        raise SystemExit(f"error: {how}")
    old = CODEC_SETS[DENSE_SET]
    default = dict(CacheParams().codecs)
    name4 = args.codecs4 or ("default" if default != old else "compact")
    if "=" in name4:  # e.g. fpn=pca8+zstd: chains laid over the default set
        codecs4 = default | dict(kv.split("=", 1) for kv in name4.split(","))
    elif name4 in CODEC_SETS:
        codecs4 = CODEC_SETS[name4]
    else:
        raise SystemExit(f"error: --codecs4 {name4!r}: one of {', '.join(CODEC_SETS)} or FAMILY=CHAIN,...")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    targets = (list(base.cache.targets) if args.targets == "all"
               else args.targets.split(",") if args.targets else METHOD_TARGETS[args.method])
    views4 = four_views(int(x) for x in args.scales4.split(","))
    sides = {"2 views": (TWO_VIEWS, old, DENSE_SET), "4 views": (views4, codecs4, name4)}
    out: dict[str, Any] = {"teacher": {"checkpoint": str(ckpt.relative_to(REPO)) if ckpt.is_relative_to(REPO)
                                       else str(ckpt), "trained": how},
                           "images": args.images, "steps": args.steps, "seeds": seeds, "method": {args.method: METHOD_WEIGHTS[args.method]},
                           "targets": targets,
                           "sides": {}}
    with workdir(settings) as work:
        work = Path(work)
        sub = subset(work, ann, args.images)
        for side, (views, codecs, codec_name) in sides.items():
            tag = side.replace(" ", "")
            params = side_params(base, work, tag, sub, ckpt, views, codecs, args.steps, seeds[0], targets, args.method)
            print(f"views: caching {side} ...", flush=True)
            t1 = time.perf_counter()
            run_cache(params, progress=False)
            row = {"views": views, "codec_set": codec_name, "codecs": codecs, "cache_s": time.perf_counter() - t1,
                   "disk_bytes": disk_bytes(Path(params.cache.path))}
            row["disk_bytes_per_image"] = row["disk_bytes"] / args.images
            row["runs"] = {}
            for seed in seeds:
                params = side_params(base, work, tag, sub, ckpt, views, codecs, args.steps, seed, targets, args.method)
                print(f"views: student {side} seed {seed} ...", flush=True)
                metrics = train_student(params, None, work / "students" / f"{tag}-seed{seed}", progress=False)
                row["runs"][str(seed)] = {k: metrics.get(k) for k in ("AP", "AP50", "AP75", "sec_per_step")}
                row["runs"][str(seed)]["view_draws"] = view_draws(params, args.steps)
                print(f"views: {side} seed {seed}: {json.dumps(row['runs'][str(seed)])}", flush=True)
            for key in ("AP", "AP50"):
                stats = spread([r[key] for r in row["runs"].values()])
                row.update({f"{key}_{k}": v for k, v in stats.items()})
            out["sides"][side] = row
    out.update(compare(out["sides"]["2 views"], out["sides"]["4 views"], seeds))
    path = write_result(NAME, settings, env, out, time.perf_counter() - t0)
    print(f"wrote {path}\n" + summary_md({"results": out}))
    return out


def compare(two: dict, four: dict, seeds: list[int]) -> dict:
    """Disk ratio, per-seed (paired) AP differences, and whether the mean difference is inside seed noise:
    two standard errors of the difference of the side means, sqrt(s2^2/n + s4^2/n) from the sample stds."""
    deltas = {str(s): four["runs"][str(s)]["AP"] - two["runs"][str(s)]["AP"] for s in seeds}
    n = len(seeds)
    se = float(np.sqrt((two["AP_std"] ** 2 + four["AP_std"] ** 2) / n))
    delta = four["AP_mean"] - two["AP_mean"]
    out = {"disk_ratio_4_over_2": four["disk_bytes"] / two["disk_bytes"], "AP_delta_4_minus_2": delta,
           "AP_delta_per_seed": deltas, "AP_delta_spread": spread(list(deltas.values())),
           "AP_delta_se": se, "AP_delta_within_noise": bool(abs(delta) <= 2 * se) if n > 1 else None}
    out["goal_met"] = {"disk": out["disk_ratio_4_over_2"] <= 1.0, "AP": delta >= 0.0}
    return out


def summary_md(result: dict) -> str:
    r = result["results"]
    rows = [[side, len(s["views"]), s["codec_set"], s["disk_bytes"] / 1e6, s["disk_bytes_per_image"] / 1e3,
             s["AP_mean"], s.get("AP_std", 0.0), s["AP50_mean"], " / ".join(f"{v['AP']:.4g}" for v in s["runs"].values())]
            for side, s in r["sides"].items()]
    table = md_table(["cache", "views/image", "codecs", "disk MB", "KB/image", "AP mean", "AP std", "AP50 mean",
                      "AP per seed"], rows)
    noise = r.get("AP_delta_within_noise")
    verdict = (" One seed: no estimate of seed noise." if noise is None
               else " The difference is inside seed noise (|mean| <= 2 standard errors)." if noise
               else " The difference is outside 2 standard errors of seed noise.")
    return (table + f"\n\nTeacher: {r['teacher']['trained']}. Cached targets {r.get('targets', 'all')}. "
            f"{r['images']} training images, {r['steps']} student "
            f"steps (offline {', '.join(r.get('method', {'cskd': 1}))}), seeds {r['seeds']}. disk(4)/disk(2) = {r['disk_ratio_4_over_2']:.3g}, "
            f"AP(4) - AP(2) = {r['AP_delta_4_minus_2']:+.4g}"
            + (f" (standard error {r['AP_delta_se']:.3g})" if "AP_delta_se" in r else "")
            + f". Goal: disk ratio <= 1 and AP difference >= 0.{verdict}")


if __name__ == "__main__":
    main()
