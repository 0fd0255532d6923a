"""Stage 2: train a student against the cached teacher targets (or a live teacher).

`--experiment NAME` picks an entry of `experiments` in params.yaml (its keys override the
`distill` section: losses {name: weight}, teacher offline|online, source zarr|wds); without it
the `distill` section is used as is. Loss names: mse, cosine, cskd, ssim, crosskd, rm, pfi; no
losses = the no-KD baseline. Writes <student.out_dir>/<NAME>/: model.pt, last.pt (resume),
train_log.csv (per-step losses, for dvc plots) and metrics.json (COCO AP on data.val_*).

Offline runs never run the teacher: they read `cache.path` and refuse a cache whose manifest
does not match these params (teacher, dataset, views, targets, codecs).
Multi-GPU: torchrun --nproc_per_node N -m pipeline.train_student ... shards batches by rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.params import make_parser, params_from_args
from stages.distill.run import train_student


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("train_student", __doc__)
    parser.add_argument("--experiment", default="", help="name of an entry in params.yaml `experiments`")
    parser.add_argument("--out", help="output folder (default: <student.out_dir>/<experiment or 'default'>)")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    out = Path(args.out or Path(params.student.out_dir) / (args.experiment or "default"))
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        metrics = train_student(params, args.experiment or None, out)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{args.experiment or 'default'}: AP={metrics['AP']:.2f} AP50={metrics['AP50']:.2f} -> {out}/metrics.json")


if __name__ == "__main__":
    main()
