"""Teacher checkpoints: read safely (`weights_only=True`) and build the detector they hold.

A kdcache checkpoint carries its architecture (`model_params`); a raw torchvision-style
state_dict is described by the params' `teacher.model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stages.config import ModelParams, from_dict, to_dict
from stages.detectors.base import Detector
from stages.detectors.build import load_detector


def read_checkpoint(checkpoint: str | Path) -> dict:
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(
            f"teacher checkpoint {path} not found: train it (python -m pipeline.train_teacher) or set teacher.checkpoint"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...
        raise ValueError(f"teacher checkpoint {path} is not readable ({type(err).__name__}); retrain or replace it") from None
    if not isinstance(state, dict):
        raise ValueError(f"teacher checkpoint {path} holds a {type(state).__name__}, not a checkpoint or state_dict")
    return state


def teacher_model_params(checkpoint: str | Path, fallback: ModelParams | None = None) -> dict[str, Any]:
    """The teacher's ModelParams as a dict: from a kdcache checkpoint, or `fallback` (params'
    teacher.model) for a raw torchvision-style state_dict that carries no architecture."""
    state = read_checkpoint(checkpoint)
    if "model_params" in state:
        return to_dict(from_dict(ModelParams, state["model_params"], "model_params"))
    if fallback is None:
        raise ValueError(f"teacher checkpoint {checkpoint} is a raw state_dict: describe it in teacher.model")
    return to_dict(fallback)


def load_teacher(checkpoint: str | Path, arch: dict, num_classes: int) -> Detector:
    """The teacher on the CPU: a kdcache checkpoint (architecture from the file) or a raw
    state_dict described by `arch` (teacher.model) with `num_classes` classes."""
    state = read_checkpoint(checkpoint)
    if "model_params" in state:
        return load_detector(checkpoint)
    return load_detector(checkpoint, from_dict(ModelParams, arch), num_classes)

