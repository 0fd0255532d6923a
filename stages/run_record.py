"""A run folder records the params that produced it; a rerun with other params is refused.

`<run folder>/run.json` holds the result-affecting params of the run (teacher or student) and
is written before the first step. A later run into the same folder:

* with identical result-affecting params resumes (or finds the run finished);
* with a different one is refused in one line naming the first differing field (`train.lr`,
  `student.model.fpn_channels`, `distill.losses.cskd`, ...) before any model is built, so an
  architecture change never reaches `load_state_dict`;
* with `overwrite=True` first removes the run's own files (checkpoints, log, metrics, record):
  never the folder, never a file a run does not write.

Params that cannot change the result (device, DataLoader workers, logging / checkpoint cadence,
output paths, other experiments, stage 1's execution settings) are left out of the record, so
moving a run to another machine or adding an experiment to params.yaml keeps every run valid.
A folder whose results were deleted (e.g. by dvc before it reruns a stage) holds nothing to
protect: its stale record is simply replaced.

Also here: `require_images`, the check that a train or val set is not empty (an empty val set
would "evaluate" to AP 0.00 after a whole training run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.config import Params, to_dict
from stores.manifest import _first_difference, _short, atomic_write_bytes

RECORD_NAME = "run.json"
RECORD_VERSION = 1
# what a training run writes into its folder: removed by --overwrite, nothing else is
RUN_FILES = ("last.pt", "model.pt", "metrics.json", "train_log.csv", RECORD_NAME)
RESULT_FILES = ("last.pt", "model.pt", "metrics.json")  # what a rerun with other params would mix with
# TrainParams fields that do not change the result
TRAIN_EXECUTION = ("device", "workers", "log_every", "ckpt_every", "dist_timeout_s")


class RunMismatchError(ValueError):
    """A run folder holds results of other params; the message names the field and the fix."""


def _train(train: Any) -> dict:
    return {k: v for k, v in to_dict(train).items() if k not in TRAIN_EXECUTION}


def _data(data: Any) -> dict:
    return {k: v for k, v in to_dict(data).items() if k != "synthetic"}


def teacher_record(model: Any, train: Any, data: Any, checkpoint: str | Path) -> dict:
    """Result-affecting params of a teacher run (train_detector's inputs)."""
    return {"kind": "teacher", "data": _data(data),  # keyed like params.yaml, so messages name teacher.train.lr
            "teacher": {"checkpoint": Path(checkpoint).name, "model": to_dict(model), "train": _train(train)}}


def student_record(params: Params, distill: Any, experiment: str | None) -> dict:
    """Result-affecting params of a student run: the resolved distill section of this experiment
    (not the other experiments), the student, training, data, and what defines its teacher."""
    cache = to_dict(params.cache)
    return {
        "kind": "student",
        "experiment": experiment or "",
        "student": {"model": to_dict(params.student.model)},
        "distill": to_dict(distill),
        "train": _train(params.train),
        "data": _data(params.data),
        "teacher": {"model": to_dict(params.teacher.model), "checkpoint": params.teacher.checkpoint},
        "cache": {k: cache[k] for k in ("views", "views_per_image", "targets", "codecs", "seed") if k in cache},
        "eval": to_dict(params.eval),
    }


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_run(out_dir: str | Path, record: dict, *, overwrite: bool = False) -> None:
    """Refuse (RunMismatchError) to continue a run folder produced by other params; with
    `overwrite` remove the run's own files first. Then write `record` (rank 0 only under DDP;
    every rank checks, and all wait for rank 0's write)."""
    out_dir = Path(out_dir)
    path = out_dir / RECORD_NAME
    results = [n for n in RESULT_FILES if (out_dir / n).exists()]
    want = {"version": RECORD_VERSION, "params": record}
    if not overwrite and results:
        have = _read(path)
        if have is None:
            raise RunMismatchError(
                f"{out_dir} holds {', '.join(results)} but no readable {RECORD_NAME} (the params that produced "
                "them): pass --overwrite to retrain from scratch, or choose another output folder"
            )
        diff = _first_difference(have.get("params"), record, "")
        if diff:
            name, a, b = diff
            raise RunMismatchError(
                f"{out_dir} was trained with {name}={_short(a, 80)}, these params say {_short(b, 80)}: "
                "pass --overwrite to retrain from scratch, or choose another output folder"
            )
    if _is_main():
        if overwrite:
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(want, indent=1, sort_keys=True) + "\n").encode())
    _barrier()


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "params" in data else None


def require_images(dataset: Any, field: str) -> None:
    """An empty train / val set is an error, raised before any work (not AP 0.00 at the end)."""
    if len(dataset) == 0:
        raise ValueError(f"{dataset.ann_file} ({field}) lists no images: point {field} at a COCO file with images")


def check_teacher_run(coco: Any, model: Any, train: Any, data: Any, checkpoint: str | Path, overwrite: bool) -> None:
    """train_detector's pre-flight: a non-empty train set, then the run folder's params record."""
    require_images(coco, "data.train_ann")
    check_run(Path(checkpoint).parent, teacher_record(model, train, data, checkpoint), overwrite=overwrite)


def check_student_run(params: Params, distill: Any, experiment: str | None, out_dir: str | Path,
                      overwrite: bool, coco: Any) -> None:
    """train_student's pre-flight: non-empty train and val sets (the val json is read now, so a
    malformed one fails before training, not after it), then the run folder's params record."""
    from stages.data.coco import CocoDataset

    require_images(coco, "data.train_ann")
    require_images(CocoDataset.from_params(params.data, "val"), "data.val_ann")
    check_run(out_dir, student_record(params, distill, experiment), overwrite=overwrite)
