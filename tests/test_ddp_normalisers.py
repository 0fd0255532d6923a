"""Loss normalisers under DDP, with real torch.distributed: 2 gloo processes, each holding its slice
(2 images) of a 4-image batch whose positives are deliberately unequal between the ranks.

What DDP does: every rank computes its loss L_r on its slice and the gradients are averaged, so the
effective loss is mean_r L_r and image i's outputs x_i (on rank r) get (1/W) dL_r/dx_i.
- Terms the official code normalises with `reduce_mean` (mmdet GFLHead; CrossKD's GFL cls and FCOS
  cls/box; CSKD's FCOS / GFL assistant): mean_r L_r and (1/W) dL_r/dx_i must equal the single-process
  loss over the union of the 4 images normalised by the GLOBAL count, and its gradient. The oracle
  is written here from the official formulas in float64 for GFL's GT losses and CrossKD's terms; for
  the CSKD assistant it is kdcache's assistant run in one process over the union.
- Terms the official code leaves per rank (CrossKD / CSKD RetinaNet num_pos, CrossKD GFL's sum of
  teacher scores): each rank's loss must equal the plain single-process loss on that rank's two
  images (and differ from the union's, which is what makes the check bite).
- torchvision's RetinaNet GT losses are normalised per image and not reduced: per rank, and DDP's
  mean equals the union's.
Run a break (e.g. `reduce_mean` returning its input) and the matching tests fail.
"""

from __future__ import annotations

import datetime
import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from stages.config import ModelParams
from stages.detectors.build import build_detector
from stages.detectors.contract import DetectorOutput, TowerFeatures
from stages.detectors.gfl import atss_match
from stages.distributed import reduce_mean
from stages.losses.common import box_masks, valid_masks
from stages.losses.crosskd import CrossKDLoss
from stages.losses.cskd_assistant import AssistantHead, assistant_losses
from stages.losses.targets import TeacherTargets

WORLD, PER_RANK = 2, 2
K = 2  # classes

# ---------------------------------------------------------------- GFL detector GT losses (ATSS)
GFL_SIZE, REG_MAX = 128, 4
# rank 0 (images 0, 1): 5 objects, many positives; rank 1 (images 2, 3): one small object each
GFL_GTS = [
    ([[10.3, 12.1, 70.9, 50.7], [60.2, 40.6, 120.1, 110.3], [5.0, 70.0, 50.0, 125.0]], [1, 0, 1]),
    ([[20.0, 20.0, 100.0, 90.0], [70.0, 5.0, 125.0, 60.0]], [0, 0]),
    ([[40.0, 44.0, 58.0, 60.0]], [1]),
    ([[80.0, 90.0, 104.0, 112.0]], [0]),
]


def values_and_grads(prefix: str, parts: dict, inputs: list) -> dict:
    """{prefix/part: the loss value, prefix/part/grad: its gradient w.r.t. each input (zeros where unused)}."""
    res = {}
    for part, value in parts.items():
        grads = torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True)
        res[f"{prefix}/{part}"] = value.detach()
        res[f"{prefix}/{part}/grad"] = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)]
    return res


def gfl_inputs():
    torch.manual_seed(0)
    det = build_detector(ModelParams(arch="gfl", backbone="resnet18", fpn_channels=16, head_convs=1,
                                     reg_max=REG_MAX), K)
    g = torch.Generator().manual_seed(1)
    sides = [GFL_SIZE // s for s in det.strides]
    cls = [torch.randn(4, K, s, s, generator=g) for s in sides]
    reg = [torch.randn(4, 4 * (REG_MAX + 1), s, s, generator=g) for s in sides]
    targets = [{"boxes": torch.tensor(b), "labels": torch.tensor(lab)} for b, lab in GFL_GTS]
    return det, cls, reg, targets


def gfl_rank(det, cls, reg, targets, images: slice) -> dict:
    """kdcache's GFL losses on `images`: each part's value and gradient w.r.t. the class / box maps."""
    c = [m[images].clone().requires_grad_(True) for m in cls]
    r = [m[images].clone().requires_grad_(True) for m in reg]
    fpn = [torch.zeros(len(c[0]), 16, *m.shape[-2:]) for m in c]
    out = DetectorOutput(fpn=fpn, strides=det.strides, image_sizes=[(GFL_SIZE, GFL_SIZE)] * len(c[0]),
                         cls_logits=c, box_reg=r, anchors=det.anchors(fpn))
    losses = det.compute_losses(out, targets[images])
    return values_and_grads("gt_gfl", {part: losses[part] for part in ("cls", "box", "dfl")}, c + r)


def gfl_oracle(det, cls, reg, targets) -> dict:
    """The official GFL losses over all 4 images in one batch (mmdet GFLHead.loss_by_feat), float64:
    QFL / sum_i max(pos_i, 1); GIoU x w and DFL x w / max(sum w, 1), w = max predicted score."""
    c = [m.double().requires_grad_(True) for m in cls]
    r = [m.double().requires_grad_(True) for m in reg]
    fpn = [torch.zeros(1, 1, *m.shape[-2:]) for m in cls]
    level_anchors = det.anchors(fpn)
    anchors, per_level = torch.cat(level_anchors).double(), [len(a) for a in level_anchors]
    flat_c = torch.cat([m.permute(0, 2, 3, 1).reshape(4, -1, K) for m in c], 1)
    flat_r = torch.cat([m.permute(0, 2, 3, 1).reshape(4, -1, 4, REG_MAX + 1) for m in r], 1)
    stride = anchors[:, 2] - anchors[:, 0]
    points = (anchors[:, :2] + anchors[:, 2:]) / 2 / stride[:, None]
    bins = torch.arange(REG_MAX + 1, dtype=torch.float64)
    qfl = giou = dfl = w_sum = 0.0
    num_pos = 0
    for i, t in enumerate(targets):
        matched = atss_match(anchors.float(), per_level, t["boxes"])  # assignment is not under test
        pos = torch.nonzero(matched >= 0).flatten()
        num_pos += max(len(pos), 1)
        gt = t["boxes"].double()[matched[pos]] / stride[pos, None]
        d = (flat_r[i, pos].softmax(-1) * bins).sum(-1)  # [P, 4] expected side distances
        px, py = points[pos, 0], points[pos, 1]
        pred = torch.stack([px - d[:, 0], py - d[:, 1], px + d[:, 2], py + d[:, 3]], 1)
        lt, rb = torch.maximum(pred[:, :2], gt[:, :2]), torch.minimum(pred[:, 2:], gt[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        union = (pred[:, 2:] - pred[:, :2]).prod(1) + (gt[:, 2:] - gt[:, :2]).prod(1) - inter
        soft = torch.zeros_like(flat_c[i])
        soft[pos, t["labels"][matched[pos]]] = (inter / union).detach()
        p = flat_c[i].sigmoid()
        qfl = qfl + (F.binary_cross_entropy_with_logits(flat_c[i], soft, reduction="none")
                     * (soft - p).abs() ** 2).sum()
        w = p[pos].detach().amax(1)
        w_sum = w_sum + w.sum()
        giou = giou + (generalized_box_iou_loss(pred, gt, reduction="none") * w).sum()
        target = torch.stack([px - gt[:, 0], py - gt[:, 1], gt[:, 2] - px, gt[:, 3] - py], 1).clamp(0, REG_MAX - 0.1)
        left = target.floor()
        logp = flat_r[i, pos].log_softmax(-1)  # [P, 4, bins]
        ce_l = -logp.gather(-1, left.long()[..., None])[..., 0]
        ce_r = -logp.gather(-1, left.long()[..., None] + 1)[..., 0]
        dfl = dfl + (((left + 1 - target) * ce_l + (target - left) * ce_r) * w[:, None]).sum() / 4
    norm = max(float(w_sum), 1.0)
    parts = {"cls": qfl / num_pos, "box": 2.0 * giou / norm, "dfl": 0.25 * dfl / norm}
    return values_and_grads("gt_gfl", parts, c + r)


# ---------------------------------------------------------------- CrossKD prediction-mimicking terms
STRIDES = [8, 16, 32]
PADDED = (32, 64)
SHAPES = [(PADDED[0] // s, PADDED[1] // s) for s in STRIDES]
SIZES = [(32, 64), (24, 40), (32, 56), (28, 64)]
# rank 0: three objects; rank 1: one small object, then an image without any
CKD_GTS = [
    ([[2.0, 2.0, 30.0, 28.0], [34.0, 4.0, 62.0, 30.0]], [0, 1]),
    ([[4.0, 6.0, 36.0, 22.0]], [1]),
    ([[10.0, 10.0, 22.0, 20.0]], [0]),
    ([], []),
]
ARCH_SHAPES = {"retinanet": (2, 4), "fcos": (1, 4), "gfl": (1, 4 * (REG_MAX + 1))}  # anchors per cell, R


def level_anchors(a: int) -> list[torch.Tensor]:
    out = []
    for (h, w), s in zip(SHAPES, STRIDES):
        ys, xs = torch.meshgrid(torch.arange(h) * s + s / 2, torch.arange(w) * s + s / 2, indexing="ij")
        c = torch.stack([xs, ys], -1).reshape(-1, 1, 2).expand(-1, a, 2).reshape(-1, 2).float()
        out.append(torch.cat([c - s / 2, c + s / 2], 1))
    return out


def crosskd_inputs(arch: str):
    a, r = ARCH_SHAPES[arch]
    g = torch.Generator().manual_seed(7)
    crossed_cls = [torch.randn(4, a * K, h, w, generator=g) * 2 for h, w in SHAPES]
    crossed_box = [torch.randn(4, a * r, h, w, generator=g) for h, w in SHAPES]
    t_probs = [torch.randn(4, a * K, h, w, generator=g).mul(2).sigmoid() for h, w in SHAPES]
    t_box = [torch.randn(4, a * r, h, w, generator=g) for h, w in SHAPES]
    if arch == "fcos":  # distances (anchor-size units) are >= 0
        crossed_box = [m.abs() + 0.2 for m in crossed_box]
        t_box = [m.abs() + 0.2 for m in t_box]
    targets = [{"boxes": torch.tensor(b).reshape(-1, 4), "labels": torch.tensor(lab, dtype=torch.int64)}
               for b, lab in CKD_GTS]
    anc = torch.cat(level_anchors(a))
    pts = (anc[:, :2] + anc[:, 2:]) / 2
    matched = torch.full((4, len(anc)), -1, dtype=torch.int64)
    for i, t in enumerate(targets):  # every anchor whose centre lies inside a GT (the last GT wins)
        for j, (x1, y1, x2, y2) in enumerate(t["boxes"].tolist()):
            matched[i, (pts[:, 0] > x1) & (pts[:, 0] < x2) & (pts[:, 1] > y1) & (pts[:, 1] < y2)] = j
    if arch == "retinanet":  # a RetinaNet ignore band
        neg = torch.nonzero(matched[0] == -1).flatten()
        matched[0, neg[::5]] = -2
    return crossed_cls, crossed_box, TeacherTargets(cls_probs=t_probs, box_reg=t_box), matched, targets


def crosskd_rank(arch: str, images: slice) -> dict:
    a, _ = ARCH_SHAPES[arch]
    crossed_cls, crossed_box, teacher, matched, targets = crosskd_inputs(arch)
    c = [m[images].clone().requires_grad_(True) for m in crossed_cls]
    r = [m[images].clone().requires_grad_(True) for m in crossed_box]
    t = TeacherTargets(cls_probs=[m[images] for m in teacher.cls_probs], box_reg=[m[images] for m in teacher.box_reg])
    valid = valid_masks(SIZES[images], SHAPES, STRIDES)
    loss = CrossKDLoss(arch, K, 8, 8, reg_max=REG_MAX, gfl_giou=True)
    parts = loss.mimic(c, r, t, valid, level_anchors(a), matched[images], targets[images])
    return values_and_grads(arch, parts, c + r)


def flat(maps: list[torch.Tensor], channels: int) -> torch.Tensor:
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, channels) for m in maps], 1)


def crosskd_oracle(arch: str) -> dict:
    """Official CrossKD cls (KDQualityFocalLoss, beta 1) and, for FCOS, box (IoULoss x teacher max
    score) over all 4 images, float64, normalised by the global count: GFL sum_i max(pos_i, 1), FCOS
    the sum of the positives' centerness targets."""
    a, _ = ARCH_SHAPES[arch]
    crossed_cls, crossed_box, teacher, matched, targets = crosskd_inputs(arch)
    c = [m.double().requires_grad_(True) for m in crossed_cls]
    r = [m.double().requires_grad_(True) for m in crossed_box]
    x, tp = flat(c, K), flat([m.double() for m in teacher.cls_probs], K)  # [4, N, K]
    anc = torch.cat(level_anchors(a)).double()
    in_img = flat([v.expand(-1, a, -1, -1) for v in valid_masks(SIZES, SHAPES, STRIDES)], 1)[..., 0] > 0
    weight = in_img & (matched != -2)
    qfl = (F.binary_cross_entropy_with_logits(x, tp, reduction="none") * (x.sigmoid() - tp).abs()).sum(-1)
    qfl = torch.where(weight, qfl, 0.0).sum()
    parts = {}
    if arch == "gfl":
        parts["cls"] = qfl / sum(max(int((matched[i] >= 0).sum()), 1) for i in range(4))
    else:  # fcos
        pts = (anc[:, :2] + anc[:, 2:]) / 2
        size = (anc[:, 2:] - anc[:, :2])
        denom = 0.0
        for i, t in enumerate(targets):
            pos = matched[i] >= 0
            gt = t["boxes"].double()[matched[i, pos]] if pos.any() else torch.zeros(0, 4, dtype=torch.float64)
            lr = torch.stack([pts[pos, 0] - gt[:, 0], gt[:, 2] - pts[pos, 0]], 1)
            tb = torch.stack([pts[pos, 1] - gt[:, 1], gt[:, 3] - pts[pos, 1]], 1)
            denom += float(((lr.amin(1) / lr.amax(1)) * (tb.amin(1) / tb.amax(1))).sqrt().sum())
        denom = max(denom, 1e-6)
        parts["cls"] = 0.4 * qfl / denom

        def decode(d):  # FCOS (l, t, r, b) in anchor-size units around the point
            return torch.cat([pts - d[..., :2] * size, pts + d[..., 2:] * size], -1)

        sb, tb_ = decode(flat(r, 4)), decode(flat([m.double() for m in teacher.box_reg], 4))
        lt, rb = torch.maximum(sb[..., :2], tb_[..., :2]), torch.minimum(sb[..., 2:], tb_[..., 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        union = (sb[..., 2:] - sb[..., :2]).prod(-1) + (tb_[..., 2:] - tb_[..., :2]).prod(-1) - inter
        iou_loss = -(inter / union.clamp(min=1e-6)).clamp(min=1e-6).log()
        t_max = tp.amax(-1)
        parts["box"] = 0.75 * torch.where(weight, iou_loss * t_max, 0.0).sum() / denom
    return values_and_grads(arch, parts, c + r)


# ---------------------------------------------------------------- CSKD assistant branch
ASSIST_C = 8


def assistant_rank(arch: str, images: slice) -> dict:
    """kdcache's CSKD assistant losses on `images` (shared, seeded assistant convs; grads w.r.t. the
    student's tower maps, which stand for everything upstream)."""
    a, r = ARCH_SHAPES[arch]
    _, _, teacher, matched, targets = crosskd_inputs(arch)
    g = torch.Generator().manual_seed(11)
    towers = [[torch.randn(4, ASSIST_C, h, w, generator=g).relu() for h, w in SHAPES] for _ in range(2)]
    quality = [torch.rand(4, a, h, w, generator=g) for h, w in SHAPES]
    torch.manual_seed(3)
    head = AssistantHead(arch, ASSIST_C, a, K, r, len(STRIDES)).double()
    # scores near 0.5, not the 0.01 prior: the GFL score sums stay above the clamp at 1 (below it, the
    # clamp after the mean makes DDP differ from one process, in mmdet as here)
    torch.nn.init.zeros_(head.cls.bias)
    cls_post = [m[images].double().requires_grad_(True) for m in towers[0]]
    reg_post = [m[images].double().requires_grad_(True) for m in towers[1]]
    student = DetectorOutput(fpn=[], strides=STRIDES, image_sizes=SIZES[images],
                             cls_tower=TowerFeatures(post=[cls_post]), reg_tower=TowerFeatures(post=[reg_post]),
                             anchors=[x.double() for x in level_anchors(a)])
    t = TeacherTargets(cls_probs=[m[images].double() for m in teacher.cls_probs],
                       box_reg=[m[images].double() for m in teacher.box_reg],
                       quality=[m[images].double() for m in quality] if arch == "fcos" else [])
    valid = [v.double() for v in valid_masks(SIZES[images], SHAPES, STRIDES)]
    fg = [f.double() for f in box_masks([x["boxes"] for x in targets[images]], SHAPES, STRIDES)]
    parts = assistant_losses(head, student, t, targets[images], list(matched[images]), valid, fg, K, REG_MAX)
    return values_and_grads(f"assist_{arch}", parts, cls_post + reg_post)


# ---------------------------------------------------------------- torchvision RetinaNet GT losses
def retinanet_rank(images: slice) -> dict:
    torch.manual_seed(0)
    det = build_detector(ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=16, head_convs=1), K)
    g = torch.Generator().manual_seed(5)
    sides = [GFL_SIZE // s for s in det.strides]
    a = det.num_anchors
    cls = [torch.randn(4, a * K, s, s, generator=g)[images].requires_grad_(True) for s in sides]
    reg = [torch.randn(4, a * 4, s, s, generator=g)[images].mul(0.1).requires_grad_(True) for s in sides]
    fpn = [torch.zeros(len(cls[0]), 16, s, s) for s in sides]
    out = DetectorOutput(fpn=fpn, strides=det.strides, image_sizes=[(GFL_SIZE, GFL_SIZE)] * len(cls[0]),
                         cls_logits=cls, box_reg=reg, anchors=det.anchors(fpn))
    targets = [{"boxes": torch.tensor(b), "labels": torch.tensor(lab)} for b, lab in GFL_GTS][images]
    losses = det.compute_losses(out, targets)
    return {f"gt_retinanet/{k}": v.detach() for k, v in losses.items()}


# ---------------------------------------------------------------- the 2 processes
def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        images = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        res = {"mean/number": reduce_mean(rank + 1), "mean/int_tensor": reduce_mean(torch.tensor(2 * rank + 1))}
        leaf = torch.tensor(float(rank + 1), requires_grad=True)
        res["mean/detached"] = not reduce_mean(leaf * 2).requires_grad
        det, cls, reg, targets = gfl_inputs()
        res.update(gfl_rank(det, cls, reg, targets, images))
        for arch in ("gfl", "fcos", "retinanet"):
            res.update(crosskd_rank(arch, images))
            res.update(assistant_rank(arch, images))
        res.update(retinanet_rank(images))
        torch.save(res, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp_norm")
    ctx = mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 150
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2 gloo processes did not finish in 150 s")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def ddp_view(ranks: list[dict], key: str) -> tuple[float, list[torch.Tensor]]:
    """What DDP trains on: the mean of the ranks' losses, and (1/W) x each rank's gradient, images in order."""
    value = sum(float(r[key]) for r in ranks) / WORLD
    grads = [torch.cat([g[lv] for g in (r[key + "/grad"] for r in ranks)]) / WORLD
             for lv in range(len(ranks[0][key + "/grad"]))]
    return value, grads


def assert_matches(ranks, expected: dict, key: str) -> None:
    value, grads = ddp_view(ranks, key)
    want = float(expected[key])
    assert math.isclose(value, want, rel_tol=2e-5, abs_tol=1e-7), f"{key}: DDP {value} vs global oracle {want}"
    for lv, (got, ref) in enumerate(zip(grads, expected[key + "/grad"])):
        err = (got.double() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= 1e-4 * scale + 1e-8, f"{key}: gradient map {lv} differs by {err:.3g} (max |g| {scale:.3g})"


def test_reduce_mean_across_ranks(ranks):
    for r in ranks:
        assert r["mean/number"] == pytest.approx(1.5) and float(r["mean/int_tensor"]) == pytest.approx(2.0)
        assert r["mean/detached"]


def test_reduce_mean_is_a_no_op_in_one_process():
    assert not dist.is_initialized()
    x = torch.tensor([3.0, 4.0], requires_grad=True)
    y = reduce_mean(x * 2)
    assert torch.equal(y, torch.tensor([6.0, 8.0])) and not y.requires_grad
    assert reduce_mean(7) == 7 and isinstance(reduce_mean(7), int)


def test_positives_really_differ_between_ranks():
    det, cls, reg, targets = gfl_inputs()
    anchors = torch.cat(det.anchors([torch.zeros(1, 1, *m.shape[-2:]) for m in cls]))
    per_level = [m.shape[-2] * m.shape[-1] for m in cls]
    pos = [int((atss_match(anchors, per_level, t["boxes"]) >= 0).sum()) for t in targets]
    assert min(pos) > 0 and sum(pos[:2]) >= 2 * sum(pos[2:]), pos


@pytest.mark.parametrize("part", ["cls", "box", "dfl"])
def test_gfl_gt_losses_use_the_global_count(ranks, part):
    assert_matches(ranks, gfl_oracle(*gfl_inputs()), f"gt_gfl/{part}")


@pytest.mark.parametrize("arch, part", [("gfl", "cls"), ("fcos", "cls"), ("fcos", "box")])
def test_crosskd_reduced_terms_use_the_global_count(ranks, arch, part):
    assert_matches(ranks, crosskd_oracle(arch), f"{arch}/{part}")


@pytest.mark.parametrize("arch, part", [("retinanet", "cls"), ("retinanet", "box"), ("gfl", "kl"), ("gfl", "box")])
def test_crosskd_per_rank_terms_stay_per_rank(ranks, arch, part):
    """Official crosskd_retinanet (avg_factor of get_targets) and crosskd_gfl's kd_avg_factor are not
    reduced: each rank's value is the one-process loss of its own two images."""
    key = f"{arch}/{part}"
    for rank, got in enumerate(ranks):
        alone = crosskd_rank(arch, slice(rank * PER_RANK, (rank + 1) * PER_RANK))
        assert torch.allclose(got[key], alone[key], rtol=1e-6, atol=0), (key, rank)
        for g, ref in zip(got[key + "/grad"], alone[key + "/grad"]):
            assert torch.allclose(g, ref, rtol=1e-5, atol=1e-9), (key, rank)
    if arch == "retinanet":  # the per-rank count differs from the global one here: the check bites
        whole = crosskd_rank(arch, slice(0, 4))
        assert not math.isclose(ddp_view(ranks, key)[0], float(whole[key]), rel_tol=1e-3), key


ASSIST_REDUCED = [("fcos", "assist_cls"), ("fcos", "assist_box"), ("fcos", "assist_ctr"),
                  ("gfl", "assist_cls"), ("gfl", "assist_box"), ("gfl", "assist_dfl")]


@pytest.mark.parametrize("arch, part", ASSIST_REDUCED)
def test_cskd_assistant_reduced_terms_equal_the_union_batch(ranks, arch, part):
    """Official cskd_head_fcos / cskd_head_gfl reduce num_pos, the centerness sum and the assistant
    score sum over the ranks: DDP equals one process over all 4 images (oracle: kdcache's own
    assistant in one process over the union, whose normalisers are then the global ones)."""
    whole = assistant_rank(arch, slice(0, 4))
    assert_matches(ranks, whole, f"assist_{arch}/{part}")


@pytest.mark.parametrize("part", ["assist_cls", "assist_box"])
def test_cskd_assistant_retinanet_stays_per_rank(ranks, part):
    """cskd_head_retina uses get_targets' num_total_pos as is (no reduce_mean)."""
    key = f"assist_retinanet/{part}"
    for rank, got in enumerate(ranks):
        alone = assistant_rank("retinanet", slice(rank * PER_RANK, (rank + 1) * PER_RANK))
        assert torch.allclose(got[key], alone[key], rtol=1e-9, atol=0), (key, rank)
    assert not math.isclose(ddp_view(ranks, key)[0], float(assistant_rank("retinanet", slice(0, 4))[key]),
                            rel_tol=1e-3), key


def test_torchvision_retinanet_is_per_image_so_ddp_equals_the_union(ranks):
    """torchvision's RetinaNet losses (kdcache's RetinaNet GT losses) divide each image by its own
    foreground count and average the images; nothing is reduced across ranks, and none is needed:
    with equal per-rank batches DDP's mean equals the one-process loss of the union."""
    whole = retinanet_rank(slice(0, 4))
    for part in ("cls", "box"):
        key = f"gt_retinanet/{part}"
        for rank, got in enumerate(ranks):
            alone = retinanet_rank(slice(rank * PER_RANK, (rank + 1) * PER_RANK))
            assert torch.allclose(got[key], alone[key], rtol=1e-6, atol=0), (key, rank)
        mean = sum(float(r[key]) for r in ranks) / WORLD
        assert math.isclose(mean, float(whole[key]), rel_tol=1e-5), (key, mean, float(whole[key]))
