"""What the benchmarks run on: a synthetic dataset, a randomly initialised teacher, params, a cache.

Nothing is downloaded. The dataset comes from `stages.data.synthetic.generate`; the benchmark
keeps the images whose views all land in the most common padded input size, so every batch is
full and every side of a comparison sees exactly the same batches. The teacher is a freshly
initialised detector (seeded) saved with `checkpoint_dict`: its speed is a trained teacher's, its
outputs are not (see README: the class maps of an untrained RetinaNet sit at its 0.01 prior).

Everything is created under a work folder and reused if already there (run_all shares one folder
between the benchmarks).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import Scale
from pipeline.params import load_params
from stages.config import ModelParams, Params, from_dict, to_dict
from stages.data.batching import view_padded_size
from stages.data.synthetic import generate
from stages.data.views import View
from stages.detectors.build import build_detector, checkpoint_dict

# params.yaml's demo choices, read from it: what a cache built by `make demo` holds
_DEMO = load_params(Path(__file__).resolve().parents[1] / "params.yaml").cache
CACHE_TARGETS = list(_DEMO.targets)
CACHE_CODECS = dict(_DEMO.codecs)


@dataclass(frozen=True)
class Fixture:
    root: Path  # this arch's folder inside the work folder
    images_dir: Path
    ann_file: Path
    num_classes: int
    teacher_cfg: ModelParams
    student_cfg: ModelParams
    checkpoint: Path
    views: tuple[View, ...]
    padded_size: tuple[int, int]  # the one padded input size of every (image, view)
    batch_size: int
    loader_workers: int

    def params(self, cache_path: Path | str, **sections) -> Params:
        """Run params over this fixture; `sections` override whole keys per section, e.g.
        ``distill={"teacher": "online", "losses": {"cskd": 1.0}}``."""
        raw = {
            "data": {"train_images": str(self.images_dir), "train_ann": str(self.ann_file),
                     "val_images": str(self.images_dir), "val_ann": str(self.ann_file)},
            "teacher": {"model": to_dict(self.teacher_cfg), "checkpoint": str(self.checkpoint)},
            "student": {"model": to_dict(self.student_cfg), "out_dir": str(self.root / "students")},
            "cache": {
                "path": str(cache_path),
                "format": "both",
                "views": [v.to_dict() for v in self.views],
                "targets": list(CACHE_TARGETS),
                "codecs": dict(CACHE_CODECS),
                "batch_size": self.batch_size,
                "block_size": 2 * self.batch_size,  # several blocks: the write of one overlaps the next
                "loader_workers": self.loader_workers,
                "n_workers": 1,
                "device": "auto",
            },
            "train": {"optimizer": "adamw", "lr": 1e-4, "batch_size": self.batch_size, "warmup_steps": 0,
                      "workers": 0, "device": "auto", "log_every": 1_000_000, "ckpt_every": 1_000_000},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return from_dict(Params, raw)


def scale_views(scale: Scale) -> tuple[View, ...]:
    lo, hi = scale.view
    return View(lo, hi, False), View(lo, hi, True)


def make_dataset(folder: Path, scale: Scale, num_images: int, seed: int = 0) -> tuple[Path, Path, tuple[int, int]]:
    """Synthetic train images, keeping `num_images` that share the most common padded view size.

    Returns (images dir, annotation file of the kept images, that padded size).
    """
    ann = folder / "instances_bench.json"
    view = scale_views(scale)[0]
    if ann.exists():
        data = json.loads(ann.read_text())
        info = data["images"][0]
        return folder / "train", ann, view_padded_size(view, info["height"], info["width"])
    pool = 4 * num_images
    while True:
        out = generate(folder, seed=seed, num_train=pool, num_val=0, min_side=scale.image_sides[0],
                       max_side=scale.image_sides[1], progress=False)
        data = json.loads(Path(out["train_ann"]).read_text())
        size_of = {im["id"]: view_padded_size(view, im["height"], im["width"]) for im in data["images"]}
        counts = Counter(size_of.values())
        # most images first, then the larger input (closer to real detector inputs)
        best, n = max(counts.items(), key=lambda kv: (kv[1], kv[0][0] * kv[0][1]))
        if n >= num_images:
            break
        if pool >= 64 * num_images:
            raise RuntimeError(f"synthetic data: only {n} of {pool} images share a padded size; widen image_sides")
        pool *= 2
    keep = sorted(i for i, s in size_of.items() if s == best)[:num_images]
    kept = set(keep)
    data["images"] = [im for im in data["images"] if im["id"] in kept]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in kept]
    ann.write_text(json.dumps(data, sort_keys=True))
    return Path(out["train_images"]), ann, best


def make_teacher(path: Path, cfg: ModelParams, num_classes: int, seed: int = 0) -> Path:
    """A seeded, randomly initialised teacher checkpoint (same bytes for the same seed and code)."""
    if not path.exists():
        torch.manual_seed(seed)
        model = build_detector(cfg, num_classes)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint_dict(model, cfg), path)
    return path


def fixture(work: Path, scale: Scale, arch: str, num_images: int, batch_size: int) -> Fixture:
    """The dataset (shared by all archs) and this arch's teacher, created once under `work`."""
    from stages.data.coco import CocoDataset

    images_dir, ann, padded = make_dataset(work / f"data-{scale.name}-{num_images}", scale, num_images)
    num_classes = CocoDataset(images_dir, ann).num_classes
    teacher_cfg, student_cfg = scale.models(arch)
    root = work / f"{scale.name}-{arch}"
    ckpt = make_teacher(root / "teacher.pt", teacher_cfg, num_classes)
    # leave two cores to the main process and the encoder thread (0 workers on a 2-core machine)
    workers = min(scale.loader_workers, max(0, (os.cpu_count() or 1) - 2))
    return Fixture(root=root, images_dir=images_dir, ann_file=ann, num_classes=num_classes,
                   teacher_cfg=teacher_cfg, student_cfg=student_cfg, checkpoint=ckpt, views=scale_views(scale),
                   padded_size=padded, batch_size=batch_size, loader_workers=workers)


def built_cache(fix: Fixture, name: str = "cache") -> Path:
    """A complete cache of the fixture (demo targets and codecs, Zarr + WebDataset), built once."""
    from stages.cache.run import run_cache

    path = fix.root / name
    run_cache(fix.params(path), progress=False)  # resumes: a complete cache is left untouched
    return path


def measure_archs(name: str, description: str, argv, measure) -> tuple[Any, dict, dict, float]:
    """The shared frame of the per-arch benchmarks: parse args, set torch up, build each arch's
    fixture in the work folder and call measure(fixture, settings, device).
    Returns (settings, env, {'archs': {arch: result}}, start time)."""
    from bench.common import make_parser, settings_from, setup_torch, workdir

    args = make_parser(name, description).parse_args(argv)
    settings = settings_from(args, argv)
    env = setup_torch(settings)
    device = torch.device(env["device"])
    t0 = time.perf_counter()
    out: dict[str, Any] = {"archs": {}}
    with workdir(settings) as work:
        for arch in settings.archs:
            fix = fixture(Path(work), settings.scale, arch, settings.images, settings.batch)
            out["archs"][arch] = measure(fix, settings, device)
    return settings, env, out, t0


def trained_checkpoint(final: Path) -> tuple[Path | None, str]:
    """A trained teacher for the real-scale benchmarks: `final` (what train_teacher writes at the end),
    else the `last.pt` next to it (a run still in progress or stopped: its step is said), else None.
    Returns (path or None, how it was trained, in words)."""
    final = Path(final)
    for path in (final, final.parent / "last.pt"):
        if not path.exists():
            continue
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        train = ckpt.get("params", {}).get("teacher", {}).get("train", {})
        data = ckpt.get("params", {}).get("data", {})
        step, total = ckpt.get("step", "?"), train.get("steps", "?")
        state = "" if path == final else f"PARTIAL (train_teacher stopped at step {step} of {total}, {path.name}); "
        how = (f"{state}trained {step} steps (batch {train.get('batch_size', '?')}, {train.get('optimizer', '?')} "
               f"lr {train.get('lr', '?')}) on {data.get('train_ann', '?')} at {data.get('min_size', '?')}x"
               f"{data.get('max_size', '?')} views")
        init = ckpt.get("params", {}).get("teacher", {}).get("model", {}).get("pretrained_backbone")
        if init:
            how += f", backbone initialised from {init}"
        metrics = path.parent / "eval.json"
        if metrics.exists():
            how += f"; val AP {json.loads(metrics.read_text()).get('AP')}"
        return path, how
    return None, f"{final} missing (and no {final.parent / 'last.pt'})"
