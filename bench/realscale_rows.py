"""The pieces of a bench.realscale row: its images (synthetic renders, or real photos with the
teacher's confident detections as their boxes), batches, teacher, KD modules, the student's warm-up,
the cpca bases, the store and the offline / online step timing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import loader as loader_bench
from bench.common import REPO, interleaved
from bench.fixtures import trained_checkpoint
from stages.cache.basis import cpca_families, fit_bases, fit_class_floors
from stages.config import CacheParams, DistillParams
from stages.data.batching import ViewDataset, collate
from stages.data.coco import CocoDataset
from stages.data.synthetic import class_specs, render_image
from stages.data.views import View
from stages.detectors.build import build_detector, load_detector
from stages.distill.run import detector_arch, loss_context, run_from_index
from stages.distill.teacher_source import cached_records_to_device, live_records, records_to_targets
from stages.losses.registry import LOSS_NAMES, build_kd_losses
from stores import Manifest, decode_record, open_writer
from stores.base import target_family
from stores.cache_basis import class_floor_chains, resolve_class_chains
from stores.manifest import SCHEMA_VERSION, is_store, remove_store

NAME = "realscale"
CODECS = dict(CacheParams().codecs)
TARGETS = [t for t in CacheParams().targets if t != "head"]  # head: static, once per cache
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
    # class maps whose floor is fitted per cache (>= 0.015; at most 10 % / 30 % of the class elements above it, on
    # the row's basis images as stage 1 fits it): a teacher less sure on real photos keeps no more elements
    "default+cls=topk24f0.015p0.1": {**CODECS, "cls": "topk24f0.015p0.1+lz4"},
    "default+cls=topk24f0.015p0.3": {**CODECS, "cls": "topk24f0.015p0.3+lz4"},
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


def teacher_row(name: str, spec: dict, device: torch.device, root: Path = REPO) -> tuple[torch.nn.Module | None, dict]:
    """The teacher of a row and its description (arch, backbone, fpn_channels, num_classes, how trained);
    its checkpoint path is relative to `root` (a checkout whose runs/ hold the trained teachers)."""
    if not spec["checkpoint"]:
        torch.manual_seed(0)
        teacher = build_detector(spec["model"], spec["num_classes"])
        backbone, used = spec["model"].backbone, None
        how = "random weights (seeded), no trained COCO weights available here: a shape row, not a quality row"
    else:
        path, how = trained_checkpoint(Path(root) / spec["checkpoint"])
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


def resolve_floors(teacher, data: CocoDataset, view: View, sets: dict, device) -> tuple[dict, dict]:
    """(sets with each topkKfFpP class chain resolved to topkKf<floor>, {set: {family: floor}}): the floor
    fitted on `data` as stage 1 fits a cache's (`stages.cache.basis.fit_class_floors`)."""
    out, floors = dict(sets), {}
    for name, codecs in sets.items():
        chains = class_floor_chains(codecs)
        if chains:
            floors[name] = fit_class_floors(teacher, batches(data, view, 1, device), chains, teacher.num_classes, device)
            out[name] = {f: c.spec for f, c in resolve_class_chains(codecs, floors[name]).items()}
    return out, floors


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


# natural RGB photos shipped in scikit-image's wheel (no download); motorcycle_* are stereo_motorcycle's pair
PHOTOS = ("astronaut", "chelsea", "coffee", "motorcycle_left", "motorcycle_right", "rocket", "hubble_deep_field")
PHOTO_HW = (800, 1333)  # the 800x1333 view: short side 800, long side 1333 (COCO's usual test view)
BOX_SCORE = 0.3  # a photo's boxes: the teacher's detections at or above this score ...
MAX_BOXES, MIN_BOXES = 20, 2  # ... at most 20; its 2 best when fewer pass


def photo_pixels(name: str) -> np.ndarray:
    """[H, W, 3] uint8 RGB of one of PHOTOS."""
    from skimage import data

    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return (left if name == "motorcycle_left" else right)[..., :3]
    return getattr(data, name)()[..., :3]


def photo_set(folder: Path, hw: tuple[int, int], n: int, teacher, classes: tuple[int, int],
              device: torch.device) -> CocoDataset:
    """n real photos (PHOTOS in turn; a second pass mirrors them) resized to exactly hw, as COCO. Photos
    have no annotations, and CSKD's fg / bg masks and RM's candidates need objects, so each photo's boxes
    are the teacher's own detections (see BOX_SCORE): the objects the teacher sees there."""
    ann = folder / "instances.json"
    if ann.exists():
        return CocoDataset(folder / "images", ann)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for k in range(n):
        pixels = Image.fromarray(photo_pixels(PHOTOS[k % len(PHOTOS)])).resize((hw[1], hw[0]), Image.BILINEAR)
        if (k // len(PHOTOS)) % 2:
            pixels = pixels.transpose(Image.FLIP_LEFT_RIGHT)
        pixels.save(folder / "images" / f"{k + 1:06d}.png")
        images.append({"id": k + 1, "file_name": f"{k + 1:06d}.png", "height": hw[0], "width": hw[1]})
    cats = [{"id": s.category_id, "name": s.name, "supercategory": "shape"} for s in class_specs(*classes)]
    if len(cats) != teacher.num_classes:  # a teacher of another label space: numbered categories
        cats = [{"id": i + 1, "name": f"class{i + 1}", "supercategory": "object"} for i in range(teacher.num_classes)]
    cat_ids = sorted(c["id"] for c in cats)  # CocoDataset: label = position of the id in sorted order
    draft = folder / "draft.json"
    draft.write_text(json.dumps({"images": images, "annotations": [], "categories": cats}))
    anns = []
    thresh, teacher.score_thresh = teacher.score_thresh, 0.0  # every detection, so the best MIN_BOXES exist
    try:
        with torch.no_grad():
            for image, b in zip(images, batches(CocoDataset(folder / "images", draft), View(min(hw), max(hw), False), 1,
                                                device)):
                det = teacher(b["images"], b["image_sizes"], with_detections=True).detections[0]
                order = det["scores"].argsort(descending=True)
                keep = [int(i) for i in order if det["scores"][i] >= BOX_SCORE][:MAX_BOXES] or order[:MIN_BOXES].tolist()
                for i in keep:
                    x1, y1, x2, y2 = det["boxes"][i].tolist()
                    if x2 - x1 < 1 or y2 - y1 < 1:
                        continue
                    anns.append({"id": len(anns) + 1, "image_id": image["id"], "iscrowd": 0, "area": (x2 - x1) * (y2 - y1),
                                 "bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": cat_ids[int(det["labels"][i])],
                                 "score": float(det["scores"][i])})
    finally:
        teacher.score_thresh = thresh
    draft.unlink()
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return CocoDataset(folder / "images", ann)
