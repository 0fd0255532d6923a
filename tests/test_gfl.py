"""GFL pieces against hand-worked values and explicit-loop references."""

from __future__ import annotations

import math

import torch
from torchvision.ops import generalized_box_iou_loss

from stages.config import ModelParams
from stages.detectors.build import build_detector
from stages.detectors.contract import DetectorOutput
from stages.detectors.gfl import aligned_iou, atss_match, distribution_focal_loss, quality_focal_loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce(x: float, y: float) -> float:
    """Binary cross-entropy of logit x against target y."""
    return -(y * math.log(sigmoid(x)) + (1 - y) * math.log(1 - sigmoid(x)))


def test_quality_focal_loss_by_hand():
    logits = torch.tensor([[0.0, 1.0], [-1.0, 2.0]])
    labels = torch.tensor([1, -1])  # image 0: class 1 with IoU 0.6; image 1: background
    scores = torch.tensor([0.6, 0.0])
    expected = [
        math.log(2) * 0.5**2 + bce(1.0, 0.6) * abs(0.6 - sigmoid(1.0)) ** 2,
        bce(-1.0, 0.0) * sigmoid(-1.0) ** 2 + bce(2.0, 0.0) * sigmoid(2.0) ** 2,
    ]
    assert torch.allclose(quality_focal_loss(logits, labels, scores), torch.tensor(expected), atol=1e-6)
    # a perfect joint score costs nothing
    perfect = torch.tensor([[-30.0, math.log(0.6 / 0.4)]])
    assert quality_focal_loss(perfect, torch.tensor([1]), torch.tensor([0.6])).item() < 1e-6


def test_distribution_focal_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5]])
    lse = math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5))
    ce = [lse - 1.0, lse - 2.0, lse - 0.5]
    expected = [0.7 * ce[0] + 0.3 * ce[1], 1.0 * ce[1]]  # targets 0.3 and exactly 1
    got = distribution_focal_loss(logits, torch.tensor([0.3, 1.0]))
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_giou_by_hand():
    pred, target = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    iou = 1 / 7  # intersection 1, union 4 + 4 - 1
    assert math.isclose(aligned_iou(pred, target).item(), iou, rel_tol=1e-6)
    giou = iou - (9 - 7) / 9  # enclosing box 3 x 3
    assert math.isclose(generalized_box_iou_loss(pred, target).item(), 1 - giou, rel_tol=1e-6)


def point_anchors(size: int = 128, strides=(8, 16, 32, 64, 128)):
    levels = []
    for s in strides:
        n = size // s
        ys, xs = torch.meshgrid(torch.arange(n) * s, torch.arange(n) * s, indexing="ij")
        c = torch.stack([xs, ys], -1).reshape(-1, 2).float()
        levels.append(torch.cat([c - s / 2, c + s / 2], 1))
    return levels


def test_atss_assigns_the_obvious_anchor():
    levels = point_anchors()
    anchors = torch.cat(levels)
    # a 64 px GT centred on the P3 point (64, 64): that point's 8-stride square is the GT itself
    gt = torch.tensor([[32.0, 32.0, 96.0, 96.0]])
    matched = atss_match(anchors, [len(a) for a in levels], gt)
    obvious = (64 // 8) * (128 // 8) + 64 // 8
    assert matched[obvious] == 0
    pos = torch.nonzero(matched == 0).flatten()
    assert (pos < len(levels[0])).all()  # all on P3, the level whose squares fit the GT
    centres = (anchors[pos, :2] + anchors[pos, 2:]) / 2
    assert ((centres - 64).abs() <= 8).all()
    assert (atss_match(anchors, [len(a) for a in levels], torch.zeros((0, 4))) == -1).all()


def reference_atss(anchors, per_level, gts, topk=9, scale=8.0):
    """ATSS with explicit loops (per GT, per level), mirroring the paper's description."""
    n = len(anchors)
    pts = [((a[0] + a[2]) / 2, (a[1] + a[3]) / 2, float(a[2] - a[0])) for a in anchors.tolist()]

    def iou(i, g):
        x, y, s = pts[i]
        h = s * scale / 2
        a = (x - h, y - h, x + h, y + h)
        iw = max(0.0, min(a[2], g[2]) - max(a[0], g[0]))
        ih = max(0.0, min(a[3], g[3]) - max(a[1], g[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter)

    best = [(-1.0, -1)] * n
    for gi, g in enumerate(gts.tolist()):
        gx, gy = (g[0] + g[2]) / 2, (g[1] + g[3]) / 2
        cands, start = [], 0
        for count in per_level:
            order = sorted(
                range(start, start + count), key=lambda i: math.hypot(pts[i][0] - gx, pts[i][1] - gy)
            )
            cands += order[:topk]
            start += count
        ious = [iou(i, g) for i in cands]
        mean = sum(ious) / len(ious)
        std = math.sqrt(sum((v - mean) ** 2 for v in ious) / (len(ious) - 1))
        for i, v in zip(cands, ious):
            x, y, _ = pts[i]
            inside = min(x - g[0], y - g[1], g[2] - x, g[3] - y) > 0.01
            if v >= mean + std and inside and v > best[i][0]:
                best[i] = (v, gi)
    return torch.tensor([b[1] for b in best])


def test_atss_equals_explicit_loops():
    levels = point_anchors(256)
    anchors, per_level = torch.cat(levels), [len(a) for a in levels]
    # off-grid coordinates: no two points tie in distance to a GT centre (topk's tie order is its own)
    gts = torch.tensor(
        [
            [10.3, 12.1, 70.9, 50.7],
            [40.2, 30.6, 201.1, 190.3],
            [50.4, 20.2, 90.1, 60.9],
            [5.5, 200.3, 30.7, 250.2],
        ]
    )
    # two near-identical GTs contest the same anchors: each goes to the higher IoU
    gts = torch.cat([gts, torch.tensor([[130.3, 130.1, 194.2, 195.7], [134.6, 128.2, 198.9, 190.4]])])
    assert torch.equal(atss_match(anchors, per_level, gts), reference_atss(anchors, per_level, gts))


def test_gfl_losses_equal_explicit_computation():
    torch.manual_seed(0)
    k, m = 2, 4
    det = build_detector(
        ModelParams(arch="gfl", backbone="resnet18", fpn_channels=16, head_convs=1, reg_max=m), k
    )
    fpn = [torch.zeros(1, 16, 128 // s, 128 // s) for s in det.strides]
    out = DetectorOutput(
        fpn=fpn,
        strides=det.strides,
        image_sizes=[(128, 128)],
        cls_logits=[torch.randn(1, k, *f.shape[-2:]) for f in fpn],
        box_reg=[torch.randn(1, 4 * (m + 1), *f.shape[-2:]) for f in fpn],
        anchors=det.anchors(fpn),
    )
    boxes = torch.tensor([[10.3, 12.1, 70.9, 50.7], [60.2, 40.6, 120.1, 110.3]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 0])}]
    got = det.compute_losses(out, targets)

    anchors = torch.cat(out.anchors)
    matched = reference_atss(anchors, [len(a) for a in out.anchors], targets[0]["boxes"])
    cls = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, k) for c in out.cls_logits]).tolist()
    reg = torch.cat([r.permute(0, 2, 3, 1).reshape(-1, 4, m + 1) for r in out.box_reg]).tolist()
    qfl = giou_sum = dfl_sum = weight_sum = 0.0
    num_pos = 0
    for i, a in enumerate(anchors.tolist()):
        s = a[2] - a[0]
        px, py = (a[0] + a[2]) / 2 / s, (a[1] + a[3]) / 2 / s
        g = int(matched[i])
        iou_t, label = 0.0, -1
        if g >= 0:
            num_pos += 1
            label = int(targets[0]["labels"][g])
            gt = [v / s for v in targets[0]["boxes"][g].tolist()]
            dist = []
            for side in reg[i]:
                z = sum(math.exp(v) for v in side)
                dist.append(sum(j * math.exp(v) / z for j, v in enumerate(side)))
            box = [px - dist[0], py - dist[1], px + dist[2], py + dist[3]]
            inter = max(0, min(box[2], gt[2]) - max(box[0], gt[0])) * max(
                0, min(box[3], gt[3]) - max(box[1], gt[1])
            )
            union = (box[2] - box[0]) * (box[3] - box[1]) + (gt[2] - gt[0]) * (gt[3] - gt[1]) - inter
            enclose = (max(box[2], gt[2]) - min(box[0], gt[0])) * (max(box[3], gt[3]) - min(box[1], gt[1]))
            iou_t = inter / union
            w = max(sigmoid(v) for v in cls[i])
            weight_sum += w
            giou_sum += w * (1 - (iou_t - (enclose - union) / enclose))
            targets_d = [px - gt[0], py - gt[1], gt[2] - px, gt[3] - py]
            for side, t in zip(reg[i], targets_d):
                t = min(max(t, 0.0), m - 0.1)
                lse = math.log(sum(math.exp(v) for v in side))
                left = int(t)
                dfl_sum += w * ((left + 1 - t) * (lse - side[left]) + (t - left) * (lse - side[left + 1])) / 4
        for c, x in enumerate(cls[i]):
            if c == label:
                qfl += bce(x, iou_t) * abs(iou_t - sigmoid(x)) ** 2
            else:
                qfl += bce(x, 0.0) * sigmoid(x) ** 2
    assert num_pos > 0
    norm = max(weight_sum, 1.0)
    expected = {"cls": qfl / num_pos, "box": 2.0 * giou_sum / norm, "dfl": 0.25 * dfl_sum / norm}
    for name, value in expected.items():
        assert math.isclose(got[name].item(), value, rel_tol=1e-4), (name, got[name].item(), value)
