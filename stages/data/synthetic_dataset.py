"""Writing the synthetic dataset (`stages.data.synthetic`): PNGs and COCO json per split, atomically.

`generate` is also importable from `stages.data.synthetic`, the dataset's public API; the images
themselves come from `stages.data.synthetic_render.render_image`, so this module holds only the
files and the counts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stages.data import dataset_record
from stages.data.synthetic_classes import ClassSpec, class_specs
from stages.data.synthetic_render import MIN_OBJECT, render_image

_SPLITS = {"train": 0, "val": 1}  # part of each image's seed: [seed, split, k]
_PNG_COMPRESS_LEVEL = 6  # fixed, with no metadata: the same seed gives byte-identical files


def _split_dataset(
    split: str,
    n: int,
    out_dir: Path,
    seed: int,
    min_side: int,
    max_side: int,
    bar,
    min_object: float = MIN_OBJECT,
    classes: list[ClassSpec] | None = None,
) -> dict:
    classes = classes or class_specs()
    img_dir = out_dir / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for k in range(n):
        rng = np.random.default_rng([seed, _SPLITS[split], k])
        h = int(rng.integers(min_side, max_side + 1))
        w = int(rng.integers(min_side, max_side + 1))
        pixels, objects = render_image(h, w, rng, min_object, classes)
        image_id = k + 1
        file_name = f"{image_id:06d}.png"
        tmp = img_dir / f".{file_name}.tmp"
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
        os.replace(tmp, img_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for obj in objects:
            annotations.append({"id": ann_id, "image_id": image_id, "iscrowd": 0, **obj})
            ann_id += 1
        if bar is not None:
            bar.update(1)
    coco = {
        "info": {"description": f"kdcache synthetic shapes ({split}, seed {seed})", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": spec.category_id, "name": spec.name, "supercategory": "shape"} for spec in classes
        ],
    }
    ann_path = out_dir / "annotations" / f"instances_{split}.json"
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ann_path.with_name(f".{ann_path.name}.tmp")
    tmp.write_text(json.dumps(coco, sort_keys=True, separators=(",", ":")) + "\n")
    os.replace(tmp, ann_path)
    return {"images": str(img_dir), "ann": str(ann_path), "annotations": annotations, "num_images": n}


def generate(
    out_dir: str | Path,
    seed: int = 0,
    num_train: int = 240,
    num_val: int = 60,
    min_side: int = 128,
    max_side: int = 224,
    progress: bool = True,
    min_object: float = MIN_OBJECT,
    textures: int = 1,
    colours: int = 1,
) -> dict:
    """Write out_dir/{train,val}/*.png and out_dir/annotations/instances_{train,val}.json.

    `textures` x `colours` x 6 shapes = the number of classes (`class_specs`; 1, 1: the default six).

    Returns {'out_dir', 'train_images', 'train_ann', 'val_images', 'val_ann', 'num_images': {split: n},
    'num_annotations': {split: n}, 'per_class': {split: {name: n}}, 'box_side': {'min', 'median', 'max'},
    'seconds'}.
    """
    if not (isinstance(min_side, int) and isinstance(max_side, int)) or min_side < 48 or max_side < min_side:
        raise ValueError(f"need 48 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
    if not MIN_OBJECT / 2 <= min_object <= 0.5 * min_side:
        raise ValueError(f"need {MIN_OBJECT / 2} <= min_object <= min_side / 2, got {min_object}")
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train}, {num_val}")
    classes = class_specs(textures, colours)
    out = Path(out_dir)
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_train + num_val, desc=f"synthetic -> {out}", unit="img")
    # only a folder whose files its record lists is rewritten (stages.data.dataset_record)
    planned = [f"{split}/{k + 1:06d}.png" for split, n in (("train", num_train), ("val", num_val)) for k in range(n)]
    foreign = dataset_record.foreign_files(out)
    if foreign:
        raise ValueError(f"{out} holds files this did not write ({', '.join(foreign[:3])}): refusing to overwrite "
                         "them; write the dataset into a new or empty folder")
    dataset_record.begin(out, planned + [f"annotations/instances_{s}.json" for s in ("train", "val")])
    try:
        splits = {
            split: _split_dataset(split, n, out, seed, min_side, max_side, bar, min_object, classes)
            for split, n in (("train", num_train), ("val", num_val))
        }
    finally:
        if bar is not None:
            bar.close()
    dataset_record.finish(out)
    sides = [min(a["bbox"][2], a["bbox"][3]) for s in splits.values() for a in s["annotations"]]
    name_of = {spec.category_id: spec.name for spec in classes}
    per_class = {}
    for split, s in splits.items():
        counts = dict.fromkeys(name_of.values(), 0)
        for a in s["annotations"]:
            counts[name_of[a["category_id"]]] += 1
        per_class[split] = counts
    return {
        "out_dir": str(out),
        "train_images": splits["train"]["images"],
        "train_ann": splits["train"]["ann"],
        "val_images": splits["val"]["images"],
        "val_ann": splits["val"]["ann"],
        "num_images": {k: s["num_images"] for k, s in splits.items()},
        "num_annotations": {k: len(s["annotations"]) for k, s in splits.items()},
        "per_class": per_class,
        "box_side": {
            "min": float(min(sides)) if sides else 0.0,
            "median": float(np.median(sides)) if sides else 0.0,
            "max": float(max(sides)) if sides else 0.0,
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
