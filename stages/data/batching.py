"""(image, view) datasets and batching: tensors, zero padding to the largest FPN stride, collate.

`ViewDataset` turns a `CocoDataset` into view-resized items; `collate` pads a list of them into one
batch. Images are top-left aligned in the padded batch, so box coordinates need no shift and
`image_sizes` gives each image's valid region. Both are plain picklable objects (DataLoader workers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from stages.data.coco import CocoDataset
from stages.data.views import View

__all__ = ["SIZE_DIVISOR", "ViewDataset", "collate", "image_to_tensor", "pad_batch", "view_padded_size"]

SIZE_DIVISOR = 128  # largest FPN stride (P7): every batch is padded to a multiple of it


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32 in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image_to_tensor expects an [H, W, 3] uint8 array, got {image.shape} {image.dtype}")
    if not image.flags.writeable:
        image = image.copy()  # torch.from_numpy warns on read-only arrays
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def padded_size(h: int, w: int, divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """(h, w) rounded up to multiples of `divisor`."""
    return -(-h // divisor) * divisor, -(-w // divisor) * divisor


def view_padded_size(view: View, h: int, w: int) -> tuple[int, int]:
    """The padded input size of an (h, w) image under `view`: its own output size rounded up to
    the largest stride. Batches that keep to one such size show each image exactly as stage 1 did."""
    return padded_size(*view.output_size(h, w))


def pad_batch(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Stack [3, h_i, w_i] images into [B, 3, Hp, Wp], zero padded bottom/right to multiples of SIZE_DIVISOR."""
    if len(images) == 0:
        raise ValueError("pad_batch needs at least one image")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    hp, wp = padded_size(max(h for h, _ in sizes), max(w for _, w in sizes))
    batch = torch.stack([F.pad(im, (0, wp - w, 0, hp - h)) for im, (h, w) in zip(images, sizes)])
    return batch, sizes


class ViewDataset(torch.utils.data.Dataset):
    """(image, view) pairs. `views` is a list of View; `mode`:
    'all'    -> len = len(dataset)*len(views), item i = (image i // V, view i % V)
    'random' -> len = len(dataset), view drawn with torch's RNG per item (training augmentation)

    `view_of(image_id) -> list[View]`, if given, replaces `views` per image: in 'all' mode the items
    are every (image, view_of(image_id)[j]) pair in image order (the length is the sum); in 'random'
    mode the view is drawn from view_of(image_id). It is called once per image at construction in
    'all' mode, and per item in 'random' mode (so it must be picklable for DataLoader workers then).
    """

    def __init__(
        self,
        dataset: CocoDataset,
        views: list[View],
        mode: str = "all",
        view_of: Callable[[int], list[View]] | None = None,
    ):
        if mode not in ("all", "random"):
            raise ValueError(f"ViewDataset mode must be 'all' or 'random', got {mode!r}")
        views = list(views)
        if not views and view_of is None:
            raise ValueError("ViewDataset needs at least one view")
        for v in views:
            if not isinstance(v, View):
                raise TypeError(f"views must be View objects, got {type(v).__name__}")
        self.dataset = dataset
        self.views = views
        self.mode = mode
        self.view_of = view_of
        self._pairs: list[tuple[int, View]] | None = None
        if mode == "all" and view_of is not None:
            self._pairs = [(i, v) for i, iid in enumerate(dataset.image_ids) for v in view_of(iid)]

    @classmethod
    def from_pairs(cls, dataset: CocoDataset, pairs: Sequence[tuple[int, str | View]]) -> ViewDataset:
        """Items in exactly the order of `pairs` = [(image_id, view or view key), ...] (e.g. a cache plan)."""
        index = {iid: i for i, iid in enumerate(dataset.image_ids)}
        out = cls.__new__(cls)
        out.dataset, out.mode, out.view_of = dataset, "all", None
        resolved = []
        for iid, view in pairs:
            if iid not in index:
                raise KeyError(f"image id {iid} is not in {dataset.ann_file}")
            resolved.append((index[iid], view if isinstance(view, View) else View.from_key(view)))
        out._pairs = resolved
        out.views = sorted({v for _, v in resolved}, key=lambda v: v.key)
        return out

    def __len__(self) -> int:
        if self._pairs is not None:
            return len(self._pairs)
        if self.mode == "all":
            return len(self.dataset) * len(self.views)
        return len(self.dataset)

    def pair(self, i: int) -> tuple[int, View]:
        """(image index into the CocoDataset, view) of item i (a 'random' item draws its view here)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        if self._pairs is not None:
            return self._pairs[i]
        if self.mode == "all":
            v = len(self.views)
            return i // v, self.views[i % v]
        views = self.views if self.view_of is None else list(self.view_of(self.dataset.image_ids[i]))
        if not views:
            raise ValueError(f"view_of({self.dataset.image_ids[i]}) returned no views")
        j = int(torch.randint(len(views), (1,)).item()) if len(views) > 1 else 0
        return i, views[j]

    def pairs(self) -> list[tuple[int, str]]:
        """[(image_id, view key), ...] of every item, in item order ('all' mode only)."""
        if self.mode != "all":
            raise ValueError("pairs() is defined for mode='all' only (random mode draws views per item)")
        ids = self.dataset.image_ids
        return [(ids[idx], view.key) for idx, view in (self.pair(i) for i in range(len(self)))]

    def __getitem__(self, i: int) -> dict:
        idx, view = self.pair(int(i))
        sample = self.dataset[idx]
        image, boxes = view.apply(sample.image, sample.boxes)
        crowd = view.boxes_to_view(sample.crowd_boxes, sample.image.shape[:2]).astype(np.float32, copy=False)
        return {
            "image": image_to_tensor(image),
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(sample.labels),
            "crowd_boxes": torch.from_numpy(np.ascontiguousarray(crowd).reshape(-1, 4)),  # ignore regions
            "image_id": sample.image_id,
            "view": view.key,
            "orig_size": (int(sample.image.shape[0]), int(sample.image.shape[1])),
        }


_KNOWN = {
    "image": "images",
    "image_id": "image_ids",
    "view": "views",
    "orig_size": "orig_sizes",
}


def collate(items: list[dict]) -> dict:
    """ViewDataset items -> {'images': [B,3,Hp,Wp], 'image_sizes': [(h, w)], 'targets': [{'boxes','labels'
    [, 'crowd_boxes']}], 'image_ids', 'views', 'orig_sizes'}; any other item keys are passed through as lists
    under their own name. 'crowd_boxes' (iscrowd regions) join the targets only where an item has some."""
    if not items:
        raise ValueError("collate needs at least one item")
    images, sizes = pad_batch([it["image"] for it in items])
    out: dict = {
        "images": images,
        "image_sizes": sizes,
        "targets": [_target(it) for it in items],
        "image_ids": [it["image_id"] for it in items],
        "views": [it["view"] for it in items],
        "orig_sizes": [tuple(it["orig_size"]) for it in items],
    }
    for key in items[0]:
        if key not in _KNOWN and key not in ("boxes", "labels", "crowd_boxes"):
            out[key] = [it[key] for it in items]
    return out


def _target(item: dict) -> dict:
    target = {"boxes": item["boxes"], "labels": item["labels"]}
    crowd = item.get("crowd_boxes")
    if crowd is not None and len(crowd):
        target["crowd_boxes"] = crowd
    return target
