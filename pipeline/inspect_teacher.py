"""Say what a teacher checkpoint is and how its classes map onto the configured dataset.

    python -m pipeline.inspect_teacher CKPT [--params params.yaml] [--set data.train_ann=...]

Prints three lines:
  what it recognised: format (kdcache / torchvision / mmdet), arch, backbone, FPN width, head
  convs, number of class outputs and label space;
  the mapping of those outputs onto data.train_ann's categories (by category id, by name, or
  by order), or the one-line refusal naming the categories the teacher cannot predict;
  the checkpoint keys nothing in the zoo matched, and the zoo weights the file lacks.
cache_teacher prints the same lines before it starts. Exit status 1 when the teacher cannot
serve (unreadable, foreign, or no mapping onto the dataset).
"""

from __future__ import annotations

from pipeline.params import make_parser, params_from_args
from stages.data.coco import CocoDataset
from stages.detectors.checkpoint import teacher_report


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("inspect_teacher", __doc__)
    parser.add_argument("checkpoint", help="teacher checkpoint (kdcache, torchvision state_dict or mmdetection)")
    parser.add_argument("--no-dataset", action="store_true", help="skip the mapping onto data.train_ann")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    categories, ann = None, params.data.train_ann
    if not args.no_dataset:
        categories = CocoDataset.from_params(params.data, "train").categories
    for line in teacher_report(args.checkpoint, params.teacher.model, categories, ann):
        print(line)


if __name__ == "__main__":
    from pipeline.cli import run

    run(main)
