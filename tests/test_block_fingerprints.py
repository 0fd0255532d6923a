"""Fingerprints that see content: image bytes and annotations per block, categories globally.

A same-size edit of one image's pixels (the old name+size fingerprint's blind spot), or an edit of
its boxes, makes exactly its block stale: stage 2 refuses the cache naming the block and image,
and a rerun of stage 1 recomputes that block alone, giving the records of a fresh build. Category
names are in the fingerprint. verify checks static/head.npz, and a rerun repairs it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.cache.plan import check_cache, open_reader
from stores.manifest import CacheMismatchError
from stores.verify import verify_store
from tests.cache_fixtures import all_records, assert_same_records, build_cache, copy_cache, file_mtimes

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache


def private_copy(tiny_cache, tmp_path):
    """The tiny cache and its dataset, both copied (the fingerprint holds content, not paths)."""
    data = tmp_path / "data"
    shutil.copytree(Path(tiny_cache.data.train_images), data / "train")
    shutil.copy(tiny_cache.data.train_ann, data / "train.json")
    params = copy_cache(tiny_cache, tmp_path)
    return replace(params, data=replace(params.data, train_images=str(data / "train"), train_ann=str(data / "train.json")))


def image_of_block(params, block: int) -> tuple[int, Path]:
    reader = open_reader(params.cache.path, "zarr")
    image_id = reader.manifest.block_records(block)[0][0]
    info = next(i for i in json.loads(Path(params.data.train_ann).read_text())["images"] if i["id"] == image_id)
    return image_id, Path(params.data.train_images) / info["file_name"]


def blocks_of(params) -> dict[int, dict]:
    reader = open_reader(params.cache.path, "zarr")
    out = {}
    for b in range(reader.manifest.num_blocks()):
        out[b] = {k: v for k, v in all_records(params.cache.path, "zarr").items() if k in reader.manifest.block_records(b)}
    return out


def test_a_same_size_pixel_edit_recomputes_only_its_block(tiny_cache, tmp_path):
    params = private_copy(tiny_cache, tmp_path)
    assert build_cache(params)["computed_blocks"] == 0, "same content at another path: nothing to do"
    image_id, path = image_of_block(params, 2)
    # store the image uncompressed, so that a pixel edit keeps the file size (what the old
    # file-name + size fingerprint could not see); the pixels are unchanged, the bytes are not
    pixels = np.array(Image.open(path))
    Image.fromarray(pixels).save(path, compress_level=0)
    assert build_cache(params)["computed_blocks"] == 1
    size = path.stat().st_size
    before = blocks_of(params)
    mtimes = file_mtimes(params.cache.path)

    pixels[: pixels.shape[0] // 2] = 255 - pixels[: pixels.shape[0] // 2]
    Image.fromarray(pixels).save(path, compress_level=0)
    assert path.stat().st_size == size, "a same-size edit"
    with pytest.raises(ValueError, match=rf"block 2, images {image_id}\b.*recompute only those blocks"):
        check_cache(open_reader(params.cache.path, "zarr"), params)  # stage 2 refuses the stale cache

    summary = build_cache(params)
    assert summary["computed_blocks"] == 1 and [s["block"] for s in summary["stats"] if not s["skipped"]] == [2]
    check_cache(open_reader(params.cache.path, "zarr"), params)
    after = blocks_of(params)
    for b in before:
        if b != 2:
            assert_same_records(after[b], before[b], f"block {b} kept")
    changed = [k for k in after[2] if not np.array_equal(after[2][k]["arrays"]["fpn.0"], before[2][k]["arrays"]["fpn.0"])]
    assert {k[0] for k in changed} == {image_id}, "the edited image's records were recomputed"
    now = file_mtimes(params.cache.path)
    touched = {p for p in now if now[p] != mtimes.get(p) and (Path(params.cache.path) / p).is_file()}
    odd = {p for p in touched if not ("/c/2" in p or "000002" in p or p == "manifest.json" or p.startswith("versions/"))}
    assert touched and not odd, odd
    assert verify_store(params.cache.path).ok

    # oracle: a fresh build over the edited dataset holds the very same records
    fresh = replace(params, cache=replace(params.cache, path=str(tmp_path / "fresh"), format="zarr"))
    build_cache(fresh)
    assert_same_records(all_records(params.cache.path, "zarr"), all_records(fresh.cache.path, "zarr"), "resumed vs fresh")
    assert_same_records(all_records(params.cache.path, "wds"), all_records(fresh.cache.path, "zarr"), "wds vs fresh")


def test_an_annotation_edit_recomputes_only_its_block_and_categories_are_fingerprinted(tiny_cache, tmp_path):
    params = private_copy(tiny_cache, tmp_path)
    image_id, _ = image_of_block(params, 1)
    ann = json.loads(Path(params.data.train_ann).read_text())
    target = next(a for a in ann["annotations"] if a["image_id"] == image_id)
    target["bbox"] = [target["bbox"][0] + 3, *target["bbox"][1:]]
    Path(params.data.train_ann).write_text(json.dumps(ann))
    summary = build_cache(params)
    assert [s["block"] for s in summary["stats"] if not s["skipped"]] == [1]

    ann["categories"][0]["name"] = "renamed"
    Path(params.data.train_ann).write_text(json.dumps(ann))
    with pytest.raises(CacheMismatchError, match=r"different dataset.categories\[0\]\[1\]: cache has .*, you asked for renamed"):
        build_cache(params)


def test_verify_checks_the_head_and_a_rerun_repairs_it(tiny_cache, tmp_path):
    params = copy_cache(tiny_cache, tmp_path)
    head = Path(params.cache.path) / "static" / "head.npz"
    good = head.read_bytes()
    assert verify_store(params.cache.path).ok
    for damage in ("missing", "flipped"):
        if damage == "missing":
            head.unlink()
        else:
            data = bytearray(good)
            data[len(data) // 2] ^= 0xFF
            head.write_bytes(bytes(data))
        report = verify_store(params.cache.path)
        assert not report.ok and any(str(head) in e and ("missing" in e if damage == "missing" else "checksum" in e)
                                     for e in report.errors), report.errors
        assert build_cache(params)["computed_blocks"] == 0, "only the head is rewritten"
        assert head.read_bytes() == good and verify_store(params.cache.path).ok
    # every file is accounted for: a shard past the plan and a stray file are named (warnings)
    (Path(params.cache.path) / "wds" / "shard-000099.tar").write_bytes(b"x")
    (Path(params.cache.path) / "notes.txt").write_text("x")
    report = verify_store(params.cache.path)
    assert report.ok and sum("not part of this cache's plan" in w for w in report.warnings) == 2, report.warnings


def test_dropping_an_image_from_the_json_recomputes_only_its_block(tiny_cache, tmp_path):
    """The plan is stable under deletion: the dropped image's records stay in place as placeholders
    (Manifest.dropped), so no later block moves and only the block that held it is recomputed."""
    from stages.distill.run import build_run

    params = private_copy(tiny_cache, tmp_path)
    image_id, _ = image_of_block(params, 1)
    original = Path(params.data.train_ann).read_text()
    ann = json.loads(original)
    ann["images"] = [i for i in ann["images"] if i["id"] != image_id]
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] != image_id]
    Path(params.data.train_ann).write_text(json.dumps(ann))
    before = blocks_of(params)

    summary = build_cache(params)
    assert [s["block"] for s in summary["stats"] if not s["skipped"]] == [1]
    manifest = open_reader(params.cache.path, "zarr").manifest
    assert manifest.dropped == [image_id] and len(manifest.plan) == 16, "the plan keeps its records in place"
    after = blocks_of(params)
    for b in before:
        if b != 1:
            assert_same_records(after[b], before[b], f"block {b} kept")
    for key, rec in after[1].items():
        if key[0] == image_id:
            assert rec["meta"].get("dropped") and not rec["arrays"], "a placeholder, no targets"
        else:
            assert rec["meta"] == before[1][key]["meta"]
    assert verify_store(params.cache.path).ok
    # stage 2 accepts the cache for the new json, from either store
    for source in ("zarr", "wds"):
        student = replace(params, distill=replace(params.distill, losses={"mse": 1.0}, source=source))
        check_cache(open_reader(params.cache.path, source), student)
        batch = next(build_run(student, None).make_batches(0))
        assert image_id not in batch["image_ids"] and len(batch["image_ids"]) == params.train.batch_size

    # the image comes back: its block is recomputed again, and the cache equals the original
    Path(params.data.train_ann).write_text(original)
    assert [s["block"] for s in build_cache(params)["stats"] if not s["skipped"]] == [1]
    assert open_reader(params.cache.path, "zarr").manifest.dropped == []
    assert_same_records(all_records(params.cache.path, "zarr"), all_records(tiny_cache.cache.path, "zarr"), "restored")
