"""Shared conformance tests for the cache stores; each backend's test module subclasses
`StoreConformance` and sets `writer_cls` / `reader_cls` / `fmt`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stores import (
    CacheMismatchError,
    DecodedRecord,
    Manifest,
    StoreReadError,
    decode,
    encode,
    encode_record,
    make_plan,
    store_summary,
    verify_store,
)
from stores.base import chain_for

LEVELS = 3
VIEWS = ["s64m96f0", "s64m96f1"]
CODECS = {"fpn": "int8c+zstd", "cls": "sparse0.01+zstd", "box": "fp16+zstd"}


def make_manifest(plan=None, block_size=4, **fingerprint) -> Manifest:
    fp = {
        "teacher_weights": "ab" * 32,
        "teacher_arch": {"arch": "retinanet", "backbone": "resnet50", "fpn_channels": 16},
        "dataset": {"ann_sha256": "cd" * 32, "num_images": 5},
        "views": [{"min_size": 64, "max_size": 96, "flip": f} for f in (False, True)],
        "targets": ["fpn", "cls", "box", "detections", "candidates"],
        "codecs": dict(CODECS),
    }
    fp.update(fingerprint)
    if plan is None:
        plan = make_plan([3, 7, 11, 12, 20], VIEWS)  # 10 records -> blocks of 4, 4, 2
    return Manifest(schema_version=1, fingerprint=fp, plan=plan, block_size=block_size, levels=LEVELS,
                    meta={"created_at": "test"})


def make_arrays(image_id: int, view: str, channels: int = 6, classes: int = 3) -> tuple[dict, dict]:
    """(meta, arrays) of one record with its own (random) per-image extent."""
    rng = np.random.default_rng(image_id * 10 + VIEWS.index(view) if view in VIEWS else image_id)
    h, w = int(rng.integers(40, 97)), int(rng.integers(40, 97))
    sizes = []
    arrays: dict[str, np.ndarray] = {}
    for level in range(LEVELS):
        stride = 8 * 2**level
        lh, lw = -(-h // stride), -(-w // stride)
        sizes.append([lh, lw])
        arrays[f"fpn.{level}"] = rng.standard_normal((channels, lh, lw)).astype(np.float32) * 3
        logits = rng.standard_normal((classes, lh, lw)).astype(np.float32) * 3 - 4
        arrays[f"cls.{level}"] = (1 / (1 + np.exp(-logits))).astype(np.float32)
        arrays[f"box.{level}"] = rng.standard_normal((4, lh, lw)).astype(np.float32)
    n = int(rng.integers(0, 5))  # 0 detections happens too
    arrays["det.boxes"] = (rng.random((n, 4)) * 64).astype(np.float32)
    arrays["det.scores"] = rng.random(n).astype(np.float32)
    arrays["det.labels"] = rng.integers(0, classes, n).astype(np.int64)
    m = int(rng.integers(0, 9))
    arrays["cand.index"] = rng.integers(0, 500, m).astype(np.int64)
    arrays["cand.score"] = rng.random(m).astype(np.float32)
    arrays["cand.offsets"] = np.array([0, m // 2, m], dtype=np.int64)
    meta = {"image_size": [h, w], "level_sizes": sizes}
    return meta, arrays


def block_records(manifest: Manifest, block: int, codecs=None):
    codecs = CODECS if codecs is None else codecs
    out = []
    for image_id, view in manifest.block_records(block):
        meta, arrays = make_arrays(image_id, view)
        out.append(encode_record(image_id, view, meta, arrays, codecs))
    return out


def expected_arrays(image_id: int, view: str, codecs=None) -> dict[str, np.ndarray]:
    """What a reader must return: exactly decode(encode(x, chain))."""
    codecs = CODECS if codecs is None else codecs
    _, arrays = make_arrays(image_id, view)
    return {k: decode(encode(v, chain_for(k, codecs))) for k, v in arrays.items()}


def assert_record_equal(rec: DecodedRecord, image_id: int, view: str, codecs=None) -> None:
    want = expected_arrays(image_id, view, codecs)
    meta, raw = make_arrays(image_id, view)
    assert rec.image_id == image_id and rec.view == view
    assert rec["meta"]["image_size"] == meta["image_size"]
    assert rec["meta"]["level_sizes"] == meta["level_sizes"]
    assert sorted(rec.arrays) == sorted(want)
    for name, arr in want.items():
        got = rec["arrays"][name]
        assert got.shape == raw[name].shape, name
        assert got.dtype == arr.dtype, name
        np.testing.assert_array_equal(got, arr, err_msg=name)


class StoreConformance:
    writer_cls: type
    reader_cls: type
    fmt: str

    @pytest.fixture
    def root(self, tmp_path):
        """Where the cache lives: a local folder here; the object-store suites override it with a URL."""
        return tmp_path

    def write_all(self, root, manifest=None, codecs=None, blocks=None):
        manifest = manifest or make_manifest()
        w = self.writer_cls(root, manifest)
        for b in range(manifest.num_blocks()) if blocks is None else blocks:
            w.write_block(b, block_records(manifest, b, codecs))
        return w

    @pytest.mark.parametrize(
        "codecs",
        [
            {"fpn": "raw+zstd", "cls": "raw+none", "box": "raw+blosc"},
            CODECS,
            {"fpn": "fp16+blosc", "cls": "u8p+zstd", "box": "bitround7+none", "det": "fp16+zstd"},
        ],
        ids=["lossless", "default", "mixed"],
    )
    def test_round_trip(self, root, codecs):
        self.write_all(root, codecs=codecs)
        reader = self.reader_cls(root)
        m = make_manifest()
        assert len(reader) == 10 and reader.keys() == m.plan
        for image_id, view in m.plan:
            assert_record_equal(reader.get(image_id, view), image_id, view, codecs)
        if codecs["fpn"] == "raw+zstd":  # lossless: bit-exact with the original arrays
            _, raw = make_arrays(3, VIEWS[1])
            rec = reader.get(3, VIEWS[1])
            for k, v in raw.items():
                if k.startswith(("fpn", "cls", "box")):
                    np.testing.assert_array_equal(rec.arrays[k], v)

    def test_both_formats_hold_the_same_blobs(self, root):
        self.write_all(root)
        reader = self.reader_cls(root)
        rec = reader.get_encoded(12, VIEWS[0])
        meta, arrays = make_arrays(12, VIEWS[0])
        assert rec.blobs == encode_record(12, VIEWS[0], meta, arrays, CODECS).blobs

    def test_targets_selection(self, root):
        self.write_all(root)
        reader = self.reader_cls(root)
        rec = reader.get(7, VIEWS[0], targets=["fpn", "det.labels"])
        assert sorted(rec.arrays) == ["det.labels", "fpn.0", "fpn.1", "fpn.2"]
        # the config-level names of CacheParams.targets / KDLosses.needs() work too
        rec = reader.get(7, VIEWS[0], targets=["detections", "candidates"])
        assert sorted(rec.arrays) == ["cand.index", "cand.offsets", "cand.score", "det.boxes", "det.labels", "det.scores"]

    def test_keys_only_completed_blocks(self, root):
        m = make_manifest()
        self.write_all(root, blocks=[0, 2])
        reader = self.reader_cls(root)
        assert reader.completed_blocks() == {0, 2}
        assert reader.keys() == m.block_records(0) + m.block_records(2)
        assert len(reader) == 6
        assert m.plan[4] not in reader and m.plan[0] in reader
        with pytest.raises(StoreReadError, match="block 1.*not written"):
            reader.get(*m.plan[4])
        with pytest.raises(KeyError, match="not in the plan"):
            reader.get(999, VIEWS[0])
        # a block written after the reader opened becomes visible
        self.writer_cls(root, m).write_block(1, block_records(m, 1))
        assert_record_equal(reader.get(*m.plan[4]), *m.plan[4])
        assert len(reader) == 10

    def test_resume_skips_completed_blocks(self, root):
        m = make_manifest()
        self.write_all(root, blocks=[0])
        w = self.writer_cls(root, m)
        assert w.completed_blocks() == {0} and w.missing_blocks() == [1, 2]
        # rewriting a completed block is a no-op: different content is NOT written
        other = [encode_record(r.image_id, r.view, r.meta, {"fpn.0": np.zeros(3, np.float32)}) for r in block_records(m, 0)]
        w.write_block(0, other)
        for b in w.missing_blocks():
            w.write_block(b, block_records(m, b))
        reader = self.reader_cls(root)
        for key in m.plan:
            assert_record_equal(reader.get(*key), *key)
        assert verify_store(root, formats=[self.fmt]).ok

    def test_block_must_hold_plan_records_in_order(self, root):
        m = make_manifest()
        w = self.writer_cls(root, m)
        recs = block_records(m, 0)
        with pytest.raises(ValueError, match="block 0 must hold"):
            w.write_block(0, recs[::-1])
        with pytest.raises(ValueError, match="block 0 must hold"):
            w.write_block(0, recs[:2])
        with pytest.raises(IndexError, match="out of range"):
            w.write_block(7, recs)
        assert w.completed_blocks() == set()

    @pytest.mark.parametrize(
        "change, field",
        [
            ({"teacher_weights": "ff" * 32}, "teacher_weights"),
            ({"teacher_arch": {"arch": "retinanet", "backbone": "resnet50", "fpn_channels": 32}}, "teacher_arch.fpn_channels"),
            ({"codecs": {**CODECS, "fpn": "fp16+zstd"}}, "codecs.fpn"),
        ],
    )
    def test_mismatched_manifest_refused(self, root, change, field):
        self.write_all(root, blocks=[0])
        with pytest.raises(CacheMismatchError) as info:
            self.writer_cls(root, make_manifest(**change))
        msg = str(info.value)
        assert f"different {field}:" in msg and str(root) in msg and "pipeline.cache_teacher" in msg

    def test_mismatched_plan_or_block_size_refused(self, root):
        self.write_all(root, blocks=[0])
        with pytest.raises(CacheMismatchError, match="different block_size: cache has 4, you asked for 5"):
            self.writer_cls(root, make_manifest(block_size=5))
        with pytest.raises(CacheMismatchError, match=r"different plan \(record 0\)"):
            self.writer_cls(root, make_manifest(plan=make_plan([2, 7, 11, 12, 20], VIEWS)))
        # the same inputs (a new created_at in meta) are accepted
        m = make_manifest()
        m2 = Manifest(m.schema_version, m.fingerprint, m.plan, m.block_size, m.levels, meta={"created_at": "later"})
        assert self.writer_cls(root, m2).completed_blocks() == {0}

    def test_static_round_trip(self, root):
        w = self.write_all(root, blocks=[0])
        weights = {"cls_logits.weight": np.random.default_rng(0).standard_normal((9, 16, 3, 3)).astype(np.float32),
                   "steps": np.array(3, dtype=np.int64)}
        w.write_static("head", weights)
        w.write_static("tower_stats", {"cls_mean": np.arange(4, dtype=np.float32)})
        reader = self.reader_cls(root)
        got = reader.read_static("head")
        assert sorted(got) == sorted(weights)
        for k in weights:
            np.testing.assert_array_equal(got[k], weights[k])
            assert got[k].dtype == weights[k].dtype
        assert reader.static_names() == ["head", "tower_stats"]
        with pytest.raises(StoreReadError, match="no static item 'nope'.*has: head, tower_stats"):
            reader.read_static("nope")
        with pytest.raises(ValueError):
            w.write_static("../evil", weights)

    def test_meta_and_manifest_on_disk(self, root):
        self.write_all(root)
        m = Manifest.load(root / "manifest.json")
        assert m.plan == make_manifest().plan and m.meta == {"created_at": "test"}
        assert json.loads((root / "manifest.json").read_text())["fingerprint"]["schema_version"] == 1
        reader = self.reader_cls(root)
        assert reader.manifest.fingerprint_digest() == make_manifest().fingerprint_digest()

    def test_verify_and_iteration(self, root):
        self.write_all(root, blocks=[0, 1])
        report = verify_store(root, formats=[self.fmt])
        assert not report.ok and report.missing_blocks == [2] and report.n_records == 8
        assert any("1 planned blocks not written (2)" in e for e in report.errors)
        self.write_all(root, blocks=[2])
        report = verify_store(root, formats=[self.fmt])
        assert report.ok, report.errors
        assert report.n_records == 10 and report.missing_blocks == []
        reader = self.reader_cls(root)
        assert [(r.image_id, r.view) for r in reader] == make_manifest().plan

    def test_reader_without_cache(self, root):
        with pytest.raises(StoreReadError, match="no cache at .*pipeline.cache_teacher"):
            self.reader_cls(root / "nothing")

    def test_store_folder_of_another_manifest_refused(self, root):
        self.write_all(root, blocks=[0])
        (root / "manifest.json").unlink()  # someone deleted the manifest by hand
        with pytest.raises(CacheMismatchError, match="another manifest.*delete"):
            self.writer_cls(root, make_manifest(teacher_weights="ee" * 32))

    def test_store_summary(self, root):
        self.write_all(root)
        s = store_summary(root, fmt=self.fmt)
        assert s["records"] == 10 and s["images"] == 5 and s["views"] == {VIEWS[0]: 5, VIEWS[1]: 5}
        assert s["codecs"] == CODECS and s["format_read"] == self.fmt
        fpn = s["targets"]["fpn.0"]
        assert fpn["codec"] == "int8c+zstd" and fpn["compression_ratio"] > 2.5
        assert s["targets"]["det.labels"]["codec"] == "raw+zstd"
        assert s["families"]["cls"]["stored_bytes_per_record"] > 0
        assert s["compression_ratio"] > 1 and s["disk_bytes"][self.fmt] > 0
        json.dumps(s)  # JSON-able for inspect_cache --json
