"""Export a trained student (a run folder) as a deployable model.

Formats:
  onnx         the whole detector, image -> boxes, scores, labels (opset 17): normalisation, padding,
               backbone, head, box decoding, score threshold, top-k, class-wise NMS, the map back to
               the original image and to the json's category ids. Runs in onnxruntime.
  torchscript  the same traced graph for plain torch (torch.jit.load), no kdcache needed.
  torchvision  FILE: a state_dict; FILE with suffix .py: build_model()/load() with torchvision's own
               RetinaNet / FCOS classes. Refused where the student does not map exactly.
  mmdet        an mmdetection 3.x checkpoint (meta.dataset_meta.classes, meta.cfg, state_dict) for
               RetinaNet / GFL / FCOS in mmdetection's layout.

ONNX / TorchScript inputs: `image` float32 [1, 3, h, w], RGB in [0, 1], resized so that the shorter side
is data.min_size and the longer at most data.max_size (PIL bilinear), and `original_size` int64 [2]
(H, W before that resize). See docs/deploy.md.

Examples:
  python -m pipeline.export_student runs/students/cskd --format onnx --out runs/export/cskd.onnx
  python -m pipeline.export_student runs/students --best --format onnx --out runs/export/best_student.onnx
"""

from __future__ import annotations

from pathlib import Path

from pipeline.params import make_parser, params_from_args
from stages.data.coco import CocoDataset
from stages.export.run import FORMATS, export_student
from stages.export.student import best_run, open_student


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("export_student", __doc__)
    parser.add_argument("run_dir", help="a student run folder (e.g. runs/students/baseline) or its model.pt")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write (see above)")
    parser.add_argument("--best", action="store_true", help="RUN_DIR is a folder of runs (runs/students): export "
                        "the one whose metrics.json has the highest val AP")
    parser.add_argument("--out", required=True, help="file to write; an existing file is replaced only if it is "
                        "an earlier export of the same format")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    run_dir = best_run(args.run_dir) if args.best else args.run_dir
    student = open_student(run_dir, params.data)
    val = CocoDataset.from_params(params.data, "val") if args.format in ("onnx", "torchscript") else None
    written = export_student(student, args.format, Path(args.out), val)
    print(f"exported {student.describe()} ({student.checkpoint}, sha256 {student.sha256[:12]}) as {args.format}: "
          + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    from pipeline.cli import run

    run(main, interrupted="nothing was replaced (exports are written whole); rerun to export")
