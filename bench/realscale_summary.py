"""bench.realscale's markdown table (bench/results/SUMMARY.md)."""

from __future__ import annotations

from bench.common import md_table
from bench.realscale_rows import BEFORE_SET
from stages.losses.registry import LOSS_NAMES


def summary_md(result: dict) -> str:
    r = result["results"]
    head = ["teacher", "trained", "MB/record", "zarr rec/s", "wds rec/s", "before: MB, zarr / wds rec/s", "step off/on",
            *[f"cos {m}" for m in LOSS_NAMES], *[f"err {m}" for m in LOSS_NAMES]]
    rows = []
    for name, row in r["teachers"].items():
        t = row["teacher"]
        if "grad_cosine" not in row:
            rows.append([name, t.get("skipped", "?"), *[None] * (len(head) - 2)])
            continue
        rps = row["loader_records_per_s_per_worker"]
        rows.append([f"{name} ({t['backbone']}, FPN {t['fpn_channels']}, {t['num_classes']} cl)", t["trained"],
                     row["bytes_per_record"] / 1e6, rps["zarr"], rps["wds"], _before(row.get("loader_records_per_s_per_worker_before")),
                     row.get("step_time_offline_over_online"),
                     *[row["grad_cosine"].get(m) for m in LOSS_NAMES], *[row["loss_rel_err"].get(m) for m in LOSS_NAMES]])
    codecs = ", ".join(f"{k} `{v}`" for k, v in r["codecs"].items())
    method_rows = [[name, *[_zarr_wds(row.get("loader_records_per_s_per_worker_by_method", {}).get(m))
                            for m in LOSS_NAMES]]
                   for name, row in r["teachers"].items() if "grad_cosine" in row]
    by_method = ("\n\nLoader rec/s per worker (zarr / wds) reading what a run of each method reads:\n\n"
                 + md_table(["teacher", *LOSS_NAMES], method_rows)) if method_rows else ""
    ratios = [f"{name}: zarr {q['zarr']:.2f}x, wds {q['wds']:.2f}x" for name, row in r["teachers"].items()
              if (q := row.get("loader_over_synthetic_row")) and q.get("zarr") and q.get("wds")]
    by_method += ("\n\nLoader rec/s on the real photos over the same teacher's synthetic row, measured in the same "
                  "run: " + "; ".join(ratios) + ".") if ratios else ""
    floors = [f"{name}: {', '.join(f'{k} {v}' for k, v in row['class_floors'].items())}"
              for name, row in r["teachers"].items() if row.get("class_floors")]
    by_method += ("\n\nFitted class floors (topkKfFpP sets, on the row's basis images): " + "; ".join(floors) + ".") if floors else ""
    return (md_table(head, rows) + by_method + f"\n\nView {r['view'][0]}x{r['view'][1]}; default codecs: {codecs}. cos = min over "
            "images of the cosine between the KD loss's gradient w.r.t. the student's outputs with cached vs live "
            "targets; err = max relative KD-loss error. before: the same records with a per-record FPN basis "
            f"(`{BEFORE_SET}` in realscale.json's codec_sets), read back just after the default's. Goals: <= 1.5 MB/record, >= 300 rec/s per worker, "
            "cos >= 0.99, err <= 1 %. Per-target cosine / max error and bytes per target: realscale.json.")


def _before(b: dict | None) -> str | None:
    return None if not b or b.get("zarr") is None else f"{b['bytes_per_record'] / 1e6:.3f}, {b['zarr']:.0f} / {b['wds']:.0f}"


def _zarr_wds(rates: dict | None) -> str | None:
    if not rates or rates.get("zarr") is None:
        return None
    return f"{rates['zarr']:.0f} / {rates['wds']:.0f}"
