"""Conformance: stages/losses vs the literal official formulas of tests/losses_reference.py (CSKD,
CrossKD) and vs pytorch-msssim (Structural KD), value AND gradient, for RetinaNet, FCOS and GFL
heads, on small fixed float64 tensors without padding (where the official code and ours must agree)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages.config import ModelParams
from stages.detectors.build import build_head
from stages.detectors.contract import DetectorOutput, TowerFeatures
from stages.losses.crosskd import CrossKDLoss
from stages.losses.cskd import CSKDLoss
from stages.losses.ssim import SSIMLoss, gaussian_window, ssim_map
from stages.losses.targets import TeacherTargets
from tests import losses_reference as ref
from tests.losses_fakes import STRIDES, anchors

K, C, B = 3, 4, 2
FULL = [(32, 64), (32, 64)]  # no padding
SHAPES = [(32 // s, 64 // s) for s in STRIDES]
GT = [{"boxes": torch.tensor([[4.0, 2.0, 30.0, 20.0], [40.0, 8.0, 60.0, 30.0]]), "labels": torch.tensor([0, 2])},
      {"boxes": torch.tensor([[2.0, 3.0, 17.0, 14.0]]), "labels": torch.tensor([1])}]
ARCHS = {"retinanet": (2, 4, 0), "fcos": (1, 4, 0), "gfl": (1, 16, 3)}  # A, R, reg_max
CK_ARCHS = {**ARCHS, "retinanet": (9, 4, 0)}  # CrossKD runs a real head: torchvision's 9 anchors


def rnd(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)


def level_maps(ch, seed, scale=1.0, positive=False):
    out = [rnd((B, ch, h, w), seed + i, scale) for i, (h, w) in enumerate(SHAPES)]
    return [(m.abs() if positive else m).requires_grad_(True) for m in out]


def matched_for(arch, a):
    """A fixed student assignment: a few positives per GT, RetinaNet also an ignore band (-2)."""
    n = sum(h * w * a for h, w in SHAPES)
    out = []
    for i, t in enumerate(GT):
        m = torch.full((n,), -1, dtype=torch.int64)
        g = torch.Generator().manual_seed(50 + i)
        idx = torch.randperm(n, generator=g)
        for j in range(len(t["boxes"])):
            m[idx[3 * j: 3 * j + 3]] = j
        if arch == "retinanet":
            m[idx[10:16]] = -2
        if i == 1 and arch == "gfl":  # an image without positives: num_pos counts it as 1 (mmdet get_targets)
            m[m >= 0] = -1
        out.append(m)
    return out


def matched_fcos_inside(a):
    """FCOS positives must lie inside their GT (centerness > 0): pick points inside each box."""
    pts = torch.cat([((x[:, :2] + x[:, 2:]) / 2) for x in anchors(a)])
    out = []
    for t in GT:
        m = torch.full((len(pts),), -1, dtype=torch.int64)
        for j, (x1, y1, x2, y2) in enumerate(t["boxes"].tolist()):
            inside = torch.nonzero((pts[:, 0] > x1) & (pts[:, 0] < x2) & (pts[:, 1] > y1) & (pts[:, 1] < y2)).flatten()
            m[inside[:3]] = j
        out.append(m)
    return out


def cskd_case(arch):
    a, r, reg_max = ARCHS[arch]
    pos = arch == "fcos"
    s_pre = level_maps(C, 40)
    student = DetectorOutput(
        fpn=level_maps(C, 0), strides=list(STRIDES), image_sizes=list(FULL),
        cls_tower=TowerFeatures([s_pre], [[m.relu() for m in s_pre]]),
        reg_tower=TowerFeatures([s_pre], [[(m * 0.7).relu() for m in s_pre]]),
        cls_logits=level_maps(a * K, 10, 2.0), box_reg=level_maps(a * r, 20, 0.5, positive=pos),
        quality=level_maps(1, 30) if arch == "fcos" else [], anchors=anchors(a))
    teacher = TeacherTargets(
        fpn=[m.detach() for m in level_maps(C, 100)],
        cls_probs=[m.detach().sigmoid() for m in level_maps(a * K, 110, 2.0)],
        box_reg=[m.detach() for m in level_maps(a * r, 120, 0.5, positive=pos)],
        quality=[m.detach().sigmoid() for m in level_maps(1, 130)] if arch == "fcos" else [])
    torch.manual_seed(3)
    t_head = build_head(ModelParams(arch=arch, fpn_channels=C, head_convs=1, reg_max=reg_max), K).double()
    for p in t_head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    teacher.head = t_head.requires_grad_(False)
    matched = matched_fcos_inside(a) if arch == "fcos" else matched_for(arch, a)
    loss = CSKDLoss(C, C, K, predictions=True, assistant=True, num_levels=3, arch=arch, same_arch=True,
                    head_channels=C, num_anchors=a, box_dim=r, reg_max=reg_max, assign=lambda out, tg: matched,
                    tower=True, tower_layers=1, teacher_head_channels=C)
    loss = loss.double()
    torch.manual_seed(7)
    for p in loss.parameters():  # livelier than the official init so every term moves
        torch.nn.init.normal_(p, std=0.3)
    return student, teacher, matched, loss


def cskd_reference(arch, student, teacher, matched, loss):
    a, r, reg_max = ARCHS[arch]
    w = (1.0, 0.5)
    parts = {k: 0.0 for k in ("neck", "roi", "fg", "bg", "pred_cls", "pred_box")}
    if arch == "fcos":
        parts["pred_ctr"] = 0.0
    boxes = [t["boxes"].double() for t in GT]
    fgs = []
    for lv, stride in enumerate(STRIDES):
        conv = loss.mimic[lv]
        feat, roi, fg, bg = ref.neck_level(student.fpn[lv], teacher.fpn[lv], conv.weight, conv.bias, boxes, stride, w)
        for key, v in zip(("neck", "roi", "fg", "bg"), (feat, roi, fg, bg)):
            parts[key] = parts[key] + v
        mfg = ref.fg_mask(boxes, B, *SHAPES[lv], stride)
        fgs.append(mfg)
        c_cls = student.cls_logits[lv].shape[1]
        parts["pred_cls"] = parts["pred_cls"] + ref.mse_cos(
            student.cls_logits[lv].sigmoid(), teacher.cls_probs[lv], w, None,
            mfg.sum() * c_cls if arch == "gfl" else None)
        parts["pred_box"] = parts["pred_box"] + ref.mse_cos(student.box_reg[lv], teacher.box_reg[lv], w, None,
                                                            mfg.sum() * student.box_reg[lv].shape[1])
        if arch == "fcos":
            parts["pred_ctr"] = parts["pred_ctr"] + ref.mse_cos(student.quality[lv].sigmoid(), teacher.quality[lv],
                                                                w, None, mfg.sum() * 1)
    # Distillbranch: per tower layer (one here), summed over levels, mean over layers
    t_out = teacher.head(teacher.fpn)
    for branch, s_tower, t_tower in (("cls", student.cls_tower, t_out.cls_tower),
                                     ("reg", student.reg_tower, t_out.reg_tower)):
        total = 0.0
        for lv in range(len(STRIDES)):
            x = s_tower.post[0][lv]
            if arch == "fcos":  # use_conv_for_mimic; RetinaNet / GFL compare the raw student maps
                conv = loss.tower_mimic[branch][lv]
                x = F.conv2d(x, conv.weight, conv.bias)
            total = total + ref.mse_cos(x, t_tower.post[0][lv], w)
        parts[f"tower_{branch}"] = total / 1
    # assistant
    h = loss.assistant
    a_cls, a_box, a_ctr = [], [], []
    for lv in range(len(STRIDES)):
        cf, rf = student.cls_tower.post[-1][lv], student.reg_tower.post[-1][lv]
        a_cls.append(F.conv2d(cf, h.cls.weight, h.cls.bias, padding=1))
        box = F.conv2d(rf, h.reg.weight, h.reg.bias, padding=1)
        if arch == "fcos":
            box = (box * h.scales[lv].scale).clamp(min=0)
            a_ctr.append(F.conv2d(cf, h.ctr.weight, h.ctr.bias, padding=1))
        elif arch == "gfl":
            box = box * h.scales[lv].scale
        a_box.append(box)
    ac, ab = ref.flat(a_cls, K), ref.flat(a_box, r)
    tp, tb = ref.flat(teacher.cls_probs, K), ref.flat(teacher.box_reg, r)
    fg_anchor = ref.flat([m[:, None].expand(-1, a, -1, -1) for m in fgs], 1)[..., 0]
    anc = torch.cat(anchors(a)).double()
    total_cls = total_box = total_dfl = 0.0
    if arch in ("retinanet", "gfl"):
        num_pos = ref.num_pos_per_image_min1(matched)
    else:
        num_pos = max(sum(int((m >= 0).sum()) for m in matched), 1)
    ws = []
    for i in range(B):
        m = matched[i]
        pos = m >= 0
        if arch == "retinanet":
            lw = (m != -2).double()
            total_cls = total_cls + (ref.focal_soft(ac[i], tp[i] * fg_anchor[i][:, None]).sum(1) * lw).sum()
            total_box = total_box + (ab[i][pos] - tb[i][pos]).abs().sum()
        elif arch == "fcos":
            total_cls = total_cls + ref.focal_soft(ac[i], tp[i] * fg_anchor[i][:, None]).sum()
        else:
            da, dt = ref.decode("gfl", ab[i][pos], anc[pos], reg_max), ref.decode("gfl", tb[i][pos], anc[pos], reg_max)
            labels = torch.full((len(m),), -1, dtype=torch.int64)
            labels[pos] = GT[i]["labels"][m[pos]]
            score = torch.zeros(len(m), dtype=torch.float64)
            score[pos] = ref.iou_aligned(da.detach(), dt)
            total_cls = total_cls + ref.qfl(ac[i], labels, score).sum()
            wt = ac[i].detach().sigmoid().max(1)[0][pos]
            ws.append(wt)
            total_box = total_box + (ref.giou(da, dt) * wt).sum()
            sides = ref.expected(tb[i][pos], reg_max).clamp(0, reg_max - 0.1)
            total_dfl = total_dfl + (ref.dfl(ab[i][pos].reshape(-1, reg_max + 1), sides.reshape(-1))
                                     * wt[:, None].expand(-1, 4).reshape(-1)).sum() / 4.0
    if arch == "fcos":
        ctr_t, giou_sum, ctr_sum = [], 0.0, 0.0
        for i in range(B):
            m = matched[i]
            pos = m >= 0
            pts = (anc[pos][:, :2] + anc[pos][:, 2:]) / 2
            ct = ref.ctr_target(pts, GT[i]["boxes"].double()[m[pos]])
            ctr_t.append(ct)
            da, dt = ref.decode("fcos", ab[i][pos], anc[pos], 0), ref.decode("fcos", tb[i][pos], anc[pos], 0)
            giou_sum = giou_sum + (ref.giou(da, dt) * ct).sum()
            ctr_sum = ctr_sum + F.binary_cross_entropy_with_logits(
                ref.flat(a_ctr, 1)[i, :, 0][pos], ref.flat(teacher.quality, 1)[i, :, 0][pos], reduction="sum")
        parts["assist_box"] = giou_sum / max(float(torch.cat(ctr_t).sum()), 1e-6)
        parts["assist_ctr"] = ctr_sum / num_pos
    parts["assist_cls"] = total_cls / num_pos
    if arch == "retinanet":
        parts["assist_box"] = total_box / num_pos
    if arch == "gfl":
        norm = max(float(torch.cat(ws).sum()), 1.0)
        parts["assist_box"] = 2.0 * total_box / norm
        parts["assist_dfl"] = 0.25 * total_dfl / norm
    return parts


def leaves(student):
    out = list(student.fpn) + list(student.cls_logits) + list(student.box_reg) + list(student.quality)
    return out + [m for layer in student.cls_tower.pre[:1] for m in layer]


def compare(got: dict, want: dict, student, params):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key in want:
        torch.testing.assert_close(got[key].double(), torch.as_tensor(want[key], dtype=torch.float64),
                                   rtol=1e-6, atol=1e-9, msg=lambda m, k=key: f"{k}: {m}")
    xs = leaves(student) + list(params)
    g_got = torch.autograd.grad(sum(got.values()), xs, allow_unused=True, retain_graph=True)
    g_want = torch.autograd.grad(sum(want.values()), xs, allow_unused=True)
    for i, (p, q) in enumerate(zip(g_got, g_want)):
        if p is None or q is None:
            assert (p is None or not p.abs().sum()) and (q is None or not q.abs().sum()), i
            continue
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m, i=i: f"grad {i}: {m}")


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "gfl"])
def test_cskd_matches_official_formulas(arch):
    student, teacher, matched, loss = cskd_case(arch)
    got = loss(student, teacher, GT)
    want = cskd_reference(arch, student, teacher, matched, loss)
    compare(got, want, student, loss.parameters())


@pytest.mark.parametrize("c_student, c_teacher", [(4, 8), (8, 4)])
def test_cskd_neck_at_unequal_fpn_widths(c_student, c_teacher):
    """DistillNeck at unequal widths: fg / bg normalised by sum(mask) * the STUDENT's width (official
    forward reads c before mimic_conv); value and gradient (student maps and mimic convs)."""
    student = DetectorOutput(fpn=level_maps(c_student, 0), strides=list(STRIDES), image_sizes=list(FULL))
    teacher = TeacherTargets(fpn=[m.detach() for m in level_maps(c_teacher, 100)])
    loss = CSKDLoss(c_student, c_teacher, K, predictions=False, num_levels=3).double()
    torch.manual_seed(7)
    for p in loss.parameters():
        torch.nn.init.normal_(p, std=0.3)
    got = loss(student, teacher, GT)
    boxes = [t["boxes"].double() for t in GT]
    want = {k: 0.0 for k in ("neck", "roi", "fg", "bg")}
    for lv, stride in enumerate(STRIDES):
        conv = loss.mimic[lv]
        for key, v in zip(want, ref.neck_level(student.fpn[lv], teacher.fpn[lv], conv.weight, conv.bias, boxes,
                                               stride)):
            want[key] = want[key] + v
    compare(got, want, student, loss.parameters())


# ---------------------------------------------------------------- CrossKD

def crosskd_case(arch, index=1):
    a, r, reg_max = CK_ARCHS[arch]
    heads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        h = build_head(ModelParams(arch=arch, fpn_channels=8, head_convs=3, reg_max=reg_max), K).double()
        for p in h.parameters():
            torch.nn.init.normal_(p, std=0.3)
        heads.append(h)
    s_head, t_head = heads
    s_fpn = level_maps(8, 0)
    o = s_head(s_fpn)
    student = DetectorOutput(fpn=s_fpn, strides=list(STRIDES), image_sizes=list(FULL), cls_tower=o.cls_tower,
                             reg_tower=o.reg_tower, cls_logits=o.cls_logits, box_reg=o.box_reg, quality=o.quality,
                             anchors=anchors(a))
    t_head.requires_grad_(False)
    with torch.no_grad():
        t = t_head([m.detach() for m in level_maps(8, 100)])
    stats = {}
    for branch, tower in (("cls", t.cls_tower), ("reg", t.reg_tower)):
        flat = [m.permute(1, 0, 2, 3).reshape(8, -1) for m in tower.pre[index]]
        stats[branch] = (torch.stack([f.mean(1) for f in flat]), torch.stack([f.std(1) for f in flat]))
    teacher = TeacherTargets(cls_probs=[m.sigmoid() for m in t.cls_logits], box_reg=t.box_reg, head=t_head,
                             tower_mean={k: v[0] for k, v in stats.items()},
                             tower_std={k: v[1] for k, v in stats.items()}, reuse_index=index)
    matched = matched_fcos_inside(a) if arch == "fcos" else matched_for(arch, a)
    loss = CrossKDLoss(arch, K, 8, 8, reg_max, assign=lambda out, tg: matched).double()
    return student, teacher, t, matched, loss


def crosskd_reference(arch, student, teacher_out, t_head, index, matched):
    a, r, reg_max = CK_ARCHS[arch]
    crossed = {}
    for branch, s_tower, t_tower in (("cls", student.cls_tower, teacher_out.cls_tower),
                                     ("reg", student.reg_tower, teacher_out.reg_tower)):
        per_level = []
        for s, t in zip(s_tower.pre[index], t_tower.pre[index]):  # official align_scale, level by level
            n, c, h, w = s.shape
            sf = s.permute(1, 0, 2, 3).reshape(c, -1)
            tf = t.permute(1, 0, 2, 3).reshape(c, -1)
            sf = (sf - sf.mean(-1, keepdim=True)) / (sf.std(-1, keepdim=True) + 1e-6)
            sf = sf * tf.std(-1, keepdim=True) + tf.mean(-1, keepdim=True)
            per_level.append(sf.reshape(c, n, h, w).permute(1, 0, 2, 3))
        crossed[branch] = per_level
    cls, box, _ = t_head.run_from(index, crossed["cls"], crossed["reg"])
    xc, xb = ref.flat(cls, K), ref.flat(box, r)
    tp, tb = ref.flat([m.sigmoid() for m in teacher_out.cls_logits], K), ref.flat(teacher_out.box_reg, r)
    anc = torch.cat(anchors(a)).double()
    t_max = ref.flat(teacher_out.cls_logits, K).max(2)[0].sigmoid()
    parts = {}
    if arch == "fcos":
        norm = 0.0
        for i in range(B):
            pos = matched[i] >= 0
            pts = (anc[pos][:, :2] + anc[pos][:, 2:]) / 2
            norm = norm + float(ref.ctr_target(pts, GT[i]["boxes"].double()[matched[i][pos]]).sum())
        norm = max(norm, 1e-6)
        parts["cls"] = 0.4 * sum(ref.kd_qfl(xc[i], tp[i]).sum() for i in range(B)) / norm
        iou = [ref.iou_aligned(ref.decode("fcos", xb[i], anc, 0), ref.decode("fcos", tb[i], anc, 0)) for i in range(B)]
        parts["box"] = 0.75 * sum((-(v.clamp(min=1e-6)).log() * t_max[i]).sum() for i, v in enumerate(iou)) / norm
        return parts
    num_pos = ref.num_pos_per_image_min1(matched)
    lw = [(m != -2).double() for m in matched]
    parts["cls"] = sum((ref.kd_qfl(xc[i], tp[i]).sum(1) * lw[i]).sum() for i in range(B)) / num_pos
    rw = [t_max[i] * lw[i] for i in range(B)]
    if arch == "retinanet":
        parts["box"] = sum((ref.giou(ref.decode("retinanet", xb[i], anc, 0), ref.decode("retinanet", tb[i], anc, 0))
                            * rw[i]).sum() for i in range(B)) / num_pos
        return parts
    kl_sum = 0.0
    for i in range(B):
        sp = xb[i].reshape(-1, reg_max + 1)
        tq = tb[i].reshape(-1, reg_max + 1)
        kl = F.kl_div(F.log_softmax(sp, 1), F.softmax(tq, 1), reduction="none").sum(1)  # class_reduction sum
        kl_sum = kl_sum + (kl * rw[i][:, None].expand(-1, 4).reshape(-1)).sum() / 4.0
    parts["kl"] = 4.0 * kl_sum / sum(w.sum() for w in rw)
    return parts


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "gfl"])
def test_crosskd_matches_official_formulas(arch):
    student, teacher, t_out, matched, loss = crosskd_case(arch)
    got = loss(student, teacher, GT)
    want = crosskd_reference(arch, student, t_out, teacher.head, 1, matched)
    compare(got, want, student, [])


# ---------------------------------------------------------------- Structural KD vs pytorch-msssim

def test_ssim_map_agrees_with_pytorch_msssim():
    from pytorch_msssim import ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 16, 23, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(1, 3, 16, 23, generator=g, dtype=torch.float64)).clamp(0, 1)
    want = ssim(x, y, data_range=1.0, size_average=False, win_size=11, win_sigma=1.5)
    got = ssim_map(x[0], y[0], gaussian_window(11, 1.5)).mean()
    torch.testing.assert_close(got, want[0].to(got.dtype), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(8, 8), (7, 11), (4, 4), (2, 2), (11, 5)])
def test_ssim_loss_on_maps_below_the_window_agrees_with_pytorch_msssim(size):
    """Maps with a side < 11 (P7 at 800x1333 is 7x11): the default skips smoothing along that side,
    as pytorch-msssim does; whole loss, value and gradient."""
    import warnings

    from pytorch_msssim import ssim

    g = torch.Generator().manual_seed(2)
    s = [torch.randn(2, 3, *size, generator=g, dtype=torch.float64, requires_grad=True)]
    t = [torch.randn(2, 3, *size, generator=g, dtype=torch.float64)]
    out = DetectorOutput(fpn=s, strides=[1], image_sizes=[size, size])
    got = SSIMLoss(3, 3)(out, TeacherTargets(fpn=t), [])["fpn"]

    def mm(z):
        lo, hi = z.amin(dim=(1, 2, 3), keepdim=True), z.amax(dim=(1, 2, 3), keepdim=True)
        return (z - lo) / (hi - lo + 1e-6)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytorch-msssim warns that it skips the short sides
        want = ((1 - ssim(mm(s[0]), mm(t[0]), data_range=1.0, size_average=False)) / 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    g1, = torch.autograd.grad(got, s)
    g2, = torch.autograd.grad(want, s)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)


def test_ssim_loss_agrees_with_pytorch_msssim():
    """Whole loss on >= 11 x 11 maps: sum over levels of mean (1 - SSIM) / 2, per-map min-max."""
    from pytorch_msssim import ssim

    g = torch.Generator().manual_seed(1)
    sizes = [(12, 14), (11, 11)]
    s = [torch.randn(2, 3, h, w, generator=g, dtype=torch.float64, requires_grad=True) for h, w in sizes]
    t = [torch.randn(2, 3, h, w, generator=g, dtype=torch.float64) for h, w in sizes]
    out = DetectorOutput(fpn=s, strides=[1, 1], image_sizes=[sizes[1], sizes[1]])
    # image_sizes crop both levels to 11 x 11 (stride 1)
    loss = SSIMLoss(3, 3)
    got = loss(out, TeacherTargets(fpn=t), [])["fpn"]

    def mm(z):
        return (z - z.amin(dim=(1, 2, 3), keepdim=True)) / (z.amax(dim=(1, 2, 3), keepdim=True)
                                                          - z.amin(dim=(1, 2, 3), keepdim=True) + 1e-6)

    want = sum(((1 - ssim(mm(a[:, :, :11, :11]), mm(b[:, :, :11, :11]), data_range=1.0, size_average=False)) / 2).mean()
               for a, b in zip(s, t))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    g1 = torch.autograd.grad(got, s, retain_graph=True)
    g2 = torch.autograd.grad(want, s)
    for p, q in zip(g1, g2):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-7)
