"""Plain feature imitation on the FPN levels: the baselines every method is compared with.

- mse:    mean over valid cells and teacher channels of (adapter(s) - t)^2, averaged over levels.
- cosine: mean over valid cells of 1 - cos(adapter(s), t), the cosine taken over channels at each
          location, averaged over levels.
The adapter is a 1x1 conv shared by all levels when the student's FPN width differs from the
teacher's, identity otherwise. Both work for every detector, Faster R-CNN included.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from stages.detectors.contract import DetectorOutput
from stages.losses.common import check_levels, make_adapter, masked_mean, valid_masks
from stages.losses.targets import TeacherTargets


class FeatureImitation(nn.Module):
    """Base of the FPN-level losses: adapter + per-level masked term, mean over levels."""

    name = "feature"

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.adapter = make_adapter(student_channels, teacher_channels)

    def needs(self) -> set[str]:
        return {"fpn"}

    def level_loss(self, s: Tensor, t: Tensor, mask: Tensor) -> Tensor:  # [B,C,H,W] x2, [B,1,H,W]
        raise NotImplementedError

    def forward(self, student: DetectorOutput, teacher: TeacherTargets, targets: list[dict]) -> dict[str, Tensor]:
        check_levels(self.name, student.fpn, teacher.fpn)
        masks = valid_masks(student.image_sizes, [f.shape[-2:] for f in student.fpn], student.strides,
                            student.fpn[0].device)
        total = sum(
            self.level_loss(self.adapter(s.float()), t.float(), m)
            for s, t, m in zip(student.fpn, teacher.fpn, masks)
        )
        return {"fpn": total / len(masks)}


class MSEFeatureLoss(FeatureImitation):
    """FitNet-style MSE on FPN features (masked mean over valid cells x teacher channels)."""

    name = "mse"

    def level_loss(self, s: Tensor, t: Tensor, mask: Tensor) -> Tensor:
        return masked_mean((s - t.detach()) ** 2, mask)


class CosineFeatureLoss(FeatureImitation):
    """1 - cosine similarity over channels per location, masked mean over valid cells."""

    name = "cosine"

    def level_loss(self, s: Tensor, t: Tensor, mask: Tensor) -> Tensor:
        cos = F.cosine_similarity(s, t.detach(), dim=1, eps=1e-8)[:, None]  # [B, 1, H, W]
        return masked_mean(1.0 - cos, mask)
