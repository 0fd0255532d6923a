"""One writer per run folder: a lease object created exclusively, not a POSIX lock.

Two training runs into one folder would interleave their logs and replace each other's results,
and `run.json`'s params check alone is check-then-act. So a run first creates
`<run folder>/run.lease` with create-exclusive semantics (`open(path, "x")`, i.e. O_CREAT|O_EXCL:
atomic on local disks and on NFSv3+; the same operation as an object store's conditional PUT with
`If-None-Match: *`), holding the run's id, host, pid and start time, and deletes it when it ends.
`flock`/`fcntl` locks are not used: on NFS they are missing or client-local, and object stores
have none.

Stale-lease rule: a lease left by a run that died (SIGKILL, power loss) is taken over only when it
provably belongs to a dead process: written on THIS host by a pid that no longer exists. Any other
lease (another host, or a live pid) refuses the run, naming the holder and how to clear it (delete
the lease file once that run is known to be gone). Taking over renames the stale lease aside, then
re-reads it: if its run id is not the stale one we decided on (another process took it over first
and wrote its own), that lease is put back (hard link, which fails rather than replace) and this
run is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

LEASE_NAME = "run.lease"


class RunLeaseError(ValueError):
    """Another run holds the run folder; the message names it and how to clear a stale lease."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _create(path: Path, lease: dict) -> bool:
    """Create the lease exclusively; False if one exists."""
    try:
        with open(path, "x") as f:
            f.write(json.dumps(lease, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except FileExistsError:
        return False
    return True


def _holder(lease: dict | None) -> str:
    if lease is None:
        return "an unreadable lease (a run being started right now, or a damaged file)"
    return (f"run {str(lease.get('run_id', '?'))[:12]} (pid {lease.get('pid', '?')} on host {lease.get('host', '?')}, "
            f"started {lease.get('started', '?')})")


def _stale(lease: dict | None) -> bool:
    """Provably dead: written on this host by a process that no longer exists."""
    if lease is None or lease.get("host") != socket.gethostname():
        return False
    try:
        return not _pid_alive(int(lease["pid"]))
    except (KeyError, TypeError, ValueError):
        return False


def _take_over(path: Path, stale: dict) -> bool:
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # someone else moved it first
        return False
    moved = _read(aside)
    if moved is None or moved.get("run_id") != stale.get("run_id"):  # not the lease we judged stale
        with contextlib.suppress(FileExistsError, FileNotFoundError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def acquire(folder: str | Path, kind: str) -> dict:
    """Create `folder/run.lease` for this process (RunLeaseError if a live run holds it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LEASE_NAME
    lease = {"run_id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "kind": kind,
             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for _ in range(3):
        if _create(path, lease):
            return lease
        have = _read(path)
        if not _stale(have):
            raise RunLeaseError(
                f"{folder} is in use by another {have.get('kind', '') + ' ' if have else ''}{_holder(have)}: two runs "
                f"into one folder would replace each other's results; wait for it, choose another output folder, "
                f"or, if that run is gone, delete {path}")
        _take_over(path, have)  # then try again to create it (another starter may win: it is refused then)
    raise RunLeaseError(f"{folder}: could not take over the stale lease {path}; delete it and rerun")


def release(folder: str | Path, lease: dict) -> None:
    """Delete the lease if it is still ours (never another run's)."""
    path = Path(folder) / LEASE_NAME
    have = _read(path)
    if have is not None and have.get("run_id") == lease["run_id"]:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lease(folder: str | Path, kind: str, *, enabled: bool = True) -> Iterator[dict | None]:
    """Hold the run folder's lease for the block (`enabled=False`: no-op, e.g. torchrun ranks > 0,
    whose rank 0 holds it for the whole run). A folder this run created and left empty is removed."""
    if not enabled:
        yield None
        return
    folder = Path(folder)
    existed = folder.exists()
    lease = acquire(folder, kind)
    try:
        yield lease
    finally:
        release(folder, lease)
        if not existed:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a refused run leaves no folder behind
