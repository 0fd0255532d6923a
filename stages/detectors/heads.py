"""Dense heads (RetinaNet, FCOS, GFL) driven layer by layer, so the towers can be read and re-entered.

Each head has a classification and a regression tower (`classification_head.conv`,
`regression_head.conv`, torchvision's names) of `head_convs` layers; layer i is
conv (+ norm) -> "pre-activation" -> ReLU -> "post-activation". `forward` records both for every
layer and level (the contract's `TowerFeatures`), and `run_from(i, cls_pre, reg_pre)` re-enters the
towers at layer i's activation with foreign pre-activation maps (CrossKD: student features through
the frozen teacher head). Both go through `TowerHead._continue`, so they agree bit for bit.

RetinaNet and FCOS subclass torchvision's heads (same state_dict keys, same `compute_loss`);
GFL is ours (GN towers, per-level learnable scale, 4 x (reg_max+1) distribution logits).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.misc import Conv2dNormActivation

from stages.detectors.backbone import gn_groups
from stages.detectors.contract import TowerFeatures


@dataclass
class HeadOutput:
    """Per level maps in the contract's layout (see `DetectorOutput`)."""

    cls_tower: TowerFeatures
    reg_tower: TowerFeatures
    cls_logits: list[Tensor] = field(default_factory=list)  # [B, A*K, H, W]
    box_reg: list[Tensor] = field(default_factory=list)  # [B, A*R, H, W]
    quality: list[Tensor] = field(default_factory=list)  # [B, A, H, W]; [] if the head has none


def _flat(seq: nn.Module) -> Iterator[nn.Module]:
    for m in seq.children():
        if isinstance(m, nn.Sequential):
            yield from _flat(m)
        else:
            yield m


def split_tower(seq: nn.Sequential) -> list[list[nn.Module]]:
    """The layers of a conv tower: per layer, the modules before its ReLU (conv [+ norm])."""
    layers: list[list[nn.Module]] = []
    current: list[nn.Module] = []
    for m in _flat(seq):
        if isinstance(m, nn.ReLU):
            if not current:
                raise ValueError("tower has an activation without a conv before it")
            layers.append(current)
            current = []
        elif isinstance(m, nn.Conv2d | nn.GroupNorm | nn.BatchNorm2d):
            current.append(m)
        else:
            raise ValueError(f"unsupported tower module {type(m).__name__} (towers are conv [+ norm] + ReLU)")
    if current:
        raise ValueError("tower ends without an activation")
    return layers


def _apply(modules: list[nn.Module], x: Tensor) -> Tensor:
    for m in modules:
        x = m(x)
    return x


def _init_conv(conv: nn.Conv2d, std: float = 0.01, bias: float = 0.0) -> nn.Conv2d:
    nn.init.normal_(conv.weight, std=std)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, bias)
    return conv


def _prior_bias(prior: float = 0.01) -> float:
    return -math.log((1 - prior) / prior)


class TowerHead:
    """Mixin: tower-recording `forward` and `run_from` for a head with two towers.

    Subclasses provide `classification_head.conv`, `regression_head.conv` and
    `predict(level, cls_feat, reg_feat) -> (cls_logits, box_reg, quality or None)`.
    """

    classification_head: nn.Module
    regression_head: nn.Module

    def predict(self, level: int, cls_feat: Tensor, reg_feat: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        raise NotImplementedError

    def tower_layers(self) -> tuple[list[list[nn.Module]], list[list[nn.Module]]]:
        return split_tower(self.classification_head.conv), split_tower(self.regression_head.conv)

    @staticmethod
    def _continue(
        layers: list[list[nn.Module]], index: int, pre: Tensor, record: TowerFeatures | None
    ) -> Tensor:
        """Activation of layer `index` on `pre`, then the remaining layers; optionally record them."""
        x = F.relu(pre)  # never in place: `pre` is part of the output
        if record is not None:
            record.pre[index].append(pre)
            record.post[index].append(x)
        for i in range(index + 1, len(layers)):
            pre = _apply(layers[i], x)
            x = F.relu(pre)
            if record is not None:
                record.pre[i].append(pre)
                record.post[i].append(x)
        return x

    def forward(self, features: list[Tensor]) -> HeadOutput:
        cls_layers, reg_layers = self.tower_layers()
        n = len(cls_layers)
        out = HeadOutput(
            TowerFeatures([[] for _ in range(n)], [[] for _ in range(n)]),
            TowerFeatures([[] for _ in range(n)], [[] for _ in range(n)]),
        )
        for level, x in enumerate(features):
            c = self._continue(cls_layers, 0, _apply(cls_layers[0], x), out.cls_tower)
            r = self._continue(reg_layers, 0, _apply(reg_layers[0], x), out.reg_tower)
            self._collect(out, self.predict(level, c, r))
        return out

    def run_from(
        self, index: int, cls_pre: list[Tensor], reg_pre: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Re-enter both towers at layer `index`'s activation -> (cls_logits, box_reg, quality) per level.

        `cls_pre[l]` / `reg_pre[l]` have the shape of `out.cls_tower.pre[index][l]`; the result is
        what `forward` would output had its towers produced those pre-activations. `quality` is []
        for heads without one.
        """
        cls_layers, reg_layers = self.tower_layers()
        if not 0 <= index < len(cls_layers):
            raise IndexError(f"tower index {index} out of range for a {len(cls_layers)}-layer head")
        if len(cls_pre) != len(reg_pre):
            raise ValueError(f"{len(cls_pre)} cls levels but {len(reg_pre)} reg levels")
        out = HeadOutput(TowerFeatures(), TowerFeatures())
        for level, (cp, rp) in enumerate(zip(cls_pre, reg_pre)):
            c = self._continue(cls_layers, index, cp, None)
            r = self._continue(reg_layers, index, rp, None)
            self._collect(out, self.predict(level, c, r))
        return out.cls_logits, out.box_reg, out.quality

    @staticmethod
    def _collect(out: HeadOutput, pred: tuple[Tensor, Tensor, Tensor | None]) -> None:
        cls, box, quality = pred
        out.cls_logits.append(cls)
        out.box_reg.append(box)
        if quality is not None:
            out.quality.append(quality)


def _check_convs(num_convs: int) -> None:
    if num_convs < 1:
        raise ValueError(f"head_convs must be >= 1, got {num_convs}")


def _resize_tower(conv: nn.Sequential, num_convs: int, channels: int, norm_layer=None) -> nn.Sequential:
    """torchvision's RetinaNet towers have 4 layers: truncate, or extend with same-style layers."""
    layers = list(conv)[:num_convs]
    while len(layers) < num_convs:
        block = Conv2dNormActivation(channels, channels, norm_layer=norm_layer)
        _init_conv(block[0])
        layers.append(block)
    return nn.Sequential(*layers)


class RetinaNetDenseHead(TowerHead, RetinaNetHead):
    """torchvision's RetinaNetHead with `head_convs` layers: v1 conv + ReLU towers; `group_norm`
    (torchvision v2) conv + GN(32) + ReLU towers and the GIoU box loss."""

    def __init__(
        self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4, group_norm: bool = False
    ):
        _check_convs(num_convs)
        norm = partial(nn.GroupNorm, gn_groups(in_channels)) if group_norm else None
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm)
        for branch in (self.classification_head, self.regression_head):
            if len(branch.conv) != num_convs:
                branch.conv = _resize_tower(branch.conv, num_convs, in_channels, norm)
        if group_norm:
            self.regression_head._loss_type = "giou"  # as torchvision's retinanet_resnet50_fpn_v2

    def predict(self, level: int, cls_feat: Tensor, reg_feat: Tensor) -> tuple[Tensor, Tensor, None]:
        return self.classification_head.cls_logits(cls_feat), self.regression_head.bbox_reg(reg_feat), None


class FCOSDenseHead(TowerHead, FCOSHead):
    """torchvision's FCOSHead (conv + GN + ReLU towers; centerness on the regression tower).

    GroupNorm uses 32 groups where the width allows (`gn_groups`), so narrow students work.
    `box_reg` is the ReLU'd (l, t, r, b) distances in anchor-size units, as torchvision decodes them.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4):
        _check_convs(num_convs)
        nn.Module.__init__(self)
        norm = partial(nn.GroupNorm, gn_groups(in_channels))
        self.box_coder = det_utils.BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(
            in_channels, num_anchors, num_classes, num_convs, norm_layer=norm
        )
        self.regression_head = FCOSRegressionHead(in_channels, num_anchors, num_convs, norm_layer=norm)

    def predict(self, level: int, cls_feat: Tensor, reg_feat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        reg = self.regression_head
        return (
            self.classification_head.cls_logits(cls_feat),
            F.relu(reg.bbox_reg(reg_feat)),
            reg.bbox_ctrness(reg_feat),
        )


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level in GFL)."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class Branch(nn.Module):
    """A tower (`conv`) plus named output convs."""

    def __init__(self, conv: nn.Sequential, **outputs: nn.Module):
        super().__init__()
        self.conv = conv
        for name, module in outputs.items():
            setattr(self, name, module)


def gn_tower(channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [
            _init_conv(nn.Conv2d(channels, channels, 3, padding=1, bias=False)),
            nn.GroupNorm(gn_groups(channels), channels),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers)


class GFLDenseHead(TowerHead, nn.Module):
    """Generalized Focal Loss head (Li et al. 2020): one anchor point per location.

    cls_logits: [B, K, H, W] joint class-IoU logits (no separate quality branch).
    box_reg:    [B, 4*(reg_max+1), H, W] per-level-scaled logits of the distance distributions,
                side-major (l, t, r, b) x bins, distances in stride units.
    """

    def __init__(
        self, in_channels: int, num_classes: int, num_convs: int = 4, reg_max: int = 16, num_levels: int = 5
    ):
        _check_convs(num_convs)
        if reg_max < 1:
            raise ValueError(f"reg_max must be >= 1, got {reg_max}")
        super().__init__()
        self.num_classes, self.reg_max = num_classes, reg_max
        self.classification_head = Branch(
            gn_tower(in_channels, num_convs),
            cls_logits=_init_conv(nn.Conv2d(in_channels, num_classes, 3, padding=1), bias=_prior_bias()),
        )
        self.regression_head = Branch(
            gn_tower(in_channels, num_convs),
            bbox_reg=_init_conv(nn.Conv2d(in_channels, 4 * (reg_max + 1), 3, padding=1)),
        )
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

    def predict(self, level: int, cls_feat: Tensor, reg_feat: Tensor) -> tuple[Tensor, Tensor, None]:
        box = self.scales[level](self.regression_head.bbox_reg(reg_feat))
        return self.classification_head.cls_logits(cls_feat), box, None
