"""Stage 1 under faults: SIGKILL and resume, a no-op rerun, damaged shards / chunks found by
inspect_cache --verify and repaired by a rerun (or --repair), a full disk, two dask workers.

The reference for "value-identical" is the session-scoped `tiny_cache`, built in-process uninterrupted
(every build here runs torch with one thread, see tests/cache_fixtures.py)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import cache_teacher, inspect_cache
from stages.cache.plan import open_reader
from stores.verify import verify_store
from tests.cache_fixtures import (
    all_records,
    assert_same_records,
    build_cache,
    copy_cache,
    file_mtimes,
    subprocess_env,
    tiny_params,
    torch_threads,
    write_params,
)

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache


def assert_equals_reference(params, reference) -> None:
    report = verify_store(params.cache.path)
    assert report.ok and not report.missing_blocks, report.errors
    for fmt in ("zarr", "wds"):
        assert_same_records(all_records(params.cache.path, fmt), all_records(reference.cache.path, fmt), fmt)


def markers(root: Path) -> dict[str, set[int]]:
    return {
        "zarr": {int(p.stem.split("-")[1]) for p in (root / "zarr" / "done").glob("block-*.json")},
        "wds": {int(p.name.split("-")[1].split(".")[0]) for p in (root / "wds").glob("shard-*.tar")},
    }


def kill_when(cmd: list[str], cwd: Path, ready, timeout: float = 120.0) -> int:
    """Start `cmd`; SIGKILL it as soon as ready() is true; return its exit status."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"finished before the kill (rc {proc.returncode}): {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the moment to kill")
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_sigkill_early_and_mid_run_then_resume(tiny_cache, tiny_coco, tiny_teacher, tmp_path):
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path)
    root = Path(params.cache.path)
    cmd = [sys.executable, "-m", "pipeline.cache_teacher", "--params", str(write_params(params, tmp_path / "p.yaml"))]
    # 1. very early: while the stores are being created
    assert kill_when(cmd, tmp_path, lambda: (root / "manifest.json").exists()) == -signal.SIGKILL
    assert markers(root)["zarr"] == set() or len(markers(root)["zarr"]) < 4
    # 2. mid-run: right after the first block's done marker (later blocks are being computed/written)
    assert kill_when(cmd, tmp_path, lambda: bool(markers(root)["zarr"] | markers(root)["wds"])) == -signal.SIGKILL
    done = markers(root)
    assert 0 < len(done["zarr"] | done["wds"]) < 4, f"killed mid-run: {done}"
    # 3. resume: only the blocks missing in some format are computed, and the result is the uninterrupted cache
    summary = build_cache(params)
    assert summary["computed_blocks"] == 4 - len(done["zarr"] & done["wds"])
    assert_equals_reference(params, tiny_cache)


def test_rerun_on_complete_store_touches_nothing(tiny_cache, tmp_path):
    params = copy_cache(tiny_cache, tmp_path)
    before = file_mtimes(params.cache.path)
    summary = build_cache(params)
    assert summary["computed_blocks"] == 0 and summary["stats"] == []
    assert file_mtimes(params.cache.path) == before, "no file written, created or removed"


def run_inspect(params, tmp_path, capsys, *args) -> tuple[int, str, str]:
    path = write_params(params, tmp_path / "inspect.yaml")
    capsys.readouterr()
    try:
        inspect_cache.main(["--params", str(path), *args])
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        if not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def rerun(params, tmp_path) -> str:
    path = write_params(params, tmp_path / "cache.yaml")
    with torch_threads(1):
        cache_teacher.main(["--params", str(path)])
    return path


def test_truncated_wds_shard_is_reported_and_repaired(tiny_cache, tmp_path, capsys):
    params = copy_cache(tiny_cache, tmp_path)
    shard = Path(params.cache.path) / "wds" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, _, err = run_inspect(params, tmp_path, capsys, "--verify")
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: ") and "block 1" in last and str(shard) in last, err
    shard.unlink()  # the fix the message names: delete the shard, rerun
    rerun(params, tmp_path)
    assert_equals_reference(params, tiny_cache)
    assert run_inspect(params, tmp_path, capsys, "--verify")[0] == 0


def test_corrupt_zarr_chunk_is_reported_and_repaired(tiny_cache, tmp_path, capsys):
    params = copy_cache(tiny_cache, tmp_path)
    store = Path(params.cache.path) / "zarr"
    shard = store / "targets" / "fpn" / "c" / "2"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out, err = run_inspect(params, tmp_path, capsys, "--verify")
    last = err.strip().splitlines()[-1]
    assert code == 1 and "[zarr] block 2" in last and str(shard) in last, err
    marker = store / "done" / "block-000002.json"
    assert str(marker) in last, "names the marker to delete"
    marker.unlink()
    rerun(params, tmp_path)
    assert_equals_reference(params, tiny_cache)


def test_repair_recomputes_exactly_what_verify_names(tiny_cache, tmp_path, capsys):
    """No hand deletion: `cache_teacher --repair` recomputes the damaged blocks verify names (a corrupt
    zarr chunk, a truncated shard) and a plain rerun rewrites a missing head."""
    params = copy_cache(tiny_cache, tmp_path)
    root = Path(params.cache.path)
    chunk = root / "zarr" / "targets" / "fpn" / "c" / "2"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    shard = root / "wds" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (root / "static" / "head.npz").unlink()
    report = verify_store(root)
    assert report.damaged_blocks == [1, 2] and any("head.npz is missing" in e for e in report.errors), report.errors
    path = write_params(params, tmp_path / "cache.yaml")
    capsys.readouterr()
    with torch_threads(1):
        cache_teacher.main(["--params", str(path), "--repair"])
    out = capsys.readouterr().out
    assert "repair: 2 damaged blocks [1, 2] will be recomputed" in out and "(2 computed now, 2 already complete)" in out
    assert_equals_reference(params, tiny_cache)


def _full_disk_on_block_1(monkeypatch, fmt: str) -> None:
    """OSError(ENOSPC) in the middle of writing block 1 of `fmt` (after some of its files are out)."""
    calls = {"n": 0}

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fmt == "zarr":
        import zarr.storage._local as local

        real_put = local._put

        def put(path, value, exclusive=False):
            if "/targets/" in str(path) and str(path).endswith("/c/1"):  # block 1: its second family fails
                calls["n"] += 1
                if calls["n"] == 2:
                    full()
            return real_put(path, value, exclusive=exclusive)

        monkeypatch.setattr(local, "_put", put)
    else:
        real_addfile = tarfile.TarFile.addfile

        def addfile(self, tarinfo, fileobj=None, **kw):
            if "shard-000001" in str(self.name):
                calls["n"] += 1
                if calls["n"] == 5:
                    full()
            return real_addfile(self, tarinfo, fileobj, **kw)

        monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_full_disk_is_one_line_and_resumable(tiny_cache, tiny_coco, tiny_teacher, tmp_path, monkeypatch, fmt):
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path)
    root = Path(params.cache.path)
    _full_disk_on_block_1(monkeypatch, fmt)
    with pytest.raises(SystemExit) as stop:
        rerun(params, tmp_path)
    msg = str(stop.value.code)
    assert msg.startswith("error: disk full while writing block 1") and "\n" not in msg and "rerun" in msg, msg
    done = markers(root)
    assert 1 not in done[fmt] and 0 in done[fmt] and done[fmt] <= {0}, done
    assert not list((root / "wds").glob("*.tmp-*")), "the failed shard's temp file is removed"
    monkeypatch.undo()
    summary = build_cache(params)
    assert summary["computed_blocks"] == 3
    assert_equals_reference(params, tiny_cache)


def test_two_dask_workers_write_disjoint_blocks_equal_to_single_process(tiny_cache, tiny_coco, tiny_teacher, tmp_path):
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path, n_workers=2)
    summary = build_cache(params)
    stats = summary["stats"]
    assert sorted(s["block"] for s in stats) == [0, 1, 2, 3], "each block written by exactly one task"
    assert all(s["formats"] == ["zarr", "wds"] and s["pid"] != os.getpid() for s in stats)
    assert all(s["torch_threads"] == 1 for s in stats)
    assert not list(Path(params.cache.path).rglob("*.tmp-*"))
    assert_equals_reference(params, tiny_cache)
    mine, ref = (open_reader(p.cache.path, "zarr").manifest for p in (params, tiny_cache))
    assert mine.to_dict() == ref.to_dict()


def test_corrupt_image_is_one_line_and_keeps_finished_blocks(tiny_coco, tiny_teacher, tmp_path):
    import shutil

    from stages.data.coco import CocoDataset

    images = tmp_path / "images"
    shutil.copytree(tiny_coco.train_images, images)
    coco = CocoDataset(images, tiny_coco.train_ann)
    bad = coco.image_path(coco.image_ids[4])  # plan order: images 4 and 5 make block 2
    bad.write_bytes(bad.read_bytes()[:200])
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path)
    params = replace(params, data=replace(params.data, train_images=str(images)))
    with pytest.raises(SystemExit) as stop:
        rerun(params, tmp_path)
    msg = str(stop.value.code)
    assert msg.startswith(f"error: {bad}: unreadable image") and "\n" not in msg, msg
    done = markers(Path(params.cache.path))
    assert done["zarr"] == done["wds"] == {0, 1}, "blocks before the bad image are finished and kept"
