"""What an export writes is marked as kdcache's, so a rerun replaces only its own files.

Each format carries a record {'kdcache_export': format, 'source_sha256': ..., ...}: ONNX in its
metadata_props, TorchScript in an extra file, torchvision / mmdet checkpoints as a dict key, the
torchvision constructor module in its first line. `refuse_foreign` reads an existing output and
refuses to overwrite anything that is not an export of the same format. Files are written whole
(temp name + rename), so an interrupted export leaves the previous file.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

MARK = "kdcache_export"
PY_HEADER = f"# {MARK} torchvision"  # first line of the torchvision constructor module


def record(fmt: str, source_sha256: str, **extra) -> dict:
    return {MARK: fmt, "source_sha256": source_sha256, **extra}


def read_record(path: Path) -> dict | None:
    """The export record an existing file carries, or None (not ours / unreadable)."""
    try:
        if path.suffix == ".py":
            with path.open() as f:
                first = f.readline().strip()
            return {MARK: "torchvision-module"} if first == PY_HEADER else None
        if path.suffix == ".onnx":
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            props = {p.key: p.value for p in model.metadata_props}
            return json.loads(props[MARK]) if MARK in props else None
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:  # TorchScript archives hold extra files under */extra/
                names = [n for n in z.namelist() if n.endswith(f"extra/{MARK}.json")]
                if names:
                    return json.loads(z.read(names[0]))
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict):
                mark = state.get(MARK) or (state.get("meta") or {}).get(MARK)
                return mark if isinstance(mark, dict) else None
    except Exception:  # any unreadable or foreign file (onnx raises protobuf's own DecodeError): not ours
        return None
    return None


def read_mark(path: Path) -> str | None:
    """The format an existing file says it was exported as, or None."""
    rec = read_record(path)
    return rec.get(MARK) if rec else None


def refuse_foreign(path: Path, fmt: str) -> None:
    """ValueError (one line) unless `path` is absent or an export of format `fmt`."""
    if not path.exists():
        return
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder: give a file name")
    found = read_mark(path)
    if found != fmt:
        what = f"a kdcache {found} export" if found else "not a kdcache export"
        raise ValueError(f"--out {path} exists and is {what}: remove it yourself or choose another --out "
                         f"(an export replaces only an earlier {fmt} export)")


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename onto `path`: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
