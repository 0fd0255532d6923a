"""Real-scale caches: bytes, loader speed and KD fidelity at an 800x1344 view, per teacher.

    python -m bench.realscale [--device cpu|cuda] [--images N] [--student-steps N]
                              [--teachers demo,synth20,coco,coco-synth90,coco-synth20] [--sets a,b]
                              [--basis-images N] [--merge]

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
(`stages.data.synthetic.render_image`; objects 16-480 px, view scale 1):
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
Writes bench/results/realscale.json (realscale-cuda.json with --device cuda) and SUMMARY.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench import loader as loader_bench
from bench.common import (
    REPO,
    dump_json,
    interleaved,
    machine_info,
    make_parser,
    md_table,
    settings_from,
    setup_torch,
    workdir,
)
from bench.fixtures import trained_checkpoint
from stages.cache.basis import cpca_families, fit_bases
from stages.fidelity import measure_gradient_fidelity
from stages.cache.targets import record_meta
from stages.config import CacheParams, DistillParams, ModelParams
from stages.data.batching import ViewDataset, collate
from stages.data.coco import CocoDataset
from stages.data.synthetic import class_specs, render_image
from stages.data.views import View
from stages.detectors.build import build_detector, load_detector
from stages.distill.run import detector_arch, loss_context, run_from_index, targets_for
from stages.distill.teacher_source import cached_records_to_device, live_records, records_to_targets
from stages.losses.registry import LOSS_NAMES, build_kd_losses
from stores import EncodedRecord, Manifest, decode_record, open_writer
from stores.base import target_family
from stores.cache_basis import CacheBases
from stores.manifest import SCHEMA_VERSION, is_store, remove_store

NAME = "realscale"
VIEW_HW = (800, 1344)  # a COCO-sized view, where the 1.5 MB goal applies (--view changes it for smoke runs only)
WARM_HW = (320, 544)
DEFAULT_ROWS = ("demo", "synth20", "coco", "coco-synth90", "coco-synth20")
GOALS = {"bytes_per_record_max": 1.5e6, "loader_records_per_s_min": 300.0, "grad_cosine_min": 0.99,
         "loss_rel_err_max": 0.01}
CODECS = dict(CacheParams().codecs)
# the loader's "before" store: an FPN basis in every record, int16 codes under pcodec, zstd class / box maps
BEFORE_SET = "pca64s0.25+pco/topk24f0.01/int8c"
# the default set plus the chains compared with it; every set is measured on the same live records
# and student outputs
CODEC_SETS = {
    "default": CODECS,
    "int8c/int8c/fp16": {"fpn": "int8c+zstd", "cls": "int8c+zstd", "box": "fp16+zstd", "quality": "fp16+zstd"},
    # a per-record 32-component PCA with a narrow top-9 (pca32 truncates FPN energy: CSKD / SSIM ~3 %; top-9
    # at F 0.002 drops real classes of ambiguous anchors), measured on the same records for comparison
    "pca32/topk9f0.002/int8c": {"fpn": "pca32+zstd", "cls": "topk9f0.002+zstd", "box": "int8c+zstd",
                                "quality": "int8c+zstd"},
    # class maps with a 0.01 floor under zstd: 16-62 % more class bytes, decoded 2-4x slower
    "default+cls=topk24f0.01+zstd": {**CODECS, "cls": "topk24f0.01+zstd"},
    # smaller class maps (top-9 at F 0.01): fewer bytes where a teacher is ambiguous, less faithful there
    "default+cls=topk9f0.01": {**CODECS, "cls": "topk9f0.01+zstd"},
    # box maps only at cells where the teacher's class score reaches 0.01 (box losses are weighted by teacher score or positives); zeros elsewhere
    "default+box=mask0.01": {**CODECS, "box": "mask0.01+zstd", "quality": "mask0.01+zstd"},
    # one PCA basis per cache (stores.cache_basis, fitted here on other images of the row): no basis in
    # the records; K = 64 or 128 of 256 channels, and the full-rank transform (nothing truncated)
    "cpca64s0.25": {**CODECS, "fpn": "cpca64s0.25+pco"},
    # an FPN basis in every record with int16 codes under pcodec, class and box codes under zstd; its
    # records are also read back by the loader, next to the default's
    BEFORE_SET: {"fpn": "pca64s0.25+pco", "cls": "topk24f0.01+zstd", "box": "int8c+zstd", "quality": "int8c+zstd"},
    "cpca128s0.25": {**CODECS, "fpn": "cpca128s0.25+pco"},
    "cpca256s0.25": {**CODECS, "fpn": "cpca256s0.25+pco"},
    # the very lossy end: small, and shown failing CSKD / CrossKD (masked boxes, top-2)
    "compact": {"fpn": "pca32+zstd", "cls": "topk2f0.01+zstd", "box": "mask0.05+zstd", "quality": "mask0.05+zstd"},
}
TARGETS = [t for t in CacheParams().targets if t != "head"]  # head: static, once per cache
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


def render_set(folder: Path, hw: tuple[int, int], n: int, classes: tuple[int, int], seed: int) -> CocoDataset:
    """n synthetic images of exactly hw (h, w) with the class set `classes` (textures, colours), as COCO."""
    ann = folder / "instances.json"
    if not ann.exists():
        specs = class_specs(*classes)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for k in range(n):
            pixels, objects = render_image(hw[0], hw[1], np.random.default_rng([seed, k]), 16.0, specs)
            Image.fromarray(pixels).save(folder / "images" / f"{k + 1:06d}.png")
            images.append({"id": k + 1, "file_name": f"{k + 1:06d}.png", "height": hw[0], "width": hw[1]})
            for o in objects:
                anns.append({"id": len(anns) + 1, "image_id": k + 1, "iscrowd": 0, **o})
        cats = [{"id": s.category_id, "name": s.name, "supercategory": "shape"} for s in specs]
        ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return CocoDataset(folder / "images", ann)


def batches(dataset: CocoDataset, view: View, size: int, device: torch.device) -> list[dict]:
    items = ViewDataset.from_pairs(dataset, [(i, view) for i in dataset.image_ids])
    out = []
    for start in range(0, len(items), size):
        b = collate([items[p] for p in range(start, min(start + size, len(items)))])
        out.append({"images": b["images"].to(device), "image_sizes": b["image_sizes"],
                    "targets": [{k: v.to(device) for k, v in t.items()} for t in b["targets"]]})
    return out


def teacher_row(name: str, spec: dict, device: torch.device) -> tuple[torch.nn.Module | None, dict]:
    """The teacher of a row and its description (arch, backbone, fpn_channels, num_classes, how trained)."""
    if not spec["checkpoint"]:
        torch.manual_seed(0)
        teacher = build_detector(spec["model"], spec["num_classes"])
        backbone, used = spec["model"].backbone, None
        how = "random weights (seeded), no trained COCO weights available here: a shape row, not a quality row"
    else:
        path, how = trained_checkpoint(REPO / spec["checkpoint"])
        if path is None:
            return None, {"skipped": f"{how}: make it with `{spec['make']}`"}
        teacher = load_detector(path)
        used = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
        backbone = torch.load(path, map_location="cpu", weights_only=True).get("model_params", {}).get("backbone", "?")
    desc = {"arch": teacher.arch, "backbone": backbone, "fpn_channels": teacher.fpn_channels,
            "head_convs": teacher.head_convs, "num_classes": teacher.num_classes, "trained": how,
            "checkpoint": used}
    return teacher.to(device).eval(), desc


def kd_modules(student, teacher, device) -> tuple[dict[str, torch.nn.Module], int]:
    distill = DistillParams()
    ctx = loss_context(student, detector_arch(teacher), teacher.num_classes, teacher.box_dim, teacher.has_quality)
    kd = {}
    for method in LOSS_NAMES:
        torch.manual_seed(2)
        kd[method] = build_kd_losses({method: 1.0}, ctx, distill).to(device).train()
    return kd, run_from_index(distill, teacher.arch, teacher.head_convs)


def warm_up(student, kd, teacher, warm: list[dict], steps: int, index: int) -> list[float]:
    """`steps` AdamW steps of GT + every KD loss (live targets) on the warm-up batches."""
    params = list(student.parameters()) + [p for m in kd.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    losses = []
    for step in range(steps):
        b = warm[step % len(warm)]
        _, records = live_records(teacher, b["images"], b["image_sizes"], b["targets"], TARGETS)
        out = student(b["images"], b["image_sizes"], targets=b["targets"])
        t = records_to_targets(records, tuple(b["images"].shape[-2:]), list(student.strides), teacher.head, index)
        total = sum(out.losses.values()) + sum(m(out, t, b["targets"])["kd_total"] for m in kd.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        losses.append(float(total.detach()))
    return losses


def row_bases(teacher, data: CocoDataset, view: View, sets: dict, device) -> dict[str, dict[str, np.ndarray]]:
    """{set: {target: basis}} for the sets with cpca chains, fitted once (largest K) on `data` (images
    the fidelity figures do not use) as stage 1 fits a cache's basis; a smaller K is its leading columns."""
    families = {}
    for codecs in sets.values():
        for family, k in cpca_families(codecs).items():
            families[family] = max(k, families.get(family, 0))
    if not families:
        return {}
    fitted = fit_bases(teacher, batches(data, view, 1, device), families, teacher.num_classes, device)
    out = {}
    for name, codecs in sets.items():
        ks = cpca_families(codecs)
        if ks:
            out[name] = {n: np.ascontiguousarray(b[:, :ks[target_family(n)]]) for n, b in fitted.items()
                         if target_family(n) in ks}
    return out


def write_store(root: Path, encoded: list, strides: list[int], bases: dict | None = None,
                codecs: dict | None = None) -> Path:
    """The rows' encoded records in a Zarr + WebDataset store (one record per block), as stage 1 writes;
    `bases`: the default set's cpca bases, stored as a cache stores them (static, sha256 in the manifest)."""
    if is_store(root):  # this benchmark's own store from an earlier run (other codecs): start afresh
        remove_store(root)
    plan = [(rec.image_id, rec.view) for rec in encoded]
    manifest = Manifest(schema_version=SCHEMA_VERSION, fingerprint={"bench": NAME, "codecs": codecs or CODECS}, plan=plan,
                        block_size=1, levels=len(strides), meta={"note": "bench.realscale records"})
    writers = [open_writer(root, manifest, fmt) for fmt in ("zarr", "wds")]
    if bases:
        loader_bench.store_bases(root, writers[0], manifest, bases)
    for block, rec in enumerate(encoded):
        for w in writers:
            w.write_block(block, [rec])
    return root


def step_ratio(student, kd, teacher, batch, encoded, index, rounds: int, bases=None) -> dict[str, float]:
    """One CSKD student step (train mode, AdamW) offline (decoded cache record -> device) vs online
    (live teacher forward + extraction): seconds per step and offline / online."""
    cskd = kd["cskd"]
    opt = torch.optim.AdamW(list(student.parameters()) + list(cskd.parameters()), lr=1e-5)
    padded = tuple(batch["images"].shape[-2:])

    def step(online: bool):
        def run():
            if online:
                _, records = live_records(teacher, batch["images"], batch["image_sizes"], batch["targets"], TARGETS)
            else:
                records = cached_records_to_device([decode_record(r, bases=bases).arrays for r in encoded],
                                                   batch["images"].device)
            t = records_to_targets(records, padded, list(student.strides), teacher.head, index)
            out = student(batch["images"], batch["image_sizes"], targets=batch["targets"])
            total = sum(out.losses.values()) + cskd(out, t, batch["targets"])["kd_total"]
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            if batch["images"].is_cuda:
                torch.cuda.synchronize()
        return run

    timing = interleaved({"offline": step(False), "online": step(True)}, rounds, warmup=0)
    off, on = timing["median_s"]["offline"], timing["median_s"]["online"]
    return {"offline_s": off, "online_s": on, "offline_over_online": off / on}


def measure_row(name: str, spec: dict, work: Path, args, settings, device) -> dict[str, Any]:
    teacher, desc = teacher_row(name, spec, device)
    if teacher is None:
        return {"teacher": desc}
    t0 = time.perf_counter()
    classes = spec["classes"]
    tag = f"{classes[0]}x{classes[1]}"
    hw, warm_hw = args.view_hw, args.warm_hw
    data = render_set(work / f"realscale-{tag}-{hw[0]}x{hw[1]}-{args.images}", hw, args.images, classes, 900)
    warm_set = render_set(work / f"realscale-{tag}-warm-{warm_hw[0]}x{warm_hw[1]}", warm_hw, 8, classes, 901)
    view = View(min(hw), max(hw), False)
    torch.manual_seed(1)
    student = build_detector(spec["student"], teacher.num_classes).to(device).train()
    kd, index = kd_modules(student, teacher, device)
    warm = batches(warm_set, View(min(warm_hw), max(warm_hw), False), 2, device)
    steps = args.student_steps if spec["student"].fpn_channels < 256 else max(1, args.student_steps // 4)
    warm_losses = warm_up(student, kd, teacher, warm, steps, index)
    big = batches(data, view, 1, device)
    encoded: list = []
    sets = {k: v for k, v in CODEC_SETS.items() if k == "default" or v != CODEC_SETS["default"]}
    if args.sets:
        sets = {k: v for k, v in sets.items() if k == "default" or k in args.sets.split(",")}
    basis_set = render_set(work / f"realscale-{tag}-basis-{hw[0]}x{hw[1]}", hw, args.basis_images, classes, 902)
    bases = row_bases(teacher, basis_set, view, sets, device)
    before: list = []
    sinks = {"default": encoded, **({BEFORE_SET: before} if BEFORE_SET in sets and sets[BEFORE_SET] != CODECS else {})}
    all_sets = measure_gradient_fidelity(teacher, student, kd, big, sets, TARGETS, index, sinks=sinks, bases=bases)
    fid = all_sets["default"]
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
        "teacher": desc,
        "student": {"backbone": spec["student"].backbone, "fpn_channels": spec["student"].fpn_channels,
                    "head_convs": spec["student"].head_convs, "warm_up_steps": steps,
                    "warm_up_view": list(warm_hw), "warm_up_loss_first_last": warm_losses[:1] + warm_losses[-1:]},
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
        "codec_sets": {k: {"codecs": sets[k], **{f: v[f] for f in ("bytes_per_record", "bytes_by_target",
                                                                    "grad_cosine", "loss_rel_err", "targets")}}
                       for k, v in all_sets.items()},
    }
    if args.step_rounds > 0:
        row["student_step"] = step_ratio(student, kd, teacher, big[0], encoded[:1], index, args.step_rounds,
                                         CacheBases(bases["default"]) if "default" in bases else None)
        row["step_time_offline_over_online"] = row["student_step"]["offline_over_online"]
    row["wall_s"] = time.perf_counter() - t0
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


def summary_md(result: dict) -> str:
    r = result["results"]
    head = ["teacher", "trained", "MB/record", "zarr rec/s", "wds rec/s", "before: MB, zarr / wds rec/s", "step off/on",
            *[f"cos {m}" for m in LOSS_NAMES], *[f"err {m}" for m in LOSS_NAMES]]
    rows = []
    for name, row in r["teachers"].items():
        t = row["teacher"]
        if "grad_cosine" not in row:
            rows.append([name, t.get("skipped", "?"), *[None] * (len(head) - 2)])
            continue
        rps = row["loader_records_per_s_per_worker"]
        rows.append([f"{name} ({t['backbone']}, FPN {t['fpn_channels']}, {t['num_classes']} cl)", t["trained"],
                     row["bytes_per_record"] / 1e6, rps["zarr"], rps["wds"], _before(row.get("loader_records_per_s_per_worker_before")),
                     row.get("step_time_offline_over_online"),
                     *[row["grad_cosine"].get(m) for m in LOSS_NAMES], *[row["loss_rel_err"].get(m) for m in LOSS_NAMES]])
    codecs = ", ".join(f"{k} `{v}`" for k, v in r["codecs"].items())
    method_rows = [[name, *[_zarr_wds(row.get("loader_records_per_s_per_worker_by_method", {}).get(m))
                            for m in LOSS_NAMES]]
                   for name, row in r["teachers"].items() if "grad_cosine" in row]
    by_method = ("\n\nLoader rec/s per worker (zarr / wds) reading what a run of each method reads:\n\n"
                 + md_table(["teacher", *LOSS_NAMES], method_rows)) if method_rows else ""
    return (md_table(head, rows) + by_method + f"\n\nView {r['view'][0]}x{r['view'][1]}; default codecs: {codecs}. cos = min over "
            "images of the cosine between the KD loss's gradient w.r.t. the student's outputs with cached vs live "
            "targets; err = max relative KD-loss error. before: the same records with a per-record FPN basis "
            f"(`{BEFORE_SET}` in realscale.json's codec_sets), read back just after the default's. Goals: <= 1.5 MB/record, >= 300 rec/s per worker, "
            "cos >= 0.99, err <= 1 %. Per-target cosine / max error and bytes per target: realscale.json.")


def _before(b: dict | None) -> str | None:
    return None if not b or b.get("zarr") is None else f"{b['bytes_per_record'] / 1e6:.3f}, {b['zarr']:.0f} / {b['wds']:.0f}"


def _zarr_wds(rates: dict | None) -> str | None:
    if not rates or rates.get("zarr") is None:
        return None
    return f"{rates['zarr']:.0f} / {rates['wds']:.0f}"


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
    args = parser.parse_args(argv)
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
            row = measure_row(name, TEACHERS[name], Path(work), args, settings, device)
            row["goals_met"] = goals_met(row)
            row["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            results["teachers"][name] = row
            print(json.dumps({k: row.get(k) for k in ("bytes_per_record", "grad_cosine", "loss_rel_err",
                                                        "loader_records_per_s_per_worker")}, default=str), flush=True)
    old = settings.out / f"{NAME}{'-cuda' if device.type == 'cuda' else ''}.json"
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
    path = write(settings, env, results, time.perf_counter() - t0, argv)
    print(f"wrote {path}")
    return results


def write(settings, env, results: dict, wall_s: float, argv) -> Path:
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
                         "reduced": False},
               "wall_s": round(wall_s, 2), "results": results}
    settings.out.mkdir(parents=True, exist_ok=True)
    suffix = "-cuda" if env["device"].startswith("cuda") else ""
    path = settings.out / f"{NAME}{suffix}.json"
    path.write_text(dump_json(_rounded(payload)) + "\n")
    write_summary(settings.out)
    return path


if __name__ == "__main__":
    main()
