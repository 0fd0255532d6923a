"""Teacher outputs -> per-image cache records, on the teacher's device.

Everything that shrinks data (cropping to the image's valid cells, quantisation, sparsification)
runs here, on the GPU when there is one, *before* the device-to-host copy: only the compact
codec "parts" cross the bus. `stores.codecs.pack` then frames them on the host; the numpy
reference `stores.codecs.prepare` computes the same parts (tests hold the two to each other).

Record array names (per image, per view; maps cropped to the image's valid cells
h_l = ceil(h / stride_l), w_l = ceil(w / stride_l)):
  fpn.{l}        [C, h_l, w_l]        FPN level l (P3 + l)
  cls.{l}        [A*K, h_l, w_l]      sigmoid class probabilities
  box.{l}        [A*R, h_l, w_l]      raw box regression (GFL: distribution logits)
  quality.{l}    [A, h_l, w_l]        sigmoid quality/centerness (FCOS only)
  det.boxes [N, 4] xyxy view pixels, det.scores [N], det.labels [N] int64
  cand.index [M] int64, cand.score [M] float32, cand.offsets [G+1] int64: per-GT candidate
                 anchors (CSR over the image's GTs, in annotation order) and the teacher's score
                 at the GT class; indices address the flattened anchors of the image's padded size
  tower.{branch}.{i} [3, C] float64: (count, sum, sum of squares) per channel of the head tower's
                 pre-activation at layer i over valid cells, so stage 2 can form batch statistics
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from stages.detectors.contract import DetectorOutput, flatten_levels

DENSE_TARGETS = ("fpn", "cls", "box", "quality")
PER_IMAGE_TARGETS = DENSE_TARGETS + ("detections", "candidates", "tower_stats")
STATIC_TARGETS = ("head",)
ALL_TARGETS = PER_IMAGE_TARGETS + STATIC_TARGETS


def valid_cells(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    return math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride)


@dataclass(frozen=True)
class TransformSpec:
    """The device-side half of a codec chain (see stores.codecs): how a float map is shrunk."""

    kind: str  # raw | fp16 | bitround | int8c | sparse | u8p
    arg: float = 0.0

    @classmethod
    def from_chain(cls, chain: str) -> TransformSpec:
        head = chain.split("+", 1)[0]
        for kind in ("bitround", "int8c", "sparse", "u8p", "fp16", "raw"):
            if head.startswith(kind):
                rest = head[len(kind) :]
                return cls(kind, float(rest) if rest else 0.0)
        raise ValueError(f"codec chain {chain!r}: unknown transform {head!r}")


def device_prepare(x: Tensor, spec: TransformSpec) -> dict[str, Tensor]:
    """Codec parts of float map `x` computed on x's device; mirrors stores.codecs.prepare."""
    x = x.float()
    if spec.kind == "raw":
        return {"values": x}
    if spec.kind == "fp16":
        return {"values": x.half()}
    if spec.kind == "bitround":
        keep = int(spec.arg)
        bits = x.contiguous().view(torch.int32)
        drop = 23 - keep
        if drop <= 0:
            return {"values": x}
        # round half to even on the mantissa, like numcodecs.BitRound
        half = (1 << (drop - 1)) - 1
        mask = -(1 << drop)
        lsb = (bits >> drop) & 1
        return {"values": ((bits + half + lsb) & mask).view(torch.float32)}
    if spec.kind == "int8c":
        flat = x.reshape(x.shape[0], -1)
        scale = flat.abs().amax(dim=1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return {"q": q.reshape(x.shape), "scale": scale}
    if spec.kind == "sparse":
        flat = x.reshape(-1)
        idx = torch.nonzero(flat >= spec.arg).flatten()
        return {"idx": idx.to(torch.int32).view(torch.int32), "val": flat[idx].half()}
    if spec.kind == "u8p":
        return {"q": torch.round(x.clamp(0, 1) * 255).to(torch.uint8)}
    raise ValueError(f"unknown transform {spec.kind}")


def _crop(m: Tensor, b: int, hw: tuple[int, int]) -> Tensor:
    return m[b, :, : hw[0], : hw[1]]


def tower_moments(out: DetectorOutput, b: int) -> dict[str, Tensor]:
    """(count, sum, sumsq) per channel of every pre-activation tower layer over image b's valid cells."""
    stats = {}
    for branch, tower in (("cls", out.cls_tower), ("reg", out.reg_tower)):
        for i, levels in enumerate(tower.pre):
            cells = [
                _crop(m, b, valid_cells(out.image_sizes[b], s)).flatten(1).double()
                for m, s in zip(levels, out.strides)
            ]
            x = torch.cat(cells, dim=1)
            count = torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64, device=x.device)
            stats[f"tower.{branch}.{i}"] = torch.stack([count, x.sum(1), (x * x).sum(1)])
    return stats


def extract_records(
    out: DetectorOutput,
    targets: list[str],
    gt: list[dict[str, Tensor]],
    candidates: list[list[Tensor]] | None,
    num_classes: int,
) -> list[dict[str, Tensor]]:
    """Per image: {array name: tensor on the teacher's device} for the requested targets.

    `out` must come from a forward with `with_detections=True` if 'detections' is requested;
    `candidates` from `detector.candidates(out, gt)` if 'candidates' is requested.
    """
    records: list[dict[str, Tensor]] = [{} for _ in out.image_sizes]
    cls_flat = None
    if "candidates" in targets:
        cls_flat = flatten_levels(out.cls_logits, num_classes).sigmoid()  # [B, N, K]
    for b, size in enumerate(out.image_sizes):
        rec = records[b]
        hws = [valid_cells(size, s) for s in out.strides]
        if "fpn" in targets:
            rec.update({f"fpn.{lv}": _crop(m, b, hw) for lv, (m, hw) in enumerate(zip(out.fpn, hws))})
        if "cls" in targets:
            rec.update({f"cls.{lv}": _crop(m, b, hw).sigmoid() for lv, (m, hw) in enumerate(zip(out.cls_logits, hws))})
        if "box" in targets:
            rec.update({f"box.{lv}": _crop(m, b, hw) for lv, (m, hw) in enumerate(zip(out.box_reg, hws))})
        if "quality" in targets and out.quality:
            rec.update({f"quality.{lv}": _crop(m, b, hw).sigmoid() for lv, (m, hw) in enumerate(zip(out.quality, hws))})
        if "detections" in targets:
            det = out.detections[b]
            rec.update({"det.boxes": det["boxes"].float(), "det.scores": det["scores"].float(),
                        "det.labels": det["labels"].long()})
        if "candidates" in targets:
            labels = gt[b]["labels"]
            per_gt = candidates[b]
            lengths = torch.tensor([0] + [len(c) for c in per_gt], dtype=torch.int64)
            index = torch.cat(per_gt) if per_gt else torch.zeros(0, dtype=torch.int64, device=labels.device)
            gt_of = torch.repeat_interleave(torch.arange(len(per_gt), device=index.device), lengths[1:].to(index.device))
            rec["cand.index"] = index.long()
            rec["cand.score"] = cls_flat[b, index, labels[gt_of]].float()
            rec["cand.offsets"] = torch.cumsum(lengths, 0)
        if "tower_stats" in targets:
            rec.update(tower_moments(out, b))
    return records


def record_meta(image_id: int, view: str, image_size: tuple[int, int], padded: tuple[int, int], strides) -> dict:
    return {
        "image_id": int(image_id),
        "view": view,
        "image_size": [int(image_size[0]), int(image_size[1])],
        "padded_size": [int(padded[0]), int(padded[1])],
        "level_sizes": [list(valid_cells(image_size, s)) for s in strides],
    }
