"""Train a zoo detector on a COCO-format dataset with GT losses only (the teacher's stage 1 prerequisite).

Under torchrun each rank loads its slice of every global batch (`EpochBatchSampler` rank/world)
and rank 0 alone writes the checkpoints (see `stages.training`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages import distributed
from stages.config import DataParams, ModelParams, TrainParams
from stages.data.batching import ViewDataset, collate, view_padded_size
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.detectors.build import build_detector, checkpoint_dict
from stages.run_record import check_teacher_run
from stages.training import EpochBatchSampler, save_checkpoint, train_loop


def train_views(data: DataParams, flip: bool) -> list[View]:
    views = [View(data.min_size, data.max_size, False)]
    return views + [View(data.min_size, data.max_size, True)] if flip else views


def make_loader(dataset: ViewDataset, num_images: int, num_views: int, cfg: TrainParams, start: int, bucket_of=None):
    sampler = EpochBatchSampler(num_images, cfg.batch_size, cfg.seed, num_views=num_views, start_step=start,
                                bucket_of=bucket_of, rank=distributed.rank(), world=distributed.world())
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
    )
    return iter(loader)


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    images = batch["images"].to(device, non_blocking=True)
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    return images, targets


def train_detector(
    model_cfg: ModelParams,
    train_cfg: TrainParams,
    data: DataParams,
    checkpoint: Path,
    run_params: dict,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Train on data.train_* and write the final checkpoint to `checkpoint` (resumes from its folder)."""
    torch.manual_seed(train_cfg.seed)
    device = distributed.local_device(train_cfg.device)
    coco = CocoDataset.from_params(data, "train")
    check_teacher_run(coco, model_cfg, train_cfg, data, checkpoint, overwrite)  # stages.run_record
    num_classes = model_cfg.num_classes or coco.num_classes
    model = build_detector(model_cfg, num_classes).to(device)
    views = train_views(data, train_cfg.flip)
    dataset = ViewDataset(coco, views, mode="all")
    # one padded size per batch: no compute spent on padding portrait images to landscape ones
    sizes = [view_padded_size(v, *coco.image_size(i)) for i in coco.image_ids for v in views]

    def step_loss(batch):
        images, targets = to_device(batch, device)
        return model(images, batch["image_sizes"], targets=targets).losses

    meta = checkpoint_dict(model, model_cfg)
    meta.pop("model")
    meta.update(categories=coco.categories, params=run_params)
    train_loop(
        modules={"model": model},
        step_loss=step_loss,
        make_batches=lambda start: make_loader(dataset, len(coco), len(views), train_cfg, start, sizes.__getitem__),
        cfg=train_cfg,
        out_dir=checkpoint.parent,
        checkpoint_meta=meta,
        device=device,
        progress=progress,
        desc=f"train {model_cfg.arch}-{model_cfg.backbone}",
    )
    if not distributed.is_main():
        return checkpoint
    final = checkpoint_dict(model.cpu(), model_cfg) | {"categories": coco.categories, "params": run_params}
    final["step"] = train_cfg.steps
    save_checkpoint(checkpoint, final)
    return checkpoint
