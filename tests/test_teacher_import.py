"""torchvision COCO checkpoints and mmdetection checkpoints as teachers.

Each torchvision detector is built by torchvision itself (random weights, num_classes=91, no
download), saved as a raw state_dict and used as the teacher on a COCO-format json with COCO's
sparse category ids. The oracle is torchvision's own modules: the cached class maps must equal
its head's outputs on the mapped channels (category id = output index). mmdetection files are
written here from mmdet's key names (read from its source; the renaming below is this test's own).
"""

from __future__ import annotations

import json
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models.detection as tvd
from torchvision.models._meta import _COCO_CATEGORIES

from tests.cache_fixtures import ONE_THREAD_ENV, torch_threads, write_params  # noqa: F401

pytest_plugins = ["tests.cache_fixtures"]

# the tiny set's 6 categories get these COCO ids / names (sparse: gaps everywhere)
COCO_IDS = [1, 3, 18, 44, 62, 90]
TV_BUILDERS = {
    "retinanet_v1": tvd.retinanet_resnet50_fpn,
    "retinanet_v2": tvd.retinanet_resnet50_fpn_v2,
    "fcos": tvd.fcos_resnet50_fpn,
    "fasterrcnn_v1": tvd.fasterrcnn_resnet50_fpn,
    "fasterrcnn_v2": tvd.fasterrcnn_resnet50_fpn_v2,
}


@pytest.fixture(scope="module")
def coco_ids_set(tmp_path_factory, tiny_coco):
    """tiny_coco's first 2 train images re-labelled with COCO ids and names, plus a crowd box, a
    segmentation field and no info/licenses keys."""
    data = json.loads(Path(tiny_coco.train_ann).read_text())
    old = sorted(c["id"] for c in data["categories"])
    new_id = dict(zip(old, COCO_IDS))
    data["categories"] = [{"id": i, "name": _COCO_CATEGORIES[i]} for i in COCO_IDS]
    keep = sorted(im["id"] for im in data["images"])[:2]  # two images: one batch, R50 teachers stay cheap
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    anns = [a for a in data["annotations"] if a["image_id"] in keep]
    for a in anns:
        a["category_id"] = new_id[a["category_id"]]
        a["segmentation"] = [[0, 0, 1, 0, 1, 1]]
    crowd = dict(anns[0], id=10_000, iscrowd=1)
    data["annotations"] = anns + [crowd]
    for key in ("info", "licenses"):
        data.pop(key, None)
    root = tmp_path_factory.mktemp("coco_ids")
    ann = root / "instances.json"
    ann.write_text(json.dumps(data))
    return types.SimpleNamespace(images=Path(tiny_coco.train_images), ann=ann, root=root)


def _params(ds, ckpt: Path, root: Path, targets, losses):
    from stages.config import (
        CacheParams,
        DataParams,
        DistillParams,
        ModelParams,
        Params,
        StudentParams,
        TeacherParams,
        TrainParams,
        ViewParams,
    )

    train = TrainParams(steps=2, batch_size=2, warmup_steps=1, log_every=1, ckpt_every=2, lr=0.001,
                        optimizer="adamw", device="cpu")
    return Params(
        data=DataParams(train_images=str(ds.images), train_ann=str(ds.ann), val_images=str(ds.images),
                        val_ann=str(ds.ann), min_size=96, max_size=128),
        teacher=TeacherParams(checkpoint=str(ckpt)),
        student=StudentParams(model=ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=8, head_convs=1),
                              out_dir=str(root / "students")),
        cache=CacheParams(path=str(root / "cache"), format="zarr", views=[ViewParams(96, 128, False)],
                          targets=targets, codecs={"fpn": "raw+zstd", "cls": "raw+zstd"}, batch_size=4,
                          block_size=4, device="cpu"),
        distill=DistillParams(losses=losses),
        train=train,
    )


def _first_record(root: Path):
    from stores.zarr_store import ZarrCacheReader

    reader = ZarrCacheReader(root)
    image_id, view = next(iter(reader.keys()))
    return reader, image_id, view, reader.get(image_id, view).arrays


def _padded_input(ds, image_id: int, view: str):
    from stages.data.batching import ViewDataset, collate
    from stages.data.coco import CocoDataset
    from stages.detectors.backbone import IMAGENET_MEAN, IMAGENET_STD, normalize_batch

    batch = collate([ViewDataset.from_pairs(CocoDataset(ds.images, ds.ann), [(image_id, view)])[0]])
    x = normalize_batch(batch["images"], batch["image_sizes"], torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD))
    return x


@pytest.mark.parametrize("name", list(TV_BUILDERS))
def test_torchvision_coco_checkpoint_teaches(name, coco_ids_set, tmp_path, capsys):
    """Loads, caches through the real cache_teacher, cached maps == torchvision's own forward on the
    mapped channels, and a student distils from the cache for two steps."""
    from pipeline import cache_teacher
    from stages.distill.run import train_student

    torch.manual_seed(0)
    with torch_threads(1):
        tv = TV_BUILDERS[name](weights=None, weights_backbone=None, num_classes=91).eval()
    ckpt = tmp_path / f"{name}.pt"
    torch.save(tv.state_dict(), ckpt)
    dense = not name.startswith("fasterrcnn")
    targets = ["fpn", "cls"] if dense else ["fpn"]  # (Faster R-CNN detections: 1000 RoIs through R50's box head)
    params = _params(coco_ids_set, ckpt, tmp_path, targets, {"pfi": 1.0} if dense else {"mse": 1.0})
    with torch_threads(1):
        cache_teacher.main(["--params", str(write_params(params, tmp_path / "params.yaml"))])
    printed = capsys.readouterr().out
    assert f"torchvision {TV_BUILDERS[name].__name__}" in printed  # the inspect line, before the work
    assert "by id: person(id 1)<-" in printed

    reader, image_id, view, arrays = _first_record(Path(params.cache.path))
    label_map = reader.manifest.fingerprint["label_map"]
    assert label_map["index"] == (COCO_IDS if dense else [i - 1 for i in COCO_IDS])
    x = _padded_input(coco_ids_set, image_id, view)
    with torch.no_grad():
        feats = list(tv.backbone(x).values())
        if not dense:  # our contract's P3..P6 are torchvision's '1', '2', '3', 'pool'
            feats = feats[1:]
        for lv, f in enumerate(feats[:4]):
            cached = arrays[f"fpn.{lv}"]
            h, w = cached.shape[-2:]
            want = f[0, :, :h, :w].numpy()
            # Stage 1 runs a padded batch of 2 at one thread, this forward one image: their fp32
            # kernels differ by round-off that grows with the maps' magnitude (random-weight R50 FPN
            # maps reach |x| ~ 60-100; 1e-4 to 2.4e-4 apart on an AMD EPYC, ~30 float32 ulps of the
            # abs max), so the tolerance is 1e-5 of the level's abs max (~80 eps of its scale). A
            # wrong channel or level mapping differs by the maps' own size (std ~ 15-20), 1e4 x more.
            tol = 1e-5 * float(np.abs(want).max())
            np.testing.assert_allclose(cached, want, rtol=0, atol=tol, err_msg=f"fpn.{lv}")
            assert np.abs(cached - np.roll(want, 1, axis=0)).max() > 1e3 * tol  # the check sees a channel shift
        if dense:
            head = tv.head.classification_head
            for lv, f in enumerate(feats):
                logits = head.cls_logits(head.conv(f))  # [1, A*91, H, W]
                a = logits.shape[1] // 91
                mapped = logits.view(1, a, 91, *logits.shape[-2:])[:, :, COCO_IDS].reshape(1, a * 6, *logits.shape[-2:])
                cached = arrays[f"cls.{lv}"]
                h, w = cached.shape[-2:]
                np.testing.assert_allclose(cached, mapped[0, :, :h, :w].sigmoid().numpy(), rtol=0, atol=1e-5)

    with torch_threads(1):
        metrics = train_student(params, None, tmp_path / "student", progress=False)
    assert (tmp_path / "student" / "model.pt").exists() and "AP" in metrics

    if name == "retinanet_v1":  # a cache whose recorded mapping differs from the student's is refused
        manifest = Path(params.cache.path) / "manifest.json"
        data = json.loads(manifest.read_text())
        data["fingerprint"]["label_map"]["index"][0] = 2
        manifest.write_text(json.dumps(data))
        from stages.distill.run import build_run

        with pytest.raises(ValueError, match=r"label_map\.index\[0\]: cache has 2, you asked for 1"):
            build_run(params, None)


def test_faster_rcnn_slice_keeps_background_and_mapped_rows():
    """The sliced box predictor == torchvision's on rows [background] + category ids."""
    from stages.detectors.label_space import slice_classes

    torch.manual_seed(0)
    pred = tvd.faster_rcnn.FastRCNNPredictor(16, 91)
    weights = {f"roi_heads.box_predictor.{k}": v for k, v in pred.state_dict().items()}
    sliced = slice_classes(weights, "faster_rcnn", 1, 90, tuple(i - 1 for i in COCO_IDS))
    small = tvd.faster_rcnn.FastRCNNPredictor(16, 7)
    small.load_state_dict({k.split("box_predictor.")[1]: v for k, v in sliced.items()})
    x = torch.randn(5, 16)
    scores, boxes = pred(x)
    s2, b2 = small(x)
    rows = [0] + COCO_IDS
    torch.testing.assert_close(s2, scores[:, rows])
    torch.testing.assert_close(b2, boxes.view(5, 91, 4)[:, rows].reshape(5, -1))


# ---------------------------------------------------------------- mmdetection

MMDET_NAMES = [n for n in _COCO_CATEGORIES if n not in ("N/A", "__background__")]  # mmdet's 80 COCO classes


def _mmdet_name(key: str, arch: str) -> str | None:
    """zoo key -> mmdet key, written from mmdet's module names (ResNet, FPN, RetinaHead / GFLHead)."""
    if key.startswith("backbone.body."):
        return "backbone." + key[len("backbone.body."):]
    rules = [
        (r"backbone\.fpn\.inner_blocks\.(\d)\.0\.(\w+)", lambda m: f"neck.lateral_convs.{m[1]}.conv.{m[2]}"),
        (r"backbone\.fpn\.layer_blocks\.(\d)\.0\.(\w+)", lambda m: f"neck.fpn_convs.{m[1]}.conv.{m[2]}"),
        (r"backbone\.fpn\.extra_blocks\.p6\.(\w+)", lambda m: f"neck.fpn_convs.3.conv.{m[1]}"),
        (r"backbone\.fpn\.extra_blocks\.p7\.(\w+)", lambda m: f"neck.fpn_convs.4.conv.{m[1]}"),
    ]
    branch = {"classification": "cls", "regression": "reg"}
    cls, reg = {"retinanet": ("retina_cls", "retina_reg"), "gfl": ("gfl_cls", "gfl_reg"),
                "fcos": ("conv_cls", "conv_reg")}[arch]
    rules += [
        (r"head\.classification_head\.cls_logits\.(\w+)", lambda m: f"bbox_head.{cls}.{m[1]}"),
        (r"head\.regression_head\.bbox_reg\.(\w+)", lambda m: f"bbox_head.{reg}.{m[1]}"),
        (r"head\.regression_head\.bbox_ctrness\.(\w+)", lambda m: f"bbox_head.conv_centerness.{m[1]}"),
        (r"head\.scales\.(\d)\.scale", lambda m: f"bbox_head.scales.{m[1]}.scale"),
    ]
    if arch == "retinanet":
        rules.append((r"head\.(\w+)_head\.conv\.(\d)\.0\.(\w+)",
                      lambda m: f"bbox_head.{branch[m[1]]}_convs.{m[2]}.conv.{m[3]}"))
    else:  # GFL towers: ConvModule(conv, gn) per layer
        rules.append((r"head\.(\w+)_head\.conv\.(\d+)\.(\w+)",
                      lambda m: f"bbox_head.{branch[m[1]]}_convs.{int(m[2]) // 3}."
                                f"{'conv' if int(m[2]) % 3 == 0 else 'gn'}.{m[3]}"))
    for rx, fn in rules:
        if m := re.fullmatch(rx, key):
            return fn(m)
    return None


class _MessageHub:  # stands for mmengine's MessageHub: a non-tensor object in mmdet 3.x files
    def __init__(self):
        self.log = {"loss": np.ones(3)}


def _save_mmdet(path: Path, model, arch: str, version: str, config: str = "style='pytorch'") -> Path:
    state = model.state_dict()
    if arch == "fcos":  # mmdet's FCOS tower convs (before GN) have no bias
        state = {k: v for k, v in state.items()
                 if not (re.fullmatch(r"head\.\w+_head\.conv\.\d+\.bias", k) and int(k.split(".")[3]) % 3 == 0)}
    sd = {_mmdet_name(k, arch): v for k, v in state.items()}
    assert None not in sd, "every zoo weight has an mmdet name"
    if version == "2.x":
        torch.save({"meta": {"CLASSES": tuple(MMDET_NAMES), "mmdet_version": "2.28.2", "config": config},
                    "state_dict": sd}, path)
        return path
    fake = types.ModuleType("mmengine_fake_hub")  # importable only while saving: loading must not need it
    _MessageHub.__module__, _MessageHub.__qualname__ = "mmengine_fake_hub", "MessageHub"
    fake.MessageHub = _MessageHub
    sys.modules["mmengine_fake_hub"] = fake
    try:
        torch.save({"meta": {"dataset_meta": {"classes": tuple(MMDET_NAMES)}}, "state_dict": sd,
                    "message_hub": _MessageHub()}, path)
    finally:
        del sys.modules["mmengine_fake_hub"]
    return path


FCOS_CONFIG = "backbone=dict(type='ResNet', depth=50, style='caffe'), bbox_head=dict(type='FCOSHead', " \
    "norm_on_bbox=True, centerness_on_reg=True)"


@pytest.mark.parametrize("arch,version", [("retinanet", "2.x"), ("gfl", "3.x"), ("fcos", "2.x")])
def test_mmdet_checkpoint_equals_the_zoo_model_it_was_made_from(arch, version, tmp_path, coco_ids_set):
    from stages.config import ModelParams
    from stages.data.coco import CocoDataset
    from stages.detectors.build import build_detector
    from stages.detectors.checkpoint import (
        load_mapped_teacher,
        load_teacher,
        open_teacher,
        teacher_model_params,
    )

    caffe = arch == "fcos"  # mmdet's FCOS checkpoints are caffe-style (needs bottlenecks: resnet50)
    cfg = ModelParams(arch=arch, backbone="resnet50" if caffe else "resnet18", fpn_channels=32, head_convs=2,
                      variant="mmdet_caffe" if caffe else "mmdet")
    torch.manual_seed(0)
    zoo = build_detector(cfg, 80).eval()
    if arch == "fcos":
        with torch.no_grad():
            for name, param in zoo.named_parameters():
                if re.fullmatch(r"head\.\w+_head\.conv\.\d+\.bias", name) and int(name.split(".")[3]) % 3 == 0:
                    param.zero_()
                if name.startswith("head.scales."):
                    param.fill_(0.5 + int(name.split(".")[2]) / 10)  # distinct per level
    path = _save_mmdet(tmp_path / "mmdet.pth", zoo, arch, version, FCOS_CONFIG if caffe else "style='pytorch'")
    if version == "3.x":  # the plain safe loader refuses the non-tensor object; ours stubs it, never imports it
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)
    tf = open_teacher(path)
    assert tf.format == "mmdet" and tf.model == cfg.__class__(**{**cfg.__dict__, "anchor_size": 32})
    assert tf.num_outputs == 80
    assert tf.unmatched == [] and tf.missing == []
    loaded = load_teacher(path, teacher_model_params(path), 80).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        a, b = zoo(x, [(128, 120)]), loaded(x, [(128, 120)])
    for name in ("fpn", "cls_logits", "box_reg", "quality"):
        for ma, mb in zip(getattr(a, name), getattr(b, name)):
            torch.testing.assert_close(ma, mb, rtol=0, atol=0)
    # mapped onto the dataset by class name: the rows of the matching mmdet classes
    ds = CocoDataset(coco_ids_set.images, coco_ids_set.ann)
    mapped, _, lmap = load_mapped_teacher(path, cfg, ds.categories, coco_ids_set.ann)
    rows = [MMDET_NAMES.index(c["name"]) for c in ds.categories]
    assert list(lmap.index) == rows and lmap.by == "name"
    with torch.no_grad():
        c = mapped.eval()(x, [(128, 120)]).cls_logits
    a_per = 9 if arch == "retinanet" else 1
    for full, part in zip(a.cls_logits, c):
        expect = full.view(1, a_per, 80, *full.shape[-2:])[:, :, rows].reshape(part.shape)
        torch.testing.assert_close(part, expect, rtol=0, atol=0)


def test_mmdet_caffe_style_backbone_and_input():
    """style='caffe': stride 2 in each stage's first 1x1 conv, and the net sees 255 * BGR - mean (std 1)."""
    from stages.config import ModelParams
    from stages.detectors.build import build_detector

    det = build_detector(ModelParams(arch="fcos", backbone="resnet50", fpn_channels=16, head_convs=1,
                                     variant="mmdet_caffe"), 2).eval().double()  # float64: 0-255 inputs
    for layer in (det.backbone.body.layer2, det.backbone.body.layer3, det.backbone.body.layer4):
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
    x = torch.rand(1, 3, 128, 128, dtype=torch.float64)
    caffe = x[:, [2, 1, 0]] * 255 - torch.tensor([103.530, 116.280, 123.675], dtype=torch.float64)[:, None, None]
    with torch.no_grad():
        got = det.extract(x, [(128, 128)])
        want = det.backbone(caffe)
    for a, b in zip(got.values(), want.values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)  # the mean buffer is float32-rounded


def test_mmdet_fcos_of_the_first_config_is_refused(tmp_path):
    from stages.config import ModelParams
    from stages.detectors.build import build_detector
    from stages.detectors.checkpoint import open_teacher

    zoo = build_detector(ModelParams(arch="fcos", backbone="resnet50", fpn_channels=16, head_convs=1,
                                     variant="mmdet_caffe"), 80)
    path = _save_mmdet(tmp_path / "fcos.pth", zoo, "fcos", "2.x", "style='caffe', norm_on_bbox=False")
    msg = _refusal(lambda: open_teacher(path))
    assert str(path) in msg and "norm_on_bbox=True and centerness_on_reg=True" in msg


def test_mmdet_anchors_are_unrounded():
    from stages.detectors.retinanet import retinanet_anchors

    tv = retinanet_anchors(32).cell_anchors if retinanet_anchors(32).cell_anchors else None
    exact = retinanet_anchors(32, exact=True)
    # mmdet: P3 base anchors, ratio 1, octave scale 2^(1/3): side 32 * 2^(1/3) centred on 0
    side = 32 * 2 ** (1 / 3)
    assert torch.allclose(exact.cell_anchors[0][4], torch.tensor([-side / 2] * 2 + [side / 2] * 2))
    assert tv is not None and torch.equal(tv[0], tv[0].round())


# ---------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def tv_retinanet_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "retinanet.pt"
    torch.save(tvd.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict(), path)
    return path


def _refusal(fn) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_refusals_name_what_is_wrong(tv_retinanet_file, tmp_path, coco_ids_set):
    from stages.config import ModelParams
    from stages.detectors.checkpoint import load_mapped_teacher, open_teacher

    cats = [{"id": 1, "name": "person"}, {"id": 95, "name": "widget"}]
    msg = _refusal(lambda: load_mapped_teacher(tv_retinanet_file, ModelParams(), cats, "ann.json"))
    assert "'widget' (id 95)" in msg and str(tv_retinanet_file) in msg and "ann.json" in msg
    cats = [{"id": 3, "name": "bus"}]
    msg = _refusal(lambda: load_mapped_teacher(tv_retinanet_file, ModelParams(), cats, "ann.json"))
    assert "category id 3 is 'bus' in the dataset but 'car' for the teacher" in msg

    sd = torch.load(tv_retinanet_file, weights_only=True)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in sd.items() if not k.startswith("head.regression_head.bbox_reg")}, partial)
    msg = _refusal(lambda: load_mapped_teacher(partial, ModelParams(), [{"id": 1, "name": "person"}], "a.json"))
    assert "lacks" in msg and "bbox_reg" in msg and str(partial) in msg
    no_cls = tmp_path / "no_cls.pt"
    torch.save({k: v for k, v in sd.items() if "cls_logits" not in k}, no_cls)
    msg = _refusal(lambda: open_teacher(no_cls))
    assert "no known head" in msg and str(no_cls) in msg

    foreign = tmp_path / "resnet.pt"
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), foreign)
    msg = _refusal(lambda: open_teacher(foreign))
    assert "not a detector checkpoint" in msg and "conv1.weight" in msg

    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94"
                     b"\x8c\x05touch\x94\x85\x94R\x94.")
    msg = _refusal(lambda: open_teacher(evil))
    assert str(evil) in msg


# ---------------------------------------------------------------- bad input: said, and refused before work


def test_kdcache_arch_disagreeing_with_params_is_said_in_one_line(tiny_teacher, capsys):
    from stages.config import ModelParams
    from stages.detectors.checkpoint import teacher_model_params

    arch = teacher_model_params(tiny_teacher, ModelParams(arch="fcos", backbone="resnet50", fpn_channels=64))
    assert arch["arch"] == "retinanet" and arch["fpn_channels"] == 16  # the checkpoint wins ...
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tiny_teacher) in err[0]  # ... and says so, once, in one line
    assert "arch='retinanet' (teacher.model: 'fcos')" in err[0] and "fpn_channels=16 (teacher.model: 64)" in err[0]


def test_teacher_with_other_class_count_is_refused_before_any_block(tiny_coco, tiny_teacher, tmp_path):
    from pipeline import cache_teacher
    from tests.cache_fixtures import tiny_params

    data = json.loads(Path(tiny_coco.train_ann).read_text())
    dropped = sorted(c["id"] for c in data["categories"])[-1]
    data["categories"] = [c for c in data["categories"] if c["id"] != dropped]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != dropped]
    ann = tmp_path / "five.json"
    ann.write_text(json.dumps(data))
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path)
    params = params.__class__(**{**params.__dict__, "data": params.data.__class__(
        **{**params.data.__dict__, "train_ann": str(ann)})})
    with pytest.raises(SystemExit) as err:
        cache_teacher.main(["--params", str(write_params(params, tmp_path / "params.yaml"))])
    msg = str(err.value.code)
    assert "\n" not in msg and str(tiny_teacher) in msg and str(ann) in msg
    assert "predicts 6 classes, the dataset has 5 categories" in msg
    assert not Path(params.cache.path).exists()  # nothing computed, nothing written


def test_pre_013_torchvision_layout_loads_as_the_current_one(tv_retinanet_file, tmp_path):
    """torchvision's v1 COCO downloads predate Conv2dNormActivation: conv.{2i}.weight, inner_blocks.N.weight."""
    from stages.detectors.checkpoint import open_teacher

    sd = torch.load(tv_retinanet_file, weights_only=True)
    old = {}
    for k, v in sd.items():
        k = re.sub(r"^(backbone\.fpn\.(inner|layer)_blocks\.\d)\.0\.", r"\1.", k)
        k = re.sub(r"^(head\.\w+_head\.conv)\.(\d)\.0\.", lambda m: f"{m[1]}.{2 * int(m[2])}.", k)
        old[k] = v
    assert "head.classification_head.conv.6.weight" in old and "backbone.fpn.inner_blocks.2.weight" in old
    path = tmp_path / "old.pth"
    torch.save(old, path)
    new_tf, old_tf = open_teacher(tv_retinanet_file), open_teacher(path)
    assert old_tf.model == new_tf.model and old_tf.missing == [] and old_tf.unmatched == []
    assert sorted(old_tf.weights) == sorted(new_tf.weights)
    for k, v in new_tf.weights.items():
        assert torch.equal(old_tf.weights[k], v), k
