"""Structural KD (de Rijk et al., "Structural Knowledge Distillation for Object Detection",
NeurIPS 2022; no official code). The paper's feature loss is
    L = sum over the K neck outputs of (1 / N_k) * sum over the level's H*W*C elements of D(phi(T), phi(a(S)))
phi: min-max rescaling to [0, 1]; a: optional 1x1 adapter; D: an SSIM-based dissimilarity with an
11x11 Gaussian window (sigma 1.5), C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 1 (the dynamic range after phi).

| paper term                  | here                              | weight / normaliser                      |
|-----------------------------|-----------------------------------|------------------------------------------|
| phi (min-max)               | `minmax` per image map (all channels and valid cells of a level; `ssim.minmax: map`) | - |
| SSIM(x, y) per cell         | `ssim_map` (valid Gaussian filtering, as Wang et al. and pytorch-msssim) | - |
| side shorter than the window | not smoothed along that side (`ssim.short_side: skip`, as pytorch-msssim) | - |
| D                           | (1 - SSIM) / 2 (`ssim.half: true`; false = 1 - SSIM) | -                  |
| 1/N_k sum over elements     | mean over channels and cells per image, mean over images | N_k = C*h*w       |
| sum over k                  | sum over levels (`ssim.levels: sum`; `mean` averages them)     | -             |
| lambda                      | the caller's weight (`distill.losses.ssim`)  | paper: 2-4                       |
What could not be read here: the method section of the paper beyond the general form above (its
text was not reachable through the tools available), so the granularity of phi (per map, the
default: the general form applies phi to the level's whole tensor; per channel would make the loss
blind to per-channel scale) and the 1/2 in D are documented choices, each a param.
Maps smaller than the window (P7 at 800x1333 is 7x11; P5-P7 of any small view): the default
(`short_side="skip"`) does what pytorch-msssim, the project's SSIM oracle, does: no Gaussian smoothing
along a side shorter than the window (a side that fits is still filtered). Why the oracle's way: a
window that does not fit cannot be placed (Wang et al. define the statistics over positions where it
fits), and skipping invents no cells, whereas replicate padding (`short_side="pad"`, kept as a named
option) makes each border cell stand in for up to (11 - side) / 2 cells that do not exist: on a
16/8/4/2 pyramid its per-level losses were 1.0x, 4.0x, 2.2x and 2.6x the oracle's, and the gradient
of an 8x8 map pointed elsewhere (cosine 0.28). With both behaviours, maps of any size agree with
pytorch-msssim's (tests/test_losses_conformance.py: >= 11 px and 8x8, 7x11, 4x4, 2x2).
Each image's valid block is cropped first, so the batch's padding never enters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.detectors.contract import DetectorOutput
from stages.losses.common import check_levels, crop_valid, wide
from stages.losses.targets import TeacherTargets

C1 = 0.01**2
C2 = 0.03**2


def gaussian_window(size: int, sigma: float) -> Tensor:
    """Normalised 1-D Gaussian [size]."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def minmax(x: Tensor, eps: float = 1e-6, per_channel: bool = False) -> Tensor:
    """x [C, h, w] mapped to [0, 1]: over the whole map (default) or each channel over its cells."""
    if per_channel:
        flat = x.flatten(1)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        return (x - lo[:, None, None]) / (hi - lo + eps)[:, None, None]
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo + eps)


SHORT_SIDES = ("skip", "pad")


def ssim_map(x: Tensor, y: Tensor, window: Tensor, short_side: str = "skip") -> Tensor:
    """SSIM of x, y [C, h, w] (values in [0, 1]) with separable window [k] at each valid window position.

    A side shorter than k: "skip" leaves it unfiltered (pytorch-msssim), "pad" replicate-pads it to k.
    Runs in float32 or wider, autocast off: var = E[x^2] - mu^2 cancels badly in bf16."""
    if short_side not in SHORT_SIDES:
        raise ValueError(f"ssim short_side must be one of {SHORT_SIDES}, got {short_side!r}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = torch.promote_types(x.dtype, torch.float32)
        x, y, window = x.to(dtype), y.to(dtype), window.to(dtype)
        c, k = x.shape[0], window.numel()
        wx = window.view(1, 1, 1, k).expand(c, 1, 1, k)
        wy = window.view(1, 1, k, 1).expand(c, 1, k, 1)

        short_h, short_w = x.shape[1] < k, x.shape[2] < k
        if short_side == "pad":
            ph, pw = max(0, k - x.shape[1]), max(0, k - x.shape[2])
            pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
            short_h = short_w = False

        def blur(z: Tensor) -> Tensor:  # valid filtering along each side that is (or was padded to) >= k
            z = z[None]
            if short_side == "pad" and (ph or pw):
                z = F.pad(z, pad, mode="replicate")
            if not short_w:
                z = F.conv2d(z, wx, groups=c)
            if not short_h:
                z = F.conv2d(z, wy, groups=c)
            return z[0]

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
                 adapter: bool = False, minmax: str = "map", levels: str = "sum", half: bool = True,
                 short_side: str = "skip"):
        super().__init__()
        if short_side not in SHORT_SIDES:
            raise ValueError(f"ssim short_side must be one of {SHORT_SIDES}, got {short_side!r}")
        self.short_side = short_side
        if minmax not in ("map", "channel") or levels not in ("sum", "mean"):
            raise ValueError(f"ssim: minmax must be map|channel, levels sum|mean; got {minmax!r}, {levels!r}")
        self.per_channel, self.level_sum, self.half = minmax == "channel", levels == "sum", half
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
            s_map, t_map = self.adapter(wide(s_map)), wide(t_map).detach()
            per_image = []
            for b, size in enumerate(student.image_sizes):
                x = minmax(crop_valid(s_map, b, size, stride), per_channel=self.per_channel)
                y = minmax(crop_valid(t_map, b, size, stride), per_channel=self.per_channel)
                d = 1 - ssim_map(x, y, window, self.short_side)
                per_image.append((d / 2 if self.half else d).mean())
            levels.append(torch.stack(per_image).mean())
        total = torch.stack(levels)
        return {"fpn": total.sum() if self.level_sum else total.mean()}
