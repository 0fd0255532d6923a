"""bench/: the timing helper, the result files and summary, the cost model, synthetic targets and
stores, and the codec measurements (tiny inputs; the benchmarks themselves run with `make bench`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import common, loader, n_experiments, rate_distortion, summary, synth_targets


def test_interleaved_alternates_order_skips_warmup_and_sums_parts():
    calls = []
    fixed = {"a": 1.0, "b": {"x": 2.0, "y": 0.5}}

    def side(name):
        def run():
            calls.append(name)
            return fixed[name]

        return run

    timing = common.interleaved({"a": side("a"), "b": side("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up round, then alternating
    assert timing["order"] == [["b", "a"], ["a", "b"], ["b", "a"]]
    assert timing["seconds"] == {"a": [1.0] * 3, "b": [2.5] * 3}
    assert timing["parts"]["b"] == {"x": [2.0] * 3, "y": [0.5] * 3}
    assert timing["median_s"] == {"a": 1.0, "b": 2.5}
    assert common.paired_ratio(timing, "b", "a") == 2.5
    assert common.paired_ratio(timing, "b", "b", part="y") == 1.0
    with pytest.raises(ValueError, match="rounds"):
        common.interleaved({"a": side("a")}, rounds=0)


def test_interleaved_times_sides_that_return_nothing():
    timing = common.interleaved({"a": lambda: None}, rounds=2, warmup=0)
    assert len(timing["seconds"]["a"]) == 2 and all(t >= 0 for t in timing["seconds"]["a"])


def test_paired_ratio_is_the_median_of_per_round_ratios():
    timing = {"seconds": {"a": [1.0, 10.0, 3.0], "b": [2.0, 10.0, 2.0]}}
    assert common.paired_ratio(timing, "a", "b") == 1.0  # ratios 0.5, 1.0, 1.5


def test_settings_reject_bad_options_with_a_clear_message():
    parser = common.make_parser("x", "")
    with pytest.raises(SystemExit, match="faster_rcnn"):
        common.settings_from(parser.parse_args(["--archs", "faster_rcnn"]), [])
    with pytest.raises(SystemExit, match="cannot fill one batch"):
        common.settings_from(parser.parse_args(["--images", "2", "--batch", "4"]), [])
    s = common.settings_from(parser.parse_args(["--rounds", "1", "--workdir", "/tmp/w"]), ["--rounds", "1",
                                                                                          "--workdir", "/tmp/w"])
    assert s.reduced and s.argv == ("--rounds", "1") and s.archs == ("retinanet",)
    real = common.settings_from(parser.parse_args(["--scale", "real"]), [])
    assert not real.reduced and real.archs == ("retinanet", "gfl") and real.scale.view == (800, 1333)


def test_dump_json_round_trips_and_keeps_number_lists_on_one_line():
    data = {"a": [1, 2.5, "x"], "b": {"c": [[1, 2], {"d": None}], "e": {}}, "f": []}
    text = common.dump_json(data)
    assert json.loads(text) == data
    assert '"a": [1, 2.5, "x"]' in text


def test_fmt():
    assert common.fmt(1234.4) == "1,234"
    assert common.fmt(0.5) == "0.5" and common.fmt(float("nan")) == "–" and common.fmt(None) == "–"
    assert common.fmt(3e-5) == "3.00e-05" and common.fmt(12) == "12"


def test_cost_model_totals_and_break_even():
    t = n_experiments.totals(cache_s=100.0, step_off=1.0, step_on=2.0, device_steps=10, ns=(1, 20))
    assert t["per_n"]["1"] == {"cached_s": 110.0, "online_s": 20.0, "online_over_cached": 20.0 / 110.0}
    assert t["per_n"]["20"]["online_over_cached"] == pytest.approx(400.0 / 300.0)
    assert t["break_even_n"] == pytest.approx(10.0)
    assert math.isinf(n_experiments.totals(1.0, 2.0, 1.0, 10)["break_even_n"])  # online never loses


def test_schedules_come_from_the_profiles():
    small = n_experiments.schedule("small")
    assert small["profile"] == "params.yaml" and small["devices"] == 1
    assert small["records"] == small["images"] * small["views"] and small["steps"] > 0
    real = n_experiments.schedule("real")
    assert real["images"] == n_experiments.COCO_TRAIN2017_IMAGES and real["devices"] == 8


def test_n_experiments_needs_its_inputs(tmp_path):
    args = common.make_parser("n_experiments", "").parse_args(["--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="cache_throughput.json not found"):
        n_experiments.compute(common.settings_from(args, []))


def _fake_result(name: str, results: dict) -> dict:
    return {
        "benchmark": name, "created": "2026-01-01T00:00:00Z", "wall_s": 1.0,
        "machine": {"cpu_model": "cpu", "cpu_cores": 2, "gpu": None, "device": "cpu", "torch": "2",
                    "torch_threads": 1, "load_average_1m": 0.5, "git_commit": "abc"},
        "scale": {"name": "small", "note": "n", "rounds": 1, "reduced": True},
        "results": results,
    }


def test_summary_is_built_from_the_json_files_and_survives_a_bad_one(tmp_path):
    t = n_experiments.totals(60.0, 1.0, 2.0, 10, ns=(1, 5))
    results = {"schedule": {"profile": "params.yaml", "records": 4, "images": 2, "views": 2, "steps": 10,
                            "devices": 1, "batch_size": 2},
               "archs": {"retinanet": {"cache_s": 60.0, "methods": {"cskd": t}}}}
    (tmp_path / "n_experiments.json").write_text(json.dumps(_fake_result("n_experiments", results)))
    (tmp_path / "loader.json").write_text(json.dumps({"benchmark": "loader"}))  # an older layout
    text = (summary.write_summary(tmp_path)).read_text()
    assert "## Total compute for N students" in text and "break-even N: cskd 6.00" in text
    assert "reduced smoke run" in text
    assert "cannot summarise loader.json" in text
    assert summary.result_files(tmp_path, "loader") == [tmp_path / "loader.json"]


def test_synthetic_targets_have_the_documented_shapes_and_sparsity():
    assert synth_targets.level_sizes(800, 1344) == [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
    rng = np.random.default_rng(0)
    p = synth_targets.class_probs(rng, (720, 50, 84))
    assert p.dtype == np.float32 and 0 < p.min() and p.max() < 1
    assert 0.018 < float((p >= 0.01).mean()) < 0.028  # ~2.3% by construction
    rec = synth_targets.retinanet_record(np.random.default_rng(0), (128, 160), fpn_channels=8, num_classes=3)
    assert rec["fpn.0"].shape == (8, 16, 20) and rec["cls.4"].shape == (27, 1, 2) and rec["box.2"].shape == (36, 4, 5)
    again = synth_targets.retinanet_record(np.random.default_rng(0), (128, 160), fpn_channels=8, num_classes=3)
    assert all(np.array_equal(rec[k], again[k]) for k in rec)


def test_synthetic_store_reads_back_the_same_records_from_both_formats(tmp_path):
    root = loader.synthetic_store(tmp_path / "s", records=3, hw=(128, 160), fpn_channels=8, num_classes=2)
    from stores import open_reader

    z, w = open_reader(root, "zarr"), open_reader(root, "wds")
    assert len(z.keys()) == 3 and len(w.shard_paths()) == 2  # blocks of BIG_BLOCK = 2
    image_id, view = z.keys()[2]
    a, b = z.get(image_id, view), w.get(image_id, view)
    assert sorted(a.arrays) == sorted(b.arrays) and len(a.arrays) == 15
    assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    settings = common.settings_from(common.make_parser("loader", "").parse_args(["--rounds", "1"]), [])
    res = loader.measure_store(root, settings)
    assert res["records"] == 3 and set(res["records_per_s"]) == {"zarr", "wds", "zarr fpn-only", "wds fpn-only"}
    sizes = res["decoded_mb_per_record_by_set"]
    assert sizes["fpn-only"] < sizes["all"] == res["decoded_mb_per_record"]


def test_codec_measurements_are_exact_for_raw_and_bounded_for_lossy():
    rng = np.random.default_rng(0)
    records = [[(f"fpn.{lv}", synth_targets.smooth_maps(rng, 4, 6, 8)) for lv in range(2)] for _ in range(2)]
    res = rate_distortion.measure_family(records, ["raw+none", "fp16+zstd", "int8c+zstd"], rounds=1)
    raw, fp16, int8 = (res["chains"][c] for c in ("raw+none", "fp16+zstd", "int8c+zstd"))
    assert raw["max_abs_error"] == 0 and raw["cosine_mean"] == 1.0
    assert res["raw_kb_per_image"] == pytest.approx(2 * 4 * 6 * 8 * 4 / 1e3)
    assert 0 < fp16["max_abs_error"] <= fp16["live_abs_max"] * 2**-11
    assert 0 < int8["max_abs_error"] <= int8["live_abs_max"] / 254 + 1e-7 and int8["cosine_mean"] > 0.999
    assert int8["kb_per_image"] < raw["kb_per_image"] and all(r["encode_mb_s"] > 0 for r in res["chains"].values())
    assert rate_distortion.applicable("cls", "sparse0.01+zstd") and not rate_distortion.applicable("fpn", "u8p+zstd")


def test_benchmark_dataset_keeps_images_of_one_padded_size(tmp_path):
    from bench.fixtures import make_dataset, scale_views
    from stages.data.batching import view_padded_size
    from stages.data.coco import CocoDataset

    scale = common.SCALES["small"]
    images, ann, padded = make_dataset(tmp_path, scale, num_images=4)
    coco = CocoDataset(images, ann)
    assert len(coco) == 4
    sizes = {view_padded_size(v, *coco.image_size(i)) for i in coco.image_ids for v in scale_views(scale)}
    assert sizes == {padded}
    data = json.loads(ann.read_text())
    assert {a["image_id"] for a in data["annotations"]} <= set(coco.image_ids)
    assert make_dataset(tmp_path, scale, num_images=4) == (images, ann, padded)  # reused, not regenerated


# ------------------------------------------------------------------------------------------------
# bench.realscale / bench.views


def test_realscale_writes_every_headline_key_and_skips_a_missing_teacher(tmp_path, monkeypatch):
    """A tiny random teacher at a small view (the real run is 800x1344): every headline key, seven
    methods, finite figures; a row whose checkpoint is missing is skipped with the command that makes it."""
    import torch

    from bench import realscale

    monkeypatch.setitem(realscale.TEACHERS, "demo", dict(realscale.TEACHERS["demo"],
                                                         checkpoint=str(tmp_path / "none/model.pt")))
    torch.set_num_threads(1)
    out = realscale.main(["--teachers", "tiny,demo", "--view", "128,192", "--warm-view", "128,128", "--images", "1",
                          "--student-steps", "1", "--rounds", "1", "--step-rounds", "1", "--loader-rounds", "2", "--device", "cpu",
                          "--out", str(tmp_path / "res"), "--workdir", str(tmp_path / "w")])
    saved = json.loads((tmp_path / "res/realscale.json").read_text())["results"]
    for key in ("view", "teacher", "bytes_per_record", "bytes_by_target", "loader_records_per_s_per_worker",
                "grad_cosine", "loss_rel_err", "codecs", "step_time_offline_over_online"):
        assert key in saved, key
    assert saved["view"] == [128, 192] and saved["headline"] == "tiny"
    assert set(saved["grad_cosine"]) == {"mse", "cosine", "cskd", "ssim", "crosskd", "rm", "pfi"}
    assert all(-1.0 <= v <= 1.0 + 1e-9 for v in saved["grad_cosine"].values())
    assert set(saved["loader_records_per_s_per_worker"]) == {"zarr", "wds"}
    assert all(v > 0 for v in saved["loader_records_per_s_per_worker"].values())
    row = saved["teachers"]["tiny"]
    by_method = row["loader_records_per_s_per_worker_by_method"]
    assert set(by_method) == set(saved["grad_cosine"]) and by_method["ssim"]["targets"] == ["fpn"]
    assert {"cls", "box", "tower_stats"} <= set(by_method["crosskd"]["targets"])
    assert all(v["zarr"] > 0 and v["wds"] > 0 for v in by_method.values())
    assert row["bytes_per_record"] == pytest.approx(sum(row["bytes_by_target"].values()), rel=1e-5)
    assert {"fpn", "cls", "box"} <= set(row["targets"]) and "default" in row["codec_sets"]
    cpca = row["codec_sets"]["cpca64s0.25"]  # coded against a basis fitted on other renders of the row
    assert cpca["codecs"]["fpn"] == "cpca64s0.25+pco" and 0 < cpca["bytes_by_target"]["fpn"]
    assert all(-1.0 <= v <= 1.0 + 1e-9 for v in cpca["grad_cosine"].values())
    assert row["teacher"]["num_classes"] == 6 and "random" in row["teacher"]["trained"]
    before = row["loader_records_per_s_per_worker_before"]  # the per-record FPN basis set, read back too
    assert before["codecs"]["fpn"] == "pca64s0.25+pco" and before["zarr"] > 0 and before["wds"] > 0
    assert before["bytes_per_record"] == row["codec_sets"][realscale.BEFORE_SET]["bytes_per_record"] > 0
    from bench import encode_cost  # stage 1's encode time per record of the row's store, both code sets

    cost = encode_cost.main([str(tmp_path / "w/realscale-store-tiny"), "--rounds", "1", "--out", str(tmp_path / "res")])
    enc = cost["results"]
    assert enc["records"] == 1 and set(enc["encode_s_per_record"]) == {"default", realscale.BEFORE_SET}
    assert all(v > 0 for v in enc["encode_s_per_record"].values()) and all(v > 0 for v in enc["bytes_per_record"].values())
    assert "missing" in saved["teachers"]["demo"]["teacher"]["skipped"]
    assert out["teachers"]["demo"]["goals_met"] == {}
    text = (tmp_path / "res/SUMMARY.md").read_text()
    assert "Real scale (800x1344)" in text and "cos cskd" in text


def test_trained_checkpoint_prefers_the_final_file_and_names_a_partial_run(tmp_path):
    import torch

    from bench.fixtures import trained_checkpoint

    final = tmp_path / "teacher/model.pt"
    assert trained_checkpoint(final)[0] is None
    final.parent.mkdir()
    meta = {"params": {"teacher": {"train": {"steps": 400, "batch_size": 4}}, "data": {"train_ann": "a.json"}}}
    torch.save(meta | {"step": 200}, final.parent / "last.pt")
    path, how = trained_checkpoint(final)
    assert path == final.parent / "last.pt" and "PARTIAL" in how and "200 of 400" in how
    torch.save(meta | {"step": 400}, final)
    path, how = trained_checkpoint(final)
    assert path == final and "PARTIAL" not in how and "trained 400 steps" in how


def test_views_summary_states_the_disk_ratio_and_ap_difference():
    from bench import views

    side = {"views": views.TWO_VIEWS, "codec_set": views.DENSE_SET, "disk_bytes": 2e6, "disk_bytes_per_image": 4e4,
            "AP_mean": 10.0, "AP50_mean": 20.0, "runs": {"0": {"AP": 10.0}}}
    four = dict(side, views=views.FOUR_VIEWS, codec_set="default", disk_bytes=1e6, AP_mean=11.0)
    result = {"results": {"sides": {"2 views": side, "4 views": four}, "teacher": {"trained": "t"}, "images": 48,
                          "steps": 80, "seeds": [0], "disk_ratio_4_over_2": 0.5, "AP_delta_4_minus_2": 1.0}}
    text = views.summary_md(result)
    assert "disk(4)/disk(2) = 0.5" in text and "AP(4) - AP(2) = +1" in text
    assert len(views.FOUR_VIEWS) >= 4 and len({(v["min_size"], v["flip"]) for v in views.FOUR_VIEWS}) == 4


def test_views_compare_pairs_seeds_and_says_when_the_difference_is_seed_noise():
    import statistics

    from bench import views

    def side(aps, disk):
        runs = {str(s): {"AP": ap} for s, ap in zip((0, 1, 2), aps)}
        return {"disk_bytes": disk, "runs": runs, "AP_mean": statistics.mean(aps), "AP_std": statistics.stdev(aps)}

    two, four = side([3.0, 4.0, 5.0], 2e6), side([3.5, 4.0, 5.5], 1.5e6)
    out = views.compare(two, four, [0, 1, 2])
    assert out["disk_ratio_4_over_2"] == pytest.approx(0.75)
    assert out["AP_delta_per_seed"] == pytest.approx({"0": 0.5, "1": 0.0, "2": 0.5})
    assert out["AP_delta_4_minus_2"] == pytest.approx(1 / 3)
    se = ((1.0 ** 2 + statistics.stdev([3.5, 4.0, 5.5]) ** 2) / 3) ** 0.5
    assert out["AP_delta_se"] == pytest.approx(se) and out["AP_delta_within_noise"] is True
    assert out["AP_delta_spread"]["std"] == pytest.approx(statistics.stdev([0.5, 0.0, 0.5]))
    assert out["goal_met"] == {"disk": True, "AP": True}
    far = views.compare(two, side([8.0, 9.0, 10.0], 3e6), [0, 1, 2])
    assert far["AP_delta_within_noise"] is False and far["goal_met"] == {"disk": False, "AP": True}
    one = views.compare(dict(two, AP_std=0.0), dict(four, AP_std=0.0), [0])
    assert one["AP_delta_within_noise"] is None and one["AP_delta_per_seed"] == pytest.approx({"0": 0.5})
