"""`TeacherTargets`: what the distillation losses get from the teacher, cached or live.

Stage 2 builds it either from a cache record batch (offline) or from a live teacher forward
(online); the losses only see this object, so both modes run the same loss code.
Shapes follow `stages.detectors.contract` (B images, per-level maps at the batch's padded size).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass
class TeacherTargets:
    fpn: list[Tensor] = field(default_factory=list)  # per level [B, C_t, H_l, W_l]
    cls_probs: list[Tensor] = field(default_factory=list)  # per level [B, A*K, H_l, W_l], sigmoid probabilities
    box_reg: list[Tensor] = field(default_factory=list)  # per level [B, A*R, H_l, W_l], raw regression / GFL logits
    quality: list[Tensor] = field(default_factory=list)  # per level [B, A, H_l, W_l] sigmoid (FCOS centerness); [] if none
    # Rank Mimicking: per image, per GT: (candidate indices into the flattened anchors [M] int64,
    # teacher scores at the GT class [M] float32)
    candidates: list[list[tuple[Tensor, Tensor]]] = field(default_factory=list)
    detections: list[dict[str, Tensor]] = field(default_factory=list)  # per image boxes/scores/labels
    head: nn.Module | None = None  # frozen teacher dense head (CrossKD); see detectors' `run_from`
    tower_mean: dict[str, Tensor] = field(default_factory=dict)  # branch -> [C_t] pre-activation mean at the reuse index
    tower_std: dict[str, Tensor] = field(default_factory=dict)  # branch -> [C_t]
    reuse_index: int = -1
