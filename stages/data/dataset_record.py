"""The record make_dataset writes into its output folder: which files are its own.

A file name is not proof of ownership (a user's `train/000001.png` looks exactly like ours), so
`OUT/.make_dataset.json` lists every file the command writes, with its sha256 once written.
A later run rewrites only a folder whose every file the record lists, unchanged since (a file
edited by hand is somebody's work now); anything else is refused before the first write.

The record is written BEFORE the images (their names, digest null: "being written"), so a run
killed half-way leaves a folder the rerun still recognises, and after them with the digests.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

RECORD_NAME = ".make_dataset.json"
KIND = "kdcache synthetic dataset"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read(out: Path) -> dict[str, str | None] | None:
    """{relative path: sha256 or None} the folder's record lists, or None without a readable one."""
    try:
        data = json.loads((out / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") != KIND or not isinstance(data.get("files"), dict):
        return None
    return data["files"]


def _write(out: Path, files: dict[str, str | None]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{RECORD_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"kind": KIND, "files": dict(sorted(files.items()))}, indent=1) + "\n")
    os.replace(tmp, out / RECORD_NAME)


def _listed(rel: str, files: dict[str, str | None]) -> str | None:
    """The listed file `rel` is, or is the temp file of (`.<name>.tmp` beside it); else None."""
    if rel in files:
        return rel
    head, _, name = rel.rpartition("/")
    if name.startswith(".") and name.endswith(".tmp"):
        base = f"{head}/{name[1:-4]}" if head else name[1:-4]
        return base if base in files else None
    return None


def foreign_files(out: Path) -> list[str]:
    """Files in `out` the record does not prove to be make_dataset's own (unlisted, or changed since
    written), each with the reason; [] for a missing or empty folder."""
    if not out.exists():
        return []
    files = read(out) or {}
    bad = []
    for p in sorted(out.rglob("*")):
        if not p.is_file() and not p.is_symlink():
            continue
        rel = p.relative_to(out).as_posix()
        if rel == RECORD_NAME or rel.startswith(f"{RECORD_NAME}.tmp-"):
            continue
        own = _listed(rel, files)
        if own is None or p.is_symlink():
            bad.append(f"{rel} (not written by make_dataset)")
        elif own == rel and files[rel] is not None and _sha256(p) != files[rel]:
            bad.append(f"{rel} (changed since make_dataset wrote it)")
    return bad


def begin(out: Path, names: Iterable[str]) -> None:
    """Record the files about to be written (digest None), keeping what the record already lists."""
    files = read(out) or {}
    _write(out, {**files, **dict.fromkeys(names)})


def finish(out: Path) -> None:
    """Record each listed file's sha256 (files no longer present are dropped)."""
    files = read(out) or {}
    _write(out, {rel: _sha256(out / rel) for rel in files if (out / rel).is_file()})
