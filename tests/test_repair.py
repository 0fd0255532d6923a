"""`cache_teacher --repair` never makes things worse (stages.cache.repair), through the real CLI:
a manifest that disagrees with the params is refused with every block intact; damaged array
metadata is restored from the manifest and the repaired store is byte-identical to the original
build; a done marker follows only a block whose data landed; an unreadable manifest.json is
rewritten from the params when the stores vouch for it (and refused when they do not)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from stores.manifest import MANIFEST_NAME
from stores.verify import verify_store
from tests.cache_fixtures import copy_cache, run_main

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache


def files_of(root: Path) -> dict[str, bytes]:
    """Every store file (the lock and the teacher head, rewritten with a fresh zip timestamp, aside)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock" and p.name != "head.npz"}


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def test_swapped_plan_entries_are_refused_before_anything_is_deleted(tiny_cache, tmp_path):
    params = copy_cache(tiny_cache, tmp_path)
    root = Path(params.cache.path)

    def swap(m):
        m["plan"][0], m["plan"][1] = m["plan"][1], m["plan"][0]

    edit_json(root / MANIFEST_NAME, swap)
    before = files_of(root)
    msg = run_main(params, tmp_path, "--repair")
    assert msg.startswith("error: ") and "different plan (record 0)" in msg, msg
    assert files_of(root) == before, "nothing was invalidated or deleted"


def test_damaged_array_metadata_is_restored_byte_identical(tiny_cache, tmp_path):
    """shape 16 -> 8 in targets/box/zarr.json (zarr would silently drop block 2's writes), and the
    shard shape 4 -> 8 in targets/cls/zarr.json: --repair restores both from the manifest."""
    params = copy_cache(tiny_cache, tmp_path)
    root = Path(params.cache.path)
    fresh = files_of(Path(tiny_cache.cache.path))
    edit_json(root / "zarr" / "targets" / "box" / "zarr.json", lambda m: m.update(shape=[8]))
    edit_json(root / "zarr" / "targets" / "cls" / "zarr.json",
              lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[8]))
    assert not verify_store(root).ok
    assert run_main(params, tmp_path, "--repair") == ""
    assert verify_store(root).ok
    assert files_of(root) == fresh, "the repaired store is byte-identical to a fresh build"


def test_a_done_marker_follows_only_data_that_landed(tiny_cache, tmp_path):
    """Without --repair, a block rewritten into an array whose shape was damaged (an out-of-range
    slice is a silent no-op in zarr) gets no done marker: the run fails naming the array."""
    params = copy_cache(tiny_cache, tmp_path)
    params = replace(params, cache=replace(params.cache, format="zarr"))
    root = Path(params.cache.path)
    marker = root / "zarr" / "done" / "block-000002.json"
    marker.unlink()  # block 2 (records 8..11) is recomputed by the next run
    edit_json(root / "zarr" / "targets" / "box" / "zarr.json", lambda m: m.update(shape=[8]))
    msg = run_main(params, tmp_path)
    assert msg.startswith("error: ") and "block 2 did not land" in msg and "targets/box holds 8 records" in msg, msg
    assert "--repair" in msg and not marker.exists()
    assert run_main(params, tmp_path, "--repair") == "" and marker.exists() and verify_store(root).ok


def test_an_unreadable_manifest_is_rewritten_from_the_params(tiny_cache, tmp_path):
    params = copy_cache(tiny_cache, tmp_path)
    root = Path(params.cache.path)
    original = json.loads((root / MANIFEST_NAME).read_text())
    stores = {k: v for k, v in files_of(root).items() if k != MANIFEST_NAME}
    (root / MANIFEST_NAME).write_text('{"fingerprint": {"teacher_weights": "abc"')  # torn
    msg = run_main(params, tmp_path)
    assert "--repair" in msg and "unreadable" in msg, msg
    assert run_main(params, tmp_path, "--repair") == ""
    restored = json.loads((root / MANIFEST_NAME).read_text())
    for key in ("fingerprint", "plan", "block_size", "levels", "block_fingerprints"):
        assert restored[key] == original[key], key
    assert {k: v for k, v in files_of(root).items() if k != MANIFEST_NAME} == stores, "no block was recomputed"
    assert verify_store(root).ok

    # stores built from other params cannot vouch for a manifest rebuilt from these: refused, untouched
    (root / MANIFEST_NAME).write_text("{ garbage")
    other = replace(params, cache=replace(params.cache, codecs={**params.cache.codecs, "box": "fp16+lz4"}))
    before = files_of(root)
    msg = run_main(other, tmp_path, "--repair")
    assert msg.startswith("error: ") and "unreadable" in msg and "written for another cache" in msg, msg
    assert files_of(root) == before
