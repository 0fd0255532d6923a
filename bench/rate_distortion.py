"""Rate-distortion of the codec chains: bytes per image, encode/decode speed, fidelity against the
live teacher, including the error each KD method's loss would see.

For every (image, view) record of the benchmark set the live teacher's targets are extracted as
stage 1 would (`stages.distill.teacher_source.live_records`, before any codec). Then, for each target
family (fpn, cls, box) and each chain of `stores.codecs.CODEC_CHAINS_FOR_BENCH`:

  KB/image       encoded bytes of the family's arrays per record (mean), and raw float32 KB
  enc/dec MB/s   float32 megabytes per second through `stores.codecs.encode` / `decode`, one
                 thread (blosc too): per core. Chains are timed in rotating order each round.
  cosine         cosine similarity of decoded vs live (all levels of a record flattened), mean
  max abs err    largest |decoded - live| over all records
  KD-loss error  |L_cached - L_live| / |L_live| for each KD method that reads the family, the real
                 loss modules (`stages.losses.registry.build_kd_losses`, weight 1) on a small seeded
                 student (the scale's student; train mode, as in a step); teacher targets batched
                 by `records_to_targets` from the live records with only this family decoded

The compact chains (`COMPACT_CHAINS`), per family: fpn pcaK (per-level channel PCA, int8 coefficients),
pcaKsS (the same basis, one quantiser step S * rms per level, int16 codes, best with the pcodec
stage ``+pco``), zfpT (ZFP fixed accuracy, numcodecs ZFPY), szT (SZ3 absolute bound, pysz) and
pcodec as the lossless stage of raw / bitround maps (`PCO_CHAINS`); cls topkKfF (per-anchor top-K classes above F, logit-domain uint8,
explicit background); box maskT (only cells whose class score >= T; the record's live class map is
the score). Encoded with the side inputs stage 1 gives them (`stores.base.codec_inputs`).

`sparse*`, `u8p` and `topk*` transforms are defined for probability maps: they run on cls only;
`mask*` runs on box only.
An untrained RetinaNet predicts its 0.01 prior almost everywhere, so its class maps are not sparse;
the extra `cls (trained-like)` rows run the same chains on synthetic maps with trained-detector
statistics (`bench.synth_targets`) standing in for the teacher's class maps: same shapes, same
student and other targets, the KD-loss error measured against the synthetic maps.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time
from typing import Any

import numpy as np
import torch

from bench.common import (
    Settings,
    md_table,
    median,
    print_table,
    write_result,
)
from bench.fixtures import CACHE_CODECS, Fixture, measure_archs
from bench.synth_targets import class_probs
from stages.cache.plan import plan_records
from stages.cache.worker import block_batches
from stages.config import DistillParams, to_dict
from stages.data.batching import ViewDataset, collate
from stages.data.coco import CocoDataset
from stages.detectors.build import build_detector, load_detector
from stages.distill.run import loss_context, run_from_index
from stages.distill.teacher_source import live_records, records_to_targets
from stages.losses.registry import build_kd_losses
from stores.base import codec_inputs
from stores.codecs import CODEC_CHAINS_FOR_BENCH, decode, encode, parse_chain

NAME = "rate_distortion"
FAMILIES = ("fpn", "cls", "box")
PROBABILITY_ONLY = ("sparse", "u8p", "topk")
BOX_ONLY = ("mask",)
COMPACT_CHAINS = ["pca8+zstd", "pca16+zstd", "pca32+zstd", "pca64+zstd", "zfp0.05+none", "zfp0.01+none",
                  "pca64s0.5+pco", "pca64s0.3+pco", "pca64s0.2+pco", "pca64s0.1+pco", "pca64s0.3+zstd",
                  "pca256s0.3+pco", "sz0.01+none", "sz0.003+none", "sz0.001+none",
                  "topk1f0.01+zstd", "topk2f0.01+zstd", "topk2f0.02+zstd", "topk3f0.005+zstd", "topk1f0.05+zstd",
                  "topk9f0.002+zstd",
                  "mask0.01+zstd", "mask0.05+zstd", "mask0.1+zstd"]
FAMILY_TRANSFORMS = {"fpn": ("pca", "pcas", "zfp", "sz"), "cls": ("topk",), "box": ("mask",)}
# pcodec as the lossless stage of the float chains (numcodecs.PCodec; pcaKsS+pco is in COMPACT_CHAINS)
PCO_CHAINS = ["raw+pco", "bitround10+pco", "bitround7+pco"]
# every registry loss that reads fpn/cls/box; rm reads candidate scores only (stored exactly)
METHODS = ("mse", "cosine", "ssim", "cskd", "pfi", "crosskd")
LIVE_TARGETS = ["fpn", "cls", "box", "candidates", "tower_stats"]
MIN_TIMED_S = 0.02  # repeat a measurement until it lasts this long (sub-ms timings are noise)


def applicable(family: str, chain: str) -> bool:
    t = parse_chain(chain).transform
    if t in BOX_ONLY:
        return family.startswith("box")
    return t not in PROBABILITY_ONLY or family.startswith("cls")


def chains_for(family: str) -> list[str]:
    """The old chains that apply to `family`, then the compact chains of its own transforms."""
    base = family.split(" ")[0]
    old = [c for c in CODEC_CHAINS_FOR_BENCH if applicable(base, c)]
    new = [c for c in COMPACT_CHAINS if parse_chain(c).transform in FAMILY_TRANSFORMS.get(base, ())
           and (parse_chain(c).transform != "sz" or importlib.util.find_spec("pysz"))]  # sz: optional extra
    return old + (PCO_CHAINS if base == "fpn" else []) + new


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


class LiveSet:
    """The benchmark records under the live teacher, batched as stage 2 batches them, plus the
    student outputs and each method's loss against the live targets."""

    def __init__(self, fix: Fixture, device: torch.device):
        self.device = device
        dataset = CocoDataset(fix.images_dir, fix.ann_file)
        views = {v.key: v for v in fix.views}
        plan = plan_records(dataset.image_ids, list(fix.views), 0, 0)
        teacher = load_detector(fix.checkpoint).to(device).eval()
        torch.manual_seed(1)
        student = build_detector(fix.student_cfg, dataset.num_classes).to(device).train()
        t_arch = to_dict(fix.teacher_cfg)
        ctx = loss_context(student, t_arch, teacher.num_classes, teacher.box_dim, teacher.has_quality)
        distill = DistillParams()
        self.losses = {}
        for method in METHODS:
            torch.manual_seed(2)  # adapters / assistant branch: the same weights for live and cached
            self.losses[method] = build_kd_losses({method: 1.0}, ctx, distill).to(device).train()
        self.needs = {m: sorted(k.needs()) for m, k in self.losses.items()}
        self.head = teacher.head
        self.num_classes = teacher.num_classes
        self.index = run_from_index(distill, fix.teacher_cfg.arch, fix.teacher_cfg.head_convs)
        self.strides = list(student.strides)
        self.batches: list[dict[str, Any]] = []
        items = ViewDataset.from_pairs(dataset, plan)
        with torch.no_grad():
            for positions in block_batches(plan, views, dataset, fix.batch_size):
                batch = collate([items[p] for p in positions])
                images = batch["images"].to(device)
                gt = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
                _, records = live_records(teacher, images, batch["image_sizes"], gt, LIVE_TARGETS)
                out = student(images, batch["image_sizes"])
                item = {"padded": tuple(images.shape[-2:]), "gt": gt, "records": records, "student": out,
                        "numpy": [{n: t.float().cpu().numpy() for n, t in r.items()} for r in records]}
                item["live_loss"] = {m: self.loss(m, item, records) for m in METHODS}
                self.batches.append(item)

    @torch.no_grad()
    def loss(self, method: str, item: dict, records: list[dict[str, torch.Tensor]]) -> float:
        targets = records_to_targets(records, item["padded"], self.strides, self.head, self.index)
        return float(self.losses[method](item["student"], targets, item["gt"])["kd_total"])

    def replaced(self, family: str, arrays: list[list[tuple[str, np.ndarray]]]) -> LiveSet:
        """A copy whose live records carry `arrays` (per record, as `family_arrays`) for `family`,
        with every method's live loss recomputed against them."""
        other = copy.copy(self)
        other.batches, k = [], 0
        for item in self.batches:
            new = dict(item, records=[dict(r) for r in item["records"]], numpy=[dict(r) for r in item["numpy"]])
            for rec, rec_np in zip(new["records"], new["numpy"]):
                for name, arr in arrays[k]:
                    if name.split(".")[0] != family or name not in rec:
                        raise ValueError(f"replaced({family!r}): {name!r} is not a {family} array of record {k}")
                    rec[name] = torch.from_numpy(arr).to(self.device)
                    rec_np[name] = arr
                k += 1
            new["live_loss"] = {m: self.loss(m, new, new["records"]) for m in METHODS}
            other.batches.append(new)
        return other

    def family_arrays(self, family: str) -> list[list[tuple[str, np.ndarray]]]:
        """Per record: [(name, live float32 array)] of one family, levels in order."""
        out = []
        for item in self.batches:
            for rec in item["numpy"]:
                out.append(sorted(((n, a) for n, a in rec.items() if n.split(".")[0] == family),
                                  key=lambda kv: int(kv[0].split(".")[1])))
        return out


def _timed(fn) -> tuple[float, int]:
    """(seconds per call, calls) with enough calls to last MIN_TIMED_S."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = max(1, min(50, math.ceil(MIN_TIMED_S / max(first, 1e-6))))
    if reps == 1:
        return first, 1
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps, reps


def measure_family(records: list[list[tuple[str, np.ndarray]]], chains: list[str], rounds: int,
                   live: LiveSet | None = None, family: str = "",
                   inputs: list[list[dict]] | None = None) -> dict[str, Any]:
    """Sizes, speeds and fidelity of each chain on one family's arrays (`records`); `inputs`: per
    record, per array, the transform's side inputs (`stores.base.codec_inputs`)."""
    inputs = inputs or [[{} for _ in rec] for rec in records]
    raw_bytes = sum(a.size * 4 for rec in records for _, a in rec)
    out: dict[str, Any] = {"records": len(records), "raw_kb_per_image": raw_bytes / len(records) / 1e3,
                           "chains": {}}
    blobs: dict[str, list[list[bytes]]] = {}
    for chain in chains:
        encoded = [[encode(a, chain, **kw) for (_, a), kw in zip(rec, kws)] for rec, kws in zip(records, inputs)]
        blobs[chain] = encoded
        cos, max_err = [], 0.0
        decoded_records = []
        for rec, rec_blobs in zip(records, encoded):
            dec = [decode(b) for b in rec_blobs]
            decoded_records.append(dec)
            cos.append(_cosine(np.concatenate([a.ravel() for _, a in rec]), np.concatenate([d.ravel() for d in dec])))
            max_err = max(max_err, max(float(np.max(np.abs(d - a))) if a.size else 0.0 for (_, a), d in zip(rec, dec)))
        row = {
            "kb_per_image": sum(len(b) for rec in encoded for b in rec) / len(records) / 1e3,
            "cosine_mean": float(np.mean(cos)),
            "cosine_min": float(np.min(cos)),
            "max_abs_error": max_err,
            "live_abs_max": max(float(np.max(np.abs(a))) for rec in records for _, a in rec),
        }
        row["compression"] = out["raw_kb_per_image"] / row["kb_per_image"]
        if live is not None:
            row["kd_loss_rel_error"] = _kd_errors(live, family, decoded_records)
        out["chains"][chain] = row
    # speed: every round times every chain, in rotating order
    enc: dict[str, list[float]] = {c: [] for c in chains}
    dec: dict[str, list[float]] = {c: [] for c in chains}
    arrays = [(a, kw) for rec, kws in zip(records, inputs) for (_, a), kw in zip(rec, kws)]
    for r in range(rounds):
        shift = r % len(chains)
        for chain in chains[shift:] + chains[:shift]:
            flat_blobs = [b for rec in blobs[chain] for b in rec]
            enc[chain].append(_timed(lambda chain=chain: [encode(a, chain, **kw) for a, kw in arrays])[0])
            dec[chain].append(_timed(lambda fb=flat_blobs: [decode(b) for b in fb])[0])
    for chain in chains:
        row = out["chains"][chain]
        row["encode_mb_s"] = raw_bytes / 1e6 / median(enc[chain])
        row["decode_mb_s"] = raw_bytes / 1e6 / median(dec[chain])
    return out


def _kd_errors(live: LiveSet, family: str, decoded: list[list[np.ndarray]]) -> dict[str, float]:
    """Mean over batches of |L_cached - L_live| / |L_live| for the methods reading `family`."""
    methods = [m for m in METHODS if family in live.needs[m]]
    errors: dict[str, list[float]] = {m: [] for m in methods}
    k = 0
    for item in live.batches:
        cached = []
        for rec in item["records"]:
            names = sorted((n for n in rec if n.split(".")[0] == family), key=lambda n: int(n.split(".")[1]))
            swapped = dict(rec)
            for name, arr in zip(names, decoded[k]):
                swapped[name] = torch.from_numpy(arr).to(live.device)
            cached.append(swapped)
            k += 1
        for m in methods:
            lc, ll = live.loss(m, item, cached), item["live_loss"][m]
            errors[m].append(abs(lc - ll) / max(abs(ll), 1e-12))
    return {m: float(np.mean(v)) for m, v in errors.items()}


def measure_arch(fix: Fixture, settings: Settings, device: torch.device) -> dict[str, Any]:
    live = LiveSet(fix, device)
    out: dict[str, Any] = {"records": sum(len(b["records"]) for b in live.batches),
                           "methods": {m: live.needs[m] for m in METHODS},
                           "live_loss": {m: float(np.mean([b["live_loss"][m] for b in live.batches]))
                                         for m in METHODS},
                           "families": {}}
    for family in FAMILIES:
        arrays = live.family_arrays(family)
        out["families"][family] = measure_family(arrays, chains_for(family), settings.rounds, live, family,
                                                 side_inputs(live, arrays))
    # trained-like class maps: the cls shapes of the same records, synthetic contents standing in
    # for the teacher's (the student and the other targets stay the live ones)
    rng = np.random.default_rng(0)
    synth = [[(n, class_probs(rng, a.shape)) for n, a in rec] for rec in live.family_arrays("cls")]
    trained_like = live.replaced("cls", synth)
    out["families"]["cls (trained-like)"] = measure_family(synth, chains_for("cls"), settings.rounds,
                                                           trained_like, "cls", side_inputs(trained_like, synth))
    # box masked by the trained-like class maps (the live box maps, the synthetic scores)
    box = live.family_arrays("box")
    out["families"]["box (trained-like scores)"] = measure_family(box, chains_for("box"), settings.rounds,
                                                                  trained_like, "box", side_inputs(trained_like, box))
    return out


def side_inputs(live: LiveSet, arrays: list[list[tuple[str, np.ndarray]]]) -> list[list[dict]]:
    """Per record, per array: the side inputs stage 1 passes (class count; the level's class map)."""
    records = [rec for item in live.batches for rec in item["numpy"]]
    return [[codec_inputs(name, rec, live.num_classes) for name, _ in arrs] for rec, arrs in zip(records, arrays)]


def summary_md(result: dict) -> str:
    parts = []
    for arch, r in result["results"]["archs"].items():
        for family, f in r["families"].items():
            base = family.split(" ")[0]
            methods = [m for m in METHODS if base in r["methods"][m]]
            rows = []
            for chain, c in f["chains"].items():
                mark = " ★" if CACHE_CODECS.get(base) == chain and "(" not in family else ""
                kd = [c.get("kd_loss_rel_error", {}).get(m, float("nan")) for m in methods]
                rows.append([chain + mark, c["kb_per_image"], c["compression"], c["encode_mb_s"], c["decode_mb_s"],
                             c["cosine_mean"], c["max_abs_error"], *kd])
            headers = ["chain", "KB/image", "x smaller", "enc MB/s", "dec MB/s", "cosine", "max abs err",
                       *[f"Δ{m}" for m in methods]]
            parts.append(f"**{arch} · {family}** (raw float32 {f['raw_kb_per_image']:.1f} KB/image, "
                         f"{f['records']} records)\n\n" + md_table(headers, rows))
    return ("\n\n".join(parts) + "\n\n★ = the demo profile's chain. Δmethod = relative KD-loss error "
            "|L_cached − L_live| / |L_live| of that method's loss (mean over batches); max abs err in the map's "
            "own units (the live maps' largest |value| is in the JSON). MB/s are raw float32 megabytes per "
            "second on one core. Untrained-teacher caveat for cls: see README.")


def main(argv: list[str] | None = None) -> dict:
    settings, env, out, t0 = measure_archs(NAME, __doc__, argv, measure_arch)
    for arch, r in out["archs"].items():
        for family, f in r["families"].items():
            rows = [[c, v["kb_per_image"], v["encode_mb_s"], v["decode_mb_s"], v["cosine_mean"], v["max_abs_error"],
                     max(v.get("kd_loss_rel_error", {}).values(), default=float("nan"))]
                    for c, v in f["chains"].items()]
            print_table(f"{NAME} {arch} {family} ({settings.scale.name})",
                        ["chain", "KB/image", "enc MB/s", "dec MB/s", "cosine", "max abs err", "worst KD-loss rel err"],
                        rows)
    path = write_result(NAME, settings, env, out, time.perf_counter() - t0)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
