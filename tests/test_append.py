"""Append: a grown dataset json adds blocks and recomputes nothing else; each dataset version is recorded.

- stage 1 (the CLI) over a json that gained images keeps the cached plan, appends the new images'
  records as new blocks and computes only those: every object of an old block is unchanged byte for
  byte, and the cache equals, record for record, one built from the grown json at once;
- a rerun with the same json computes nothing and records no new version (the plan is deterministic);
- a cached plan whose last block was partly filled: that block is completed (recomputed once), the
  other old blocks are untouched;
- removed images: their blocks are recomputed with placeholders, the version lists them as dropped;
- the manifest lists every version (records, blocks, dropped, the json's sha256) and keeps each one's
  whole manifest in versions/v<N>.json, created once: another writer's different version N is refused;
- a reader opened before an append keeps its keys and records; a new reader sees the new blocks; a
  student records the version it read in run.json's inputs;
- the same append on a real S3 API (moto's server on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from stages.cache.plan import check_cache, open_reader, pin_dataset_version
from stages.data.coco import CocoDataset
from stages.distill.run import cache_inputs
from stores.manifest import Manifest, ManifestVersionConflict, version_path
from stores.url import as_path
from stores.verify import verify_store
from tests.cache_fixtures import all_records, assert_same_records, run_main, tiny_params
from tests.s3_server import s3_fs, s3_root, s3_server  # noqa: F401  (fixtures)

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache


def dataset_without(tiny_coco, tmp_path: Path, drop: list[int]) -> Path:
    """A copy of tiny_coco's train json without images `drop` (and their annotations)."""
    data = json.loads(Path(tiny_coco.train_ann).read_text())
    data["images"] = [i for i in data["images"] if i["id"] not in drop]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in drop]
    path = tmp_path / f"train-{len(data['images'])}.json"
    path.write_text(json.dumps(data))
    return path


def with_json(params, ann: Path):
    return replace(params, data=replace(params.data, train_ann=str(ann)))


def computed(out: str) -> int:
    """Blocks computed by the run, from the CLI's summary line."""
    line = next(ln for ln in out.splitlines() if "computed now" in ln)
    return int(line.split("(")[1].split(" computed")[0])


_BLOCK_OBJECT = re.compile(r"/c/(\d+)(/\d+)*$|block-(\d+)\.json$|shard-(\d+)\.(tar|json)$")


def block_of(name: str) -> int | None:
    """The block a store object belongs to (a zarr chunk/shard or marker, a wds tar or sidecar)."""
    m = _BLOCK_OBJECT.search(name)
    return None if m is None else int(m.group(1) or m.group(3) or m.group(4))


def block_objects(root: Path, blocks: range) -> dict[str, str]:
    """sha256 of every object of `blocks` under a local cache folder."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and block_of(str(p)) in blocks}


def s3_block_etags(url: str, blocks: range) -> dict[str, str]:
    """ETag (the MD5 of a single-PUT object) of every object of `blocks` under an S3 prefix."""
    found = s3_fs().find(url.removeprefix("s3://"), detail=True)
    return {k: v["ETag"] for k, v in found.items() if block_of(k) in blocks}


def ids(tiny_coco) -> list[int]:
    return sorted(i["id"] for i in json.loads(Path(tiny_coco.train_ann).read_text())["images"])


def test_a_grown_json_appends_blocks_and_recomputes_nothing_else(tiny_coco, tiny_teacher, tiny_cache, tmp_path, capsys):
    """6 images (12 records, 3 full blocks), then all 8 (the new ones have the lowest ids): one block
    computed, the old ones untouched, every record equal to tiny_cache's (the 8-image json built at
    once), both formats."""
    newest = ids(tiny_coco)[:2]  # the two lowest ids: sorted in, they would shift every block of the plan
    params = with_json(tiny_params(tiny_coco, tiny_teacher, tmp_path), dataset_without(tiny_coco, tmp_path, newest))
    root = Path(params.cache.path)
    assert run_main(params, tmp_path) == ""
    assert computed(capsys.readouterr().out) == 3
    before = block_objects(root, range(3))
    assert {block_of(k) for k in before if k.endswith(".json") and "done" in k} == {0, 1, 2}

    grown = with_json(params, Path(tiny_coco.train_ann))
    assert run_main(grown, tmp_path) == ""
    assert computed(capsys.readouterr().out) == 1, "only the new images' block"
    assert block_objects(root, range(3)) == before, "every object of an old block unchanged byte for byte"
    for fmt in ("zarr", "wds"):
        assert_same_records(all_records(root, fmt), all_records(tiny_cache.cache.path, fmt), f"{fmt} after append")
        check_cache(open_reader(root, fmt), grown)  # stage 2 accepts it against the grown json
    assert verify_store(root).ok

    m = Manifest.load(root / "manifest.json")
    sha = hashlib.sha256(Path(tiny_coco.train_ann).read_bytes()).hexdigest()
    assert [(v["version"], v["records"], v["blocks"], v["dropped"]) for v in m.versions] == [(1, 12, 3, []), (2, 16, 4, [])]
    assert m.versions[-1]["dataset_sha256"] == sha
    assert Manifest.load_version(root, 1).plan == m.plan[:12] and Manifest.load_version(root, 2) == m
    assert {i for i, _ in m.plan[12:]} == set(newest), "the new images' records follow the cached plan"

    assert run_main(grown, tmp_path) == ""  # the same grown json again: the same plan, nothing to do
    assert computed(capsys.readouterr().out) == 0
    assert Manifest.load(root / "manifest.json") == m


def test_removed_images_are_dropped_in_a_new_version(tiny_coco, tiny_teacher, tmp_path, capsys):
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path)
    root = Path(params.cache.path)
    assert run_main(params, tmp_path) == ""
    gone = ids(tiny_coco)[2]  # block 1 holds images 2 and 3 (2 views each, 4 records per block)
    before = block_objects(root, range(4))
    capsys.readouterr()
    assert run_main(with_json(params, dataset_without(tiny_coco, tmp_path, [gone])), tmp_path) == ""
    assert computed(capsys.readouterr().out) == 1
    after = block_objects(root, range(4))
    changed = {k for k in before if before[k] != after.get(k)}
    assert {block_of(k) for k in changed} == {1} and "zarr/done/block-000001.json" in changed
    m = Manifest.load(root / "manifest.json")
    assert m.dropped == [gone] and [v["dropped"] for v in m.versions] == [[], [gone]]
    assert [v["records"] for v in m.versions] == [16, 16], "the dropped image keeps its place in the plan"


def test_a_pinned_reader_keeps_its_version_while_a_writer_appends(tiny_coco, tiny_teacher, tmp_path):
    newest = ids(tiny_coco)[:2]
    params = with_json(tiny_params(tiny_coco, tiny_teacher, tmp_path), dataset_without(tiny_coco, tmp_path, newest))
    root = Path(params.cache.path)
    assert run_main(params, tmp_path) == ""
    readers = {fmt: open_reader(root, fmt) for fmt in ("zarr", "wds")}
    assert cache_inputs(readers["zarr"].manifest)["cache"]["version"] == 1  # what a student's run.json records
    keys = {fmt: r.keys() for fmt, r in readers.items()}
    first = {fmt: r.get(*keys[fmt][0]) for fmt, r in readers.items()}

    assert run_main(with_json(params, Path(tiny_coco.train_ann)), tmp_path) == ""  # a writer appends
    for fmt, reader in readers.items():
        reader.refresh()  # sees the new block's marker, which is not in its version
        assert reader.keys() == keys[fmt] and len(keys[fmt]) == 12, fmt
        again = reader.get(*keys[fmt][0])
        assert sorted(again.arrays) == sorted(first[fmt].arrays)
        assert all((again.arrays[k] == first[fmt].arrays[k]).all() for k in again.arrays), fmt
        fresh = open_reader(root, fmt)
        assert len(fresh.keys()) == 16 and fresh.keys()[:12] == keys[fmt], fmt
        assert cache_inputs(fresh.manifest)["cache"]["version"] == 2

    # a student started now with the 6-image json: the latest version names images its json lacks,
    # so it reads version 1 (what train_student does before check_cache), and records it
    old = CocoDataset(params.data.train_images, params.data.train_ann)
    student = open_reader(root, "zarr")
    with pytest.raises(ValueError, match="not in"):
        check_cache(student, params)  # the latest version, unpinned: refused
    assert pin_dataset_version(student, old) == 1
    check_cache(student, params)
    assert student.keys() == keys["zarr"] and cache_inputs(student.manifest)["cache"]["version"] == 1
    grown = open_reader(root, "zarr")
    assert pin_dataset_version(grown, CocoDataset(params.data.train_images, tiny_coco.train_ann)) == 2


def test_another_writers_version_with_other_content_is_refused(tiny_cache, tmp_path):
    root = tmp_path / "cache"
    shutil.copytree(tiny_cache.cache.path, root)
    m = Manifest.load(root / "manifest.json")
    mine = m.with_new_version("a" * 64)
    theirs = m.with_new_version("b" * 64)
    theirs.publish(root)
    theirs.publish(root)  # the same content again: harmless (a slow node and its replacement)
    with pytest.raises(ManifestVersionConflict, match=r"dataset version 2 .*rerun python -m pipeline.cache_teacher"):
        mine.publish(root)
    assert Manifest.load(root / "manifest.json") == theirs, "the loser wrote nothing"
    assert json.loads(version_path(root, 2).read_text())["versions"][-1]["dataset_sha256"] == "b" * 64


def test_append_on_an_s3_server(s3_root, tiny_coco, tiny_teacher, tiny_cache, tmp_path, capsys):  # noqa: F811
    newest = ids(tiny_coco)[:2]
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path, path=s3_root, format="zarr",
                         receipt=str(tmp_path / "receipt.json"))
    params = with_json(params, dataset_without(tiny_coco, tmp_path, newest))
    assert run_main(params, tmp_path) == ""
    assert computed(capsys.readouterr().out) == 3
    pinned = open_reader(s3_root, "zarr")
    etags = s3_block_etags(s3_root, range(3))
    assert {block_of(k) for k in etags if "/done/" in k} == {0, 1, 2}
    assert run_main(with_json(params, Path(tiny_coco.train_ann)), tmp_path) == ""
    assert computed(capsys.readouterr().out) == 1
    assert s3_block_etags(s3_root, range(3)) == etags, "no object of an old block was rewritten"
    assert_same_records(all_records(s3_root, "zarr"), all_records(tiny_cache.cache.path, "zarr"), "s3 after append")
    pinned.refresh()
    assert len(pinned.keys()) == 12
    m = Manifest.load(as_path(s3_root) / "manifest.json")
    assert [v["records"] for v in m.versions] == [12, 16] and version_path(as_path(s3_root), 1).exists()


def test_a_partly_filled_last_block_is_completed_once(tiny_coco, tiny_teacher, tiny_cache, tmp_path, capsys):
    """5 images (10 records: blocks 0, 1 full, block 2 half), then all 8: block 2 is completed (the
    one old block recomputed) and block 3 added; blocks 0 and 1 are untouched."""
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path, format="zarr")
    params = with_json(params, dataset_without(tiny_coco, tmp_path, ids(tiny_coco)[:3]))
    root = Path(params.cache.path)
    assert run_main(params, tmp_path) == ""
    before = block_objects(root, range(2))
    capsys.readouterr()
    assert run_main(with_json(params, Path(tiny_coco.train_ann)), tmp_path) == ""
    assert computed(capsys.readouterr().out) == 2
    assert block_objects(root, range(2)) == before
    assert_same_records(all_records(root, "zarr"), all_records(tiny_cache.cache.path, "zarr"), "after append")
    assert [v["blocks"] for v in Manifest.load(root / "manifest.json").versions] == [3, 4]
