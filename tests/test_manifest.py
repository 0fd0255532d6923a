"""Manifest: blocks, (de)serialisation, atomic save, field-by-field compatibility messages."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from stores.manifest import (
    SCHEMA_VERSION,
    CacheMismatchError,
    Manifest,
    check_compatible,
    make_plan,
    sha256_file,
)


def fingerprint(**change):
    fp = {
        "teacher_weights": "0" * 64,
        "teacher_arch": {"arch": "gfl", "backbone": "resnet50", "fpn_channels": 128, "reg_max": 16},
        "dataset": {"ann_sha256": "a" * 64, "files_sha256": "b" * 64, "num_images": 240},
        "views": [{"min_size": 160, "max_size": 256, "flip": False}, {"min_size": 160, "max_size": 256, "flip": True}],
        "targets": ["fpn", "cls", "box"],
        "codecs": {"fpn": "int8c+zstd", "cls": "sparse0.01+zstd"},
    }
    fp.update(change)
    return fp


def manifest(n_images=5, block_size=4, **change) -> Manifest:
    plan = make_plan(range(1, n_images + 1), ["s160m256f0", "s160m256f1"])
    return Manifest(SCHEMA_VERSION, fingerprint(**change), plan, block_size, 5, meta={"created_at": "now"})


def test_blocks():
    m = manifest()
    assert len(m.plan) == 10 and m.num_blocks() == 3
    assert m.block_records(0) == [(1, "s160m256f0"), (1, "s160m256f1"), (2, "s160m256f0"), (2, "s160m256f1")]
    assert m.block_records(2) == [(5, "s160m256f0"), (5, "s160m256f1")]
    assert m.block_range(2) == (8, 10)
    assert sum(len(m.block_records(b)) for b in range(m.num_blocks())) == len(m.plan)
    with pytest.raises(IndexError):
        m.block_records(3)
    assert Manifest(1, {}, [], 4, 5).num_blocks() == 0


def test_plan_helpers_and_validation():
    plan = make_plan([3, 1], lambda i: ["b", "a"] if i == 1 else ["a"])
    assert plan == [(1, "a"), (1, "b"), (3, "a")]
    with pytest.raises(ValueError, match="twice"):
        Manifest(1, {}, [(1, "a"), (1, "a")], 4, 5)
    with pytest.raises(ValueError, match="block_size"):
        Manifest(1, {}, [(1, "a")], 0, 5)


def test_round_trip_and_atomic_save(tmp_path):
    m = manifest()
    path = tmp_path / "sub" / "manifest.json"
    m.save(path)
    assert Manifest.load(path) == m
    assert Manifest.from_dict(json.loads(path.read_text())) == m
    assert Manifest.load(path).plan[0] == (1, "s160m256f0")  # tuples again after JSON
    assert m.fingerprint["schema_version"] == SCHEMA_VERSION
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]  # no temp file left
    m2 = manifest(block_size=2)
    m2.save(path)
    assert Manifest.load(path).block_size == 2


def test_load_errors(tmp_path):
    p = tmp_path / "manifest.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable.*cache_teacher"):
        Manifest.load(p)
    p.write_text(json.dumps({"plan": []}))
    with pytest.raises(ValueError, match="malformed.*lacks schema_version"):
        Manifest.load(p)


def test_digest_ignores_meta_and_key_order():
    a = manifest()
    b = Manifest(a.schema_version, dict(reversed(list(a.fingerprint.items()))), a.plan, a.block_size, a.levels,
                 meta={"created_at": "other"})
    assert a.fingerprint_digest() == b.fingerprint_digest()
    assert a.fingerprint_digest() != manifest(targets=["fpn"]).fingerprint_digest()
    assert len(a.fingerprint_digest()) == 64


def test_check_compatible_accepts_same():
    m = manifest()
    check_compatible(m, fingerprint(), "cache/x")
    check_compatible(m, manifest(), "cache/x")
    check_compatible(m, {**fingerprint(), "plan": [list(p) for p in m.plan], "block_size": 4}, "cache/x")


@pytest.mark.parametrize(
    "change, field, have, want",
    [
        ({"teacher_weights": "1" * 64}, "teacher_weights", "0" * 64, "1" * 64),
        ({"teacher_arch": {**fingerprint()["teacher_arch"], "fpn_channels": 256}}, "teacher_arch.fpn_channels", "128", "256"),
        ({"dataset": {**fingerprint()["dataset"], "num_images": 60}}, "dataset.num_images", "240", "60"),
        ({"views": fingerprint()["views"][:1]}, "views (length)", "2", "1"),
        ({"views": [fingerprint()["views"][0], {"min_size": 192, "max_size": 256, "flip": True}]}, "views[1].min_size", "160", "192"),
        ({"codecs": {"fpn": "fp16+zstd", "cls": "sparse0.01+zstd"}}, "codecs.fpn", "int8c+zstd", "fp16+zstd"),
        ({"targets": ["fpn", "cls"]}, "targets (length)", "3", "2"),
        ({"schema_version": SCHEMA_VERSION + 1}, "schema_version", str(SCHEMA_VERSION), str(SCHEMA_VERSION + 1)),
    ],
)
def test_check_compatible_names_field(change, field, have, want):
    with pytest.raises(CacheMismatchError) as info:
        check_compatible(manifest(), fingerprint(**change), "cache/teacher")
    msg = str(info.value)
    assert msg.startswith(f"cache cache/teacher was built with a different {field}: ")
    assert f"cache has {have}, you asked for {want};" in msg
    assert "rebuild it with python -m pipeline.cache_teacher (or point distill to the matching cache)" in msg


def test_check_compatible_first_difference_wins_and_missing_keys():
    with pytest.raises(CacheMismatchError, match="different teacher_weights"):
        check_compatible(manifest(), fingerprint(teacher_weights="x", codecs={}), "c")
    fp = fingerprint()
    del fp["codecs"]
    with pytest.raises(CacheMismatchError, match="different codecs: cache has .*you asked for <absent>"):
        check_compatible(manifest(), fp, "c")
    with pytest.raises(CacheMismatchError, match="different teacher_arch.extra: cache has <absent>"):
        check_compatible(manifest(), fingerprint(teacher_arch={**fingerprint()["teacher_arch"], "extra": 1}), "c")


def test_check_compatible_plan_and_block_size():
    m = manifest()
    with pytest.raises(CacheMismatchError, match=r"different plan \(record 2\): cache has image 2 view s160m256f0"):
        check_compatible(m, Manifest(SCHEMA_VERSION, fingerprint(), make_plan([1, 3, 4, 5, 6], ["s160m256f0", "s160m256f1"]), 4, 5), "c")
    with pytest.raises(CacheMismatchError, match=r"different plan \(number of records\): cache has 10, you asked for 8"):
        check_compatible(m, manifest(n_images=4), "c")
    with pytest.raises(CacheMismatchError, match="different block_size: cache has 4, you asked for 8"):
        check_compatible(m, manifest(block_size=8), "c")


def test_long_values_are_shortened():
    with pytest.raises(CacheMismatchError) as info:
        check_compatible(manifest(), fingerprint(teacher_weights=["x" * 50] * 20), "c")
    assert len(str(info.value)) < 600 and "..." in str(info.value)


def test_sha256_file(tmp_path):
    p = tmp_path / "w.pt"
    data = os.urandom(3_000_000)
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
