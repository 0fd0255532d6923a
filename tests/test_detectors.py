"""The detector zoo against its one output contract (tiny models: resnet18, FPN 32, 2 head convs, 128 px)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch
import torchvision
from torchvision.models.detection import FCOS as TVFCOS
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from stages.config import ModelParams
from stages.detectors.backbone import normalize_batch
from stages.detectors.box_coding import FCOS_CODER, RETINANET_CODER, centers, decode_boxes
from stages.detectors.build import build_detector, build_head, checkpoint_dict, load_detector
from stages.detectors.contract import flatten_levels

K = 3
DENSE = ["retinanet", "fcos", "gfl"]
ARCHS = DENSE + ["faster_rcnn"]
SIZES = [(128, 128), (96, 128)]  # the second image is padded at the bottom


def tiny(arch: str, **kw) -> ModelParams:
    return ModelParams(arch=arch, backbone="resnet18", fpn_channels=32, head_convs=2, **kw)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 128, 128, generator=g)
    images[1, :, 96:] = 0  # padding
    targets = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 30.0, 110.0, 60.0]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},  # no GT
    ]
    return images, targets


@pytest.fixture(scope="module")
def zoo():
    """arch -> (detector, output of a training forward with targets and detections)."""
    result = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        det = build_detector(tiny(arch), K)
        images, targets = batch()
        result[arch] = (det, det(images, SIZES, targets=targets, with_detections=True))
    return result


@pytest.mark.parametrize("arch", ARCHS)
def test_output_contract_shapes(zoo, arch):
    det, out = zoo[arch]
    assert det.arch == arch and det.num_classes == K and det.fpn_channels == 32
    assert det.strides == out.strides == [8, 16, 32, 64, 128]
    assert out.image_sizes == SIZES
    assert [tuple(f.shape) for f in out.fpn] == [(2, 32, 128 // s, 128 // s) for s in det.strides]
    if not det.dense:
        assert not (out.cls_logits or out.box_reg or out.quality or out.anchors or out.cls_tower.pre)
        assert det.num_anchors == 0 and det.head is None
        return
    a, r = det.num_anchors, det.box_dim
    assert (a, r) == {"retinanet": (9, 4), "fcos": (1, 4), "gfl": (1, 68)}[arch]
    assert det.head_convs == 2 and det.default_reuse_index == 1  # paper's 3 (FCOS 2) clamped
    assert det.has_quality == (arch == "fcos") and det.reg_max == (16 if arch == "gfl" else 0)
    for tower in (out.cls_tower, out.reg_tower):
        assert len(tower.pre) == len(tower.post) == 2
        for layer in tower.pre + tower.post:
            assert [tuple(m.shape) for m in layer] == [tuple(f.shape) for f in out.fpn]
    for level, f in enumerate(out.fpn):
        h, w = f.shape[-2:]
        assert out.cls_logits[level].shape == (2, a * K, h, w)
        assert out.box_reg[level].shape == (2, a * r, h, w)
        assert out.anchors[level].shape == (h * w * a, 4)
        if det.has_quality:
            assert out.quality[level].shape == (2, a, h, w)
    assert out.quality == [] or det.has_quality
    assert out.num_anchors == a


@pytest.mark.parametrize("arch", DENSE)
def test_flatten_order_matches_anchors(zoo, arch):
    """flatten_levels' (level, y, x, anchor) order is the anchors' order, and anchors sit on the grid."""
    det, out = zoo[arch]
    a = det.num_anchors
    maps = []
    for anchors, f, stride in zip(out.anchors, out.fpn, det.strides):
        h, w = f.shape[-2:]
        grid = anchors.view(h, w, a, 4)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        assert torch.allclose(centers(grid).mean(dim=2), torch.stack([xs, ys], -1).float() * stride)
        maps.append(grid.permute(2, 3, 0, 1).reshape(1, a * 4, h, w))  # the [B, A*R, H, W] layout
    assert torch.equal(flatten_levels(maps, 4)[0], torch.cat(out.anchors))


@pytest.mark.parametrize("arch", ARCHS)
def test_losses_finite_and_backward(zoo, arch):
    det, _ = zoo[arch]
    det.zero_grad()
    images, targets = batch(1)
    out = det(images, SIZES, targets=targets)
    assert out.detections is None
    names = {
        "retinanet": {"cls", "box"},
        "fcos": {"cls", "box", "ctrness"},
        "gfl": {"cls", "box", "dfl"},
        "faster_rcnn": {"rpn_cls", "rpn_box", "cls", "box"},
    }[arch]
    assert set(out.losses) == names
    for v in out.losses.values():
        assert v.dim() == 0 and torch.isfinite(v)
    sum(out.losses.values()).backward()
    grads = [p.grad for p in det.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert det.backbone.body.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_without_any_gt(zoo, arch):
    det, _ = zoo[arch]
    det.zero_grad()
    images, targets = batch(2)
    out = det(images, SIZES, targets=[targets[1], targets[1]])
    total = sum(out.losses.values())
    assert torch.isfinite(total)
    total.backward()


@torch.no_grad()
def _positive_quality(det, out, targets):
    """GFL: mean IoU of positives' decoded boxes with their GT, and mean score at the GT class."""
    anchors, matched = det.matches(out, targets)
    pos = matched[0] >= 0
    reg = flatten_levels(out.box_reg, det.box_dim)[0][pos]
    gt = targets[0]["boxes"][matched[0][pos]]
    iou = box_iou(decode_boxes("gfl", reg, anchors[pos], det.reg_max), gt).diag().mean()
    score = flatten_levels(out.cls_logits, K)[0][pos].sigmoid()
    return float(iou), float(score[torch.arange(len(gt)), targets[0]["labels"][matched[0][pos]]].mean())


@pytest.mark.parametrize("arch", DENSE)
def test_overfit_one_image(arch):
    torch.manual_seed(0)
    det = build_detector(tiny(arch), K)
    images, targets = batch()
    images, targets = images[:1], targets[:1]
    opt = torch.optim.SGD(det.parameters(), lr=0.02, momentum=0.9)
    losses, quality = [], []
    for _ in range(10):
        out = det(images, SIZES[:1], targets=targets)
        loss = sum(out.losses.values())
        if arch == "gfl":
            quality.append(_positive_quality(det, out, det.prepare_targets(targets, images.device)))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(det.parameters(), 10.0)  # as the training loop does
        opt.step()
        losses.append(loss.item())
    if arch == "gfl":
        # GFL's loss is not monotone early on: the QFL targets (IoUs) and the box-loss weights
        # (class scores) grow as it learns; what must improve is the boxes and the scores
        assert quality[-1][0] > quality[0][0] + 0.05, quality
        assert quality[-1][1] > 1.5 * quality[0][1], quality
    else:
        assert min(losses[-3:]) < 0.9 * losses[0], losses


@pytest.mark.parametrize("arch", ARCHS)
def test_detections_format(arch):
    torch.manual_seed(0)
    det = build_detector(tiny(arch, score_thresh=0.0, detections_per_img=7), K).eval()
    images, _ = batch()
    with torch.no_grad():
        out = det(images, SIZES, with_detections=True)
    assert len(out.detections) == 2
    for d, (h, w) in zip(out.detections, SIZES):
        n = len(d["boxes"])
        assert 0 < n <= 7
        assert d["boxes"].shape == (n, 4) and d["scores"].shape == (n,) and d["labels"].shape == (n,)
        assert d["labels"].dtype == torch.int64 and 0 <= d["labels"].min() and d["labels"].max() < K
        b = d["boxes"]
        assert (b[:, 0::2] >= 0).all() and (b[:, 0::2] <= w).all() and (b[:, 1::2] <= h).all()
        assert not d["boxes"].requires_grad
    again = det.postprocess(out)
    for d, e in zip(out.detections, again):
        assert all(torch.equal(d[k], e[k]) for k in ("boxes", "scores", "labels"))


@pytest.mark.parametrize("arch", DENSE)
def test_run_from_reproduces_forward_exactly(zoo, arch):
    det, out = zoo[arch]
    with torch.no_grad():
        for i in range(det.head_convs):
            cls, box, quality = det.head.run_from(i, out.cls_tower.pre[i], out.reg_tower.pre[i])
            assert all(torch.equal(x, y) for x, y in zip(cls, out.cls_logits))
            assert all(torch.equal(x, y) for x, y in zip(box, out.box_reg))
            assert len(quality) == len(out.quality)
            assert all(torch.equal(x, y) for x, y in zip(quality, out.quality))
    with pytest.raises(IndexError):
        det.head.run_from(det.head_convs, out.cls_tower.pre[0], out.reg_tower.pre[0])


@pytest.mark.parametrize("arch", DENSE)
def test_build_head_is_the_detector_head(zoo, arch):
    det, out = zoo[arch]
    head = build_head(tiny(arch), K)
    assert type(head) is type(det.head)
    head.load_state_dict(det.head.state_dict())  # strict: same keys and shapes
    i = det.default_reuse_index
    with torch.no_grad():
        cls, _, _ = head.run_from(i, out.cls_tower.pre[i], out.reg_tower.pre[i])
    assert all(torch.equal(x, y) for x, y in zip(cls, out.cls_logits))
    with pytest.raises(ValueError, match="no dense head"):
        build_head(tiny("faster_rcnn"), K)


@pytest.mark.parametrize("arch", DENSE)
def test_candidates(zoo, arch):
    det, out = zoo[arch]
    _, targets = batch()
    cands = det.candidates(out, targets)
    n = sum(len(a) for a in out.anchors)
    anchors = torch.cat(out.anchors)
    assert len(cands) == 2 and cands[1] == []
    assert len(cands[0]) == 2
    for g, idx in enumerate(cands[0]):
        assert idx.dtype == torch.int64 and len(idx) > 0
        assert idx.min() >= 0 and idx.max() < n and len(idx.unique()) == len(idx)
        gt = targets[0]["boxes"][g]
        if arch == "retinanet":
            ious = box_iou(gt[None], anchors[idx])[0]
            best = box_iou(gt[None], anchors)[0].max()
            assert ((ious >= 0.5) | (ious == best)).all()
        else:  # the points lie inside the GT
            p = centers(anchors[idx])
            assert ((p >= gt[:2]) & (p <= gt[2:])).all()
    # one anchor never goes to two GTs
    both = torch.cat(cands[0])
    assert len(both.unique()) == len(both)
    with pytest.raises(TypeError, match="not a dense detector"):
        zoo["faster_rcnn"][0].candidates(zoo["faster_rcnn"][1], targets)


def test_fcos_assignment_and_losses_equal_torchvision(zoo):
    """Our FCOS matching + loss call equals torchvision's own `FCOS.compute_loss`."""
    det, out = zoo["fcos"]
    _, targets = batch()
    targets = det.prepare_targets(targets, torch.device("cpu"))
    ours = det.compute_losses(out, targets)
    anchors = torch.cat(out.anchors)
    theirs = TVFCOS.compute_loss(
        det, targets, det.head_outputs(out), [anchors] * 2, [len(a) for a in out.anchors]
    )
    assert torch.equal(ours["cls"], theirs["classification"])
    assert torch.equal(ours["box"], theirs["bbox_regression"])
    assert torch.equal(ours["ctrness"], theirs["bbox_ctrness"])


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_content_is_ignored(arch):
    """Normalisation zeroes the padding, so what the padding held changes nothing."""
    torch.manual_seed(0)
    det = build_detector(tiny(arch), K).eval()
    images, _ = batch()
    noisy = images.clone()
    noisy[1, :, 96:] = torch.rand_like(noisy[1, :, 96:])
    with torch.no_grad():
        a, b = det(images, SIZES), det(noisy, SIZES)
    assert all(torch.equal(x, y) for x, y in zip(a.fpn, b.fpn))


def test_input_checks():
    det = build_detector(tiny("retinanet"), K)
    with pytest.raises(ValueError, match="multiples of 128"):
        det(torch.rand(1, 3, 160, 256), [(160, 256)])
    with pytest.raises(ValueError, match="labels"):
        det(
            torch.rand(1, 3, 128, 128),
            [(128, 128)],
            targets=[{"boxes": torch.ones(1, 4), "labels": torch.tensor([K])}],
        )
    with pytest.raises(ValueError, match="unknown arch"):
        build_detector(dataclasses.replace(tiny("retinanet"), arch="yolo"), K)


def test_faster_rcnn_roi_scales_use_padded_size():
    """RoIAlign infers level scales from the image size: a batch of short images must not fool it."""
    det = build_detector(tiny("faster_rcnn"), K).eval()
    with torch.no_grad():
        det(torch.rand(2, 3, 256, 256), [(160, 256), (150, 240)], with_detections=True)
    assert det.roi_heads.box_roi_pool.scales == [1 / 8, 1 / 16, 1 / 32]


def test_decode_boxes():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 40.0, 24.0]])
    assert torch.allclose(decode_boxes("retinanet", torch.zeros(2, 4), anchors), anchors)
    gt = torch.tensor([[2.0, 3.0, 20.0, 18.0], [10.0, 0.0, 50.0, 30.0]])
    assert torch.allclose(
        decode_boxes("retinanet", RETINANET_CODER.encode_single(gt, anchors), anchors), gt, atol=1e-4
    )
    points = torch.tensor([[4.0, 4.0, 12.0, 12.0]])  # stride 8, centre (8, 8)
    fcos_gt = torch.tensor([[2.0, 3.0, 20.0, 18.0]])
    assert torch.allclose(decode_boxes("fcos", FCOS_CODER.encode(points, fcos_gt), points), fcos_gt)
    logits = torch.full((1, 4, 17), -30.0)
    for side, bin_ in enumerate([1, 2, 3, 4]):
        logits[0, side, bin_] = 30.0  # one-hot distributions: l=1, t=2, r=3, b=4 strides
    boxes = decode_boxes("gfl", logits.reshape(1, 68), points, reg_max=16)
    assert torch.allclose(boxes, torch.tensor([[8 - 8.0, 8 - 16.0, 8 + 24.0, 8 + 32.0]]))
    with pytest.raises(ValueError, match="expected 68"):
        decode_boxes("gfl", torch.zeros(1, 4), points)
    with pytest.raises(ValueError, match="no dense box regression"):
        decode_boxes("faster_rcnn", torch.zeros(1, 4), points)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    cfg = tiny(arch)
    det = build_detector(cfg, K)
    images, targets = batch()
    det(images, SIZES, targets=targets)  # move the BN running stats off their init
    path = tmp_path / "model.pt"
    torch.save(checkpoint_dict(det, cfg) | {"step": 3}, path)
    loaded = load_detector(path)
    assert loaded.arch == arch and loaded.num_classes == K
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in det.state_dict().items())
    det.eval(), loaded.eval()
    with torch.no_grad():
        a = det(images, SIZES, with_detections=True)
        b = loaded(images, SIZES, with_detections=True)
    assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a.detections, b.detections))
    # a cfg given with the checkpoint must agree on the architecture
    with pytest.raises(ValueError, match="head_convs=2 but cfg says 3"):
        load_detector(path, dataclasses.replace(cfg, head_convs=3))


def test_mismatched_checkpoint_gives_a_clear_error(tmp_path):
    det = build_detector(tiny("retinanet"), K)
    path = tmp_path / "raw.pt"
    torch.save(det.state_dict(), path)
    with pytest.raises(ValueError, match="needs cfg and num_classes"):
        load_detector(path)
    with pytest.raises(ValueError, match=r"raw\.pt.*wrong shapes.*cls_logits.*check arch/backbone"):
        load_detector(path, tiny("retinanet"), K + 1)
    with pytest.raises(ValueError, match=r"raw\.pt.*unexpected keys.*conv\.1.*check arch/backbone"):
        load_detector(path, dataclasses.replace(tiny("retinanet"), head_convs=1), K)
    with pytest.raises(ValueError, match=r"missing keys.*check arch/backbone"):
        load_detector(path, tiny("gfl"), K)


def test_torchvision_retinanet_checkpoint_loads_and_matches(tmp_path):
    """A torchvision retinanet_resnet50_fpn state_dict loads into ours; same features, head and anchors."""
    torch.manual_seed(0)
    tv = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5
    )
    state = tv.state_dict()
    path = tmp_path / "tv_retinanet.pt"
    torch.save(state, path)
    cfg = ModelParams(arch="retinanet", backbone="resnet50", fpn_channels=256, head_convs=4)
    ours = load_detector(path, cfg, 5).eval()
    tv.eval()
    images = torch.rand(1, 3, 128, 256)
    with torch.no_grad():
        out = ours(images, [(128, 256)])
        x = normalize_batch(images, [(128, 256)], ours.image_mean, ours.image_std)
        feats = list(tv.backbone(x).values())
        head = tv.head(feats)
        tv_anchors = tv.anchor_generator(ImageList(x, [(128, 256)]), feats)[0]
    assert all(torch.equal(a, b) for a, b in zip(out.fpn, feats))
    assert torch.equal(flatten_levels(out.cls_logits, 5), head["cls_logits"])
    assert torch.equal(flatten_levels(out.box_reg, 4), head["bbox_regression"])
    assert torch.equal(torch.cat(out.anchors), tv_anchors)
    # FrozenBatchNorm2d checkpoints have no num_batches_tracked: still loads
    frozen = OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    torch.save(frozen, path)
    load_detector(path, cfg, 5)


def _tv_backbone(channels: int) -> BackboneWithFPN:
    return BackboneWithFPN(
        torchvision.models.resnet18(weights=None),
        {"layer2": "0", "layer3": "1", "layer4": "2"},
        [128, 256, 512],
        channels,
        extra_blocks=LastLevelP6P7(channels, channels),
    )


def test_torchvision_fcos_state_dict_loads_and_matches(tmp_path):
    torch.manual_seed(0)
    tv = TVFCOS(_tv_backbone(64), num_classes=K).eval()
    path = tmp_path / "tv_fcos.pt"
    torch.save(tv.state_dict(), path)
    ours = load_detector(
        path, ModelParams(arch="fcos", backbone="resnet18", fpn_channels=64, head_convs=4), K
    ).eval()
    images = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        out = ours(images, [(128, 128)])
        head = tv.head(out.fpn)
    assert torch.equal(flatten_levels(out.cls_logits, K), head["cls_logits"])
    assert torch.equal(flatten_levels(out.box_reg, 4), head["bbox_regression"])
    assert torch.equal(flatten_levels(out.quality, 1), head["bbox_ctrness"])


def test_torchvision_faster_rcnn_state_dict_loads_and_matches(tmp_path):
    torch.manual_seed(0)
    tv = FasterRCNN(
        _tv_backbone(32),
        num_classes=K + 1,  # torchvision counts the background
        rpn_anchor_generator=AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5),
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 7, 2),
    ).eval()
    path = tmp_path / "tv_frcnn.pt"
    torch.save(tv.state_dict(), path)
    ours = load_detector(path, tiny("faster_rcnn"), K).eval()
    images = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        out = ours(images, [(128, 128)])
        rois = [torch.tensor([[10.0, 10.0, 60.0, 80.0], [0.0, 0.0, 128.0, 128.0]])]
        feats = OrderedDict(zip(["0", "1", "2", "p6", "p7"], out.fpn))
        theirs = tv.roi_heads.box_predictor(
            tv.roi_heads.box_head(tv.roi_heads.box_roi_pool(feats, rois, [(128, 128)]))
        )
        mine = ours._box_head(feats, rois)
        assert torch.equal(tv.rpn.head(out.fpn)[0][0], ours.rpn.head(out.fpn)[0][0])
    assert all(torch.equal(a, b) for a, b in zip(theirs, mine))


def test_resnet50_build_only():
    det = build_detector(ModelParams(arch="gfl", backbone="resnet50", fpn_channels=64, head_convs=4), K)
    fpn = det.backbone.fpn
    assert [b[0].in_channels for b in fpn.inner_blocks] == [512, 1024, 2048]
    assert det.head_convs == 4 and det.default_reuse_index == 2  # paper's 3: run_from(2)
    assert not any(isinstance(m, torchvision.ops.FrozenBatchNorm2d) for m in det.modules())


def test_pretrained_backbone_file(tmp_path):
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(net.state_dict(), path)
    det = build_detector(tiny("retinanet", pretrained_backbone=str(path)), K)
    assert torch.equal(det.backbone.body.conv1.weight, net.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a state_dict of this ResNet"):
        build_detector(tiny("retinanet", pretrained_backbone=str(path)), K)


def test_pretrained_backbone_from_a_detector_checkpoint(tmp_path):
    """A kdcache checkpoint's ResNet body seeds another detector (other FPN width, head, arch); the rest is new."""
    donor = build_detector(tiny("retinanet"), K)
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(0.5)
    ckpt = tmp_path / "donor.pt"
    torch.save(checkpoint_dict(donor, tiny("retinanet")), ckpt)
    det = build_detector(tiny("fcos", pretrained_backbone=str(ckpt)), K + 2)
    donor_body, body = donor.backbone.body.state_dict(), det.backbone.body.state_dict()
    assert body.keys() == donor_body.keys() and all(torch.equal(body[k], donor_body[k]) for k in body)
    fpn_key = "inner_blocks.0.0.weight"
    assert not torch.equal(det.backbone.fpn.state_dict()[fpn_key], donor.backbone.fpn.state_dict()[fpn_key])
    r34 = dataclasses.replace(tiny("retinanet"), backbone="resnet34")
    torch.save(checkpoint_dict(build_detector(r34, K), r34), ckpt)
    with pytest.raises(ValueError, match="not a state_dict of this ResNet"):
        build_detector(tiny("retinanet", pretrained_backbone=str(ckpt)), K)


def test_checkpoint_loads_after_its_pretrained_backbone_file_is_gone(tmp_path):
    """A checkpoint holds every weight: loading it must not need (or read) the file training started from."""
    from stages.detectors.checkpoint import load_teacher, teacher_model_params

    net = torchvision.models.resnet18(weights=None)
    backbone_file = tmp_path / "r18.pt"
    torch.save(net.state_dict(), backbone_file)
    cfg = tiny("retinanet", pretrained_backbone=str(backbone_file))
    det = build_detector(cfg, K)
    with torch.no_grad():
        det.backbone.body.conv1.weight.add_(1.0)  # trained on from the file's weights
    ckpt = tmp_path / "model.pt"
    torch.save(checkpoint_dict(det, cfg), ckpt)
    backbone_file.unlink()
    for loaded in (load_detector(ckpt), load_detector(ckpt, cfg),
                   load_teacher(ckpt, teacher_model_params(ckpt), K)):
        assert torch.equal(loaded.backbone.body.conv1.weight, det.backbone.body.conv1.weight)
