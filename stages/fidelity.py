"""How exact is a cache? Decoded records against a live teacher re-run on the same inputs.

It compares the two stages (stage 1's records, decoded through stage 2's teacher source), so it
sits above both packages: stages.cache and stages.distill never import it.

Per target family: mean cosine similarity, max abs error, and the relative error of a KD loss
computed against the cached instead of the live target. The KD losses use a fixed proxy student
(the live target plus 10% seeded noise), so the figure answers "how much would a student's loss
move if it trained on this cache": feature MSE for fpn, soft-target BCE (the QFL-KD core) for
cls/quality, L1 for box, and the softmax-KL of Rank Mimicking for candidate scores.

Gradient fidelity, what a student actually feels: for each real KD loss (built by the
caller through `stages.losses.registry.build_kd_losses`, so it is the training code's loss), the
loss and its gradient with respect to the student's outputs (every FPN / tower / dense map of
`DetectorOutput`, made leaves by `leaf_outputs`) are computed once with live teacher targets and
once with the same records after the cache's codecs (`roundtrip`: `stores.encode_record` then the
numpy reference `decode_record`, which the device decode must match exactly). `gradient_fidelity`
gives the gradient cosine and the relative loss error per method; `measure_gradient_fidelity`
runs it over batches and aggregates min cosine / max error, bytes per record and per-target
cosine / max abs error (`target_errors`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.data.batching import ViewDataset, collate
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.detectors.contract import DetectorOutput, TowerFeatures
from stages.distill.teacher_source import cached_records_to_device, live_records, records_to_targets
from stores.base import decode_record, encode_record
from stores.cache_basis import CacheBases


def _proxy(live: torch.Tensor, seed: int) -> torch.Tensor:
    """The fixed proxy student: `live` (float64) plus seeded noise of 10% of the values' RMS.

    Why the RMS and not the std: the relative KD-loss error divides by the proxy's own loss, which
    scales with the noise squared, so the proxy must sit a meaningful distance from the teacher. A
    flat target (an untrained teacher's candidate scores, all 0.0100004 +- 7e-6: its prior) has a
    std near its float32 resolution; a std-sized proxy is then within round-off of the teacher and
    the ratio measures round-off (the 2e-8 between a batched and a single-image forward reads as a
    37% loss error). The RMS (>= std, >= |mean|) keeps the std-sized proxy where the values vary
    and floors it at the values' own magnitude where they do not."""
    g = torch.Generator().manual_seed(seed)
    spread = live.double().square().mean().sqrt().clamp_min(1e-6)
    return live.double() + 0.1 * spread * torch.randn(live.shape, generator=g).double()


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
    # float64: a KL of near-uniform softmaxes is ~1e-6, and float32 log-softmaxes (~-3, ulp 2e-7) would
    # put their own round-off into the loss difference; the inputs are float32, so this adds nothing to them.
    c = torch.from_numpy(np.asarray(cached, dtype=np.float32)).double().flatten()
    t = live.detach().float().cpu().double().flatten()
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


# ------------------------------------------------------------------------------------------------
# gradient fidelity: the real KD losses, live vs cached targets, gradient w.r.t. the student's outputs


def leaf_outputs(out: DetectorOutput) -> tuple[DetectorOutput, list[Tensor]]:
    """A copy of `out` whose maps (fpn, tower pre/post, cls, box, quality) are detached leaves that
    require grad, and the list of those leaves: d loss / d leaf is the gradient w.r.t. the student's
    outputs (what reaches the student's weights through its own backward, unchanged by the codec)."""
    leaves: list[Tensor] = []

    def leaf(t: Tensor) -> Tensor:
        x = t.detach().requires_grad_(True)
        leaves.append(x)
        return x

    def tower(t: TowerFeatures) -> TowerFeatures:
        return TowerFeatures(pre=[[leaf(m) for m in lv] for lv in t.pre], post=[[leaf(m) for m in lv] for lv in t.post])

    copy = dataclasses.replace(
        out, fpn=[leaf(m) for m in out.fpn], cls_tower=tower(out.cls_tower), reg_tower=tower(out.reg_tower),
        cls_logits=[leaf(m) for m in out.cls_logits], box_reg=[leaf(m) for m in out.box_reg],
        quality=[leaf(m) for m in out.quality])
    return copy, leaves


def roundtrip(records: list[dict[str, Tensor]], codecs: Mapping[str, str], num_classes: int,
              sink: list | None = None, bases: Mapping[str, np.ndarray] | None = None,
              ) -> tuple[list[dict[str, int]], list[dict[str, Tensor]]]:
    """Each live record encoded as stage 1 stores it, and decoded back onto the records' device.
    Returns (per record {target name: stored bytes}, decoded records); the `stores.EncodedRecord`s
    are appended to `sink` when given (e.g. to write a store of them). `bases`: the PCA bases by
    target name that cpca chains code against (`stores.cache_basis`; fitted on other images)."""
    sizes, decoded = [], []
    attach = CacheBases(bases) if bases else None
    for rec in records:
        device = next(iter(rec.values())).device
        arrays = {name: t.detach().cpu().numpy() for name, t in rec.items()}
        enc = encode_record(0, "fidelity", {}, arrays, codecs, num_classes, bases)
        sizes.append({name: len(blob) for name, blob in enc.blobs.items()})
        if sink is not None:
            sink.append(enc)
        decoded.append(cached_records_to_device([decode_record(enc, bases=attach).arrays], device)[0])
    return sizes, decoded


def _family(name: str) -> str:
    return name.split(".")[0] if not name.startswith("tower.") else "tower"


def target_errors(live: list[dict[str, Tensor]], cached: list[dict[str, Tensor]]) -> dict[str, dict[str, float]]:
    """Per target family: min over records of the cosine (a record's levels flattened together) and the
    max abs error, for every float target (integer targets are stored exactly)."""
    out: dict[str, dict[str, float]] = {}
    for rec_l, rec_c in zip(live, cached):
        by_family: dict[str, list[tuple[Tensor, Tensor]]] = {}
        for name, t in rec_l.items():
            if t.is_floating_point() and name in rec_c:
                by_family.setdefault(_family(name), []).append((t.double().flatten(), rec_c[name].double().flatten()))
        for family, pairs in by_family.items():
            a = torch.cat([p[0] for p in pairs])
            b = torch.cat([p[1] for p in pairs])
            cos = _cos(torch.dot(a, b), a.norm() ** 2, b.norm() ** 2)
            err = float((a - b).abs().max()) if a.numel() else 0.0
            row = out.setdefault(family, {"cosine_min": 1.0, "max_abs_error": 0.0, "live_abs_max": 0.0})
            row["cosine_min"] = min(row["cosine_min"], cos)
            row["max_abs_error"] = max(row["max_abs_error"], err)
            row["live_abs_max"] = max(row["live_abs_max"], float(a.abs().max()) if a.numel() else 0.0)
    return out


def _cos(dot: Tensor | float, na2: Tensor | float, nb2: Tensor | float) -> float:
    """Cosine from a dot product and squared norms; 1 when both vectors are zero, 0 when one is."""
    na2, nb2 = float(na2), float(nb2)
    if na2 == 0 or nb2 == 0:
        return 1.0 if na2 == nb2 else 0.0
    return float(dot) / (na2 ** 0.5 * nb2 ** 0.5)


def gradient_fidelity(kd: Mapping[str, nn.Module], student_out: DetectorOutput, live, cached,
                      gt: list[dict[str, Tensor]]) -> dict[str, dict[str, float]]:
    """Per method (`kd`: name -> a KDLosses module of that one method): the KD loss with live and with
    cached `TeacherTargets`, its relative error and the cosine between the two gradients w.r.t. the
    student's outputs (all maps of `leaf_outputs`, as one vector)."""
    out_leaf, leaves = leaf_outputs(student_out)
    results = {}
    for method, loss in kd.items():
        values, grads = {}, {}
        for side, targets in (("live", live), ("cached", cached)):
            value = loss(out_leaf, targets, gt)["kd_total"]
            values[side] = float(value.detach())
            grads[side] = (torch.autograd.grad(value, leaves, allow_unused=True) if value.requires_grad
                           else [None] * len(leaves))
        dot, n_live, n_cached = 0.0, 0.0, 0.0
        for g_l, g_c in zip(grads["live"], grads["cached"]):
            if g_l is not None:
                n_live += float((g_l.double() ** 2).sum())
            if g_c is not None:
                n_cached += float((g_c.double() ** 2).sum())
            if g_l is not None and g_c is not None:
                dot += float((g_l.double() * g_c.double()).sum())
        live_v = values["live"]
        results[method] = {
            "grad_cosine": _cos(dot, n_live, n_cached),
            "loss_rel_err": abs(values["cached"] - live_v) / max(abs(live_v), 1e-12),
            "loss_live": live_v,
            "loss_cached": values["cached"],
            "grad_norm_live": n_live ** 0.5,
        }
    return results


def measure_gradient_fidelity(teacher: nn.Module, student: nn.Module, kd: Mapping[str, nn.Module],
                              batches: Iterable[dict], codec_sets: Mapping[str, Mapping[str, str]],
                              targets: list[str], reuse_index: int, sinks: Mapping[str, list] | None = None,
                              bases: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> dict:
    """Gradient and target fidelity of each codec set (name -> {family: chain}, or a callable
    (batch, live records) -> (per record {name: bytes}, cached records)) over `batches`
    ({"images" [B,3,H,W] on the device, "image_sizes", "targets": GT dicts on the device}). The
    teacher runs once per batch, the student once (in its current mode, no grad); every codec set is
    measured against the same live records and student outputs.

    Returns {set: {"grad_cosine": {method: min}, "loss_rel_err": {method: max}, "per_batch": [...],
    "targets": {family: cosine_min / max_abs_error / live_abs_max}, "bytes_per_record": mean,
    "bytes_by_target": {family: mean bytes per record}, "records": n, "teacher_cls": mean fractions of
    class probabilities >= 0.01 / 0.05 / 0.5 and their max (a teacher at its prior has ~0)}}; a set's encoded records go to
    `sinks[set]` when given (see `roundtrip`); `bases[set]` are the PCA bases of a set's cpca chains."""
    state = {name: {"per_batch": [], "sizes": [], "errors": {}} for name in codec_sets}
    cls_stats: list[list[float]] = []  # how far the teacher's class maps are from its prior
    strides = list(student.strides)
    for batch in batches:
        images, image_sizes, gt = batch["images"], batch["image_sizes"], batch["targets"]
        padded = tuple(images.shape[-2:])
        _, live = live_records(teacher, images, image_sizes, gt, targets)
        with torch.no_grad():
            student_out = student(images, image_sizes)
        t_live = records_to_targets(live, padded, strides, teacher.head, reuse_index)
        for rec in live:
            probs = torch.cat([t.flatten() for n, t in rec.items() if n.startswith("cls.")])
            if probs.numel():
                cls_stats.append([float((probs >= 0.01).float().mean()), float((probs >= 0.05).float().mean()),
                                  float((probs >= 0.5).float().mean()), float(probs.max())])
        for name, codecs in codec_sets.items():
            st = state[name]
            if callable(codecs):  # the cached side comes from elsewhere (e.g. a store: cached_gradient_fidelity)
                rec_sizes, cached = codecs(batch, live)
            else:
                rec_sizes, cached = roundtrip(live, codecs, teacher.num_classes, (sinks or {}).get(name),
                                              (bases or {}).get(name))
            st["sizes"] += rec_sizes
            for family, row in target_errors(live, cached).items():
                agg = st["errors"].setdefault(family, dict(row))
                agg["cosine_min"] = min(agg["cosine_min"], row["cosine_min"])
                agg["max_abs_error"] = max(agg["max_abs_error"], row["max_abs_error"])
                agg["live_abs_max"] = max(agg["live_abs_max"], row["live_abs_max"])
            t_cached = records_to_targets(cached, padded, strides, teacher.head, reuse_index)
            st["per_batch"].append(gradient_fidelity(kd, student_out, t_live, t_cached, gt))
            del cached, t_cached
    teacher_cls = dict(zip(("frac_ge_0.01", "frac_ge_0.05", "frac_ge_0.5", "max"),
                           np.mean(cls_stats, axis=0).tolist() if cls_stats else []))
    return {name: _aggregate(st, list(kd)) | {"teacher_cls": teacher_cls} for name, st in state.items()}


def _aggregate(st: dict, methods: list[str]) -> dict:
    sizes, per_batch = st["sizes"], st["per_batch"]
    by_target: dict[str, float] = {}
    for rec in sizes:
        for name, n in rec.items():
            by_target[_family(name)] = by_target.get(_family(name), 0.0) + n / len(sizes)
    return {
        "grad_cosine": {m: min(b[m]["grad_cosine"] for b in per_batch) for m in methods},
        "loss_rel_err": {m: max(b[m]["loss_rel_err"] for b in per_batch) for m in methods},
        "per_batch": per_batch,
        "targets": st["errors"],
        "bytes_per_record": float(np.mean([sum(r.values()) for r in sizes])) if sizes else 0.0,
        "bytes_by_target": by_target,
        "records": len(sizes),
    }


def cached_gradient_fidelity(reader, teacher: nn.Module, student: nn.Module, kd: Mapping[str, nn.Module],
                             dataset: CocoDataset, n_images: int, device: torch.device, reuse_index: int) -> dict:
    """`measure_gradient_fidelity` of a cache: its first n records (one per batch) as the cached side,
    the live teacher re-run on the same (image, view) as the live side (`inspect_cache --fidelity`)."""
    fp = reader.manifest.fingerprint
    views = {View.from_dict(v).key: View.from_dict(v) for v in fp["views"]}
    targets = [t for t in fp["targets"] if t != "head"]
    batches = []
    for image_id, view_key in (reader.keys()[:n_images] if n_images > 0 else reader.keys()):
        b = collate([ViewDataset.from_pairs(dataset, [(image_id, views[view_key])])[0]])
        batches.append({"images": b["images"].to(device), "image_sizes": b["image_sizes"], "key": (image_id, view_key),
                        "targets": [{k: v.to(device) for k, v in t.items()} for t in b["targets"]]})

    def from_cache(batch, live):
        rec = reader.get_encoded(*batch["key"])
        return [{n: len(blob) for n, blob in rec.blobs.items()}], cached_records_to_device(
            [decode_record(rec, bases=reader.codec_bases()).arrays], device)

    out = measure_gradient_fidelity(teacher, student, kd, batches, {"cache": from_cache}, targets, reuse_index)
    return out["cache"]
