"""The training loop shared by the teacher (`pipeline.train_teacher`) and the students (stage 2).

One loop, parameterised by a `step_loss(batch) -> {name: scalar}` function: the teacher's is its
GT detection loss; a student's is GT loss + KD losses. The loop owns what every run needs:
optimiser + warm-up + schedule, gradient clipping, autocast on CUDA, tqdm progress, CSV metrics
(DVC plots read them), checkpoints that record architecture + params + step, and exact resume.

Determinism: batches come from `EpochBatchSampler`, a pure function of (seed, step), so a run
resumed from a checkpoint sees the same batches as an uninterrupted one.

Under torchrun (`stages.distributed`), every trained module goes inside one
DistributedDataParallel wrapper (gradients averaged by DDP's bucketed all-reduce), BatchNorm
becomes SyncBatchNorm when `train.sync_bn`, each rank trains on its slice of every global batch
(`train.batch_size` images per process), and only rank 0 writes the log and checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import math
import os
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from stages import distributed
from stages.config import TrainParams
from stages.devices import resolve_device  # noqa: F401  (re-exported: callers import it from here)


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Endless batches of dataset indices, reshuffled each epoch from (seed, epoch).

    `num_images` images, each with `num_views` views laid out as index = image * num_views + view
    (the layout of `ViewDataset(mode='all')`); every epoch visits each image once under a view drawn
    from the same seeded generator (restricted to `views_of(image)` when given: a cache's per-image
    view subset). `bucket_of(index)` (e.g. the padded input size) keeps every batch within one
    bucket, so an image is always padded exactly as the teacher saw it when its targets were cached.
    `start_step` skips the batches a resumed run already saw; `rank`/`world` give each DDP process
    its slice of every global batch.
    """

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        seed: int,
        num_views: int = 1,
        start_step: int = 0,
        rank: int = 0,
        world: int = 1,
        views_of: Callable[[int], list[int]] | None = None,
        bucket_of: Callable[[int], Hashable] | None = None,
    ):
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.num_views, self.start_step, self.rank, self.world = num_views, start_step, rank, world
        self.views_of, self.bucket_of = views_of, bucket_of
        self.global_batch = batch_size * world
        if not self._epoch(0):
            raise ValueError(
                f"{num_images} images cannot fill one batch of {batch_size} x {world} processes "
                "(within one input-size bucket): lower train.batch_size"
            )

    def _epoch(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_images, generator=g).tolist()
        picks = torch.randint(0, 1 << 30, (self.num_images,), generator=g).tolist()
        pending: dict[Hashable, list[int]] = {}
        batches = []
        for image in order:
            allowed = self.views_of(image) if self.views_of else range(self.num_views)
            index = image * self.num_views + allowed[picks[image] % len(allowed)]
            group = pending.setdefault(self.bucket_of(index) if self.bucket_of else 0, [])
            group.append(index)
            if len(group) == self.global_batch:
                batches.append(group[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])
                group.clear()
        return batches  # leftovers of each bucket wait for the next epoch's shuffle

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = 0, self.start_step
        while True:
            batches = self._epoch(epoch)
            if skip < len(batches):
                yield from batches[skip:]
                skip = 0
            else:
                skip -= len(batches)
            epoch += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for its own bookkeeping
        return 1 << 62


def lr_at(step: int, cfg: TrainParams) -> float:
    """Linear warm-up from 0.1% then the chosen schedule over the remaining steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (0.001 + 0.999 * step / max(1, cfg.warmup_steps))
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    if cfg.schedule == "step":  # x0.1 at 2/3 and 8/9 of training, like the 1x detection schedule
        return cfg.lr * (0.1 ** (int(progress >= 2 / 3) + int(progress >= 8 / 9)))
    return cfg.lr


def make_optimizer(params: list[nn.Parameter], cfg: TrainParams) -> torch.optim.Optimizer:
    # no weight decay on norms and biases (1-d tensors): standard for detectors
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, size limit, read-only folder, ...); one line
    naming the file. The temporary file is already removed and the previous checkpoint kept."""

    def __str__(self) -> str:
        return str(self.args[-1])


class _RecordingWriter:
    """A file object for torch.save that remembers the first OSError of a write: torch wraps it into
    a RuntimeError about stream positions that no longer says the disk was full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


# errnos that mean "no room": ENOSPC, EDQUOT, EFBIG (a file size limit, RLIMIT_FSIZE or the filesystem's)
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: a crash mid-write never leaves a half checkpoint under the real name, and a failed
    write (full disk) removes its temporary file and raises CheckpointSaveError naming `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            sink = _RecordingWriter(f)
            try:
                torch.save(state, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None
            f.flush()
            os.fsync(f.fileno())  # the rename below must not publish data still in the page cache
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(err, OSError):
            raise
        reason = err.strerror or str(err)
        what = "the disk is full or the file hits a size limit" if err.errno in _NO_ROOM else "the write failed"
        kept = "the previous checkpoint is kept; " if path.exists() else ""
        raise CheckpointSaveError(err.errno, f"{path}: checkpoint not saved, {what} ({reason}); {kept}free space "
                                  f"in {path.parent} (or move the run) and rerun the same command") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...
        raise ValueError(f"{path}: not a readable kdcache checkpoint ({err}); delete it to start over") from err


class CsvLog:
    """Per-step metrics as CSV (what `dvc plots` reads); appends on resume.

    On resume the log keeps the rows up to the checkpoint's step, the source of truth: rows a
    crashed run logged after it are dropped, and so is a torn tail (a power loss can leave the
    last lines as NUL bytes or half a row), with a note on stderr saying what was dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path, self.fields = path, None
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step == 0 or not path.exists():
            path.write_text("")
            return
        self.fields, keep, torn = _readable_rows(path, resume_step)
        if torn:
            print(f"note: {path}: dropped {torn} torn line(s) at its end (NUL bytes or a half row, as a power "
                  f"loss leaves them); resuming from the checkpoint at step {resume_step}", file=sys.stderr)
        with path.open("w", newline="") as f:
            if self.fields:
                w = csv.DictWriter(f, self.fields)
                w.writeheader()
                w.writerows(keep)

    def write(self, row: dict[str, float]) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row.keys())
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def _readable_rows(path: Path, resume_step: int) -> tuple[list[str] | None, list[dict], int]:
    """(header, rows with step <= resume_step, number of torn lines): parsing stops at the first
    line that is not a whole row of numbers; it and every line after it count as torn."""
    lines = path.read_bytes().decode("utf-8", "replace").splitlines()
    header = next(csv.reader(lines[:1]), None)
    if not header or "step" not in header or any("\x00" in h for h in header):
        return None, [], len(lines)
    keep = []
    for i, line in enumerate(lines[1:], start=1):
        row = next(csv.reader([line]), [])
        if "\x00" in line or len(row) != len(header) or not _numeric(row, header.index("step")):
            return header, keep, len(lines) - i
        if int(row[header.index("step")]) <= resume_step:
            keep.append(dict(zip(header, row, strict=True)))
    return header, keep, 0


def _numeric(row: list[str], step_at: int) -> bool:
    """A whole logged row: an integer step, and numbers (or blanks) everywhere else."""
    try:
        int(row[step_at])
        for v in row:
            if v:
                float(v)
    except ValueError:
        return False
    return True


def train_loop(
    *,
    modules: dict[str, nn.Module],
    step_loss: Callable[[dict[str, Any]], dict[str, Tensor]],
    make_batches: Callable[[int], Iterator[dict[str, Any]]],
    cfg: TrainParams,
    out_dir: Path,
    checkpoint_meta: dict[str, Any],
    device: torch.device,
    progress: bool = True,
    desc: str = "train",
    after_step: Callable[[int], None] | None = None,
    log_path: Path | None = None,
) -> dict[str, float]:
    """Run `cfg.steps` optimisation steps; returns the last logged metrics.

    modules: everything trained (e.g. {'model': student, 'kd': kd_losses}); all are saved in the
    checkpoint under their key. step_loss(batch) returns named scalar losses; their sum is minimised.
    make_batches(start_step) yields batches from that step on (deterministic in the step).
    Checkpoints go to out_dir/last.pt (every cfg.ckpt_every steps and at the end); a run finds and
    resumes from it, so a killed run loses at most ckpt_every steps. `log_path` (default
    out_dir/train_log.csv) gets the per-step metrics; the returned dict adds `mean_sec_per_step`.
    Under torchrun the logged losses are the mean over ranks.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "last.pt"
    world = distributed.world()
    is_main = distributed.is_main()
    if world > 1 and cfg.sync_bn and distributed.has_batchnorm(modules):
        for m in modules.values():
            distributed.convert_sync_bn(m, device)  # in place: same parameters and state_dict keys
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    start = 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        for name, module in modules.items():
            module.load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    log = CsvLog(log_path or out_dir / "train_log.csv", start) if is_main else None
    if start >= cfg.steps:
        return {}
    for m in modules.values():
        m.train()
    # DDP broadcasts rank 0's parameters and buffers here: every rank starts from the same state
    net = distributed.wrap(modules, step_loss, device)
    use_amp = cfg.amp and device.type == "cuda"
    batches = make_batches(start)
    last: dict[str, float] = {}

    def checkpoint(step: int) -> None:
        state = {name: m.state_dict() for name, m in modules.items()}
        state.update(checkpoint_meta, optimizer=optimizer.state_dict(), step=step)
        save_checkpoint(ckpt_path, state)

    bar = tqdm(range(start, cfg.steps), desc=desc, disable=not (progress and is_main), initial=start, total=cfg.steps)
    window_start, window_steps = time.perf_counter(), 0
    run_start = time.perf_counter()
    for step in bar:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(batches)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            losses = net(batch)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"step {step}: loss is {total.item()} ({ {k: float(v) for k, v in losses.items()} }); "
                f"lower train.lr or raise train.warmup_steps (checkpoint {ckpt_path} is from before this step)"
            )
        optimizer.zero_grad(set_to_none=True)
        total.backward()  # under DDP: gradients are averaged over ranks here
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        window_steps += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            sec = (time.perf_counter() - window_start) / window_steps
            window_start, window_steps = time.perf_counter(), 0
            names = list(losses)  # same order on every rank: the same code built the dict
            values = torch.stack([total.detach().float()] + [losses[k].detach().float() for k in names]).cpu()
            if world > 1:  # the log shows the global batch's losses, not rank 0's slice
                values = values.to(device)
                torch.distributed.all_reduce(values)
                values = values.cpu() / world
            last = {"step": step + 1, "lr": lr, "sec_per_step": round(sec, 4), "loss": float(values[0])}
            last.update({k: float(v) for k, v in zip(names, values[1:].tolist(), strict=True)})
            if log is not None:
                log.write(last)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
        if is_main and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps):
            checkpoint(step + 1)
    last["mean_sec_per_step"] = round((time.perf_counter() - run_start) / max(1, cfg.steps - start), 4)
    return last
