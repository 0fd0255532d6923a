"""Stage 0: write the synthetic COCO-format detection dataset.

Reads `data.synthetic` from params.yaml (out, seed, num_train, num_val, min_side, max_side) and
writes OUT/train/*.png, OUT/val/*.png and OUT/annotations/instances_{train,val}.json. The same
params give byte-identical files. To train on your own COCO data instead, skip this stage and point
data.train_images / data.train_ann / data.val_images / data.val_ann at it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.params import make_parser, params_from_args
from stages.data import dataset_record
from stages.data.synthetic import CLASSES, generate

DESCRIPTION = """\
Generate the synthetic detection dataset (six shape+texture classes: {classes}) with clutter,
occlusion and objects from ~8 px to ~60% of the image, in COCO format.

Params used (params.yaml section data.synthetic): out, seed, num_train, num_val, min_side, max_side,
min_object, textures, colours (6 x textures x colours classes; profiles/synth20.yaml has 24).
Example:
  python -m pipeline.make_dataset --set data.synthetic.num_train=40 --set data.synthetic.out=data/tiny
""".format(classes=", ".join(CLASSES))


def check_out_folder(out: Path) -> None:
    """Refuse (one line) to write into a folder holding any file make_dataset's own record
    (`OUT/.make_dataset.json`, stages.data.dataset_record) does not list unchanged: a file name
    like train/000001.png is no proof that it wrote it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"data.synthetic.out {out} is a file: point it at a new folder")
    foreign = dataset_record.foreign_files(out)
    if foreign:
        raise ValueError(f"data.synthetic.out {out} holds files make_dataset did not write ({', '.join(foreign[:5])}"
                         f"{' ...' if len(foreign) > 5 else ''}): refusing to overwrite them; point "
                         "data.synthetic.out at a new or empty folder")


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser("make_dataset", DESCRIPTION)
    args = parser.parse_args(argv)
    params = params_from_args(args)
    cfg = params.data.synthetic
    check_out_folder(Path(cfg.out))  # rewrites only a synthetic dataset of its own, never someone's data
    try:
        stats = generate(
            cfg.out,
            seed=cfg.seed,
            num_train=cfg.num_train,
            num_val=cfg.num_val,
            min_side=cfg.min_side,
            max_side=cfg.max_side,
            min_object=cfg.min_object,
            textures=cfg.textures,
            colours=cfg.colours,
            progress=True,
        )
    except ValueError as err:
        sys.exit(f"error: data.synthetic: {err}")
    n_img, n_ann = stats["num_images"], stats["num_annotations"]
    print(
        f"wrote {n_img['train']} train / {n_img['val']} val images, "
        f"{n_ann['train']} / {n_ann['val']} boxes (side {stats['box_side']['min']:.0f}-"
        f"{stats['box_side']['max']:.0f} px, median {stats['box_side']['median']:.0f}) to {stats['out_dir']} "
        f"in {stats['seconds']:.1f} s"
    )
    data = params.data
    expected = {
        "data.train_images": (data.train_images, stats["train_images"]),
        "data.train_ann": (data.train_ann, stats["train_ann"]),
        "data.val_images": (data.val_images, stats["val_images"]),
        "data.val_ann": (data.val_ann, stats["val_ann"]),
    }
    off = [
        key
        for key, (configured, written) in expected.items()
        if Path(configured).resolve() != Path(written).resolve()
    ]
    if off:
        print(
            f"note: {', '.join(off)} do not point at this dataset; set them to use it "
            f"(e.g. --set data.train_images={stats['train_images']})",
            file=sys.stderr,
        )
    return stats


if __name__ == "__main__":
    from pipeline.cli import run

    run(main, interrupted="the dataset folder may be partial; rerun python -m pipeline.make_dataset to rewrite it")
