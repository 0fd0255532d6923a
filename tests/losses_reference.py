"""Literal references of the official CSKD and CrossKD losses, written from the official code's
formulas (swkdn16/CSKD cskd_head_*.py, jbwang1997/CrossKD crosskd_*.py + kd_loss.py) and mmdet's
loss conventions, in float64, level by level, in the official reduction order. Independent of
stages/losses: it imports nothing from there. Inputs are unpadded batches (the official code runs
over the whole padded map; with no padding both agree).

mmdet conventions used: weight_reduce_loss = sum(loss * weight) / avg_factor, or the mean over all
elements when avg_factor is None; torch.nn.CosineSimilarity(eps) = x.y / max(|x| |y|, eps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

EPS_COS = 1e-6


def cos_sim(x, y, dim):
    return (x * y).sum(dim) / torch.clamp_min(x.norm(dim=dim) * y.norm(dim=dim), EPS_COS)


def mse_cos(s, t, w, mask=None, avg_factor=None, premask=False):
    """Official `_loss_mse_cos` (DistillNeck / Distillprediction). premask: Distillprediction's mask."""
    t = t.detach()
    b, c, h, wd = s.shape
    if premask and mask is not None:
        s, t = s * mask[:, None], t * mask[:, None]
    ch = cos_sim(s.reshape(b, c, -1), t.reshape(b, c, -1), 2)  # [b, c]
    sp = cos_sim(s.reshape(b, c, -1).permute(0, 2, 1), t.reshape(b, c, -1).permute(0, 2, 1), 2)  # [b, hw]
    g = ((1 - ch[:, :, None]) * (1 - sp[:, None, :])).reshape(b, c, h, wd).abs()
    if avg_factor is not None:
        cos = (1 - ch).mean() + (1 - sp).sum() / avg_factor
    else:
        cos = (1 - ch).mean() + (1 - sp).mean()
    if mask is not None:
        g = g * mask[:, None]
    sq = (s - t) ** 2 * g
    mse = sq.sum() / avg_factor if avg_factor is not None else sq.mean()
    return w[0] * mse + w[1] * cos


def fg_mask(boxes, b, h, w, stride):
    m = torch.zeros(b, h, w, dtype=torch.float64)
    for i in range(b):
        for x1, y1, x2, y2 in boxes[i].tolist():
            m[i, int(y1 / stride): int(y2 / stride) + 1, int(x1 / stride): int(x2 / stride) + 1] = 1
    return m


def neck_level(s, t, conv_w, conv_b, boxes, stride, w=(1.0, 0.5)):
    """DistillNeck.forward for one level -> (feat, roi, fg, bg). As official, `b, c, h, w = student.shape`
    is read from the student map BEFORE `_student = self.mimic_conv(student)`: c in the fg / bg
    avg_factor `mask.sum() * c` is the student's own width."""
    b, c, h, wd = s.shape
    s = F.conv2d(s, conv_w, conv_b)
    feat = mse_cos(s, t, w)
    rois = [bx / stride for bx in boxes]
    roi = mse_cos(roi_align(s, rois, 7, 1.0, 2, True), roi_align(t, rois, 7, 1.0, 2, True), w)
    mfg = fg_mask(boxes, b, h, wd, stride)
    mbg = 1 - mfg
    bg = mse_cos(s * mbg[:, None], t * mbg[:, None], w, mbg, mbg.sum() * c) if mbg.sum() > 0 else 0.0
    fg = mse_cos(s * mfg[:, None], t * mfg[:, None], w, mfg, mfg.sum() * c)
    return feat, roi, fg, bg


def focal_soft(x, t, alpha=0.25, gamma=2.0):
    p = x.sigmoid()
    pt = (1 - p) * t + p * (1 - t)
    return F.binary_cross_entropy_with_logits(x, t, reduction="none") * (alpha * t + (1 - alpha) * (1 - t)) * pt**gamma


def giou(p, q):
    """GIoU loss of aligned xyxy boxes [M, 4]."""
    area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    area_q = (q[:, 2] - q[:, 0]) * (q[:, 3] - q[:, 1])
    iw = (torch.min(p[:, 2], q[:, 2]) - torch.max(p[:, 0], q[:, 0])).clamp(min=0)
    ih = (torch.min(p[:, 3], q[:, 3]) - torch.max(p[:, 1], q[:, 1])).clamp(min=0)
    inter = iw * ih
    union = area_p + area_q - inter
    iou = inter / union
    cw = torch.max(p[:, 2], q[:, 2]) - torch.min(p[:, 0], q[:, 0])
    chh = torch.max(p[:, 3], q[:, 3]) - torch.min(p[:, 1], q[:, 1])
    enclose = cw * chh
    return 1 - (iou - (enclose - union) / enclose)


def iou_aligned(p, q, eps=1e-6):
    area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    area_q = (q[:, 2] - q[:, 0]) * (q[:, 3] - q[:, 1])
    iw = (torch.min(p[:, 2], q[:, 2]) - torch.max(p[:, 0], q[:, 0])).clamp(min=0)
    ih = (torch.min(p[:, 3], q[:, 3]) - torch.max(p[:, 1], q[:, 1])).clamp(min=0)
    inter = iw * ih
    return inter / torch.clamp_min(area_p + area_q - inter, eps)


def decode(arch, reg, anchors, reg_max):
    """reg [M, R] w.r.t. anchors [M, 4] -> xyxy (RetinaNet deltas, FCOS/GFL distances in stride units)."""
    w = anchors[:, 2] - anchors[:, 0]
    h = anchors[:, 3] - anchors[:, 1]
    cx = anchors[:, 0] + w / 2
    cy = anchors[:, 1] + h / 2
    if arch == "retinanet":
        pcx, pcy = reg[:, 0] * w + cx, reg[:, 1] * h + cy
        dw = reg[:, 2].clamp(max=math.log(1000.0 / 16))
        dh = reg[:, 3].clamp(max=math.log(1000.0 / 16))
        pw, ph = torch.exp(dw) * w, torch.exp(dh) * h
        return torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], 1)
    if arch == "gfl":
        reg = expected(reg, reg_max)
    return torch.stack([cx - reg[:, 0] * w, cy - reg[:, 1] * h, cx + reg[:, 2] * w, cy + reg[:, 3] * h], 1)


def expected(reg, reg_max):
    p = reg.reshape(-1, 4, reg_max + 1).softmax(-1)
    return (p * torch.arange(reg_max + 1, dtype=p.dtype)).sum(-1)


def flat(maps, per):
    """[B, A*X, H, W] per level -> [B, N, X] in (level, y, x, anchor) order."""
    out = []
    for m in maps:
        b, ax, h, w = m.shape
        out.append(m.reshape(b, ax // per, per, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, per))
    return torch.cat(out, 1)


def ctr_target(points, boxes):
    l_, t_ = points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1]
    r_, b_ = boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]
    return torch.sqrt(torch.min(l_, r_) / torch.max(l_, r_) * torch.min(t_, b_) / torch.max(t_, b_))


def qfl(x, labels, score, beta=2.0):
    """GFL QualityFocalLoss per sample (sum over classes)."""
    p = x.sigmoid()
    loss = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none") * p**beta
    for i in range(len(labels)):
        if labels[i] >= 0:
            c = int(labels[i])
            loss[i, c] = F.binary_cross_entropy_with_logits(x[i, c], score[i], reduction="none") * (
                score[i] - p[i, c]).abs() ** beta
    return loss.sum(1)


def dfl(x, target):
    left = target.floor().long()
    wl, wr = left + 1 - target, target - left
    return F.cross_entropy(x, left, reduction="none") * wl + F.cross_entropy(x, left + 1, reduction="none") * wr


def num_pos_per_image_min1(matched):
    return sum(max(int((m >= 0).sum()), 1) for m in matched)


def kd_qfl(x, t_prob, beta=1.0):
    """CrossKD KDQualityFocalLoss elementwise (target = sigmoid of the teacher logits)."""
    return F.binary_cross_entropy_with_logits(x, t_prob, reduction="none") * (x.sigmoid() - t_prob).abs() ** beta
