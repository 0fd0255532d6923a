"""How exact is a cache? Decoded records against a live teacher re-run on the same inputs.

Per target family: mean cosine similarity, max abs error, and the relative error of a KD loss
computed against the cached instead of the live target. The KD losses use a fixed proxy student
(the live target plus 10% seeded noise), so the figure answers "how much would a student's loss
move if it trained on this cache": feature MSE for fpn, soft-target BCE (the QFL-KD core) for
cls/quality, L1 for box, and the softmax-KL of Rank Mimicking for candidate scores.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from stages.data.batching import ViewDataset, collate
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.distill.teacher_source import live_records


def _proxy(live: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = live.std(correction=0) if live.numel() > 1 else live.abs().mean()
    return live + 0.1 * spread.clamp_min(1e-6) * torch.randn(live.shape, generator=g)


def _kd_loss(family: str, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if family in ("cls", "quality"):
        return F.binary_cross_entropy(student.clamp(1e-6, 1 - 1e-6), target.clamp(0, 1))
    if family == "box":
        return (student - target).abs().mean()
    if family == "cand":
        return F.kl_div(F.log_softmax(student, 0), F.softmax(target, 0), reduction="sum")
    return F.mse_loss(student, target)


def compare(family: str, cached: np.ndarray, live: torch.Tensor, seed: int) -> dict[str, float]:
    """Cosine, max abs error and relative KD-loss error of one cached array against the live one."""
    c = torch.from_numpy(np.asarray(cached, dtype=np.float32)).flatten()
    t = live.detach().float().cpu().flatten()
    if c.shape != t.shape:
        raise ValueError(f"{family}: cached array has {c.numel()} values, the live teacher gives {t.numel()}: "
                         "is this the cache's teacher and dataset?")
    if t.numel() == 0:  # e.g. an image without GTs has no candidates
        return {"cosine": 1.0, "max_abs_error": 0.0, "rel_kd_loss_error": 0.0}
    proxy = _proxy(t, seed)
    if family in ("cls", "quality"):
        proxy = proxy.clamp(0, 1)
    live_loss = _kd_loss(family, proxy, t)
    cached_loss = _kd_loss(family, proxy, c)
    return {
        "cosine": float(F.cosine_similarity(c, t, dim=0, eps=1e-12)),
        "max_abs_error": float((c - t).abs().max()),
        "rel_kd_loss_error": float((cached_loss - live_loss).abs() / live_loss.abs().clamp_min(1e-12)),
    }


@torch.no_grad()
def measure_fidelity(reader, teacher, dataset: CocoDataset, n_images: int, device: torch.device) -> dict:
    """Aggregate (mean cosine, max of max-abs, mean relative loss error) per family over n records."""
    fp = reader.manifest.fingerprint
    views = {View.from_dict(v).key: View.from_dict(v) for v in fp["views"]}
    targets = [t for t in fp["targets"] if t in ("fpn", "cls", "box", "quality", "candidates")]
    per_family: dict[str, list[dict[str, float]]] = {}
    keys = reader.keys()[:n_images] if n_images > 0 else reader.keys()
    for i, (image_id, view_key) in enumerate(keys):
        item = ViewDataset.from_pairs(dataset, [(image_id, views[view_key])])[0]
        batch = collate([item])
        gt = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        _, (live,) = live_records(teacher, batch["images"].to(device), batch["image_sizes"], gt, targets)
        cached = reader.get(image_id, view_key)["arrays"]
        for name, tensor in live.items():
            family = name.split(".")[0]
            if family not in ("fpn", "cls", "box", "quality", "cand") or name in ("cand.index", "cand.offsets"):
                continue
            per_family.setdefault(family, []).append(compare(family, cached[name], tensor, seed=i))
    return {
        family: {
            "cosine": float(np.mean([r["cosine"] for r in rows])),
            "max_abs_error": float(np.max([r["max_abs_error"] for r in rows])),
            "rel_kd_loss_error": float(np.mean([r["rel_kd_loss_error"] for r in rows])),
            "arrays": len(rows),
        }
        for family, rows in sorted(per_family.items())
    }
