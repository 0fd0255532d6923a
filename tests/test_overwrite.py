"""Nothing lost: --overwrite removes only a folder it recognises as a kdcache store (its manifest)
holding nothing else, and a new cache is never written into a non-empty folder that is not one."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from stores.manifest import MANIFEST_NAME, NotAStoreError, check_cache_folder, remove_store
from tests.cache_fixtures import copy_cache, run_main, subprocess_env, write_params

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache

ROOT = Path(__file__).resolve().parents[1]




def user_folder(path: Path) -> dict[str, bytes]:
    """A folder of someone's own files (what must survive)."""
    (path / "sub").mkdir(parents=True)
    files = {"notes.txt": b"my notes", "sub/data.bin": os.urandom(100), "manifest.yaml": b"not ours"}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def assert_intact(path: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (path / name).read_bytes() == data, f"{name} was changed or deleted"


def test_overwrite_refuses_a_foreign_folder_cli(tiny_cache, tmp_path):
    """The reported case, from the command line: cache.path at a folder of one's own files."""
    mine = tmp_path / "mine"
    files = user_folder(mine)
    params = replace(tiny_cache, cache=replace(tiny_cache.cache, path=str(mine)))
    path = write_params(params, tmp_path / "p.yaml")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cache_teacher", "--params", str(path), "--overwrite"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and str(mine) in err and "not a kdcache cache" in err, err
    assert "--overwrite will not delete it" in err, err
    assert_intact(mine, files)
    assert sorted(p.name for p in mine.iterdir()) == ["manifest.yaml", "notes.txt", "sub"], "nothing was added"


def test_new_cache_into_a_non_empty_folder_is_refused(tiny_cache, tmp_path):
    mine = tmp_path / "mine"
    files = user_folder(mine)
    params = replace(tiny_cache, cache=replace(tiny_cache.cache, path=str(mine)))
    msg = run_main(params, tmp_path)
    assert msg.startswith("error: ") and "\n" not in msg and "refusing to write a cache into it" in msg, msg
    assert_intact(mine, files)
    assert not (mine / MANIFEST_NAME).exists() and not (mine / "zarr").exists()


def test_overwrite_refuses_a_store_holding_other_files(tiny_cache, tmp_path):
    params = copy_cache(tiny_cache, tmp_path)
    root = Path(params.cache.path)
    (root / "results.csv").write_text("keep me")
    params = replace(params, cache=replace(params.cache, codecs={"fpn": "fp16+zstd"}))
    msg = run_main(params, tmp_path, "--overwrite")
    assert "holds other files besides the cache (results.csv)" in msg and "--overwrite will not delete it" in msg, msg
    assert (root / "results.csv").read_text() == "keep me" and (root / MANIFEST_NAME).exists()
    # without --overwrite, resuming / checking the store is fine (nothing is deleted): the usual refusal
    assert "different codecs" in run_main(params, tmp_path)


def test_folder_rules(tmp_path):
    """check_cache_folder / remove_store on hand-made folders: what counts as a store, what is kept."""
    check_cache_folder(tmp_path / "absent", overwrite=True)  # nothing there: fine
    empty = tmp_path / "empty"
    empty.mkdir()
    check_cache_folder(empty, overwrite=False)
    (empty / ".lock").write_text("")  # a creation that was killed before the manifest: still "empty"
    check_cache_folder(empty, overwrite=False)

    store = tmp_path / "store"
    (store / "zarr" / "done").mkdir(parents=True)
    (store / "wds").mkdir()
    (store / "static").mkdir()
    (store / MANIFEST_NAME).write_text('{"fingerprint": {}, "plan": [], "block_size": 1, "levels": 1, "schema_version": 2}')
    (store / ".lock").write_text("")
    (store / ".manifest.json.tmp-12-abc").write_text("")
    check_cache_folder(store, overwrite=True)
    remove_store(store)
    assert not store.exists()

    damaged = tmp_path / "damaged"  # unreadable manifest beside a format folder: ours, may be replaced
    (damaged / "zarr").mkdir(parents=True)
    (damaged / MANIFEST_NAME).write_text("{ garbage")
    remove_store(damaged)
    assert not damaged.exists()

    lone = tmp_path / "lone"  # a folder whose only file happens to be called manifest.json
    lone.mkdir()
    (lone / MANIFEST_NAME).write_text('{"name": "my web app"}')
    with pytest.raises(NotAStoreError, match="not a kdcache cache"):
        remove_store(lone)
    assert (lone / MANIFEST_NAME).exists()

    orphan = tmp_path / "orphan"  # format folders without a manifest: not recognisably ours
    (orphan / "zarr").mkdir(parents=True)
    with pytest.raises(NotAStoreError, match="no kdcache manifest.json; holds zarr"):
        check_cache_folder(orphan, overwrite=True)

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotAStoreError, match="is a file"):
        check_cache_folder(a_file, overwrite=False)

    link = tmp_path / "link"
    link.symlink_to(store.parent / "empty")
    with pytest.raises(NotAStoreError, match="symlink"):
        check_cache_folder(link, overwrite=True)


def test_make_dataset_never_overwrites_someone_elses_data(tmp_path):
    """The same class in stage 0: data.synthetic.out at a real COCO folder would have its
    annotations/instances_train.json and train/000001.png replaced."""
    from pipeline import cli, make_dataset

    coco = tmp_path / "my_coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train").mkdir()
    mine = {"annotations/instances_train.json": b'{"info": {"description": "my labels"}}',
            "train/000001.png": b"my image"}
    for name, data in mine.items():
        (coco / name).write_bytes(data)
    argv = ["--params", str(tmp_path / "none.yaml"), "--set", f"data.synthetic.out={coco}",
            "--set", "data.synthetic.num_train=2", "--set", "data.synthetic.num_val=1"]
    (tmp_path / "none.yaml").write_text("{}\n")
    with pytest.raises(SystemExit) as stop:
        cli.run(lambda: make_dataset.main(argv), argv=argv)
    msg = str(stop.value.code)
    assert msg.startswith("error: ") and "annotations/instances_train.json (not written by make_dataset)" in msg, msg
    assert_intact(coco, mine)
    # its own output folder is rewritten as before (same params, same bytes)
    own = tmp_path / "synthetic"
    argv[3] = f"data.synthetic.out={own}"
    make_dataset.main(argv)
    first = {p: p.read_bytes() for p in own.rglob("*") if p.is_file()}
    make_dataset.main(argv)
    assert {p: p.read_bytes() for p in own.rglob("*") if p.is_file()} == first
