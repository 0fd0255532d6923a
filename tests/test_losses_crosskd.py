import pytest
import torch

from stages.config import ModelParams
from stages.detectors.build import build_head
from stages.detectors.contract import DetectorOutput
from stages.losses.common import valid_masks
from stages.losses.crosskd import CrossKDLoss
from stages.losses.targets import TeacherTargets
from tests.losses_fakes import (
    IMAGE_SIZES,
    SHAPES,
    STRIDES,
    anchors,
    grads_finite,
    gt_targets,
    maps,
    scramble_padding,
)

K = 3


def head(arch: str, channels: int, convs: int, seed: int, reg_max: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    h = build_head(ModelParams(arch=arch, fpn_channels=channels, head_convs=convs, reg_max=reg_max), K)
    for p in h.parameters():  # livelier than the 0.01-std init, so predictions vary across cells
        torch.nn.init.normal_(p, std=0.3)
    reg = h.regression_head.bbox_reg  # moderate boxes: no degenerate (zero-area) teacher boxes
    reg.weight.data *= 0.1
    reg.bias.data.fill_(1.0 if arch == "fcos" else 0.0)
    return h


def run(h, fpn, image_sizes, num_anchors) -> DetectorOutput:
    o = h(fpn)
    return DetectorOutput(fpn=fpn, strides=list(STRIDES), image_sizes=list(image_sizes), cls_tower=o.cls_tower,
                          reg_tower=o.reg_tower, cls_logits=o.cls_logits, box_reg=o.box_reg, quality=o.quality,
                          anchors=anchors(num_anchors))


def teacher_side(t_head, fpn, image_sizes, index, num_anchors) -> TeacherTargets:
    """What stage 2 hands the loss: teacher predictions, frozen head, tower stats over valid cells."""
    t_head.requires_grad_(False)
    with torch.no_grad():
        out = run(t_head, fpn, image_sizes, num_anchors)
    valid = valid_masks(image_sizes, SHAPES, STRIDES)
    mean, std = {}, {}
    for branch, tower in (("cls", out.cls_tower), ("reg", out.reg_tower)):
        cells = [m.permute(1, 0, 2, 3)[:, v[:, 0] > 0] for m, v in zip(tower.pre[index], valid)]  # per level
        mean[branch] = torch.stack([c.mean(dim=1) for c in cells])  # [L, C]
        std[branch] = torch.stack([c.std(dim=1) for c in cells])  # unbiased, as official align_scale
    return TeacherTargets(cls_probs=[m.sigmoid() for m in out.cls_logits], box_reg=out.box_reg, head=t_head,
                          quality=[m.sigmoid() for m in out.quality],
                          tower_mean=mean, tower_std=std, reuse_index=index)


ARCHS = [("retinanet", 9, 4, 0), ("fcos", 1, 4, 0), ("gfl", 1, 20, 4)]
GT = gt_targets()


def assign_inside(out, targets):
    """A stand-in assigner: up to 3 anchors whose centre lies inside each GT box are its positives."""
    anc = torch.cat(out.anchors)
    pts = (anc[:, :2] + anc[:, 2:]) / 2
    matched = []
    for t in targets:
        m = torch.full((len(pts),), -1, dtype=torch.int64)
        for j, (x1, y1, x2, y2) in enumerate(t["boxes"].tolist()):
            inside = torch.nonzero((pts[:, 0] > x1) & (pts[:, 0] < x2) & (pts[:, 1] > y1) & (pts[:, 1] < y2)).flatten()
            m[inside[:3]] = j
        matched.append(m)
    return matched


@pytest.mark.parametrize("arch, a, r, reg_max", ARCHS)
def test_zero_when_student_is_the_teacher(arch, a, r, reg_max):
    sizes = [(32, 64), (32, 64)]  # no padding: the crossed head sees exactly the teacher's maps
    t_head = head(arch, 8, 3, seed=0, reg_max=reg_max)
    fpn = maps(2, 8, seed=5)
    teacher = teacher_side(t_head, fpn, sizes, index=1, num_anchors=a)
    student = run(t_head, fpn, sizes, a)
    parts = CrossKDLoss(arch, K, 8, 8, reg_max=reg_max, assign=assign_inside)(student, teacher, GT)
    assert set(parts) == ({"cls", "kl"} if arch == "gfl" else {"cls", "box"})  # GFL GIoU KD: gfl_giou
    for key, value in parts.items():
        assert abs(value.item()) < 1e-3, (key, value.item())  # float32 noise / a few positives


@pytest.mark.parametrize("arch, a, r, reg_max", ARCHS)
def test_gradients_reach_the_student_only(arch, a, r, reg_max):
    t_head = head(arch, 8, 3, seed=0, reg_max=reg_max)
    s_head = head(arch, 4, 2, seed=1, reg_max=reg_max)  # narrower and shallower than the teacher
    teacher = teacher_side(t_head, maps(2, 8, seed=5), IMAGE_SIZES, index=2, num_anchors=a)
    student = run(s_head, maps(2, 4, seed=6, grad=True), IMAGE_SIZES, a)
    loss = CrossKDLoss(arch, K, 4, 8, reg_max=reg_max, assign=assign_inside)
    parts = loss(student, teacher, GT)
    assert all(torch.isfinite(v) and v.item() > 0 for v in parts.values())
    sum(parts.values()).backward()
    assert grads_finite(student.fpn)  # through the student's tower up to its reuse layer
    assert next(s_head.classification_head.conv.parameters()).grad is not None
    assert all(p.grad is None and not p.requires_grad for p in t_head.parameters())
    assert loss.adapters["cls"].weight.grad is not None and loss.adapters["reg"].weight.grad is not None


def test_padding_changes_nothing():
    arch, a = "fcos", 1
    t_head = head(arch, 8, 3, seed=0)
    teacher = teacher_side(t_head, maps(2, 8, seed=5), IMAGE_SIZES, index=1, num_anchors=a)
    student = run(head(arch, 8, 3, seed=1), maps(2, 8, seed=6), IMAGE_SIZES, a)
    loss = CrossKDLoss(arch, K, 8, 8, assign=assign_inside)
    before = loss(student, teacher, GT)
    for tower in (student.cls_tower, student.reg_tower):
        tower.pre[1] = scramble_padding(tower.pre[1])
    teacher.cls_probs = scramble_padding(teacher.cls_probs, value=float("nan"))
    teacher.box_reg = scramble_padding(teacher.box_reg, value=float("nan"))
    after = loss(student, teacher, GT)
    for key in before:
        assert torch.allclose(after[key], before[key], rtol=1e-5), key


def test_missing_inputs():
    loss = CrossKDLoss("fcos", K, 8, 8, assign=assign_inside)
    t_head = head("fcos", 8, 3, seed=0)
    teacher = teacher_side(t_head, maps(2, 8, seed=5), IMAGE_SIZES, index=1, num_anchors=1)
    student = run(head("fcos", 8, 3, seed=1), maps(2, 8, seed=6), IMAGE_SIZES, 1)
    teacher.head = None
    with pytest.raises(ValueError, match="head"):
        loss(student, teacher, GT)
    teacher.head, teacher.reuse_index = t_head, -1
    with pytest.raises(ValueError, match="tower statistics"):
        loss(student, teacher, GT)
    teacher.reuse_index = 1
    with pytest.raises(ValueError, match="assigner"):
        CrossKDLoss("fcos", K, 8, 8)(student, teacher, GT)


def test_tower_statistics_per_level_from_cached_moments():
    """Stage 1's per-level moments -> stage 2's per-level mean / unbiased std == torch.std per level."""
    from stages.cache.targets import tower_moments
    from stages.distill.teacher_source import tower_statistics

    t_head = head("gfl", 8, 3, seed=0)
    out = run(t_head, maps(2, 8, seed=5), IMAGE_SIZES, 1)
    records = [tower_moments(out, b) for b in range(2)]
    mean, std = tower_statistics(records, 1)
    valid = valid_masks(IMAGE_SIZES, SHAPES, STRIDES)
    for branch, tower in (("cls", out.cls_tower), ("reg", out.reg_tower)):
        assert mean[branch].shape == (len(STRIDES), 8)
        for lv, (m, v) in enumerate(zip(tower.pre[1], valid)):
            cells = m.detach().permute(1, 0, 2, 3)[:, v[:, 0] > 0].double()
            torch.testing.assert_close(mean[branch][lv].double(), cells.mean(1), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(std[branch][lv].double(), cells.std(1), rtol=1e-5, atol=1e-6)
    # the per-layer layout of tower statistics (a [3, C] blob per layer and level, plus the pooled one per
    # layer), written out here from the packed arrays: the same statistics, alone or mixed in one batch
    def legacy(r, per_level=True):
        out = {}
        for branch in ("cls", "reg"):
            for i, layer in enumerate(r[f"tower.{branch}"]):
                out[f"tower.{branch}.{i}"] = layer.double().sum(0).float()
                if per_level:
                    out.update({f"tower.{branch}.{i}.{lv}": m for lv, m in enumerate(layer)})
        return out
    assert all(set(r) == {"tower.cls", "tower.reg"} and r["tower.cls"].shape == (3, len(STRIDES), 3, 8) for r in records)
    for batch in ([legacy(r) for r in records], [legacy(records[0]), records[1]]):
        for a, b in zip(tower_statistics(batch, 1), (mean, std)):
            for branch in ("cls", "reg"):
                torch.testing.assert_close(a[branch], b[branch], rtol=1e-6, atol=1e-7)
    pooled = [legacy(r, per_level=False) for r in records]  # a cache from before per-level moments
    mean, std = tower_statistics(pooled, 1)
    assert mean["cls"].shape == (8,)
    mixed, _ = tower_statistics([pooled[0], records[1]], 1)  # with a packed record: pooled statistics
    torch.testing.assert_close(mixed["cls"], mean["cls"])
