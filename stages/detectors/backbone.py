"""ResNet + FPN backbone shared by every detector in the zoo: P3..P7, strides 8..128.

Built from torchvision pieces with torchvision's attribute names (`body`, `fpn`), so a
torchvision detection checkpoint's `backbone.*` keys load as they are. We train from scratch,
so the ResNet keeps trainable `BatchNorm2d` (torchvision's pretrained detectors freeze BN:
`FrozenBatchNorm2d` has the same state_dict keys minus `num_batches_tracked`, which
`stages.detectors.build.load_detector` tolerates).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

STRIDES = [8, 16, 32, 64, 128]  # P3..P7
PAD_MULTIPLE = STRIDES[-1]  # inputs are padded to a multiple of the coarsest stride
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


class LastLevelP6P7NoReLU(LastLevelP6P7):
    """mmdetection's extra levels (`relu_before_extra_convs=False`): P7 = conv(P6), no ReLU between."""

    def forward(self, p, c, names):
        x = c[-1] if not self.use_P5 else p[-1]
        p6 = self.p6(x)
        p.extend([p6, self.p7(p6)])
        names.extend(["p6", "p7"])
        return p, names


def build_backbone(
    name: str, fpn_channels: int, pretrained: str = "", variant: str = "", arch: str = ""
) -> BackboneWithFPN:
    """ResNet `name` (weights=None, trainable BN) + FPN on C3..C5 + P6/P7.

    Returns the torchvision `BackboneWithFPN`; its forward gives an OrderedDict
    {'0': P3, '1': P4, '2': P5, 'p6': P6, 'p7': P7}, each [B, fpn_channels, H/s, W/s].
    `pretrained`: optional local path to a torchvision ResNet state_dict, or to a kdcache detector
    checkpoint whose ResNet body is taken (`backbone.body.*`); no downloads.
    `variant` (ModelParams.variant) picks the extra levels of the checkpoint family:
      ''/'tv_v1': P6 = conv(P5), P7 = conv(relu(P6))   (torchvision v1 RetinaNet / FCOS)
      'tv_v2'   : P6 = conv(C5), P7 = conv(relu(P6))   (torchvision retinanet_resnet50_fpn_v2)
      'mmdet'   : P7 = conv(P6) without ReLU; P6 from C5 for RetinaNet ('on_input'), else from P5;
                  FCOS ('on_output', relu_before_extra_convs) is torchvision's v1 layout
      'mmdet_caffe': the same on a caffe-style ResNet (stride 2 in each stage's first 1x1 conv)
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    if fpn_channels < 1:
        raise ValueError(f"fpn_channels must be >= 1, got {fpn_channels}")
    net = getattr(resnet, name)(weights=None)
    if pretrained:
        load_resnet_weights(net, pretrained)
    if variant == "mmdet_caffe":
        caffe_strides(net)
    c5 = net.fc.in_features  # 512 (basic blocks) or 2048 (bottlenecks)
    return BackboneWithFPN(
        net,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[c5 // 4, c5 // 2, c5],
        out_channels=fpn_channels,
        extra_blocks=extra_levels(c5, fpn_channels, variant, arch),
    )


def caffe_strides(net: nn.Module) -> None:
    """mmdet's style='caffe' ResNet: each stage's downsampling stride sits in the first 1x1 conv of its
    first bottleneck instead of the 3x3 (same weights, other features)."""
    for layer in (net.layer2, net.layer3, net.layer4):
        block = layer[0]
        if not hasattr(block, "conv3"):
            raise ValueError("a caffe-style ResNet needs bottleneck blocks (resnet50/101)")
        block.conv1.stride, block.conv2.stride = (2, 2), (1, 1)


def extra_levels(c5: int, fpn_channels: int, variant: str, arch: str) -> LastLevelP6P7:
    mmdet = variant in ("mmdet", "mmdet_caffe")
    from_c5 = variant == "tv_v2" or (mmdet and arch == "retinanet")
    cls = LastLevelP6P7NoReLU if mmdet and arch != "fcos" else LastLevelP6P7
    return cls(c5 if from_c5 else fpn_channels, fpn_channels)


def load_resnet_weights(net: nn.Module, path: str | Path) -> None:
    """Strictly load a ResNet state_dict file into `net` (the `fc.*` head and BN counters may be absent)."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: model.pretrained_backbone not found; give a local ResNet state_dict file or ''")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle of objects (refused unread, never run), a truncated or foreign file
        raise ValueError(
            f"{path} (model.pretrained_backbone): not a weights-only checkpoint that torch.load(weights_only=True) "
            f"reads ({type(err).__name__}); save the ResNet's plain state_dict: torch.save(net.state_dict(), path)"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a ResNet state_dict, got {type(state).__name__}")
    if "model" in state and "model_params" in state:  # a kdcache detector checkpoint: its trained ResNet body
        prefix = "backbone.body."
        state = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    state = dict(state)
    own = net.state_dict()
    for key, value in own.items():
        if key not in state and (key.endswith("num_batches_tracked") or key.startswith("fc.")):
            state[key] = value
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path}: not a state_dict of this ResNet (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shapes {shapes[:3]}); check model.backbone against the file's architecture"
        )
    net.load_state_dict(state)


def gn_groups(channels: int, preferred: int = 32) -> int:
    """GroupNorm groups: 32 for the usual widths (>= 64); for narrow heads the largest divisor that
    leaves >= 2 channels per group, so a 1x1 P7 map of one image still normalises in training."""
    return math.gcd(preferred, max(channels // 2, 1))


def normalize_batch(images: Tensor, image_sizes: list[tuple[int, int]], mean: Tensor, std: Tensor) -> Tensor:
    """ImageNet-normalise a padded [B, 3, H, W] batch in [0, 1]; padding becomes exactly 0.

    torchvision normalises each image then pads with zeros; doing the same keeps our features
    equal to a torchvision detector's for the same image, whatever the padding value was.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
    h, w = images.shape[-2:]
    if h % PAD_MULTIPLE or w % PAD_MULTIPLE:
        raise ValueError(f"padded input {h}x{w}: H and W must be multiples of {PAD_MULTIPLE} (the P7 stride)")
    if len(image_sizes) != images.shape[0]:
        raise ValueError(f"{len(image_sizes)} image_sizes for a batch of {images.shape[0]}")
    x = (images - mean[:, None, None]) / std[:, None, None]
    if any(ih < h or iw < w for ih, iw in image_sizes):
        mask = torch.zeros((images.shape[0], 1, h, w), dtype=x.dtype, device=x.device)
        for b, (ih, iw) in enumerate(image_sizes):
            mask[b, :, :ih, :iw] = 1
        x = x * mask
    return x
