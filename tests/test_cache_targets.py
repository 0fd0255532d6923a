"""Teacher outputs -> cache records: device-side codec parts equal the numpy reference bit for bit;
crops, candidates (CSR) and tower moments are what the teacher computed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.cache.targets import device_prepare, extract_records, parts_to_numpy, record_meta, valid_cells
from stages.detectors.contract import flatten_levels
from stores.codecs import CODEC_CHAINS_FOR_BENCH, effective_chain, encode, pack, parse_chain, prepare

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher

EXTRA_CHAINS = ["bitround1+zstd", "bitround23+zstd", "sparse1+zstd", "u8p+none", "int8c+none"]


def _tie_values(keepbits: int) -> np.ndarray:
    """float32 values whose dropped mantissa bits are exactly half a quantum (round-half-even ties)."""
    drop = 23 - keepbits
    if drop <= 0:
        return np.zeros(0, np.float32)
    mant = np.array([0, 1, 2, 3, 0x7F], dtype=np.int64) << drop | (1 << (drop - 1))
    bits = ((np.array([127, 130, 100], dtype=np.int64)[:, None] << 23) | mant[None, :]).ravel()
    vals = bits.astype(np.int32).view(np.float32)
    return np.concatenate([vals, -vals])


def _float_map() -> np.ndarray:
    """[8, 9, 11] features: mixed scales, an all-zero channel, int8c halfway ties, bitround ties,
    values past the fp16 range."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 9, 11)) * np.logspace(-3, 3, 8)[:, None, None]).astype(np.float32)
    x[2] = 0.0
    flat = x.reshape(8, -1)
    flat[3, :6] = [127.0, 2.5, -3.5, 0.5, -0.5, 126.5]  # scale 1: exact .5 ties for int8c
    ties = np.concatenate([_tie_values(7), _tie_values(10)])
    flat[4, : len(ties)] = ties
    flat[5, :2] = [70000.0, -1e6]  # fp16 overflow -> inf on both sides
    return x


def _prob_map() -> np.ndarray:
    """[6, 7, 5] probabilities with values exactly at the sparse thresholds and at 0 / 1 / u8p ties."""
    rng = np.random.default_rng(1)
    p = (1 / (1 + np.exp(-(rng.standard_normal((6, 7, 5)) * 3 - 3)))).astype(np.float32)
    flat = p.reshape(-1)
    flat[:8] = [0.01, 0.05, np.float32(0.01) * np.float32(0.999999), 0.0, 1.0, 0.5 / 255, 1.5 / 255, 0.049999]
    return p


def _near_ties(centres: np.ndarray, n: int, top: float) -> np.ndarray:
    """float32 `centres` and their neighbours one ulp up and down, padded with `top` to n values."""
    c = centres.astype(np.float32)
    x = np.concatenate([c, np.nextafter(c, np.float32(np.inf)), np.nextafter(c, np.float32(-np.inf))])
    return np.concatenate([x, np.full(n - len(x), top, np.float32)])


def _tie_map() -> np.ndarray:
    """[3, 768]: values within an ulp of the .5 rounding points of int8c (x / scale; dividing
    differs from multiplying by 1 / scale on ~10-20% of them) and of u8p (x * 255)."""
    k = np.arange(-126, 126, dtype=np.float32) + np.float32(0.5)
    rows = []
    for amax in (np.float32(1.7), np.float32(0.3)):
        scale = amax / np.float32(127)
        rows.append(_near_ties(k * scale, 768, amax))
    rows.append(_near_ties((np.arange(255, dtype=np.float32) + np.float32(0.5)) / np.float32(255), 768, 1.0))
    return np.stack(rows)


INPUTS = {"float": _float_map(), "prob": _prob_map(), "ties": _tie_map()}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 range, on purpose
@pytest.mark.parametrize("spec", CODEC_CHAINS_FOR_BENCH + EXTRA_CHAINS)
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_device_prepare_equals_numpy_prepare(spec, kind):
    x = INPUTS[kind]
    chain = parse_chain(spec)
    dev = parts_to_numpy(device_prepare(torch.from_numpy(x.copy()), chain))
    ref = prepare(x, chain)
    assert sorted(dev) == sorted(ref)
    for name in ref:
        assert dev[name].dtype == ref[name].dtype, name
        assert dev[name].shape == ref[name].shape, name
        assert dev[name].tobytes() == ref[name].tobytes(), f"{spec} {kind}: part {name} differs"
    # so the framed blob is byte-identical to the host-only path
    assert pack(dev, chain, x.shape, x.dtype) == encode(x, chain)


@pytest.mark.parametrize("spec", ["int8c+zstd", "fp16+zstd", "sparse0.01+zstd", "u8p+zstd", "bitround7+zstd"])
def test_device_prepare_edge_shapes_and_integers(spec):
    chain = parse_chain(spec)
    for x in (np.zeros((3, 0, 4), np.float32), np.float32(2.5).reshape(()), np.full((2, 1), -1.0, np.float32)):
        dev = parts_to_numpy(device_prepare(torch.from_numpy(np.array(x)), chain))
        assert pack(dev, chain, x.shape, x.dtype) == encode(x, chain), x.shape
    ints = np.arange(-5, 7, dtype=np.int64)  # integer arrays are stored raw whatever the chain says
    eff = effective_chain(ints, chain)
    dev = parts_to_numpy(device_prepare(torch.from_numpy(ints), eff))
    assert pack(dev, eff, ints.shape, ints.dtype) == encode(ints, chain)


def test_valid_cells_and_record_meta():
    assert valid_cells((100, 129), 8) == (13, 17)
    assert valid_cells((128, 128), 128) == (1, 1)
    meta = record_meta(7, "s96m128f0", (100, 129), (128, 256), [8, 16, 32, 64, 128])
    assert meta["level_sizes"] == [[math.ceil(100 / s), math.ceil(129 / s)] for s in (8, 16, 32, 64, 128)]
    assert meta["image_size"] == [100, 129] and meta["padded_size"] == [128, 256] and meta["image_id"] == 7


@pytest.fixture(scope="module")
def live(tiny_teacher):
    """A two-image batch of different sizes in one padded 128x128 input, and its records."""
    from stages.detectors.build import load_detector

    teacher = load_detector(tiny_teacher).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 128, 128, generator=g)
    sizes = [(100, 121), (128, 70)]
    gt = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 30.0, 110.0, 95.0], [0.0, 0.0, 30.0, 20.0]]),
         "labels": torch.tensor([1, 4, 0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no GT: empty CSR
    ]
    targets = ["fpn", "cls", "box", "quality", "detections", "candidates", "tower_stats"]
    with torch.no_grad():
        out = teacher(images, sizes, with_detections=True)
        cands = teacher.candidates(out, gt)
        records = extract_records(out, targets, gt, cands, teacher.num_classes)
    return teacher, out, gt, cands, records


def test_records_are_crops_of_the_teacher_maps(live):
    teacher, out, _, _, records = live
    assert len(records) == 2
    for b, rec in enumerate(records):
        h, w = out.image_sizes[b]
        for lv, s in enumerate(out.strides):
            hl, wl = math.ceil(h / s), math.ceil(w / s)
            assert rec[f"fpn.{lv}"].shape == (16, hl, wl)
            torch.testing.assert_close(rec[f"fpn.{lv}"], out.fpn[lv][b, :, :hl, :wl], rtol=0, atol=0)
            torch.testing.assert_close(rec[f"cls.{lv}"], out.cls_logits[lv][b, :, :hl, :wl].sigmoid(), rtol=0, atol=0)
            torch.testing.assert_close(rec[f"box.{lv}"], out.box_reg[lv][b, :, :hl, :wl], rtol=0, atol=0)
        assert not any(n.startswith("quality.") for n in rec), "RetinaNet has no quality branch"
        det = out.detections[b]
        assert rec["det.boxes"].shape[1] == 4 and len(rec["det.boxes"]) == len(rec["det.scores"]) == len(rec["det.labels"])
        assert len(rec["det.boxes"]) > 0, "the fixture teacher's low score threshold yields detections"
        torch.testing.assert_close(rec["det.scores"], det["scores"].float())
        assert rec["det.labels"].dtype == torch.int64


def test_candidates_are_csr_over_gts(live):
    teacher, out, gt, cands, records = live
    num_anchors = sum(len(a) for a in out.anchors)
    probs = flatten_levels(out.cls_logits, teacher.num_classes).sigmoid()
    for b, rec in enumerate(records):
        off, index, score = rec["cand.offsets"], rec["cand.index"], rec["cand.score"]
        assert off.dtype == torch.int64 and index.dtype == torch.int64 and score.dtype == torch.float32
        assert len(off) == len(gt[b]["labels"]) + 1 and off[0] == 0 and int(off[-1]) == len(index) == len(score)
        assert bool((off[1:] >= off[:-1]).all())
        assert index.numel() == 0 or (0 <= int(index.min()) and int(index.max()) < num_anchors)
        for g in range(len(off) - 1):
            mine = index[off[g] : off[g + 1]]
            torch.testing.assert_close(mine, cands[b][g])
            torch.testing.assert_close(score[off[g] : off[g + 1]], probs[b, mine, gt[b]["labels"][g]])
    assert len(records[0]["cand.index"]) > 0 and len(records[1]["cand.index"]) == 0


def test_tower_moments_over_valid_cells(live):
    teacher, out, _, _, records = live
    for b, rec in enumerate(records):
        h, w = out.image_sizes[b]
        for branch, tower in (("cls", out.cls_tower), ("reg", out.reg_tower)):
            assert len(tower.pre) == 2
            packed = rec[f"tower.{branch}"]
            assert packed.shape == (2, len(out.strides), 3, 16) and packed.dtype == torch.float32  # float64 sums
            for i, levels in enumerate(tower.pre):
                for lv, (m, s) in enumerate(zip(levels, out.strides)):  # masked sums over the padded maps
                    mask = torch.zeros(m.shape[-2:], dtype=torch.float64)
                    mask[: math.ceil(h / s), : math.ceil(w / s)] = 1
                    x = m[b].double()
                    stats = packed[i, lv]
                    assert bool((stats[0].double() == mask.sum()).all())
                    torch.testing.assert_close(stats[1].double(), (x * mask).sum((1, 2)), rtol=1e-6, atol=1e-6)
                    torch.testing.assert_close(stats[2].double(), (x * x * mask).sum((1, 2)), rtol=1e-6, atol=1e-6)
