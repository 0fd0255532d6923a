"""Stage 2: train one student with GT loss + KD losses against cached (or live) teacher targets.

The training loop is the foundation's (`stages.training.train_loop`); this module only supplies
the batches, the teacher targets for each batch and the loss function. Offline (default) the
teacher never runs: its targets come from the cache, whose manifest is checked against this run's
params first. Online (`distill.teacher: online`) runs the live teacher on the same batches and
extracts the same records before any codec — the reference the cache is measured against.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages import distributed
from stages.cache.plan import check_cache, open_reader, pin_dataset_version, resolve_train_teacher
from stages.cache.targets import PER_IMAGE_TARGETS
from stages.config import DistillParams, Params, from_dict, to_dict
from stages.data.batching import ViewDataset, collate, view_padded_size
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.detector_training import to_device
from stages.detectors.base import crosskd_run_from_index
from stages.detectors.build import build_detector, checkpoint_dict
from stages.detectors.resolved_teacher import ResolvedTeacher
from stages.detectors.retinanet import anchor_layout
from stages.distill.loader import CachedViewDataset, cached_views, check_padding, wds_batches
from stages.distill.teacher_source import (
    cached_records_to_device,
    live_records,
    records_to_targets,
    teacher_head_from_cache,
)
from stages.evaluation import evaluate
from stages.losses.registry import LossContext, build_kd_losses
from stages.run_lease import run_lease
from stages.run_record import check_kind, check_out_folder, check_student_run
from stages.training import EpochBatchSampler, save_checkpoint, train_loop
from stores.local_cache import install as install_local_cache
from stores.provenance import check_store_provenance


def resolve_distill(params: Params, experiment: str | None) -> DistillParams:
    """`distill` with the named experiment's keys laid over it (experiments: {name: {losses: ..}})."""
    if not experiment:
        return params.distill
    if experiment not in params.experiments:
        raise ValueError(f"unknown experiment {experiment!r}; params.yaml defines: {', '.join(params.experiments)}")
    merged = to_dict(params.distill) | dict(params.experiments[experiment])
    return from_dict(DistillParams, merged, f"experiments.{experiment}")


@dataclass
class TeacherInfo:
    """What stage 2 knows about the teacher without running it."""

    arch: dict[str, Any]  # ModelParams as a dict
    num_classes: int
    head: nn.Module | None


def loss_context(student: nn.Module, t_arch: dict, num_classes: int, t_box_dim: int, t_quality: bool) -> LossContext:
    return LossContext(
        student_arch=student.arch,
        teacher_arch=t_arch["arch"],
        num_classes=num_classes,
        num_levels=len(student.strides),
        strides=list(student.strides),
        student_channels=student.fpn_channels,
        teacher_channels=t_arch["fpn_channels"],
        student_head_channels=student.fpn_channels,
        teacher_head_channels=t_arch["fpn_channels"],
        num_anchors=student.num_anchors,
        box_dim=student.box_dim,
        teacher_box_dim=t_box_dim,
        reg_max=student.reg_max,
        student_dense=student.dense,
        teacher_has_quality=t_quality,
        assign=student_assigner(student) if student.dense else None,
        student_head_convs=getattr(student, "head_convs", 0),
        teacher_head_convs=t_arch.get("head_convs", 0) if t_arch["arch"] != "faster_rcnn" else 0,
        teacher_anchors=anchor_layout(t_arch),
        student_anchors=anchor_layout(detector_arch(student)),
    )


def detector_arch(det: nn.Module) -> dict:
    """The architecture fields `loss_context` reads, from a built detector (a cache gives its teacher's
    as the fingerprint's dict; a live teacher, the student and the benchmarks' teachers are modules)."""
    return {"arch": det.arch, "fpn_channels": det.fpn_channels, "variant": det.variant,
            "anchor_size": getattr(det, "anchor_size", 0)}


def student_assigner(student: nn.Module) -> Callable:
    """The student's own GT assignment (what its detection loss uses), for the KD normalisers."""

    def assign(out, targets: list[dict]) -> list[torch.Tensor]:
        device = out.anchors[0].device
        return student.matches(out, student.prepare_targets(targets, device))[1]

    return assign


def run_from_index(distill: DistillParams, teacher_arch: str, head_convs: int) -> int:
    """The `run_from` layer for CrossKD: `distill.crosskd.reuse_index` in the paper's numbering,
    or the paper's default for the teacher's arch (3; 2 for FCOS) when it is -1."""
    paper = distill.crosskd.reuse_index if distill.crosskd.reuse_index > 0 else (2 if teacher_arch == "fcos" else 3)
    return crosskd_run_from_index(paper, head_convs)


@dataclass
class DistillRun:
    """One student experiment, assembled: what `train_loop` needs, plus the pieces tests inspect."""

    distill: DistillParams
    device: torch.device
    coco: CocoDataset
    student: nn.Module
    kd: nn.Module
    teacher_targets: Callable[[dict, torch.Tensor, list[dict]], Any]
    step_loss: Callable[[dict], dict[str, torch.Tensor]]
    make_batches: Callable[[int], Any]
    inputs: dict | None = None  # digests of the teacher / cache content it consumes (run.json's `inputs`)


def build_run(params: Params, experiment: str | None, resolved: ResolvedTeacher | None = None) -> DistillRun:
    """Student, KD losses, teacher source (cache or live) and batches for one experiment. `resolved`:
    params' teacher as the entry point resolved it (else it is resolved here, once): the cache check
    compares its digest, the online teacher is built from it."""
    distill = resolve_distill(params, experiment)
    cfg = params.train
    torch.manual_seed(cfg.seed)
    device = distributed.local_device(cfg.device)
    coco = CocoDataset.from_params(params.data, "train")
    student_cfg = params.student.model
    student = build_detector(student_cfg, student_cfg.num_classes or coco.num_classes).to(device)
    views = [View(v.min_size, v.max_size, v.flip) for v in params.cache.views]

    teacher, reader = None, None
    if distill.teacher == "online":
        # the teacher's class outputs mapped onto the dataset's categories (refused if it cannot predict them)
        resolved = resolved or resolve_train_teacher(params, coco)
        teacher, t_arch = resolved.build().to(device).eval(), resolved.arch
        for p in teacher.parameters():
            p.requires_grad_(False)
        t_info = TeacherInfo(t_arch, teacher.num_classes, teacher.head)
        t_box_dim, t_quality = teacher.box_dim, teacher.has_quality
        inputs = {"teacher_sha256": resolved.sha256}
    else:
        # a cache at a URL with cache.local set: shards read through the node's scratch-disk copy (forked
        # loader workers inherit it)
        install_local_cache(params.cache.path, params.cache.local.path, params.cache.local.max_gb)
        reader = open_reader(params.cache.path, distill.source)
        pin_dataset_version(reader, coco)  # the version this json names; blocks appended later are never read
        check_cache(reader, params, resolved)
        check_store_provenance(reader)  # zarr/ or wds/ written for this manifest, not copied from another cache
        inputs = cache_inputs(reader.manifest)
        t_arch = reader.manifest.fingerprint["teacher_arch"]
        t_info = TeacherInfo(t_arch, reader.manifest.meta["num_classes"], None)
        t_box_dim, t_quality = reader.manifest.meta["box_dim"], reader.manifest.meta["has_quality"]
    if t_info.num_classes != student.num_classes:
        raise ValueError(f"the teacher is mapped onto the dataset's {t_info.num_classes} categories "
                         f"({params.data.train_ann}) but student.model.num_classes is {student.num_classes}; "
                         "set it to 0 (= the dataset's categories)")

    ctx = loss_context(student, t_arch, t_info.num_classes, t_box_dim, t_quality)
    kd = build_kd_losses(distill.losses, ctx, distill).to(device)
    needs = kd.needs()
    index = run_from_index(distill, t_arch["arch"], t_arch["head_convs"])
    if "head" in needs and t_info.head is None:
        t_info.head = teacher_head_from_cache(reader, t_arch, t_info.num_classes).to(device)
    targets_needed = sorted(targets_for(needs))

    def teacher_targets(batch, images, targets):
        padded = tuple(images.shape[-2:])
        if teacher is not None:
            _, records = live_records(teacher, images, batch["image_sizes"], targets, targets_needed)
        else:
            padded = check_padding(batch)
            records = cached_records_to_device(batch["teacher"], device)
        return records_to_targets(records, padded, list(student.strides), t_info.head, index)

    def step_loss(batch):
        images, targets = to_device(batch, device)
        out = student(images, batch["image_sizes"], targets=targets)
        losses = dict(out.losses)
        if distill.losses:
            kd_losses = kd(out, teacher_targets(batch, images, targets), targets)
            losses.update({k: v for k, v in kd_losses.items() if k != "kd_total"})
        return losses

    make_batches = _batch_source(distill, coco, views, reader, cfg, targets_needed, pin=device.type == "cuda")
    return DistillRun(distill, device, coco, student, kd, teacher_targets, step_loss, make_batches, inputs)


def cache_inputs(manifest) -> dict:
    """What an offline student consumes, as digests: the teacher's weights (checked against
    teacher.checkpoint by `check_cache`), the cache's fingerprint, its per-block content and the
    dataset version the reader pinned (`Manifest.versions`: blocks appended later are not read)."""
    content = json.dumps([manifest.block_fingerprints, manifest.statics], sort_keys=True).encode()
    return {"teacher_sha256": manifest.fingerprint.get("teacher_weights", ""),
            "cache": {"fingerprint_digest": manifest.fingerprint_digest(),
                      "content_sha256": hashlib.sha256(content).hexdigest(),
                      "version": manifest.version}}


def train_student(params: Params, experiment: str | None, out_dir: Path, progress: bool = True,
                  overwrite: bool = False, resolved: ResolvedTeacher | None = None) -> dict:
    """Train, evaluate on val, write out_dir/{model.pt, metrics.json, train_log.csv}; return metrics.
    One writer per run folder: rank 0 holds its lease (`stages.run_lease`) for the whole run."""
    check_out_folder(out_dir, params.data, params.cache.path, "--out")
    check_kind(out_dir, "student", overwrite=overwrite)  # a teacher's folder: refused before any work
    with run_lease(out_dir, "student", enabled=distributed.is_main()):
        return _train_student(params, experiment, Path(out_dir), progress, overwrite, resolved)


def _train_student(params: Params, experiment: str | None, out_dir: Path, progress: bool, overwrite: bool,
                   resolved: ResolvedTeacher | None = None) -> dict:
    run = build_run(params, experiment, resolved)
    check_student_run(params, run.distill, experiment, out_dir, overwrite, run.coco, run.inputs)  # stages.run_record
    student_cfg = params.student.model
    meta = checkpoint_dict(run.student, student_cfg)
    meta.pop("model")
    meta.update(categories=run.coco.categories, params=to_dict(params), experiment=experiment or "")
    # the student and the KD modules (adapters, the CSKD assistant branch) train inside one DDP module
    last = train_loop(
        modules={"model": run.student, "kd": run.kd},
        step_loss=run.step_loss,
        make_batches=run.make_batches,
        cfg=params.train,
        out_dir=out_dir,
        checkpoint_meta=meta,
        device=run.device,
        progress=progress,
        desc=f"student {experiment or ''}".strip(),
    )
    if not distributed.is_main():  # rank 0 alone writes the model, the metrics and the evaluation
        return {}
    final = checkpoint_dict(run.student.cpu(), student_cfg) | {"categories": run.coco.categories, "step": params.train.steps}
    save_checkpoint(out_dir / "model.pt", final)
    val = CocoDataset.from_params(params.data, "val")
    view = View(params.data.min_size, params.data.max_size)
    metrics = evaluate(run.student.to(run.device), val, view, params.eval.batch_size, run.device, progress)
    metrics.update(experiment=experiment or "", teacher_mode=run.distill.teacher, losses=run.distill.losses)
    if "mean_sec_per_step" in last:  # per-step time of this run (per rank under torchrun), for dvc exp show
        metrics.update(sec_per_step=last["mean_sec_per_step"], processes=distributed.world())
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def targets_for(needs: set[str]) -> set[str]:
    """Per-image record families a set of losses reads. The head is static (once per cache, not per
    image): CSKD's tower terms run it on the cached FPN and need no per-image record for it; only
    CrossKD reads the per-image `tower_stats` (it says so in its own needs)."""
    return {n for n in needs if n in PER_IMAGE_TARGETS}


def _batch_source(distill, coco, views, reader, cfg, targets, pin: bool = False):
    """Batches of the run; `pin`: collate pins the cached compact parts (CUDA training device)."""
    if distill.teacher == "offline" and distill.source == "wds":
        from stores.wds_store import decode_sample

        cached_views(reader, coco, views)  # a partial cache is refused as the Zarr source refuses it

        bases = reader.codec_bases()  # cpca feature chains: the cache's PCA bases, read once

        def decode(sample):  # checksums checked; compact parts, dequantised on the training device
            return decode_sample(sample, targets, compact=True, defer_delta=True, bases=bases)

        # WebDataset: each rank (node) and DataLoader worker streams its own shards
        return lambda start: wds_batches(reader.shard_paths(), decode, coco, views, cfg.batch_size, cfg.seed, start,
                                         pin=pin, targets=targets)
    if reader is not None:
        dataset = CachedViewDataset(coco, views, reader, targets)
        views_of, bucket_of = dataset.views_of, dataset.bucket_of
    else:
        dataset = ViewDataset(coco, views, mode="all")
        sizes = [view_padded_size(v, *coco.image_size(i)) for i in coco.image_ids for v in views]
        views_of, bucket_of = None, sizes.__getitem__

    def make(start: int):
        sampler = EpochBatchSampler(len(coco), cfg.batch_size, cfg.seed, num_views=len(views), start_step=start,
                                    views_of=views_of, bucket_of=bucket_of, **_ddp_rank())
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                                             pin_memory=pin and reader is not None)
        return iter(loader)

    return make


def _ddp_rank() -> dict:
    """Zarr by index: each rank reads its slice of every global batch the sampler draws."""
    return {"rank": distributed.rank(), "world": distributed.world()}
