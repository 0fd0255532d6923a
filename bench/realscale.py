"""Real-scale caches: bytes, loader speed and KD fidelity at an 800x1344 view, per teacher.

    python -m bench.realscale [--device cpu|cuda] [--images N] [--student-steps N]
                              [--teachers demo,synth20,coco,coco-synth90,coco-synth20] [--sets a,b]
                              [--basis-images N] [--merge] [--sources synthetic,photos] [--tag T]

Teacher rows (say plainly which figures come from which):
  demo     the demo teacher (params.yaml: RetinaNet R50, FPN 64, 2 head convs, 6 classes), the
           checkpoint `python -m pipeline.train_teacher` writes (runs/teacher/model.pt)
  synth20  the synth20 teacher (profiles/synth20.yaml: same shape, 24 classes, larger images, trained
           longer), runs/synth20/teacher/model.pt
  coco     a COCO-like shape: RetinaNet R50, FPN 256, 4 head convs, 80 classes, seeded RANDOM weights
           (no trained COCO weights here; its class maps sit at the prior, so its cls bytes and
           errors are not a trained teacher's)
  coco-synth90  the same COCO shape with 90 classes, trained briefly from scratch on synthetic data
           (profiles/synth90.yaml, runs/synth90/teacher/model.pt): sparse class maps like a trained
           detector's, but not a good detector and not COCO's weights
  coco-synth20  the same COCO shape (anchors 16 px) on the synth20 data (24 classes): body from the synth20
           teacher, FPN and head trained 500 steps (profiles/synth20coco.yaml,
           runs/synth20coco/teacher/model.pt): COCO shapes from a detector that has learnt its classes
A row whose checkpoint is missing is reported as skipped with the command that makes it.

Per row, on N images rendered natively at 800x1344 from the teacher's own synthetic classes
(`stages.data.synthetic.render_image`; objects 16-480 px, view scale 1), and for a trained teacher a
second row NAME/photos on N real photos (scikit-image's astronaut, chelsea, coffee, motorcycle
left / right, rocket, hubble_deep_field) resized to 800x1333, whose boxes are the teacher's own
detections (score >= 0.3; `--sources` chooses; the same warmed-up student measures both, and the
photo row's loader rec/s is also given as a ratio to the synthetic row's, measured in the same run):
  * a student (the profile's: R18 FPN 32; coco rows: R18 FPN 256, 4 convs) and every KD method's
    trainable parts are first trained `--student-steps` AdamW steps (a quarter for the coco rows) on GT loss + all seven KD losses
    (live targets) at a 320x544 view of other rendered images: "a student that has trained a while";
  * `stages.fidelity.measure_gradient_fidelity` then gives, per method (mse, cosine, cskd,
    ssim, crosskd, rm, pfi; the registry's real losses, weight 1), the cosine between the KD loss's
    gradient w.r.t. the student's outputs with cached vs live targets (min over images) and the
    relative KD-loss error (max), per-target cosine / max abs error, and bytes per record with the
    default codecs (`CacheParams` targets and codecs; all targets but the static head);
  * the records are written to a Zarr + WebDataset store and read back by `bench.loader.measure_store`
    in a fresh spawned process (records/s per worker process, one thread): every target, and per
    method what a stage-2 run of that method reads (its losses' needs: fpn for mse / cosine / ssim,
    cls + box + tower for crosskd, ...; both readers skip the other families' bytes);
  * one training step of an offline vs online CSKD student at 800x1344 (`offline / online` < 1:
    the cache saves that share of the step).
Writes bench/results/realscale.json (realscale-cuda.json with --device cuda; realscale-TAG.json with
--tag, for a reduced run) and SUMMARY.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench import loader as loader_bench
from bench.common import REPO, dump_json, machine_info, make_parser, settings_from, setup_torch, workdir
from bench.realscale_rows import (  # noqa: F401  (TARGETS, teacher_row, ...: bench.codec_sets reads them here)
    BEFORE_SET,
    BOX_SCORE,
    CODEC_SETS,
    CODECS,
    NAME,
    PHOTO_HW,
    PHOTOS,
    TARGETS,
    batches,
    kd_modules,
    photo_set,
    render_set,
    resolve_floors,
    row_bases,
    step_ratio,
    teacher_row,
    warm_up,
    write_store,
)
from bench.realscale_summary import summary_md  # noqa: F401  (bench.summary reads it here)
from stages.cache.targets import record_meta
from stages.config import ModelParams
from stages.data.views import View
from stages.detectors.build import build_detector
from stages.distill.run import targets_for
from stages.fidelity import measure_gradient_fidelity
from stages.losses.registry import LOSS_NAMES
from stores import EncodedRecord
from stores.cache_basis import CacheBases

VIEW_HW = (800, 1344)  # a COCO-sized view, where the 1.5 MB goal applies (--view changes it for smoke runs only)
WARM_HW = (320, 544)
DEFAULT_ROWS = ("demo", "synth20", "coco", "coco-synth90", "coco-synth20")
GOALS = {"bytes_per_record_max": 1.5e6, "loader_records_per_s_min": 300.0, "grad_cosine_min": 0.99,
         "loss_rel_err_max": 0.01}
STUDENT_SMALL = ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=32, head_convs=2, anchor_size=16)
TEACHERS: dict[str, dict[str, Any]] = {
    "demo": {"checkpoint": "runs/teacher/model.pt", "classes": (1, 1), "student": STUDENT_SMALL,
             "make": "python -m pipeline.make_dataset && python -m pipeline.train_teacher"},
    "synth20": {"checkpoint": "runs/synth20/teacher/model.pt", "classes": (2, 2), "student": STUDENT_SMALL,
                "make": "python -m pipeline.make_dataset --params profiles/synth20.yaml && "
                        "python -m pipeline.train_teacher --params profiles/synth20.yaml"},
    # smoke tests only (not in the default rows): a tiny random teacher
    "tiny": {"checkpoint": "", "classes": (1, 1), "num_classes": 6,
             "model": ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=16, head_convs=2, anchor_size=16),
             "student": ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=8, head_convs=2,
                                    anchor_size=16)},
    "coco": {"checkpoint": "", "classes": (2, 2), "num_classes": 80,
             "model": ModelParams(arch="retinanet", backbone="resnet50", fpn_channels=256, head_convs=4),
             "student": ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=256, head_convs=4)},
    # the same COCO shape (R50, FPN 256, 4 head convs), trained briefly on 90 synthetic classes so its class
    # maps are sparse like a trained detector's (no COCO weights can be downloaded here): profiles/synth90.yaml
    "coco-synth90": {"checkpoint": "runs/synth90/teacher/model.pt", "classes": (5, 3),
                     "student": ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=256, head_convs=4),
                     "make": "python -m pipeline.make_dataset --params profiles/synth90.yaml && "
                             "python -m pipeline.train_teacher --params profiles/synth90.yaml"},
    # COCO's shape trained until it classifies: the synth20 data and body, FPN 256 and a 4-conv head trained
    # on it (a COCO-shaped head does not learn 90 synthetic classes on this CPU: profiles/synth20coco.yaml)
    "coco-synth20": {"checkpoint": "runs/synth20coco/teacher/model.pt", "classes": (2, 2),
                     "student": ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=256, head_convs=4,
                                            anchor_size=16),
                     "make": "python -m pipeline.make_dataset --params profiles/synth20.yaml && "
                             "python -m pipeline.train_teacher --params profiles/synth20.yaml && "
                             "python -m pipeline.train_teacher --params profiles/synth20coco.yaml"},
}


def measure_rows(name: str, spec: dict, work: Path, args, settings, device) -> dict[str, dict[str, Any]]:
    """The teacher's rows, one per image source (`--sources`): {name: synthetic renders, name/photos:
    real photos}. One student, warmed up once, is measured on each (side by side, same process)."""
    teacher, desc = teacher_row(name, spec, device, args.runs_root)
    if teacher is None:
        return {name: {"teacher": desc}}
    t0 = time.perf_counter()
    classes = spec["classes"]
    tag = f"{classes[0]}x{classes[1]}"
    warm_hw = args.warm_hw
    warm_set = render_set(work / f"realscale-{tag}-warm-{warm_hw[0]}x{warm_hw[1]}", warm_hw, 8, classes, 901)
    torch.manual_seed(1)
    student = build_detector(spec["student"], teacher.num_classes).to(device).train()
    kd, index = kd_modules(student, teacher, device)
    warm = batches(warm_set, View(min(warm_hw), max(warm_hw), False), 2, device)
    steps = args.student_steps if spec["student"].fpn_channels < 256 else max(1, args.student_steps // 4)
    warm_losses = warm_up(student, kd, teacher, warm, steps, index)
    student_desc = {"backbone": spec["student"].backbone, "fpn_channels": spec["student"].fpn_channels,
                    "head_convs": spec["student"].head_convs, "warm_up_steps": steps,
                    "warm_up_view": list(warm_hw), "warm_up_loss_first_last": warm_losses[:1] + warm_losses[-1:]}
    rows = {}
    for source in args.source_list or (["synthetic", "photos"] if spec["checkpoint"] else ["synthetic"]):
        t1 = time.perf_counter()
        if source == "photos":
            hw = args.photo_hw
            data = photo_set(work / f"realscale-photos-{name}-{hw[0]}x{hw[1]}-{args.images}", hw, args.images,
                             teacher, classes, device)
            basis_set = data  # as stage 1: the cache's basis is fitted on images of the cache itself
            key = f"{name}/photos"
        else:
            hw = args.view_hw
            data = render_set(work / f"realscale-{tag}-{hw[0]}x{hw[1]}-{args.images}", hw, args.images, classes, 900)
            basis_set = render_set(work / f"realscale-{tag}-basis-{hw[0]}x{hw[1]}", hw, args.basis_images, classes,
                                   902)
            key = name
        row = measure_images(key, data, basis_set, hw, teacher, student, kd, index, work, args, settings, device)
        row = {"teacher": desc, "student": student_desc, "source": source_desc(source, data), **row}
        row["wall_s"] = time.perf_counter() - t1 + (t1 - t0 if not rows else 0.0)
        rows[key] = row
    if name in rows and f"{name}/photos" in rows:  # the loader on photos over the loader on renders, same run
        syn, photo = (rows[k]["loader_records_per_s_per_worker"] for k in (name, f"{name}/photos"))
        rows[f"{name}/photos"]["loader_over_synthetic_row"] = {
            r: photo[r] / syn[r] if photo.get(r) and syn.get(r) else None for r in ("zarr", "wds")}
    return rows


def source_desc(source: str, data) -> dict[str, Any]:
    if source != "photos":
        return {"kind": "synthetic", "note": "rendered natively at the view from the teacher's own classes"}
    n = len(data.image_ids)
    return {"kind": "photos", "photos": [PHOTOS[k % len(PHOTOS)] for k in range(n)],
            "note": f"scikit-image photos resized to the view; boxes = the teacher's detections >= {BOX_SCORE}",
            "boxes_per_image": sum(len(data.load(i).boxes) for i in data.image_ids) / max(n, 1)}


def measure_images(key, data, basis_set, hw, teacher, student, kd, index, work: Path, args, settings,
                   device) -> dict[str, Any]:
    """Bytes, loader speed and fidelity of the default (and compared) codecs on one image set."""
    view = View(min(hw), max(hw), False)
    big = batches(data, view, 1, device)
    encoded: list = []
    sets = {k: v for k, v in CODEC_SETS.items() if k == "default" or v != CODEC_SETS["default"]}
    if args.sets:
        sets = {k: v for k, v in sets.items() if k == "default" or k in args.sets.split(",")}
    sets, floors = resolve_floors(teacher, basis_set, view, sets, device)
    bases = row_bases(teacher, basis_set, view, sets, device)
    before: list = []
    sinks = {"default": encoded, **({BEFORE_SET: before} if BEFORE_SET in sets and sets[BEFORE_SET] != CODECS else {})}
    all_sets = measure_gradient_fidelity(teacher, student, kd, big, sets, TARGETS, index, sinks=sinks, bases=bases)
    fid = all_sets["default"]
    name = key.replace("/", "-")
    strides = list(student.strides)
    padded = tuple(big[0]["images"].shape[-2:])

    def sized(records):
        return [EncodedRecord(i + 1, view.key, record_meta(i + 1, view.key, hw, padded, strides), r.blobs)
                for i, r in enumerate(records)]
    store = write_store(work / f"realscale-store-{name}", sized(encoded), strides, bases.get("default"))
    # what a stage-2 run of each method reads per record (its losses' needs), each read as that run reads it
    method_sets = {m: sorted(targets_for(kd[m].needs())) for m in LOSS_NAMES}
    labels = {"+".join(t): t for t in method_sets.values()}
    # a worker-like process; more rounds than the fidelity part: a round reads only the row's few records
    loader = loader_bench.measure_store_apart(store, replace(settings, rounds=args.loader_rounds), target_sets=labels)
    rps = loader["records_per_s"]
    loader_before = None
    if before:  # the same records under BEFORE_SET's codecs, read back the same way just after
        old_store = write_store(work / f"realscale-store-{name}-before", sized(before), strides, bases.get(BEFORE_SET),
                                sets[BEFORE_SET])
        got = loader_bench.measure_store_apart(old_store, replace(settings, rounds=args.loader_rounds), target_sets={})
        loader_before = {"codecs": sets[BEFORE_SET], "bytes_per_record": all_sets[BEFORE_SET]["bytes_per_record"],
                         **{r: got["records_per_s"].get(r) for r in ("zarr", "wds")}}
    by_method = {m: {"targets": t, "zarr": rps.get(f"zarr {'+'.join(t)}"), "wds": rps.get(f"wds {'+'.join(t)}")}
                 for m, t in method_sets.items()}
    row = {
        "images": fid["records"],
        "bytes_per_record": fid["bytes_per_record"],
        "bytes_by_target": fid["bytes_by_target"],
        "loader_records_per_s_per_worker": {"zarr": rps.get("zarr"), "wds": rps.get("wds")},
        "loader_records_per_s_per_worker_by_method": by_method,
        # every target read back, with BEFORE_SET's codecs (measured just after the default's)
        "loader_records_per_s_per_worker_before": loader_before,
        "loader": {k: v for k, v in loader.items() if k != "timing"},
        "grad_cosine": fid["grad_cosine"],
        "loss_rel_err": fid["loss_rel_err"],
        "targets": fid["targets"],
        "teacher_cls": fid["teacher_cls"],
        "per_image": fid["per_batch"],
        "class_floors": floors,  # the fitted floor of each set with a topkKfFpP class chain (its codecs: resolved)
        "codec_sets": {k: {"codecs": sets[k], **{f: v[f] for f in ("bytes_per_record", "bytes_by_target",
                                                                    "grad_cosine", "loss_rel_err", "targets")}}
                       for k, v in all_sets.items()},
    }
    if args.step_rounds > 0:
        row["student_step"] = step_ratio(student, kd, teacher, big[0], encoded[:1], index, args.step_rounds,
                                         CacheBases(bases["default"]) if "default" in bases else None)
        row["step_time_offline_over_online"] = row["student_step"]["offline_over_online"]
    return row


def goals_met(row: dict) -> dict[str, Any]:
    if "grad_cosine" not in row:
        return {}
    rps = row["loader_records_per_s_per_worker"]
    return {
        "bytes_per_record": row["bytes_per_record"] <= GOALS["bytes_per_record_max"],
        "loader": min(v for v in rps.values() if v is not None) >= GOALS["loader_records_per_s_min"],
        "loader_by_method": {m: min(v[r] for r in ("zarr", "wds")) >= GOALS["loader_records_per_s_min"]
                             for m, v in row.get("loader_records_per_s_per_worker_by_method", {}).items()},
        "grad_cosine": {m: v >= GOALS["grad_cosine_min"] for m, v in row["grad_cosine"].items()},
        "loss_rel_err": {m: v <= GOALS["loss_rel_err_max"] for m, v in row["loss_rel_err"].items()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(NAME, __doc__)
    parser.add_argument("--teachers", default=",".join(DEFAULT_ROWS),
                        help=f"rows to run (default: {','.join(DEFAULT_ROWS)}; 'tiny' for smoke runs)")
    parser.add_argument("--view", default=f"{VIEW_HW[0]},{VIEW_HW[1]}", help="H,W of the measured view")
    parser.add_argument("--warm-view", default=f"{WARM_HW[0]},{WARM_HW[1]}", help="H,W of the warm-up images")
    parser.add_argument("--student-steps", type=int, default=20, help="student warm-up steps before measuring")
    parser.add_argument("--basis-images", type=int, default=4,
                        help="other images of the row's view on which the cpca sets' PCA basis is fitted")
    parser.add_argument("--sets", default="",
                        help="comma-separated codec sets to measure besides 'default' (default: all of CODEC_SETS)")
    parser.add_argument("--step-rounds", type=int, default=1, help="offline/online step rounds (0 = skip)")
    parser.add_argument("--loader-rounds", type=int, default=15,
                        help="rounds of the loader measurement (each reads the row's records once per side)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the existing result file that this run does not measure")
    parser.add_argument("--sources", default="",
                        help="image sets per teacher: synthetic (renders of its classes), photos (scikit-image's "
                             "real photos, row NAME/photos); default: both for a trained teacher, synthetic for a "
                             "random one")
    parser.add_argument("--photo-view", default=f"{PHOTO_HW[0]},{PHOTO_HW[1]}", help="H,W the photos are resized to")
    parser.add_argument("--runs-root", type=Path, default=REPO,
                        help="the checkout whose runs/ hold the trained teachers (default: this one)")
    parser.add_argument("--tag", default="",
                        help="a reduced run's name: writes realscale-TAG.json (marked reduced), not realscale.json")
    args = parser.parse_args(argv)
    args.photo_hw = tuple(int(x) for x in args.photo_view.split(","))
    args.source_list = [x.strip() for x in args.sources.split(",") if x.strip()]
    if set(args.source_list) - {"synthetic", "photos"}:
        raise SystemExit(f"error: --sources: unknown {sorted(set(args.source_list) - {'synthetic', 'photos'})}; "
                         "valid: synthetic, photos")
    args.images = args.images or 2
    args.batch = args.batch or 1  # one image per measured batch
    args.view_hw = tuple(int(x) for x in args.view.split(","))
    args.warm_hw = tuple(int(x) for x in args.warm_view.split(","))
    settings = settings_from(args, argv)
    env = setup_torch(settings)
    device = torch.device(env["device"])
    t0 = time.perf_counter()
    names = [n.strip() for n in args.teachers.split(",") if n.strip()]
    unknown = [n for n in names if n not in TEACHERS]
    if unknown:
        raise SystemExit(f"error: --teachers: unknown {unknown}; valid: {', '.join(TEACHERS)}")
    results: dict[str, Any] = {"view": list(args.view_hw), "codecs": CODECS, "targets": TARGETS, "goals": GOALS,
                               "teachers": {}}
    with workdir(settings) as work:
        for name in names:
            print(f"realscale: {name} ...", flush=True)
            for key, row in measure_rows(name, TEACHERS[name], Path(work), args, settings, device).items():
                row["goals_met"] = goals_met(row)
                row["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                results["teachers"][key] = row
                print(key, json.dumps({k: row.get(k) for k in ("bytes_per_record", "grad_cosine", "loss_rel_err",
                                                               "loader_records_per_s_per_worker")}, default=str), flush=True)
    old = settings.out / f"{result_name(args.tag, device.type)}.json"
    if args.merge and old.exists():
        kept = json.loads(old.read_text())["results"].get("teachers", {})
        results["teachers"] = {n: kept[n] for n in kept if n not in results["teachers"]} | results["teachers"]
    # the headline keys: the trained teacher worth measuring (synth20), else the first measured row
    order = ["synth20", "demo", "coco"] + [n for n in results["teachers"] if n not in ("synth20", "demo", "coco")]
    measured = [n for n in order if "grad_cosine" in results["teachers"].get(n, {})]
    if measured:
        top = results["teachers"][measured[0]]
        results["headline"] = measured[0]
        for key in ("teacher", "bytes_per_record", "bytes_by_target", "loader_records_per_s_per_worker",
                    "grad_cosine", "loss_rel_err", "step_time_offline_over_online"):
            results[key] = top.get(key)
    path = write(settings, env, results, time.perf_counter() - t0, argv, args.tag)
    print(f"wrote {path}")
    return results


def result_name(tag: str, device_type: str) -> str:
    return f"{NAME}{'-' + tag if tag else ''}{'-cuda' if device_type == 'cuda' else ''}"


def write(settings, env, results: dict, wall_s: float, argv, tag: str = "") -> Path:
    """realscale.json (realscale-cuda.json on a GPU) + SUMMARY.md; like `bench.common.write_result`
    but named by device, not scale (the view is fixed at 800x1344)."""
    import datetime as dt

    from bench.common import _rounded
    from bench.summary import write_summary

    payload = {"benchmark": NAME, "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "command": " ".join(["python -m bench." + NAME, *settings.argv]),
               "machine": machine_info(env["device"]) | {"torch_threads": env["torch_threads"],
                                                         "blosc_threads": env["blosc_threads"]},
               "scale": {"name": "800x1344", "note": "real-scale view", "rounds": settings.rounds,
                         "reduced": bool(tag)},
               "wall_s": round(wall_s, 2), "results": results}
    settings.out.mkdir(parents=True, exist_ok=True)
    path = settings.out / f"{result_name(tag, 'cuda' if env['device'].startswith('cuda') else 'cpu')}.json"
    path.write_text(dump_json(_rounded(payload)) + "\n")
    write_summary(settings.out)
    return path


if __name__ == "__main__":
    main()
