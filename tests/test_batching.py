"""Batching: tensor conversion, padding to SIZE_DIVISOR, ViewDataset modes, collate, picklability."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from stages.data.batching import SIZE_DIVISOR, ViewDataset, collate, image_to_tensor, pad_batch
from stages.data.coco import CocoDataset
from stages.data.views import View

VIEWS = [View(64, 96, False), View(64, 96, True), View(80, 120, False)]


def test_image_to_tensor():
    img = np.zeros((5, 7, 3), np.uint8)
    img[1, 2] = (255, 0, 51)
    t = image_to_tensor(img)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32
    assert t[:, 1, 2].tolist() == pytest.approx([1.0, 0.0, 0.2])
    with pytest.raises(ValueError):
        image_to_tensor(np.zeros((5, 7), np.uint8))


@pytest.mark.parametrize(
    "shapes, expected",
    [
        ([(100, 150)], (128, 256)),
        ([(128, 128)], (128, 128)),
        ([(129, 1)], (256, 128)),
        ([(100, 150), (160, 90), (30, 257)], (256, 384)),
    ],
)
def test_pad_batch_sizes(shapes, expected):
    ims = [torch.rand(3, h, w) + 0.5 for h, w in shapes]
    batch, sizes = pad_batch(ims)
    assert batch.shape == (len(shapes), 3, *expected)
    assert batch.shape[-1] % SIZE_DIVISOR == 0 and batch.shape[-2] % SIZE_DIVISOR == 0
    assert sizes == shapes
    for i, (h, w) in enumerate(shapes):
        torch.testing.assert_close(batch[i, :, :h, :w], ims[i])  # top-left aligned
        assert batch[i, :, h:, :].abs().sum() == 0 and batch[i, :, :, w:].abs().sum() == 0
    with pytest.raises(ValueError):
        pad_batch([])


def test_view_dataset_all_mode(tiny_coco):
    ds = CocoDataset(tiny_coco.train_images, tiny_coco.train_ann)
    vd = ViewDataset(ds, VIEWS, mode="all")
    assert len(vd) == len(ds) * len(VIEWS)
    for i in (0, 1, 2, 3, len(vd) - 1):
        item = vd[i]
        sample = ds[i // 3]
        view = VIEWS[i % 3]
        assert item["image_id"] == sample.image_id and item["view"] == view.key
        h, w = sample.image.shape[:2]
        assert item["orig_size"] == (h, w)
        assert tuple(item["image"].shape) == (3, *view.output_size(h, w))
        assert item["boxes"].dtype == torch.float32 and item["labels"].dtype == torch.int64
        _, boxes = view.apply(sample.image, sample.boxes)
        np.testing.assert_allclose(item["boxes"].numpy(), boxes)
        assert item["labels"].tolist() == sample.labels.tolist()
    assert vd.pairs()[:4] == [
        (ds.image_ids[0], VIEWS[0].key),
        (ds.image_ids[0], VIEWS[1].key),
        (ds.image_ids[0], VIEWS[2].key),
        (ds.image_ids[1], VIEWS[0].key),
    ]


def test_view_dataset_view_of_and_from_pairs(tiny_coco):
    ds = CocoDataset(tiny_coco.train_images, tiny_coco.train_ann)
    vd = ViewDataset(ds, VIEWS, mode="all", view_of=lambda iid: VIEWS[: 1 + iid % 2])
    assert len(vd) == sum(1 + iid % 2 for iid in ds.image_ids)
    pairs = vd.pairs()
    assert pairs[0] == (ds.image_ids[0], VIEWS[0].key)
    rev = ViewDataset.from_pairs(ds, list(reversed(pairs)))
    assert len(rev) == len(pairs)
    assert rev.pairs() == list(reversed(pairs))
    item = rev[0]
    assert (item["image_id"], item["view"]) == pairs[-1]
    with pytest.raises(KeyError):
        ViewDataset.from_pairs(ds, [(12345, VIEWS[0].key)])


def test_view_dataset_random_mode(tiny_coco):
    ds = CocoDataset(tiny_coco.train_images, tiny_coco.train_ann)
    vd = ViewDataset(ds, VIEWS, mode="random")
    assert len(vd) == len(ds)
    torch.manual_seed(0)
    a = [vd[i % len(vd)]["view"] for i in range(24)]
    torch.manual_seed(0)
    b = [vd[i % len(vd)]["view"] for i in range(24)]
    assert a == b and set(a) == {v.key for v in VIEWS}
    assert [vd[i]["image_id"] for i in range(len(vd))] == ds.image_ids
    with pytest.raises(ValueError):
        ViewDataset(ds, VIEWS, mode="bogus")


def test_collate_and_dataloader_workers(tiny_coco):
    ds = CocoDataset(tiny_coco.train_images, tiny_coco.train_ann)
    vd = ViewDataset(ds, VIEWS[:2], mode="all")
    pickle.loads(pickle.dumps(vd))
    pickle.loads(pickle.dumps(collate))
    batch = collate([vd[0], vd[1], vd[5]])
    assert batch["images"].shape[0] == 3 and batch["images"].shape[-1] % SIZE_DIVISOR == 0
    assert batch["image_sizes"] == [tuple(vd[i]["image"].shape[1:]) for i in (0, 1, 5)]
    assert batch["views"] == [vd[i]["view"] for i in (0, 1, 5)]
    assert batch["image_ids"] == [vd[i]["image_id"] for i in (0, 1, 5)]
    assert batch["orig_sizes"] == [vd[i]["orig_size"] for i in (0, 1, 5)]
    assert set(batch["targets"][0]) == {"boxes", "labels"}
    extra = collate([{**vd[0], "weight": 1.0}, {**vd[1], "weight": 2.0}])
    assert extra["weight"] == [1.0, 2.0]

    loader = torch.utils.data.DataLoader(vd, batch_size=4, num_workers=2, collate_fn=collate)
    seen = []
    for b in loader:
        assert b["images"].ndim == 4
        seen += list(zip(b["image_ids"], b["views"]))
    assert seen == vd.pairs()
