"""COCO-format detection data: validated loading of images and boxes.

`CocoDataset(images_dir, ann_file)` checks the annotation file at construction (fast: no image
is decoded) and raises `CocoDataError` with a one-line message naming the file or id and the fix:
unreadable / malformed JSON, missing top-level keys (images, annotations, categories), malformed
entries, duplicate image / annotation / category ids, an annotation whose category or image is
unknown, image files missing from `images_dir`, and file names that lead outside it (absolute, or
with `..`). `check_readable()` checks every image's data is complete (cheaply, see there).

Loading a sample (`load(image_id)`, `ds[idx]`) decodes the image fully with PIL (`.load()`, so a
truncated or corrupt file raises `CocoDataError` naming it; LOAD_TRUNCATED_IMAGES is never set),
converts it to RGB uint8 and turns the annotations into training boxes:

* COCO `[x, y, w, h]` -> xyxy float32 pixels, clipped to the image;
* `iscrowd=1` annotations are not training boxes: they become `crowd_boxes`, ignore regions that
  the dense detectors' assignment leaves out of the loss (as detectron2 / mmdet's ignore IoF do);
* `segmentation` fields are never read (no mask is decoded); missing `info` / `licenses` are fine;
* category ids may be sparse (COCO's 1..90 with gaps): labels are positions, ids stay the ids;
* `exif_transpose=True` applies the EXIF Orientation tag first (off by default, as COCO's boxes
  are in the stored pixel frame);
* degenerate boxes (NaN / infinite / negative size, or width or height <= `MIN_BOX_SIDE` px after
  clipping) are dropped with a `warnings.warn` naming the image id and annotation id (once per
  annotation per dataset object);
* labels are contiguous 0-based indices: the categories sorted by id map to 0..K-1
  (`label_to_cat_id` maps back for COCOeval).

Image modes: grayscale (L, 1, I, I;16, F), palette (P), RGBA/LA, CMYK and YCbCr become RGB;
alpha is dropped (not composited); 16-bit grayscale is scaled to 8 bits (/257).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

MIN_BOX_SIDE = 1.0  # boxes whose clipped width or height is <= this many pixels are dropped

__all__ = ["MIN_BOX_SIDE", "CocoDataError", "CocoDataset", "Sample", "decode_image"]


class CocoDataError(ValueError):
    """Invalid COCO data; the one-line message names the file / image id and the fix."""


@dataclass(frozen=True, eq=False)
class Sample:
    image_id: int
    file_name: str
    image: np.ndarray  # [H, W, 3] uint8 RGB
    boxes: np.ndarray  # [N, 4] float32 xyxy pixels, clipped, degenerate dropped, crowd excluded
    labels: np.ndarray  # [N] int64 contiguous 0-based class index (categories sorted by id)
    # [M, 4] float32 xyxy pixels of the iscrowd=1 annotations, clipped: ignore regions, not objects
    crowd_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def decode_image(path: str | Path, exif_transpose: bool = False) -> np.ndarray:
    """Decode an image file fully into [H, W, 3] uint8 RGB; CocoDataError naming the file on failure."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decodes everything: truncated / corrupt data raises here
            return _to_rgb(ImageOps.exif_transpose(im) if exif_transpose else im)
    except FileNotFoundError as err:
        raise CocoDataError(f"{path}: image file not found; check images_dir and file_name") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # UnidentifiedImageError is an OSError; truncated files raise OSError; bad chunks SyntaxError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CocoDataError(
            f"{path}: unreadable image ({reason}); re-export or replace the file, or drop it from the annotations"
        ) from err


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        arr = np.array(im, dtype=np.uint8)
    elif mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0  # 16-bit range -> 8-bit
        g = np.clip(np.round(a), 0, 255).astype(np.uint8)
        arr = np.repeat(g[:, :, None], 3, axis=2)
    else:
        # L, 1, P (with or without transparency), RGBA, LA, CMYK, YCbCr, ...: alpha is dropped
        if mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        arr = np.array(im.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(arr)


class CocoDataset:
    """A COCO instances file plus its image folder; see the module docstring for the checks."""

    def __init__(self, images_dir: str | Path, ann_file: str | Path, exif_transpose: bool = False):
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.exif_transpose = bool(exif_transpose)
        data = self._read_json()
        self._validate_and_index(data)
        self._check_files()
        self._coco = None
        self._fingerprint: dict | None = None
        self._warned: set[int] = set()

    @classmethod
    def from_params(cls, data, split: str = "train") -> CocoDataset:
        """The 'train' or 'val' set of a `DataParams` (with its `exif_transpose` setting)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return cls(getattr(data, f"{split}_images"), getattr(data, f"{split}_ann"),
                   exif_transpose=getattr(data, "exif_transpose", False))

    # ------------------------------------------------------------------ construction
    def _err(self, msg: str) -> CocoDataError:
        return CocoDataError(f"{self.ann_file}: {msg}")

    def _read_json(self) -> dict:
        if not self.ann_file.is_file():
            raise CocoDataError(
                f"{self.ann_file}: annotation file not found; check the path "
                "(python -m pipeline.make_dataset writes the synthetic one)"
            )
        raw = self.ann_file.read_bytes()
        self._ann_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise self._err(f"not valid JSON ({err}); re-export the annotation file") from err
        if not isinstance(data, dict):
            raise self._err(
                f"expected a JSON object at top level, got {type(data).__name__}; not a COCO file"
            )
        missing = [k for k in ("images", "annotations", "categories") if k not in data]
        if missing:
            raise self._err(
                f"missing top-level key(s) {', '.join(repr(k) for k in missing)}; a COCO instances file needs "
                "'images', 'annotations' and 'categories' lists"
            )
        for key in ("images", "annotations", "categories"):
            if not isinstance(data[key], list):
                raise self._err(f"'{key}' must be a list, got {type(data[key]).__name__}")
        return data

    def _validate_and_index(self, data: dict) -> None:
        # categories
        categories: dict[int, dict] = {}
        for i, cat in enumerate(data["categories"]):
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                raise self._err(f"categories[{i}] needs an integer 'id'; fix the entry")
            cid = cat["id"]
            if cid in categories:
                raise self._err(f"duplicate category id {cid}; category ids must be unique")
            name = cat.get("name", str(cid))
            categories[cid] = {"id": cid, "name": str(name)}
        if not categories:
            raise self._err("'categories' is empty; list at least one category")
        self.categories: list[dict] = [categories[c] for c in sorted(categories)]
        self.num_classes: int = len(self.categories)
        self._cat_ids: list[int] = [c["id"] for c in self.categories]
        self._cat_to_label: dict[int, int] = {c: i for i, c in enumerate(self._cat_ids)}

        # images
        images: dict[int, dict] = {}
        for i, img in enumerate(data["images"]):
            if not isinstance(img, dict) or not _is_int(img.get("id")):
                raise self._err(f"images[{i}] needs an integer 'id'; fix the entry")
            iid = img["id"]
            fname = img.get("file_name")
            if not isinstance(fname, str) or not fname:
                raise self._err(f"image id {iid} has no 'file_name' string; fix the entry")
            parts = fname.replace("\\", "/").split("/")
            if fname.startswith(("/", "\\")) or Path(fname).is_absolute() or ".." in parts:
                raise self._err(f"image id {iid}: file_name {fname!r} leads outside the image folder "
                                f"{self.images_dir}; file names must be relative paths inside it (no leading /, no ..)")
            if iid in images:
                raise self._err(
                    f"duplicate image id {iid} ({images[iid]['file_name']!r} and {fname!r}); image ids must be unique"
                )
            for dim in ("width", "height"):
                if dim in img and not (_is_int(img[dim]) and img[dim] > 0):
                    raise self._err(f"image id {iid}: '{dim}' must be a positive integer, got {img[dim]!r}")
            images[iid] = img
        self._images = images
        self.image_ids: list[int] = sorted(images)

        # annotations
        anns_by_image: dict[int, list[dict]] = {iid: [] for iid in images}
        seen_ann: set[int] = set()
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or not _is_int(ann.get("id")):
                raise self._err(f"annotations[{i}] needs an integer 'id'; fix the entry")
            aid = ann["id"]
            if aid in seen_ann:
                raise self._err(f"duplicate annotation id {aid}; annotation ids must be unique")
            seen_ann.add(aid)
            for key in ("image_id", "category_id"):
                if not _is_int(ann.get(key)):
                    raise self._err(f"annotation id {aid} needs an integer '{key}'; fix the entry")
            if ann["category_id"] not in categories:
                known = ", ".join(str(c) for c in self._cat_ids)
                raise self._err(
                    f"annotation id {aid} has unknown category_id {ann['category_id']} (known: {known}); "
                    "fix the annotation or add the category"
                )
            if ann["image_id"] not in images:
                raise self._err(
                    f"annotation id {aid} points to unknown image_id {ann['image_id']}; "
                    "add the image to 'images' or remove the annotation"
                )
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list | tuple) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                raise self._err(f"annotation id {aid}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
            crowd = ann.get("iscrowd", 0)
            if crowd not in (0, 1, True, False):
                raise self._err(f"annotation id {aid}: 'iscrowd' must be 0 or 1, got {crowd!r}")
            anns_by_image[ann["image_id"]].append(ann)
        for anns in anns_by_image.values():
            anns.sort(key=lambda a: a["id"])
        self._anns = anns_by_image
        self._data = data  # kept for the pycocotools index (built lazily)

    def _check_files(self) -> None:
        if not self.images_dir.is_dir():
            raise CocoDataError(
                f"{self.images_dir}: image folder not found (annotations: {self.ann_file}); check images_dir"
            )
        try:
            listing = set(os.listdir(self.images_dir))
        except OSError as err:
            raise CocoDataError(f"{self.images_dir}: cannot list the image folder ({err})") from err
        missing = []
        for iid in self.image_ids:
            fname = self._images[iid]["file_name"]
            if "/" in fname or os.sep in fname:
                ok = (self.images_dir / fname).is_file()
            else:
                ok = fname in listing
            if not ok:
                missing.append((iid, fname))
        if missing:
            iid, fname = missing[0]
            raise CocoDataError(
                f"{self.images_dir}: {len(missing)} image file(s) listed in {self.ann_file} are missing, "
                f"e.g. {fname!r} (image id {iid}); fix images_dir or remove those images from the annotations"
            )

    # ------------------------------------------------------------------ public API
    @property
    def coco(self):
        """pycocotools COCO index over the same data (for COCOeval); area / iscrowd filled in if absent."""
        if self._coco is None:
            from pycocotools.coco import COCO

            data = copy.deepcopy(self._data)
            for ann in data["annotations"]:
                ann.setdefault("iscrowd", 0)
                if "area" not in ann:
                    _, _, w, h = ann["bbox"]
                    ann["area"] = float(max(w, 0) * max(h, 0)) if math.isfinite(w * h) else 0.0
            coco = COCO()
            coco.dataset = data
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    def label_to_cat_id(self, label: int) -> int:
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise IndexError(f"label {label} out of range [0, {self.num_classes})")
        return self._cat_ids[label]

    def cat_id_to_label(self, cat_id: int) -> int:
        return self._cat_to_label[int(cat_id)]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, idx: int) -> Sample:
        n = len(self.image_ids)
        idx = int(idx)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"index {idx} out of range for {n} images")
        return self.load(self.image_ids[idx])

    def image_info(self, image_id: int) -> dict:
        try:
            return self._images[int(image_id)]
        except KeyError:
            raise KeyError(f"image id {image_id} is not in {self.ann_file}") from None

    def image_size(self, image_id: int) -> tuple[int, int]:
        """(h, w) from the annotations, else from the image file's header (no decoding; COCO makes
        width/height optional)."""
        info = self.image_info(image_id)
        if "height" in info and "width" in info:
            return int(info["height"]), int(info["width"])
        path = self.images_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                w, h = im.size
                if self.exif_transpose and im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90
                    w, h = h, w
        except OSError as err:
            raise CocoDataError(f"{path} (image id {image_id}): cannot read the image header ({err}); fix or remove it") from None
        return h, w

    def check_readable(self) -> None:
        """Every image's data is complete, checked up front (a truncated val image would otherwise
        surface after a whole training run). Cheap: PNGs verify their chunk CRCs, JPEGs decode at
        1/8 scale (DCT-scaled, yet every byte of the stream is read), other formats decode fully."""
        for iid in self.image_ids:
            path = self.image_path(iid)
            try:
                with Image.open(path) as im:
                    if im.format == "PNG":
                        im.verify()
                    else:
                        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                        im.load()
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise CocoDataError(f"{path} (image id {iid} in {self.ann_file}): unreadable image ({reason}); "
                                    "re-export or replace the file, or drop it from the annotations") from None

    def image_path(self, image_id: int) -> Path:
        return self.images_dir / self.image_info(image_id)["file_name"]

    def load(self, image_id: int) -> Sample:
        info = self.image_info(image_id)
        image_id = int(image_id)
        path = self.images_dir / info["file_name"]
        image = decode_image(path, self.exif_transpose)
        h, w = image.shape[:2]
        if ("width" in info and info["width"] != w) or ("height" in info and info["height"] != h):
            raise CocoDataError(
                f"{path}: image is {w}x{h} but {self.ann_file} says {info.get('width')}x{info.get('height')} "
                f"(image id {image_id}); fix width/height or the file"
            )
        boxes, labels, crowd = self._boxes(image_id, h, w)
        return Sample(image_id=image_id, file_name=info["file_name"], image=image, boxes=boxes, labels=labels,
                      crowd_boxes=crowd)

    def _boxes(self, image_id: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes, labels, crowd = [], [], []
        for ann in self._anns[image_id]:
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            if ann.get("iscrowd", 0):
                if all(math.isfinite(v) for v in (x, y, bw, bh)) and bw > 0 and bh > 0:
                    crowd.append((min(max(x, 0.0), w), min(max(y, 0.0), h),
                                  min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)))
                continue
            reason = None
            if not all(math.isfinite(v) for v in (x, y, bw, bh)):
                reason = "non-finite coordinates"
            elif bw < 0 or bh < 0:
                reason = f"negative size {bw:g}x{bh:g}"
            else:
                x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
                x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
                if x2 - x1 <= MIN_BOX_SIDE or y2 - y1 <= MIN_BOX_SIDE:
                    reason = f"{x2 - x1:.2f}x{y2 - y1:.2f} px after clipping to the {w}x{h} image"
            if reason is not None:
                if ann["id"] not in self._warned:
                    self._warned.add(ann["id"])
                    warnings.warn(
                        f"{self.ann_file}: image id {image_id}, annotation id {ann['id']}: degenerate box "
                        f"{ann['bbox']} ({reason}) dropped",
                        stacklevel=3,
                    )
                continue
            boxes.append((x1, y1, x2, y2))
            labels.append(self._cat_to_label[ann["category_id"]])
        return (
            np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(labels, dtype=np.int64).reshape(-1),
            np.asarray(crowd, dtype=np.float32).reshape(-1, 4),
        )

    def fingerprint(self) -> dict:
        """Content identity: sha256 of the annotation file bytes and of the sorted (file_name, size) list.

        files_sha256 = sha256(json.dumps(sorted([[file_name, size_bytes], ...]), separators=(",", ":"))).
        """
        if self._fingerprint is None:
            files = sorted(
                [info["file_name"], (self.images_dir / info["file_name"]).stat().st_size]
                for info in self._images.values()
            )
            blob = json.dumps(files, separators=(",", ":")).encode()
            self._fingerprint = {
                "ann_sha256": self._ann_sha256,
                "files_sha256": hashlib.sha256(blob).hexdigest(),
                "num_images": len(self.image_ids),
            }
        return dict(self._fingerprint)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_coco"] = None  # rebuilt on demand; keeps DataLoader worker pickles small
        return state

    def __repr__(self) -> str:
        return (
            f"CocoDataset({str(self.images_dir)!r}, {str(self.ann_file)!r}: {len(self)} images, "
            f"{self.num_classes} classes)"
        )
