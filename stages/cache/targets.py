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
  tower.{branch} [I, L, 3, C] float32: (count, sum, sum of squares) per channel of the head tower's
                 pre-activation at layer i, over the valid cells of FPN level l, so stage 2 forms
                 CrossKD's per-level batch mean and unbiased std (official `align_scale` runs level by
                 level). One array per branch (the packed layout); caches in the per-layer layout
                 hold the same moments as
                 tower.{branch}.{i}.{l} [3, C] plus the pooled tower.{branch}.{i} [3, C], 2 x I x (L + 1)
                 small blobs per record (48 for a COCO-shaped RetinaNet) that cost a loader worker ~0.8 ms
                 of its ~4 ms per record in framing alone; `stages.distill.teacher_source` reads both.
                 Summed in float64, stored in float32 (older caches hold float64; both
                 read alike, stage 2 sums the batch in float64): on a COCO-shaped teacher at 800x1344
                 the std it gives moves by 1.3e-6 (relative) at most, the tower stats of a record
                 shrink from 186 to 100 kB (bench.realscale coco-synth20: 1.38 -> 1.30 MB), and a CUDA
                 teacher's bf16 maps hold less precision than float32 anyway
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from stages.cache import device_codecs
from stages.detectors.contract import DetectorOutput, flatten_levels
from stores.codecs import CodecChain

DENSE_TARGETS = ("fpn", "cls", "box", "quality")
PER_IMAGE_TARGETS = DENSE_TARGETS + ("detections", "candidates", "tower_stats")
STATIC_TARGETS = ("head",)
ALL_TARGETS = PER_IMAGE_TARGETS + STATIC_TARGETS


def valid_cells(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    return math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride)


def device_prepare(x: Tensor, chain: CodecChain, classes: int | None = None,
                   score: Tensor | None = None, basis=None) -> dict[str, Tensor]:
    """Codec parts of `x` computed on x's device; the same parts as `stores.codecs.prepare`
    (names, dtypes, rounding: bit for bit, tests hold the two to each other) so
    `stores.codecs.pack` frames them after the host copy. Sparse indices are int32 (int64 past
    2**31 elements); `parts_to_numpy` makes them uint32 as `pack` expects.

    int8c: [C, ...] -> q int8 [C, ...] (round half to even of x / scale) and scale float32 [C]
    (max |x| / 127 per channel, 1 for an all-zero channel); a 0-d array is one channel.
    topk / mask / pca: `stages.cache.device_codecs` (`classes` and `score` as in
    `stores.codecs.prepare`; `stores.base.codec_inputs` picks them). zfp is a host transform:
    the float32 map itself is returned and `pack` codes it.
    """
    if chain.transform == "raw" or not x.is_floating_point():
        return {"data": x}
    x = x.float()
    if chain.transform == "cpca":  # `basis`: the cache's (numpy, or a device_codecs.DeviceBasis)
        return device_codecs.cpca_prepare(x, basis, float(chain.param[1]))
    if chain.transform in ("topk", "mask", "pca", "pcas", "zfp", "sz"):
        return _compact_prepare(x, chain, classes, score)
    if chain.transform == "fp16":
        return {"data": x.half()}
    if chain.transform == "bitround":
        drop = 23 - int(chain.param)
        if drop <= 0:
            return {"data": x}
        bits = x.contiguous().view(torch.int32)
        bits = bits + ((bits >> drop) & 1) + ((1 << (drop - 1)) - 1)  # round half to even on the mantissa
        return {"data": (bits & ~((1 << drop) - 1)).view(torch.float32)}
    if chain.transform == "int8c":
        channels = x.shape[0] if x.dim() else 1
        flat = x.reshape(channels, -1)
        if flat.shape[1] == 0:
            amax = flat.new_zeros(channels)
        else:
            amax = flat.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return {"q": q.reshape(x.shape), "scale": scale}
    if chain.transform == "sparse":
        flat = x.reshape(-1)
        threshold = torch.tensor(chain.param, dtype=torch.float32, device=x.device)  # compared in float32, as numpy
        idx = torch.nonzero(flat >= threshold).flatten()
        return {"idx": idx.to(torch.int32 if flat.numel() < 2**31 else torch.int64), "val": flat[idx].half()}
    if chain.transform == "u8p":
        return {"q": torch.round(x.clamp(0, 1) * 255).to(torch.uint8)}
    raise ValueError(f"unknown transform {chain.transform}")


def _compact_prepare(x: Tensor, chain: CodecChain, classes: int | None, score: Tensor | None) -> dict[str, Tensor]:
    if chain.transform == "topk":
        return device_codecs.topk_prepare(x, chain.param[0], chain.param[1], classes)
    if chain.transform == "mask":
        return device_codecs.mask_prepare(x, float(chain.param), score)
    if chain.transform == "pca":
        return device_codecs.pca_prepare(x, int(chain.param))
    if chain.transform == "pcas":
        return device_codecs.pcas_prepare(x, int(chain.param[0]), float(chain.param[1]))
    return {"data": x.contiguous()}  # zfp, sz: coded by stores.codecs.pack on the host


def parts_to_numpy(parts: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Host copies of device parts with the dtypes `pack` expects (sparse indices are uint32)."""
    out = {k: v.cpu().numpy() for k, v in parts.items()}
    if "idx" in out:
        if out["idx"].size and int(out["idx"][-1]) >= 2**32:
            raise ValueError(f"sparse: index {int(out['idx'][-1])} exceeds the uint32 range of the blob format")
        out["idx"] = out["idx"].astype(np.uint32)
    return out


def _crop(m: Tensor, b: int, hw: tuple[int, int]) -> Tensor:
    return m[b, :, : hw[0], : hw[1]]


def tower_moments(out: DetectorOutput, b: int) -> dict[str, Tensor]:
    """tower.{branch}: [I, L, 3, C] (count, sum, sumsq) per channel of every pre-activation tower
    layer i over image b's valid cells of each level l (a branch without layers gives nothing)."""
    stats = {}
    for branch, tower in (("cls", out.cls_tower), ("reg", out.reg_tower)):
        layers = []
        for levels in tower.pre:
            per_level = []
            for m, s in zip(levels, out.strides):
                x = _crop(m, b, valid_cells(out.image_sizes[b], s)).flatten(1).double()
                count = torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64, device=x.device)
                per_level.append(torch.stack([count, x.sum(1), (x * x).sum(1)]))
            layers.append(torch.stack(per_level))
        if layers:
            stats[f"tower.{branch}"] = torch.stack(layers).float()  # float32: see the table
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
