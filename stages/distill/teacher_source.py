"""Per-image teacher records -> batched `TeacherTargets`, for cached and live teachers alike.

Offline, the records come decoded from the cache; online, from `extract_records` on a live
teacher forward. Both go through `records_to_targets`, so the two modes differ only by the
codec: maps are placed at the top-left of zero maps of the batch's padded level sizes (cells
outside the image are zero in both modes; the losses mask them anyway).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from stages.cache.targets import extract_records
from stages.config import ModelParams, from_dict
from stages.detectors.build import build_head
from stages.detectors.contract import DetectorOutput
from stages.distill.device_decode import record_to_device
from stages.losses.targets import TeacherTargets
from stores.provenance import check_head_static


def _place(maps: Sequence[Tensor], padded_hw: tuple[int, int], stride: int) -> Tensor:
    """Stack per-image [C, h, w] crops into [B, C, H/stride, W/stride] zeros."""
    c = maps[0].shape[0]
    out = maps[0].new_zeros((len(maps), c, padded_hw[0] // stride, padded_hw[1] // stride))
    for b, m in enumerate(maps):
        out[b, :, : m.shape[1], : m.shape[2]] = m
    return out


def _levels(records: list[dict[str, Tensor]], family: str, padded_hw, strides) -> list[Tensor]:
    if f"{family}.0" not in records[0]:
        return []
    return [_place([r[f"{family}.{lv}"] for r in records], padded_hw, s) for lv, s in enumerate(strides)]


def _tower_moments(r: dict[str, Tensor], branch: str, index: int) -> tuple[Tensor | None, Tensor | None]:
    """One record's (per-level [L, 3, C] or None, pooled [3, C] or None) float64 moments of tower
    layer `index`, from either record layout (`stages.cache.targets`): tower.{branch} [I, L, 3, C]
    (the packed layout) or tower.{branch}.{i}.{l} and the pooled tower.{branch}.{i} (the per-layer layout)."""
    packed = r.get(f"tower.{branch}")
    if packed is not None:
        if index >= packed.shape[0]:
            return None, None
        per_level = packed[index].double()
        return per_level, per_level.sum(0)  # pooled = the levels' sums (counts, sums, sums of squares add)
    key = f"tower.{branch}.{index}"
    levels = sorted(int(k.rsplit(".", 1)[1]) for k in r if k.startswith(key + "."))
    per_level = torch.stack([r[f"{key}.{lv}"].double() for lv in levels]) if levels else None
    pooled = r[key].double() if key in r else None
    return per_level, pooled


def tower_statistics(records: list[dict[str, Tensor]], index: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-level, per-channel mean and unbiased std ([L, C]) of the teacher's pre-activation tower map at
    `index` over the batch's valid cells (CrossKD's `align_scale`). A cache with only the pooled
    moments gives [C] (population std), which the loss broadcasts to every level. Records of both
    layouts may share a batch (a cache resumed across the change)."""
    mean, std = {}, {}
    for branch in ("cls", "reg"):
        moments = [_tower_moments(r, branch, index) for r in records]
        if all(lv is not None for lv, _ in moments):
            count, total, sq = torch.stack([lv for lv, _ in moments]).sum(0).unbind(1)  # each [L, C]
            m = total / count
            var = (sq - total * m) / (count - 1).clamp_min(1)
        elif all(pooled is not None for _, pooled in moments):
            count, total, sq = torch.stack([pooled for _, pooled in moments]).sum(0)
            m = total / count
            var = sq / count - m * m
        else:
            continue
        mean[branch] = m.float()
        std[branch] = var.clamp_min(1e-12).sqrt().float()
    return mean, std


def records_to_targets(
    records: list[dict[str, Tensor]],
    padded_hw: tuple[int, int],
    strides: list[int],
    head: nn.Module | None = None,
    reuse_index: int = -1,
) -> TeacherTargets:
    """Batch per-image records (tensors already on the training device) into TeacherTargets."""
    candidates = []
    for r in records:
        if "cand.offsets" not in r:
            break
        off = r["cand.offsets"].tolist()
        candidates.append(
            [(r["cand.index"][off[g] : off[g + 1]].long(), r["cand.score"][off[g] : off[g + 1]].float())
             for g in range(len(off) - 1)]
        )
    detections = [
        {"boxes": r["det.boxes"], "scores": r["det.scores"], "labels": r["det.labels"].long()}
        for r in records
        if "det.boxes" in r
    ]
    mean, std = tower_statistics(records, reuse_index) if reuse_index >= 0 else ({}, {})
    return TeacherTargets(
        fpn=_levels(records, "fpn", padded_hw, strides),
        cls_probs=_levels(records, "cls", padded_hw, strides),
        box_reg=_levels(records, "box", padded_hw, strides),
        quality=_levels(records, "quality", padded_hw, strides),
        candidates=candidates,
        detections=detections,
        head=head,
        tower_mean=mean,
        tower_std=std,
        reuse_index=reuse_index,
    )


def cached_records_to_device(arrays: list[dict], device: torch.device) -> list[dict[str, Tensor]]:
    """Cached records -> tensors on `device`: compact parts (`stores.codecs.CompactArray`, what
    the loader hands on) are pinned, copied and dequantised / scattered there
    (`stages.distill.device_decode`); numpy maps (a reader's reference decode) are just copied."""
    return [record_to_device(rec, device) for rec in arrays]


@torch.no_grad()
def live_records(
    teacher: nn.Module,
    images: Tensor,
    image_sizes: list[tuple[int, int]],
    gt: list[dict[str, Tensor]],
    targets: list[str],
) -> tuple[DetectorOutput, list[dict[str, Tensor]]]:
    """Run the teacher and extract exactly what stage 1 would cache (before codecs)."""
    out = teacher(images, image_sizes, with_detections="detections" in targets)
    cands = teacher.candidates(out, gt) if "candidates" in targets else None
    return out, extract_records(out, targets, gt, cands, teacher.num_classes)


def teacher_head_from_cache(reader, arch: dict, num_classes: int) -> torch.nn.Module:
    """The frozen teacher dense head rebuilt from the cache's static weights (no backbone needed).
    Only the head the manifest vouches for (its sha256), with exactly this head's arrays (checked
    from the npz's headers before anything is loaded)."""
    head = build_head(from_dict(ModelParams, arch), num_classes)
    expected = {k: (tuple(v.shape), "float32") for k, v in head.state_dict().items()}  # stage 1 stores float32
    check_head_static(reader.root, reader.manifest, expected)
    state = {k: torch.from_numpy(np.array(v)) for k, v in reader.read_static("head").items()}
    head.load_state_dict(state)
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return head
