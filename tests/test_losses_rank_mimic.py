import math

import pytest
import torch

from stages.detectors.contract import flatten_levels
from stages.losses.rank_mimic import PFILoss, RankMimicLoss
from tests.losses_fakes import (
    IMAGE_SIZES,
    STRIDES,
    grads_finite,
    gt_targets,
    scramble_padding,
    student_output,
    teacher_from_student,
    teacher_targets,
)


def kl_softmax(p_scores, q_scores):
    p = [math.exp(v) / sum(math.exp(u) for u in p_scores) for v in p_scores]
    q = [math.exp(v) / sum(math.exp(u) for u in q_scores) for v in q_scores]
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def candidates():
    # image 0 (no padding): GT0 three candidates, GT1 one (KL 0: counts in the paper's M only)
    # image 1 (20x36): cell (0, 6) of P3 (index 6) is padding -> dropped; (1, 1) = index 9 is valid
    return [
        [(torch.tensor([0, 1, 5]), torch.tensor([0.9, 0.5, 0.1])), (torch.tensor([3]), torch.tensor([0.8]))],
        [(torch.tensor([0, 6, 9]), torch.tensor([0.7, 0.2, 0.4]))],
    ]


def test_rank_mimic_by_hand():
    student = student_output()
    teacher = teacher_targets()
    teacher.candidates = candidates()
    got = RankMimicLoss(3)(student, teacher, gt_targets())["rank"]
    logits = flatten_levels([m.detach() for m in student.cls_logits], 3)

    def logit(p):
        return math.log(p / (1 - p))

    # default: softmax over logits (teacher probabilities mapped back through the logit), T = 1;
    # the paper's 1/M over all M = 3 GT objects (GT1 of image 0 has one candidate: KL 0)
    kls = (kl_softmax([logit(p) for p in (0.9, 0.5, 0.1)], [logits[0, i, 0].item() for i in (0, 1, 5)])
           + kl_softmax([logit(p) for p in (0.7, 0.4)], [logits[1, i, 1].item() for i in (0, 9)]))
    assert math.isclose(got.item(), kls / 3, rel_tol=1e-5)
    got.backward()
    assert grads_finite(student.cls_logits)
    # mean_over="ranked": only the 2 GTs with >= 2 candidates count
    ranked = RankMimicLoss(3, mean_over="ranked")(student, teacher, gt_targets())["rank"]
    assert math.isclose(ranked.item(), kls / 2, rel_tol=1e-5)
    # scores="probs": a softmax over probabilities; temperature divides both sides
    probs = logits.sigmoid()
    got = RankMimicLoss(3, scores="probs", temperature=0.5)(student, teacher, gt_targets())["rank"]
    expect = (kl_softmax([p / 0.5 for p in (0.9, 0.5, 0.1)], [probs[0, i, 0].item() / 0.5 for i in (0, 1, 5)])
              + kl_softmax([p / 0.5 for p in (0.7, 0.4)], [probs[1, i, 1].item() / 0.5 for i in (0, 9)])) / 3
    assert math.isclose(got.item(), expect, rel_tol=1e-5)


def test_rank_mimic_mean_over_objects_of_the_paper():
    """L_RM = 1/M sum_j KL_j, M = the number of objects: in a batch where 1 of 4 GTs has a single candidate,
    the paper's mean is 3/4 of the mean over ranked GTs alone."""
    student = student_output(grad=False)
    teacher = teacher_targets()
    gts = [{"boxes": torch.zeros(3, 4), "labels": torch.tensor([0, 1, 2])},
           {"boxes": torch.zeros(1, 4), "labels": torch.tensor([1])}]
    teacher.candidates = [[(torch.tensor([0, 1]), torch.tensor([0.9, 0.1])), (torch.tensor([2, 3]), torch.tensor([0.3, 0.6])),
                           (torch.tensor([4]), torch.tensor([0.8]))],
                          [(torch.tensor([0, 9, 10]), torch.tensor([0.2, 0.5, 0.7]))]]
    logits = flatten_levels([m for m in student.cls_logits], 3)

    def logit(p):
        return math.log(p / (1 - p))

    kls = [kl_softmax([logit(0.9), logit(0.1)], [logits[0, i, 0].item() for i in (0, 1)]),
           kl_softmax([logit(0.3), logit(0.6)], [logits[0, i, 1].item() for i in (2, 3)]),
           kl_softmax([logit(p) for p in (0.2, 0.5, 0.7)], [logits[1, i, 1].item() for i in (0, 9, 10)])]
    paper = RankMimicLoss(3)(student, teacher, gts)["rank"].item()
    ranked = RankMimicLoss(3, mean_over="ranked")(student, teacher, gts)["rank"].item()
    assert math.isclose(paper, sum(kls) / 4, rel_tol=1e-5)
    assert math.isclose(ranked, sum(kls) / 3, rel_tol=1e-5)
    with pytest.raises(ValueError, match="mean_over"):
        RankMimicLoss(3, mean_over="gts")


def test_rank_mimic_zero_when_scores_match_and_order_kept():
    student = student_output()
    teacher = teacher_targets()
    scores = flatten_levels([m.detach() for m in student.cls_logits], 3).sigmoid()
    index = torch.tensor([2, 7, 11, 30])
    teacher.candidates = [[(index, scores[0, index, 0]), (index, scores[0, index, 2])], [(index[:2], scores[1, index[:2], 1])]]
    assert RankMimicLoss(3)(student, teacher, gt_targets())["rank"].item() < 1e-7
    # the same scores on permuted anchors are a different ranking: not zero (nothing is sorted)
    teacher.candidates[0][0] = (index, scores[0, index.flip(0), 0])
    assert RankMimicLoss(3)(student, teacher, gt_targets())["rank"].item() > 1e-6


def test_rank_mimic_padding_and_errors():
    student, teacher = student_output(grad=False), teacher_targets()
    teacher.candidates = candidates()
    loss = RankMimicLoss(3)
    before = loss(student, teacher, gt_targets())["rank"]
    student.cls_logits = scramble_padding(student.cls_logits)
    assert torch.equal(loss(student, teacher, gt_targets())["rank"], before)
    teacher.candidates = [[(torch.tensor([0, 10_000]), torch.tensor([0.5, 0.5]))] * 2, candidates()[1]]
    with pytest.raises(ValueError, match="same anchors"):
        loss(student, teacher, gt_targets())
    teacher.candidates = candidates()[:1] + [[]]
    with pytest.raises(ValueError, match="GT"):
        loss(student, teacher, gt_targets())


def test_rank_mimic_without_usable_gt_is_zero():
    student, teacher = student_output(grad=False), teacher_targets()
    teacher.candidates = [[], []]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in range(2)]
    assert RankMimicLoss(3)(student, teacher, targets)["rank"].item() == 0.0


def test_pfi_by_hand():
    student, teacher = student_output(), teacher_targets()
    got = PFILoss(4, 4, 3)(student, teacher, [])["fpn"]
    levels = []
    for s, t, sl, tp, stride in zip(student.fpn, teacher.fpn, student.cls_logits, teacher.cls_probs, STRIDES):
        total, count = 0.0, 0
        for b, (h, w) in enumerate(IMAGE_SIZES):
            for y in range(math.ceil(h / stride)):
                for x in range(math.ceil(w / stride)):
                    p = sum((1 / (1 + math.exp(-a)) - c) ** 2 for a, c in zip(sl[b, :, y, x].tolist(), tp[b, :, y, x].tolist())) / 3
                    f = sum((a - c) ** 2 for a, c in zip(s[b, :, y, x].tolist(), t[b, :, y, x].tolist())) / 4
                    total, count = total + p * f, count + 1
        levels.append(total / count)
    assert math.isclose(got.item(), sum(levels) / len(levels), rel_tol=1e-5)
    got.backward()
    assert grads_finite(student.fpn)
    assert all(m.grad is None for m in student.cls_logits)  # the prediction difference is only a weight


def test_pfi_zero_when_equal_and_padding():
    student = student_output(grad=False)
    loss = PFILoss(4, 4, 3)
    assert loss(student, teacher_from_student(student), [])["fpn"].item() < 1e-10
    teacher = teacher_targets()
    before = loss(student, teacher, [])["fpn"]
    student.fpn = scramble_padding(student.fpn)
    student.cls_logits = scramble_padding(student.cls_logits, value=float("inf"))
    teacher.fpn = scramble_padding(teacher.fpn, value=float("nan"))
    assert torch.equal(loss(student, teacher, [])["fpn"], before)


def test_pfi_adapter_and_anchor_mismatch():
    student = student_output(c=4, a=1)
    loss = PFILoss(4, 8, 3)
    loss(student, teacher_targets(c=8, a=9), [])["fpn"].backward()
    assert loss.adapter.weight.grad is not None and grads_finite(student.fpn)
