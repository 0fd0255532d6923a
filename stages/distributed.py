"""Data-parallel training under torchrun: process group, DistributedDataParallel, SyncBatchNorm.

`torchrun --nproc_per_node N -m pipeline.train_student ...` starts N processes with RANK,
LOCAL_RANK, WORLD_SIZE and a rendezvous in their environment; `init_from_env` joins them (nccl on
GPUs, one GPU per process by LOCAL_RANK; gloo on CPU) and `wrap` puts everything that trains
(detector, KD adapters, the CSKD assistant branch) inside ONE DistributedDataParallel module, so
their gradients are reduced by DDP's bucketed all-reduce, overlapped with backward.

SyncBatchNorm: the zoo's ResNets train BatchNorm (from scratch), so under DDP each rank would
otherwise normalise with the statistics of its own slice of the global batch and the result would
depend on the process count. torch's `nn.SyncBatchNorm` runs on GPUs only (its kernels are CUDA
ones); on CPU (gloo: CI, debugging) `_CpuSyncBatchNorm` computes the same global statistics with
one differentiable all-reduce of per-channel sums (`_AllReduceSum`: its backward all-reduces the
gradient, as torch's SyncBatchNorm backward does), so an N-process CPU run equals a 1-process run with the same global
batch up to float rounding.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stages.devices import resolve_device

DEFAULT_TIMEOUT_S = 300


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def reduce_mean(value, device: torch.device | str | None = None):
    """mmdetection's `reduce_mean` for loss normalisers: the mean over the process group of a count or
    sum this rank computed on its slice of the global batch (a loss normalised by it, averaged by DDP
    over the ranks, is the global batch's loss normalised by the global count).

    `value`: a tensor (returned detached: a normaliser carries no gradient) or a Python number
    (returned as a float, like mmdet's `.item()`; `device` is where the collective runs, default the
    current CUDA device under nccl, else the CPU). One process / no process group: `value` itself
    (detached), so single-process losses are bit-identical to not calling this. It is a collective:
    every rank must call it the same number of times in the same order, never in a branch that
    depends on its own data.
    """
    if world() == 1:
        return value.detach() if isinstance(value, torch.Tensor) else value
    if isinstance(value, torch.Tensor):
        t = value.detach().clone()
        if not t.is_floating_point():
            t = t.float()
    else:
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(float(value), dtype=torch.float32, device=device)
    dist.all_reduce(t)
    t = t / world()
    return t if isinstance(value, torch.Tensor) else t.item()


def init_from_env(timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """Join the torchrun process group when WORLD_SIZE > 1; True if this is a multi-process run.

    The timeout bounds every collective: a rank that dies mid-step makes the others fail after at
    most `timeout_s` instead of hanging (torchrun normally stops them sooner, when it sees the exit).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # one GPU per process, picked by its local rank
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(spec: str) -> torch.device:
    """The device of this process: under torchrun with CUDA, cuda:LOCAL_RANK."""
    device = resolve_device(spec)
    if device.type == "cuda" and device.index is None and world() > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


class _CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d synchronised over the process group on CPU (gloo), where nn.SyncBatchNorm
    raises (and DDP refuses it on CPU modules). Eval mode and 1 process: plain BatchNorm2d.

    Global mean and biased variance from all-reduced per-channel sums, running statistics updated
    with the unbiased variance over the global count (as torch's kernels do).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or world() == 1:
            return super().forward(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
        group = _cpu_bn_group()
        # two passes (sum, then squared deviations): E[x^2] - mean^2 cancels badly in float32
        count = torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype)
        total = _AllReduceSum.apply(torch.cat([input.sum(dims), count]), group)
        n = total[-1]
        mean = total[:-1] / n
        centered = input - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims), group) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        out = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; every rank's output depends on every rank's input, so the gradient of the
    sum of all ranks' losses w.r.t. this rank's input is the all-reduced output gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


_BN_GROUP: list = []


def _cpu_bn_group():
    """A gloo group of its own for BN statistics: collectives of one group must be issued in the
    same order on every rank, and DDP's bucket all-reduces fire from backward hooks on WORLD."""
    if not _BN_GROUP:
        _BN_GROUP.append(dist.new_group(backend="gloo"))
    return _BN_GROUP[0]


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> synchronised BatchNorm (same parameters, buffers and state_dict keys), in place
    below the top module: torch's nn.SyncBatchNorm on GPUs, `_CpuSyncBatchNorm` on CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:  # the zoo's only BN; a subclass swap keeps every attribute
            m.__class__ = _CpuSyncBatchNorm
    return module


def has_batchnorm(modules: dict[str, nn.Module]) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for mod in modules.values() for m in mod.modules())


class StepNet(nn.Module):
    """Every trained module under one parent, whose forward is the step's loss function.

    DDP needs the forward to go through its wrapper (to arm the backward all-reduce and find the
    parameters a step leaves unused, e.g. a KD branch without targets this batch); `step_loss`
    closes over the same module objects, which are registered here so DDP sees their parameters.
    """

    def __init__(self, modules: dict[str, nn.Module], step_loss):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self.step_loss = step_loss

    def forward(self, batch):
        return self.step_loss(batch)


def wrap(modules: dict[str, nn.Module], step_loss, device: torch.device) -> nn.Module:
    """StepNet of `modules`, inside DistributedDataParallel when there is more than one process."""
    net = StepNet(modules, step_loss)
    if world() == 1:
        return net
    # find_unused_parameters: losses differ in which parameters a step touches (CrossKD skips the
    # student's own last tower layers for its KD branch, a batch may have no positives for a term)
    return DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
    )
