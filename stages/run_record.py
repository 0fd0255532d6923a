"""A run folder records the params that produced it; a rerun with other params is refused.

`<run folder>/run.json` holds the result-affecting params of the run (teacher or student) and
is written before the first step. A later run into the same folder:

* with identical result-affecting params resumes (or finds the run finished);
* with a different one is refused in one line naming the first differing field (`train.lr`,
  `student.model.fpn_channels`, `distill.losses.cskd`, ...) before any model is built, so an
  architecture change never reaches `load_state_dict`;
* with `overwrite=True` first removes the run's own files (checkpoints, log, metrics, record):
  never the folder, never a file a run does not write, and only when the folder's `run.json`
  proves it holds a run of the same kind (`--overwrite` of a student never deletes a teacher, and
  results without a readable record are nobody's provable own: refused).

Provenance: besides params, the record holds digests of the content the run consumed (`inputs`):
the teacher checkpoint's sha256, the cache's fingerprint digest and a digest of its per-block
content fingerprints and the dataset version it read (offline students), and the training set's content (`CocoDataset.fingerprint`:
sha256 of the annotation json, and of the image file names and sizes; not the image bytes, which
would mean reading gigabytes on every run; offline students get the image bytes through the cache's
block fingerprints, which stage 2 checks anyway). A teacher retrained in place or relabelled boxes
make a finished run's rerun refuse, naming what changed, exactly as a params change does.

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
RECORD_VERSION = 2  # 2: `inputs` (content digests) beside `params`
# what a training run writes into its folder: removed by --overwrite, nothing else is
RUN_FILES = ("last.pt", "model.pt", "metrics.json", "train_log.csv", RECORD_NAME)
RESULT_FILES = ("last.pt", "model.pt", "metrics.json")  # what a rerun with other params would mix with
# TrainParams fields that do not change the result
TRAIN_EXECUTION = ("device", "workers", "log_every", "ckpt_every", "dist_timeout_s", "threads")


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


# what each `inputs` digest is, for the refusal message
INPUT_NAMES = {
    "teacher_sha256": "teacher.checkpoint's content (sha256)",
    "cache.fingerprint_digest": "the cache's fingerprint (cache.path)",
    "cache.content_sha256": "the cache's per-block image content (cache.path)",
    "cache.version": "the cache's dataset version (cache.path: its manifest's versions)",
    "train_data.ann_sha256": "data.train_ann's content (sha256)",
    "train_data.files_sha256": "data.train_images' file names and sizes",
    "train_data.num_images": "the number of training images",
}


def dataset_content(dataset: Any) -> dict:
    """The training set's content digest: the annotation json's sha256 and the image list's
    (names and sizes; the pixels are not hashed: see the module docstring)."""
    return dataset.fingerprint()


def read_record(out_dir: str | Path) -> dict | None:
    """The folder's run.json as written by `check_run`, or None (absent / unreadable)."""
    return _read(Path(out_dir) / RECORD_NAME)


def check_kind(out_dir: str | Path, kind: str, *, overwrite: bool = False) -> None:
    """Refuse a folder holding another kind of run (a teacher's, for a student), and --overwrite of
    results no readable run.json proves to be a run of this kind. Cheap: called before any work."""
    out_dir = Path(out_dir)
    have = read_record(out_dir)
    results = [n for n in RESULT_FILES if (out_dir / n).exists()]
    if have is not None:
        their = (have.get("params") or {}).get("kind")
        if their != kind:
            action = f"--overwrite replaces only a {kind} run" if overwrite else f"refusing to train a {kind} into it"
            raise RunMismatchError(
                f"{out_dir} holds a {their} run (its {RECORD_NAME} says kind {their!r}), not a {kind} run: "
                f"{action}; choose another output folder")
    elif results and overwrite:
        raise RunMismatchError(
            f"{out_dir} holds {', '.join(results)} but no readable {RECORD_NAME}, so nothing proves they are a "
            f"{kind} run of kdcache: --overwrite will not delete them; move them away yourself or choose "
            "another output folder")


def check_run(out_dir: str | Path, record: dict, *, overwrite: bool = False, inputs: dict | None = None) -> None:
    """Refuse (RunMismatchError) to continue a run folder produced by other params or from other
    content (`inputs`: digests of what the run consumes); with `overwrite` remove the run's own files
    first (only a run of the same kind). Then write the record (rank 0 only under DDP; every rank
    checks, and all wait for rank 0's write)."""
    out_dir = Path(out_dir)
    path = out_dir / RECORD_NAME
    check_kind(out_dir, record.get("kind", ""), overwrite=overwrite)
    results = [n for n in RESULT_FILES if (out_dir / n).exists()]
    want = {"version": RECORD_VERSION, "params": record, "inputs": inputs or {}}
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
        diff = _input_difference(have.get("inputs") or {}, inputs or {})
        if diff:
            name, a, b = diff
            what = INPUT_NAMES.get(name, name)
            raise RunMismatchError(
                f"{out_dir} was trained on other content: {what} changed since (inputs.{name} was {_short(a, 20)}, "
                f"now {_short(b, 20)}): pass --overwrite to retrain from scratch on the new content, or choose "
                "another output folder"
            )
    if _is_main():
        if overwrite:
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(want, indent=1, sort_keys=True) + "\n").encode())
    _barrier()


INPUT_ORDER = ("teacher_sha256", "train_data", "cache")  # the root cause first: a retrained teacher changes its cache too


def _input_difference(have: dict, want: dict) -> tuple[str, Any, Any] | None:
    keys = [k for k in INPUT_ORDER if k in have or k in want] + sorted((set(have) | set(want)) - set(INPUT_ORDER))
    for key in keys:
        diff = _first_difference(have.get(key, "<absent>"), want.get(key, "<absent>"), key)
        if diff:
            return diff
    return None


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "params" in data else None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_folder(out_dir: str | Path, data: Any, cache_path: str | Path | None, flag: str) -> None:
    """A run folder is never the cache folder (or inside it) nor an image folder: the run's files
    would sit among data that other commands own."""
    out = Path(out_dir).resolve()
    if cache_path and _inside(out, Path(cache_path).resolve()):
        raise ValueError(f"{flag} {out_dir} is inside the cache folder cache.path={cache_path}: "
                         "point it at a folder of its own")
    for field in ("train_images", "val_images"):
        folder = getattr(data, field, None)
        if folder and out == Path(folder).resolve():
            raise ValueError(f"{flag} {out_dir} is the image folder data.{field}: point it at a folder of its own")


def require_images(dataset: Any, field: str) -> None:
    """An empty train / val set is an error, raised before any work (not AP 0.00 at the end)."""
    if len(dataset) == 0:
        raise ValueError(f"{dataset.ann_file} ({field}) lists no images: point {field} at a COCO file with images")


def check_teacher_run(coco: Any, model: Any, train: Any, data: Any, checkpoint: str | Path, overwrite: bool) -> None:
    """train_detector's pre-flight: a non-empty train set, then the run folder's params record and
    the training set's content."""
    require_images(coco, "data.train_ann")
    check_run(Path(checkpoint).parent, teacher_record(model, train, data, checkpoint), overwrite=overwrite,
              inputs={"train_data": dataset_content(coco)})


def check_student_run(params: Params, distill: Any, experiment: str | None, out_dir: str | Path,
                      overwrite: bool, coco: Any, inputs: dict | None = None) -> None:
    """train_student's pre-flight: non-empty train and val sets (the val json is read now, so a
    malformed one fails before training, not after it), then the run folder's params record and
    the digests of the content it consumes (`inputs`, from `build_run`)."""
    from stages.data.coco import CocoDataset

    require_images(coco, "data.train_ann")
    val = CocoDataset.from_params(params.data, "val")
    require_images(val, "data.val_ann")
    val.check_readable()  # a truncated val image would otherwise surface after the whole run
    check_run(out_dir, student_record(params, distill, experiment), overwrite=overwrite,
              inputs={**(inputs or {}), "train_data": dataset_content(coco)})
