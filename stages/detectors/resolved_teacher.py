"""The teacher of a run, resolved once: the file and its digest, what it is, how its classes map.

An entry point (`pipeline.cache_teacher`, `pipeline.train_student`, `pipeline.inspect_cache`)
calls `resolve_teacher` once. The checkpoint is read once (`checkpoint.read_checkpoint`, whose
sha256 is that of the very bytes the weights were loaded from), its format and architecture are
recognised, and its class outputs are mapped onto the dataset's categories. The `ResolvedTeacher`
is then passed down: stage 1's planning takes the fingerprint's teacher_weights / teacher_arch /
label_map from it and builds the detector from its weights; stage 2 (the cache check, the online
teacher) and fidelity do the same. Nothing in that process reads the file again.

Dask workers are other processes, maybe on other machines. They are sent the cache job (a few
hundred bytes: paths, the fingerprint digest), and each worker process re-reads the checkpoint once
and checks its sha256 against the one the run resolved, recorded in the manifest's fingerprint
(`reload_checked`): a file replaced mid-run is refused in one line, never cached under the old
teacher's fingerprint. Why re-read rather than send the state_dict: a detection teacher's weights
are 100s of MB, which dask would pickle through the scheduler for every task (`client.map`
arguments), while the checkpoint already sits where every worker can read it (as the cache does),
and with the digest check a re-read is exactly as safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.config import ModelParams, to_dict
from stages.detectors.base import Detector
from stages.detectors.checkpoint import TeacherFile, architecture, build_teacher, open_teacher, report_lines
from stages.detectors.label_space import LabelMap, LabelSpace, map_labels


class TeacherChangedError(ValueError):
    """The checkpoint file no longer holds the weights the run resolved."""


@dataclass(frozen=True, eq=False)
class ResolvedTeacher:
    """A teacher checkpoint read once and mapped onto a dataset (see the module docstring)."""

    file: TeacherFile  # what the checkpoint holds: format, architecture, weights, label space, sha256
    label_map: LabelMap  # its class outputs -> the dataset's categories (sorted by id)
    categories: tuple[dict, ...]  # the dataset's categories the map is onto
    ann_file: str  # the COCO json they come from

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def sha256(self) -> str:
        return self.file.sha256

    @property
    def format(self) -> str:
        return self.file.format

    @property
    def model(self) -> ModelParams:
        return self.file.model

    @property
    def arch(self) -> dict[str, Any]:
        """ModelParams as a dict: what a cache's fingerprint records as teacher_arch."""
        return to_dict(self.file.model)

    @property
    def label_space(self) -> LabelSpace:
        return self.file.label_space

    @property
    def num_classes(self) -> int:
        """Class outputs after the mapping: the dataset's categories."""
        return len(self.label_map.index)

    def build(self) -> Detector:
        """The teacher on the CPU, predicting exactly the dataset's categories (no file read)."""
        return build_teacher(self.file, self.arch, self.num_classes, self.label_map.index)

    def report(self) -> list[str]:
        """The `inspect_teacher` lines: what was recognised, the label map, unmatched keys."""
        return report_lines(self.file, self.label_map, list(self.categories), self.ann_file)

    def onto(self, categories: list[dict], ann_file: str | Path) -> ResolvedTeacher:
        """The same teacher mapped onto another dataset's categories (no file read); ValueError
        naming both files if it cannot predict them."""
        lmap = map_labels(self.file.label_space, categories, self.path, str(ann_file))
        return ResolvedTeacher(self.file, lmap, tuple(categories), str(ann_file))


def resolve_teacher(checkpoint: str | Path, fallback: ModelParams | None, categories: list[dict],
                    ann_file: str | Path, role: str = "teacher") -> ResolvedTeacher:
    """Read `checkpoint` once, recognise it (`fallback`: params' teacher.model, whose inference knobs
    imported checkpoints take; a differing architecture is noted once, the file wins) and map its
    classes onto `categories` (ValueError naming both files if it cannot)."""
    tf = open_teacher(checkpoint, fallback)
    architecture(tf, fallback, role)  # the one-line note when params describe another architecture
    lmap = map_labels(tf.label_space, categories, tf.path, str(ann_file))
    return ResolvedTeacher(tf, lmap, tuple(categories), str(ann_file))


def reload_checked(checkpoint: str | Path, sha256: str, arch: dict, num_classes: int,
                   label_index: list[int] | tuple[int, ...] | None) -> Detector:
    """A worker process's teacher: the checkpoint read again and built as the run resolved it
    (`arch`, `label_index` from the cache's fingerprint), refused in one line if the file's sha256
    is not the run's (`TeacherChangedError`)."""
    tf = open_teacher(checkpoint)
    if tf.sha256 != sha256:
        raise TeacherChangedError(
            f"teacher checkpoint {tf.path} changed during the run (sha256 {tf.sha256[:12]}, the run resolved "
            f"{sha256[:12]}): its blocks would not be the cache's teacher's; restore the file, or rerun "
            "python -m pipeline.cache_teacher --overwrite to cache the new teacher")
    return build_teacher(tf, arch, num_classes, label_index)
