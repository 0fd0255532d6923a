"""Where a process computes: its torch device and how many CPU threads torch may use.

`resolve_device` turns a params device spelling (auto | cpu | cuda | cuda:N | mps) into a
torch.device and refuses, naming the params field, a device this machine does not have, so
`train.device=cuda:7` on a CPU machine is one line about `train.device`, not a CUDA stack trace
from the first `.to(device)`.

`apply_threads` sets torch's intra-op and inter-op thread counts. torch's default is one thread
per core of the machine, whatever share of it the process really has: two jobs on two cores with
two threads each spin-wait on each other's cores and run 5-10x slower per step than one alone.
The automatic count is therefore the CPUs this process may run on (its affinity mask, then the
cgroup cpu quota of a container) divided by the processes of this job on the node (torchrun's
LOCAL_WORLD_SIZE), at least 1. `OMP_NUM_THREADS`, the ecosystem's own knob (torchrun sets it to 1
for several processes), is the user's explicit choice and wins over the automatic count; an
explicit `threads` param wins over both.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from stages.config import ConfigError

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def resolve_device(spec: str, field: str = "train.device") -> torch.device:
    """'auto' -> cuda if available, else cpu; any other spelling must name a device this machine has
    (ConfigError naming `field` otherwise)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"{field}: {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{field}: {spec!r}, but torch sees no CUDA device on this machine; "
                              f"set {field}=auto or cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{field}: {spec!r}, but this machine has {count} CUDA device(s) "
                              f"(cuda:0..cuda:{count - 1}); set {field}=cuda or cuda:0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{field}: 'mps', but torch sees no Apple GPU here; set {field}=auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{field}: {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, lowered by a cgroup cpu quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota() -> float | None:
    """The cgroup's CPU quota in CPUs (cpu.max 'QUOTA PERIOD', or cgroup v1's pair); None = unlimited."""
    try:
        if CGROUP_V2_CPU_MAX.exists():
            quota, period = CGROUP_V2_CPU_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if CGROUP_V1_QUOTA.exists():
            quota_us = int(CGROUP_V1_QUOTA.read_text())
            return None if quota_us <= 0 else quota_us / int(CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None
    return None


def auto_threads() -> tuple[int, str]:
    """The automatic thread count and where it comes from (for the log line)."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), f"OMP_NUM_THREADS={omp}"
    cpus = available_cpus()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cpus // local), f"auto: {cpus} CPUs available / {local} local process(es)"


def apply_threads(requested: int, field: str = "train.threads") -> str:
    """Set torch's thread counts (`requested` > 0, else `auto_threads()`); returns a one-line note."""
    if requested > 0:
        threads, why = requested, f"{field}={requested}"
    else:
        threads, why = auto_threads()
    torch.set_num_threads(threads)
    try:  # allowed only before the first inter-op parallel work of the process
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass
    return f"torch CPU threads: {torch.get_num_threads()} ({why})"
