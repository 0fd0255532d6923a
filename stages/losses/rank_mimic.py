"""Rank Mimicking and Prediction-guided Feature Imitation (Li et al., "Knowledge Distillation for
Object Detection via Rank Mimicking and Prediction-guided Feature Imitation", AAAI 2022).

RM (paper weight 4): per GT, the teacher's assigner picked candidate anchors M and scored them at
the GT's class (`teacher.candidates[b][g] = (index [M] into the flattened anchors, scores [M])`).
The student scores the SAME anchors at the same class; the loss is
KL(softmax(z_t / T) || softmax(z_s / T)) over the candidates, anchor by anchor (no sorting: the
point is to keep the teacher's ranking of each anchor), averaged over the batch's GT objects (see the
table; candidates on padded cells are dropped). The indices address
`flatten_levels` order, so student and teacher need the same anchors per location.
z (`rm.scores`): "logits" (default) = the pre-sigmoid class scores (the cache stores the teacher's
sigmoid probability p; z_t = log(p / (1 - p)), p clamped to [1e-6, 1 - 1e-6]); "probs" = the
sigmoid probabilities (a softmax over values in [0, 1] is nearly uniform, so
the rank signal is weak). T (`rm.temperature`) = 1. The paper's exact definition of the score fed
to the softmax could not be read here (its method text was not reachable); logits are chosen
because a softmax over probabilities cannot express the teacher's ranking sharply.

| paper term | here         | weight (caller)   | normaliser                 |
|------------|--------------|-------------------|----------------------------|
| L_RM       | rm/rank      | 4                 | M = every GT object of the batch (`rm.mean_over: objects`) |
| L_PFI      | pfi/fpn      | 1.5               | mean over valid cells per level, mean over levels |
Why M counts every GT: the paper's L_RM = 1/M sum_{j=1..M} sum_i P^t_ij log(P^t_ij / P^s_ij), M the
number of objects (as recalled from the paper; its method text could not be fetched through the tools
here to quote); nothing in the formula drops an object, and an object with one candidate
has the same one-point distribution on both sides, so its KL is exactly 0 and it only enters M (as
does an object whose candidates all lie on padding, or one the assigner gave no candidate). The text
does not discuss such objects, so the other reading is a named option: `mean_over: "ranked"` averages
over the GTs with >= 2 candidates on valid cells only (the GTs that have a ranking to mimic), which is
M / M_ranked times larger, e.g. 4/3 when 1 of 4 GTs has a single candidate.

PFI (paper weight 1.5): per level and valid cell, the weight P = mean over the A*K class channels of
(student prob - teacher prob)^2 (detached: a guide, not a target; per-location max over anchors when
A differs) scales the feature imitation F = mean over channels of (adapter(student FPN) - teacher
FPN)^2; the loss is mean over valid cells of P * F, averaged over levels. The detach of P and
the mean over levels are kept as they were: the paper text that would settle them could not be
read here. It needs dense predictions
on both sides: for Faster R-CNN the registry refuses it (uniform weights would just be `mse`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.detectors.contract import DetectorOutput, flatten_levels
from stages.losses.common import check_levels, make_adapter, masked_mean, match_class_maps, valid_masks
from stages.losses.targets import TeacherTargets


def rank_kl(teacher_scores: Tensor, student_scores: Tensor) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) between two score vectors [M] (same anchor order)."""
    return F.kl_div(F.log_softmax(student_scores, dim=0), F.softmax(teacher_scores.detach(), dim=0),
                    reduction="sum")


PROB_EPS = 1e-6
# what L_RM's 1/M counts: every GT object (the paper's M) or only GTs with >= 2 candidates
MEAN_OVER = ("objects", "ranked")


class RankMimicLoss(nn.Module):
    name = "rm"

    def __init__(self, num_classes: int, scores: str = "logits", temperature: float = 1.0,
                 mean_over: str = "objects"):
        super().__init__()
        if scores not in ("logits", "probs") or temperature <= 0:
            raise ValueError(f"rm: scores must be logits|probs and temperature > 0, got {scores!r}, {temperature}")
        if mean_over not in MEAN_OVER:
            raise ValueError(f"rm: mean_over must be one of {MEAN_OVER}, got {mean_over!r}")
        self.num_classes = num_classes
        self.over_all_objects = mean_over == "objects"
        self.use_logits, self.temperature = scores == "logits", temperature

    def needs(self) -> set[str]:
        return {"candidates"}

    def forward(self, student: DetectorOutput, teacher: TeacherTargets, targets: list[dict]) -> dict[str, Tensor]:
        k = self.num_classes
        logits = flatten_levels([m.float() for m in student.cls_logits], k)  # [B, N, K]
        num_anchors = student.cls_logits[0].shape[1] // k
        valid = valid_masks(student.image_sizes, [m.shape[-2:] for m in student.cls_logits], student.strides,
                            logits.device)
        anchor_valid = flatten_levels([v.expand(-1, num_anchors, -1, -1) for v in valid], 1)[..., 0] > 0
        if len(teacher.candidates) != logits.shape[0]:
            raise ValueError(f"rm: candidates for {len(teacher.candidates)} images, batch has {logits.shape[0]}")
        terms, num_objects = [], 0
        for b, per_gt in enumerate(teacher.candidates):
            labels = targets[b]["labels"]
            if len(per_gt) != len(labels):
                raise ValueError(f"rm: image {b} has candidates for {len(per_gt)} GTs but {len(labels)} GT boxes")
            num_objects += len(labels)
            for (index, t_scores), label in zip(per_gt, labels.tolist()):
                index = index.to(logits.device).long()
                if index.numel() and int(index.max()) >= logits.shape[1]:
                    raise ValueError(
                        f"rm: candidate index {int(index.max())} outside the student's {logits.shape[1]} "
                        "anchors: student and teacher need the same anchors per location and levels"
                    )
                keep = anchor_valid[b, index]
                if int(keep.sum()) < 2:
                    continue
                s_z = logits[b, index[keep], label]
                t_z = t_scores.to(logits.device).float()[keep]
                if self.use_logits:
                    t_z = torch.logit(t_z.clamp(PROB_EPS, 1 - PROB_EPS))
                else:
                    s_z = s_z.sigmoid()
                terms.append(rank_kl(t_z / self.temperature, s_z / self.temperature))
        if not terms:  # no object with >= 2 candidates: every KL is 0 under either reading
            return {"rank": logits.new_zeros(())}
        return {"rank": torch.stack(terms).sum() / (num_objects if self.over_all_objects else len(terms))}


class PFILoss(nn.Module):
    name = "pfi"

    def __init__(self, student_channels: int, teacher_channels: int, num_classes: int):
        super().__init__()
        self.adapter = make_adapter(student_channels, teacher_channels)
        self.num_classes = num_classes

    def needs(self) -> set[str]:
        return {"fpn", "cls"}

    def forward(self, student: DetectorOutput, teacher: TeacherTargets, targets: list[dict]) -> dict[str, Tensor]:
        check_levels(self.name, student.fpn, teacher.fpn)
        check_levels(self.name, student.cls_logits, teacher.cls_probs)
        valid = valid_masks(student.image_sizes, [f.shape[-2:] for f in student.fpn], student.strides,
                            student.fpn[0].device)
        levels = []
        for s, t, logits, probs, v in zip(student.fpn, teacher.fpn, student.cls_logits, teacher.cls_probs, valid):
            sp, tp = match_class_maps(logits.float().sigmoid(), probs.float(), self.num_classes)
            p_diff = ((sp - tp) ** 2).mean(dim=1, keepdim=True).detach()
            f_diff = ((self.adapter(s.float()) - t.float().detach()) ** 2).mean(dim=1, keepdim=True)
            levels.append(masked_mean(p_diff * f_diff, v))
        return {"fpn": torch.stack(levels).mean()}
