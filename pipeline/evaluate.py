"""Evaluate a detector checkpoint on the val set (`data.val_*`) with pycocotools.

Writes a JSON file with AP, AP50, AP75, APs, APm, APl (percent) and per-class AP. The image view
is `data.min_size` / `data.max_size`, as in training. Device and CPU threads: `train.device`,
`train.threads` (0 = the CPUs this process may use, or OMP_NUM_THREADS when set).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.params import make_parser, params_from_args
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.detectors.checkpoint import load_mapped_teacher
from stages.devices import apply_threads, resolve_device
from stages.evaluation import METRIC_NAMES, evaluate
from stages.run_record import read_record, require_images


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("evaluate", __doc__)
    parser.add_argument("--checkpoint", help="detector checkpoint (default: teacher.checkpoint)")
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    device = resolve_device(params.train.device, "train.device")
    ckpt = Path(args.checkpoint or params.teacher.checkpoint)
    if not ckpt.exists():
        raise SystemExit(f"error: checkpoint {ckpt} not found; train it first (python -m pipeline.train_teacher)")
    print(apply_threads(params.train.threads), flush=True)
    # the run record next to the checkpoint says what it is; the params section of that kind
    # supplies the inference knobs and names it in notes
    kind = ((read_record(ckpt.parent) or {}).get("params") or {}).get("kind")
    role = "student" if kind == "student" else "teacher"  # no record: a teacher (imported ones have none)
    fallback = params.student.model if role == "student" else params.teacher.model
    dataset = CocoDataset.from_params(params.data, "val")
    require_images(dataset, "data.val_ann")  # an empty val set is an error, not AP 0.00
    # the architecture is read off the checkpoint; its classes are mapped onto the val set's categories
    model = load_mapped_teacher(ckpt, fallback, dataset.categories, params.data.val_ann, role)[0].to(device)
    view = View(params.data.min_size, params.data.max_size, False)
    metrics = evaluate(model, dataset, view, params.eval.batch_size, device)
    metrics["checkpoint"] = str(ckpt)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(" ".join(f"{k}=n/a" if metrics[k] is None else f"{k}={metrics[k]:.2f}" for k in METRIC_NAMES))


if __name__ == "__main__":
    from pipeline.cli import run

    run(main, interrupted="no metrics were written; rerun to evaluate")
