import dataclasses

import pytest
import torch

from stages.config import ConfigError, DistillParams
from stages.losses.feature import MSEFeatureLoss
from stages.losses.registry import LOSS_NAMES, KDLosses, LossContext, build_kd_losses
from tests.losses_fakes import IMAGE_SIZES, grads_finite, gt_targets, maps, student_output, teacher_targets
from tests.test_losses_crosskd import K, assign_inside, head, run, teacher_side

CTX = LossContext(
    student_arch="fcos", teacher_arch="fcos", num_classes=K, num_levels=3, strides=[8, 16, 32],
    student_channels=4, teacher_channels=8, student_head_channels=4, teacher_head_channels=8,
    num_anchors=1, box_dim=4, teacher_box_dim=4, reg_max=16, student_dense=True, teacher_has_quality=True,
    assign=assign_inside,
)
FASTER = dataclasses.replace(CTX, student_arch="faster_rcnn", student_dense=False, num_anchors=0, box_dim=0)


def build(weights, ctx=CTX):
    return build_kd_losses(weights, ctx, DistillParams())


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown loss 'fitnet'.*mse, cosine, cskd, ssim, crosskd, rm, pfi"):
        build({"fitnet": 1.0})


def test_bad_weight():
    with pytest.raises(ConfigError, match="distill.losses.mse: weight"):
        build({"mse": -1.0})


@pytest.mark.parametrize("name", ["crosskd", "rm", "pfi"])
def test_dense_only_losses_refused_for_faster_rcnn(name):
    with pytest.raises(ConfigError, match=f"distill.losses.{name}: needs dense.*mse, cosine, ssim, cskd"):
        build({name: 1.0}, FASTER)
    with pytest.raises(ConfigError, match=f"distill.losses.{name}: needs the teacher's dense"):
        build({name: 1.0}, dataclasses.replace(CTX, teacher_arch="faster_rcnn"))


def test_faster_rcnn_gets_feature_losses():
    kd = build({"mse": 1, "cosine": 1, "ssim": 2, "cskd": 1}, FASTER)
    assert kd.needs() == {"fpn"}
    student = student_output(c=4)
    student.cls_logits, student.box_reg, student.anchors = [], [], []
    out = kd(student, teacher_targets(c=8), gt_targets())
    assert set(out) == {"mse/fpn", "cosine/fpn", "ssim/fpn", "cskd/neck", "cskd/roi", "cskd/fg", "cskd/bg",
                        "kd_total"}


def test_crosskd_and_rm_need_matching_teacher():
    with pytest.raises(ConfigError, match="crosskd: student \\(fcos\\) and teacher \\(gfl\\)"):
        build({"crosskd": 1.0}, dataclasses.replace(CTX, teacher_arch="gfl", teacher_box_dim=68))
    with pytest.raises(ConfigError, match="rm: the retinanet teacher"):
        build({"rm": 4.0}, dataclasses.replace(CTX, teacher_arch="retinanet"))


def test_empty_and_zero_weights():
    kd = build({})
    out = kd(student_output(), teacher_targets(), gt_targets())
    assert set(out) == {"kd_total"} and out["kd_total"].item() == 0.0
    assert kd.needs() == set()
    assert set(build({"mse": 0.0, "rm": 4})(student_output(), _with_candidates(teacher_targets()), gt_targets())) == {
        "rm/rank", "kd_total"}


def _with_candidates(teacher):
    teacher.candidates = [[(torch.tensor([0, 1, 2]), torch.tensor([0.9, 0.5, 0.2]))] * 2,
                          [(torch.tensor([0, 9]), torch.tensor([0.3, 0.6]))]]
    return teacher


def test_weights_multiply_and_total_sums():
    student, teacher = student_output(c=4), teacher_targets(c=8)
    kd = build({"mse": 2.5, "pfi": 1.5})
    out = kd(student, teacher, gt_targets())
    plain = MSEFeatureLoss(4, 8)
    plain.load_state_dict(kd.losses["mse"].state_dict())
    assert torch.allclose(out["mse/fpn"], 2.5 * plain(student, teacher, [])["fpn"])
    assert torch.allclose(out["kd_total"], out["mse/fpn"] + out["pfi/fpn"])


def test_missing_teacher_field_is_named():
    with pytest.raises(ValueError, match="rm needs the teacher's 'candidates'"):
        build({"rm": 4})(student_output(), teacher_targets(), gt_targets())


def test_all_losses_together_on_a_real_head():
    """Every loss at once (FCOS student and teacher, real tiny heads): keys, needs, finite gradients."""
    t_head = head("fcos", 8, 2, seed=0)
    teacher = teacher_side(t_head, maps(2, 8, seed=5), IMAGE_SIZES, index=1, num_anchors=1)
    teacher.fpn = maps(2, 8, seed=7)
    _with_candidates(teacher)
    s_head = head("fcos", 4, 2, seed=1)
    student = run(s_head, maps(2, 4, seed=6, grad=True), IMAGE_SIZES, 1)
    kd = build({name: 1.0 for name in LOSS_NAMES})
    assert isinstance(kd, KDLosses)
    assert kd.needs() == {"fpn", "cls", "box", "quality", "candidates", "head", "tower_stats"}
    out = kd(student, teacher, gt_targets())
    assert {k.split("/")[0] for k in out} == set(LOSS_NAMES) | {"kd_total"}
    assert all(torch.isfinite(v) for v in out.values())
    out["kd_total"].backward()
    assert grads_finite(student.fpn)
    trainable = [p for p in kd.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in t_head.parameters())
    # the trainable parts are what the training loop checkpoints
    again = build({name: 1.0 for name in LOSS_NAMES})
    again.load_state_dict(kd.state_dict())


def test_retinanet_anchor_layouts_must_agree_for_per_anchor_losses():
    """A RetinaNet teacher's class / box maps are per anchor: a student with other anchor sizes (or
    mmdet's unrounded sizes against torchvision's) is refused for the losses that read them, by name."""
    from stages.config import ModelParams, to_dict
    from stages.detectors.build import build_detector
    from stages.distill.run import loss_context

    def ctx_for(student_kw: dict, teacher_kw: dict) -> LossContext:
        base = {"arch": "retinanet", "backbone": "resnet18", "fpn_channels": 8, "head_convs": 1}
        student = build_detector(ModelParams(**base, **student_kw), K)
        return loss_context(student, to_dict(ModelParams(**base, **teacher_kw)), K, 4, False)

    ctx = ctx_for({"anchor_size": 16}, {})  # torchvision's 32 px teacher, a 16 px student
    for name in ("crosskd", "rm", "pfi", "cskd"):
        with pytest.raises(ConfigError, match=rf"distill.losses.{name}: the teacher's RetinaNet anchors on P3 are "
                                              r"\(32\.0, 40\.0, 50\.0\) px, the student's \(16\.0, 20\.0, 25\.0\) px"):
            build({name: 1.0}, ctx)
    assert set(build({"mse": 1.0, "cosine": 1.0, "ssim": 1.0}, ctx).losses) == {"mse", "cosine", "ssim"}
    # mmdet's unrounded octave sizes (40.32, 50.80) against torchvision's (40, 50): within 5 %, accepted
    mmdet = ctx_for({}, {"variant": "mmdet"})
    assert mmdet.teacher_anchors != mmdet.student_anchors and "crosskd" in build({"crosskd": 1.0}, mmdet).losses
    with pytest.raises(ConfigError, match="distill.losses.rm: the teacher's RetinaNet anchors"):
        build({"rm": 1.0}, ctx_for({"anchor_size": 24}, {"anchor_size": 32}))  # 24 against 32 px: refused
    same = ctx_for({"anchor_size": 16}, {"anchor_size": 16})
    assert set(build({"crosskd": 1.0, "rm": 1.0, "pfi": 1.0, "cskd": 1.0}, same).losses) == {"crosskd", "rm", "pfi", "cskd"}
