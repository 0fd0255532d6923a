"""Compact codecs end to end: stage 1 caches with the compact chains (device encoders, side inputs picked by
the worker), stage 2 reads compact parts from both formats and dequantises on the training device.

The reference is independent of the caching loop: the live teacher's records, encoded by the numpy
reference (`stores.encode_record`) and decoded by the numpy reference (`stores.codecs.decode`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from stages.cache.plan import open_reader
from stages.config import Params
from stages.data.batching import ViewDataset, collate
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.detectors.build import load_detector
from stages.distill.run import build_run
from stages.distill.teacher_source import cached_records_to_device, live_records
from stores.base import decode_record, encode_record
from stores.codecs import CompactArray, decode_compact
from tests.cache_fixtures import build_cache, tiny_params, torch_threads

pytest_plugins = ["tests.cache_fixtures"]

# fpn: the default FPN transform (one quantiser step per level, pcodec stage); pca4+zstd is covered
# by tests/test_device_codecs.py
COMPACT = {"fpn": "pca4s0.05+pco", "cls": "topk2f0.01+zstd", "box": "mask0.01002+zstd"}  # the random teacher sits at its 0.01 prior


@pytest.fixture(scope="module")
def compact_cache(tmp_path_factory, tiny_coco, tiny_teacher) -> Params:
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path_factory.mktemp("compact"), codecs=COMPACT,
                         targets=["fpn", "cls", "box", "candidates"], format="both")
    build_cache(params)
    return params


def _live(params: Params, image_id: int, view_key: str) -> tuple[dict[str, np.ndarray], int]:
    coco = CocoDataset(params.data.train_images, params.data.train_ann)
    view = next(View(v.min_size, v.max_size, v.flip) for v in params.cache.views
                if View(v.min_size, v.max_size, v.flip).key == view_key)
    batch = collate([ViewDataset.from_pairs(coco, [(image_id, view)])[0]])
    teacher = load_detector(params.teacher.checkpoint).eval()
    with torch_threads(1):
        _, records = live_records(teacher, batch["images"], batch["image_sizes"], batch["targets"],
                                  ["fpn", "cls", "box"])
    return {n: t.float().numpy() for n, t in records[0].items()}, teacher.num_classes


def test_cached_compact_targets_match_the_numpy_reference(compact_cache):
    reader = open_reader(compact_cache.cache.path, "zarr")
    image_id, view = reader.keys()[3]
    live, num_classes = _live(compact_cache, image_id, view)
    ref = decode_record(encode_record(image_id, view, {}, live, COMPACT, num_classes)).arrays
    cached = reader.get(image_id, view).arrays
    compact = reader.get(image_id, view, compact=True).arrays
    assert reader.manifest.fingerprint["codecs"] == COMPACT
    # the caching loop's teacher ran on other batches (other padding): inputs equal to ~1e-6, so
    # compare within the codecs' own error bounds, not bit for bit (tests/test_device_codecs does that)
    step = (9.0 - np.log(0.01 / 0.99)) / 255
    for name, want in ref.items():
        got, x = cached[name], live[name]
        assert got.shape == want.shape, name
        if name.startswith("fpn"):  # pca4s0.05 of 16 channels: the same subspace as the reference
            assert np.abs(got - want).max() <= 0.02 * np.abs(x).max() + 1e-6, name
        elif name.startswith("cls"):  # top-2 of each anchor's classes, logit error <= half a bin
            idx = compact[name].parts["idx"].astype(np.int64)  # kept elements, flat [A*K, h, w] order
            cells = int(np.prod(got.shape[1:]))
            kept = np.zeros(got.size, bool)
            kept[idx] = True
            kept = kept.reshape(got.shape)
            # oracle: per (anchor, cell) the 2nd largest live class value; ties at it are kept too
            groups = x.reshape(-1, num_classes, cells)
            second = np.sort(groups, axis=1)[:, -2:-1, :]
            n_kept = kept.reshape(groups.shape).sum(axis=1)
            assert (x[kept] >= np.repeat(second, num_classes, 1).reshape(got.shape)[kept] - 1e-6).all(), name
            assert (x[kept] >= 0.01 - 1e-6).all() and (n_kept >= 1).any(), name
            assert ((n_kept <= 2) | (np.sort(groups, axis=1)[:, -3, :] >= second[:, 0, :] - 1e-6)).all(), name
            assert np.abs(got[~kept] - x[~kept]).max() < 1e-3, name  # the background model: 0.01 +- 1e-5 here
            lx, lg = np.log(x[kept] / (1 - x[kept])), np.log(got[kept] / (1 - got[kept]))
            assert np.abs(lx - lg).max() <= step / 2 + 1e-3, name
        else:  # mask: int8 per channel on the cells whose class score >= T, zero elsewhere
            score = live[name.replace("box", "cls")].max(axis=0)
            sure = np.abs(score - 0.01002) > 1e-7  # away from the threshold: the same decision both runs
            confident = score >= 0.01002
            assert not got[:, ~confident & sure].any(), name
            err = np.abs(got - x)[:, confident & sure]
            assert err.size == 0 or err.max() <= np.abs(x).max() / 254 + 1e-5, name
    confident = live["cls.0"].max(axis=0) >= 0.01002
    assert confident.any() and not confident.all()


@pytest.mark.parametrize("source", ["zarr", "wds"])
def test_stage2_reads_compact_parts_and_decodes_them_on_the_device(compact_cache, source):
    params = replace(compact_cache, distill=replace(compact_cache.distill, teacher="offline", source=source,
                                                    losses={"pfi": 1.5}))
    run = build_run(params, None)
    batch = next(run.make_batches(0))
    first = batch["teacher"][0]
    assert first and all(isinstance(v, CompactArray) for v in first.values())
    on_device = cached_records_to_device(batch["teacher"], run.device)[0]
    reader = open_reader(compact_cache.cache.path, "zarr")
    reference = reader.get(batch["image_ids"][0], batch["views"][0], targets=list(first)).arrays
    for name, arr in reference.items():
        np.testing.assert_allclose(on_device[name].cpu().numpy(), arr, rtol=0, atol=1e-5 * (np.abs(arr).max() + 1e-12),
                                   err_msg=name)
        np.testing.assert_array_equal(decode_compact(first[name]), arr, err_msg=name)
    losses = run.step_loss(batch)
    assert torch.isfinite(sum(losses.values()))


def test_partial_cache_refused_the_same_by_both_sources_in_stage2(compact_cache, tmp_path):
    """One block missing (its shard and its zarr done marker deleted, as a
    killed stage 1 leaves it): `train_student` refuses it with the same line for zarr and wds."""
    import shutil

    from stores.zarr_store import marker_path

    root = tmp_path / "cache"
    shutil.copytree(compact_cache.cache.path, root)
    (root / "wds" / "shard-000001.tar").unlink()
    marker_path(root / "zarr", 1).unlink()
    messages = []
    for source in ("zarr", "wds"):
        params = replace(compact_cache, cache=replace(compact_cache.cache, path=str(root)),
                         distill=replace(compact_cache.distill, teacher="offline", source=source, losses={"mse": 1.0}))
        with pytest.raises(ValueError) as info:
            build_run(params, None)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"cache {root} has no record for ") and "python -m pipeline.cache_teacher" in messages[0]
