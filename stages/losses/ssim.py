"""Structural KD (de Rijk et al., "Structural Knowledge Distillation for Object Detection"):
(1 - SSIM) / 2 between student and teacher FPN maps instead of an Lp distance.

Per image, per level, per channel: crop the image's valid cells, min-max normalise each channel
map to [0, 1] over those cells (student and teacher separately), then SSIM with a Gaussian window
(11, sigma 1.5; `DistillParams.ssim`), constants C1 = 0.01^2, C2 = 0.03^2 (dynamic range 1).
Windows at the border (and maps smaller than the window, e.g. P7 of a small image: 1 x 2 cells)
read replicate padding of the valid block, so padding of the batch never enters. The loss is the
mean of (1 - SSIM) / 2 over channels and cells, averaged over images, then over levels.
The paper weighs it with lambda ~ 2-4 (the caller's weight). Student widths differing from the
teacher's need the 1x1 adapter (always built then); with equal widths it is optional
(`DistillParams.ssim.adapter`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.detectors.contract import DetectorOutput
from stages.losses.common import check_levels, crop_valid
from stages.losses.targets import TeacherTargets

C1 = 0.01**2
C2 = 0.03**2


def gaussian_window(size: int, sigma: float) -> Tensor:
    """Normalised 1-D Gaussian [size]."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def minmax(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Each channel of x [C, h, w] mapped to [0, 1] over its cells."""
    flat = x.flatten(1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    return (x - lo[:, None, None]) / (hi - lo + eps)[:, None, None]


def ssim_map(x: Tensor, y: Tensor, window: Tensor) -> Tensor:
    """Per-cell SSIM of x, y [C, h, w] (values in [0, 1]) with separable window [k]; replicate padding.

    Runs in float32 or wider, autocast off: var = E[x^2] - mu^2 cancels badly in bf16."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = torch.promote_types(x.dtype, torch.float32)
        x, y, window = x.to(dtype), y.to(dtype), window.to(dtype)
        c, k = x.shape[0], window.numel()
        wx = window.view(1, 1, 1, k).expand(c, 1, 1, k)
        wy = window.view(1, 1, k, 1).expand(c, 1, k, 1)

        def blur(z: Tensor) -> Tensor:
            z = F.pad(z[None], (k // 2, k // 2, k // 2, k // 2), mode="replicate")
            return F.conv2d(F.conv2d(z, wx, groups=c), wy, groups=c)[0]

        mu_x, mu_y = blur(x), blur(y)
        var_x = blur(x * x) - mu_x**2
        var_y = blur(y * y) - mu_y**2
        cov = blur(x * y) - mu_x * mu_y
        num = (2 * mu_x * mu_y + C1) * (2 * cov + C2)
        den = (mu_x**2 + mu_y**2 + C1) * (var_x + var_y + C2)
        return num / den


class SSIMLoss(nn.Module):
    name = "ssim"

    def __init__(self, student_channels: int, teacher_channels: int, window: int = 11, sigma: float = 1.5,
                 adapter: bool = False):
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"ssim window must be a positive odd number, got {window}")
        if adapter or student_channels != teacher_channels:
            self.adapter: nn.Module = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        else:
            self.adapter = nn.Identity()
        self.register_buffer("window", gaussian_window(window, sigma), persistent=False)

    def needs(self) -> set[str]:
        return {"fpn"}

    def forward(self, student: DetectorOutput, teacher: TeacherTargets, targets: list[dict]) -> dict[str, Tensor]:
        check_levels(self.name, student.fpn, teacher.fpn)
        window = self.window.to(student.fpn[0].device)
        levels = []
        for s_map, t_map, stride in zip(student.fpn, teacher.fpn, student.strides):
            s_map, t_map = self.adapter(s_map.float()), t_map.float().detach()
            per_image = [
                ((1 - ssim_map(minmax(crop_valid(s_map, b, size, stride)),
                               minmax(crop_valid(t_map, b, size, stride)), window)) / 2).mean()
                for b, size in enumerate(student.image_sizes)
            ]
            levels.append(torch.stack(per_image).mean())
        return {"fpn": torch.stack(levels).mean()}
