"""Say what a teacher checkpoint is and, given a dataset, how its classes map onto it.

    python -m pipeline.inspect_teacher CKPT [--params params.yaml] [--set data.train_ann=...]

Prints what it recognised: format (kdcache / torchvision / mmdet), arch, backbone, FPN width, head
convs, number of class outputs and label space; then the checkpoint keys nothing in the zoo
matched, and the zoo weights the file lacks. None of that needs a dataset.
With a dataset it also prints the mapping of those outputs onto data.train_ann's categories (by
category id, by name, or by order), or the one-line refusal naming the categories the teacher
cannot predict. A dataset is given when data.train_ann exists, or is set on the command line
(`--set data.train_ann=...`, which must then exist); `--no-dataset` skips the mapping.
cache_teacher prints the same lines before it starts. Exit status 1 when the teacher cannot
serve (unreadable, foreign, or no mapping onto a given dataset).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.params import make_parser, params_from_args
from stages.data.coco import CocoDataset
from stages.detectors.checkpoint import teacher_report


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("inspect_teacher", __doc__)
    parser.add_argument("checkpoint", help="teacher checkpoint (kdcache, torchvision state_dict or mmdetection)")
    parser.add_argument("--no-dataset", action="store_true", help="skip the mapping onto data.train_ann")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    ann = params.data.train_ann
    # the params file's default dataset may simply not be there yet (a fresh checkout): describe the
    # checkpoint alone; a dataset named on the command line must exist
    named = any(o.strip().startswith(("data.train_ann=", "data.train_images=")) for o in args.overrides)
    categories = None
    if not args.no_dataset and (named or Path(ann).exists()):
        categories = CocoDataset.from_params(params.data, "train").categories
    for line in teacher_report(args.checkpoint, params.teacher.model, categories, ann):
        print(line)
    if categories is None:
        why = "--no-dataset" if args.no_dataset else f"no dataset at data.train_ann ({ann})"
        print(f"label map: not computed ({why}); pass --set data.train_ann=... --set data.train_images=... "
              "to map the classes onto a dataset")


if __name__ == "__main__":
    from pipeline.cli import run

    run(main)
