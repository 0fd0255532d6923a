"""The student a run folder holds, opened for export: weights, architecture, categories, eval view.

A run folder (`runs/students/<experiment>`, or a teacher's `runs/teacher`) holds `model.pt`
({'model', 'model_params', 'num_classes', 'categories'}) and `run.json` (the params that produced
it). Exports are identified by the sha256 of the `model.pt` they consumed, not by its path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.config import DataParams, ModelParams, from_dict
from stages.detectors.base import Detector
from stages.detectors.build import load_detector
from stores.manifest import sha256_file

MODEL_FILE = "model.pt"


@dataclass
class Student:
    checkpoint: Path
    sha256: str  # of the checkpoint file: what an export records it was made from
    detector: Detector  # on the CPU, eval mode
    cfg: ModelParams
    categories: list[dict]  # the json's categories sorted by id: label j <-> categories[j]
    min_size: int  # the eval view (data.min_size / data.max_size), the size exports expect
    max_size: int

    @property
    def category_ids(self) -> list[int]:
        return [int(c["id"]) for c in self.categories]

    @property
    def class_names(self) -> list[str]:
        return [str(c["name"]) for c in self.categories]

    def describe(self) -> str:
        m = self.cfg
        return (f"{m.arch} {m.backbone} FPN {m.fpn_channels}, {m.head_convs} head convs"
                + (f", variant {m.variant}" if m.variant else "") + f", {len(self.categories)} classes")


def open_student(run: str | Path, data: DataParams) -> Student:
    """The student of a run folder (or a model.pt path); one-line ValueError naming what is missing."""
    run = Path(run)
    ckpt = run / MODEL_FILE if run.is_dir() else run
    if not ckpt.exists():
        raise ValueError(f"{ckpt} not found: point at a finished run folder (e.g. runs/students/baseline, "
                         "written by python -m pipeline.train_student) or its model.pt")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle: one line, not a traceback
        raise ValueError(f"{ckpt}: not a readable checkpoint ({type(err).__name__}); export the model.pt a "
                         "training run wrote") from None
    if not isinstance(state, dict) or "model_params" not in state or "model" not in state:
        raise ValueError(f"{ckpt}: not a kdcache detector checkpoint (no 'model' / 'model_params'); "
                         "export the model.pt a training run wrote")
    categories = state.get("categories")
    if not (isinstance(categories, list) and len(categories) == int(state["num_classes"])
            and all(isinstance(c, dict) and "id" in c and "name" in c for c in categories)):
        raise ValueError(f"{ckpt}: records no categories for its {state['num_classes']} classes (the json "
                         "category ids the exported labels are); retrain it with python -m pipeline.train_student")
    cfg = from_dict(ModelParams, state["model_params"], "model_params")
    detector = load_detector(ckpt).eval()
    min_size, max_size = _eval_view(ckpt.parent, data)
    return Student(ckpt, sha256_file(ckpt), detector, cfg, list(categories), min_size, max_size)


def _eval_view(folder: Path, data: DataParams) -> tuple[int, int]:
    """data.min_size / max_size, checked against the run's own record when it has one."""
    record = folder / "run.json"
    if record.exists():
        recorded = json.loads(record.read_text()).get("params", {}).get("data", {})
        for key in ("min_size", "max_size"):
            if key in recorded and recorded[key] != getattr(data, key):
                raise ValueError(f"{folder} was trained and evaluated with data.{key}={recorded[key]}, these params "
                                 f"say {getattr(data, key)}: pass --set data.{key}={recorded[key]} (the export "
                                 "expects images resized to the size the student was evaluated at)")
    return data.min_size, data.max_size


def best_run(folder: str | Path) -> Path:
    """The run folder under `folder` whose metrics.json has the highest val AP (the demo's deployable)."""
    folder = Path(folder)
    scored = []
    for metrics in sorted(folder.glob("*/metrics.json")):
        ap = json.loads(metrics.read_text()).get("AP")
        if ap is not None and (metrics.parent / MODEL_FILE).exists():
            scored.append((float(ap), metrics.parent.name, metrics.parent))
    if not scored:
        raise ValueError(f"{folder}: no run folder with metrics.json and {MODEL_FILE}; train students first "
                         "(dvc repro, or python -m pipeline.train_student --experiment NAME)")
    return max(scored)[2]
