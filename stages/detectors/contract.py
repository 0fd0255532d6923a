"""The one output contract every detector in the zoo returns.

Losses, target extraction and the caching loop only ever see `DetectorOutput`, so no code
special-cases a detector class. Shapes use B = batch, C = FPN width, K = classes, A = anchors
per location, L = levels. Boxes are xyxy float32 in the pixel frame of the padded input batch.

Dense detectors (RetinaNet, FCOS, GFL) fill every field. Faster R-CNN fills `fpn`,
`image_sizes`, `strides` and `detections` only (its dense fields are empty lists), so only the
feature-level distillation methods apply to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TowerFeatures:
    """Head-tower activations for one branch ('cls' or 'reg').

    pre[i][l]  : [B, C, H_l, W_l] output of tower layer i before its activation (conv + norm)
    post[i][l] : [B, C, H_l, W_l] the same after the activation (input of layer i + 1)
    i in [0, head_convs), l in [0, L)
    """

    pre: list[list[Tensor]] = field(default_factory=list)
    post: list[list[Tensor]] = field(default_factory=list)


@dataclass
class DetectorOutput:
    fpn: list[Tensor]  # per level [B, C, H_l, W_l], P3..P7
    strides: list[int]  # per level, pixels per feature cell
    image_sizes: list[tuple[int, int]]  # per image (h, w) valid region inside the padded batch
    cls_tower: TowerFeatures = field(default_factory=TowerFeatures)
    reg_tower: TowerFeatures = field(default_factory=TowerFeatures)
    cls_logits: list[Tensor] = field(default_factory=list)  # per level [B, A*K, H_l, W_l], pre-sigmoid
    box_reg: list[Tensor] = field(default_factory=list)  # per level [B, A*R, H_l, W_l]; R = 4, or 4*(reg_max+1) for GFL
    quality: list[Tensor] = field(default_factory=list)  # per level [B, A, H_l, W_l] (FCOS centerness logits); [] if none
    anchors: list[Tensor] = field(default_factory=list)  # per level [H_l*W_l*A, 4] xyxy (FCOS/GFL: stride-sized boxes at the points)
    detections: list[dict[str, Tensor]] | None = None  # per image {boxes [N,4] xyxy, scores [N], labels [N] int64 (0-based)}
    losses: dict[str, Tensor] | None = None  # GT detection losses, filled when forward() got targets

    @property
    def num_anchors(self) -> int:
        """A: anchors per feature location."""
        if not self.anchors:
            return 0
        h, w = self.fpn[0].shape[-2:]
        return self.anchors[0].shape[0] // (h * w)


def flatten_levels(maps: list[Tensor], per_anchor: int) -> Tensor:
    """[B, A*X, H, W] per level -> [B, sum_l H_l*W_l*A, X] in (level, y, x, anchor) order.

    This is the index space of the contract's flattened anchors (`torch.cat(anchors)`), of
    Rank Mimicking's candidate indices and of every dense cached target.
    """
    out = []
    for m in maps:
        b, ax, h, w = m.shape
        a = ax // per_anchor
        out.append(m.view(b, a, per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, per_anchor))
    return torch.cat(out, dim=1)
