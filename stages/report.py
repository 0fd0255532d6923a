"""report.md + PNG plots from a finished DAG: AP table, training curves, cache size and fidelity."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stages.report_speed import speed_section  # noqa: E402

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# the cache's per-method fidelity goals (DESIGN.md, bench.realscale GOALS) and, for a method that misses
# them, the mechanism that makes it the most sensitive to the cached maps' quantisation
GRAD_COSINE_GOAL, LOSS_ERR_GOAL = 0.99, 0.01
MISS_REASONS = {
    "ssim": "SSIM compares local means and variances of min-max rescaled FPN maps; where a map is flat its "
            "variance is of the order of the FPN quantiser's noise (cpca step 0.25 x rms), so that noise moves "
            "the gradient more than it moves an MSE's",
    "pfi": "PFI multiplies two cached targets, the FPN error and the class-probability difference (top-k class "
           "maps below the floor decode to the rank-one background), so their relative errors add up",
}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _read_log(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _ap(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"  # n/a: no val object of that size


def _mean_step_time(rows: list[dict[str, float]]) -> float:
    times = [r["sec_per_step"] for r in rows[1:] if "sec_per_step" in r]  # first window holds warm-up
    return sum(times) / len(times) if times else float("nan")


def build_report(
    teacher_metrics: Path, students_dir: Path, experiments: dict, cache_report: Path, out_md: Path, plots_dir: Path,
    speed: list[dict] | None = None, export: dict | None = None,
) -> str:
    """`speed`: `report_speed.speed_accuracy` tables, one per device (teacher and students timed side by side);
    `export`: {'experiment', 'path', 'source_sha256', 'opset'} of the exported best student."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    teacher = _read_json(teacher_metrics)
    rows, logs = [], {}
    for name, spec in experiments.items():
        metrics = _read_json(students_dir / name / "metrics.json")
        logs[name] = _read_log(students_dir / name / "train_log.csv")
        losses = spec.get("losses") or {}
        rows.append((name, spec.get("teacher", "offline"), losses, metrics, _mean_step_time(logs[name])))
    baseline = next((m for n, _, losses, m, _ in rows if not losses and m), {})

    lines = ["# kdcache demo report", ""]
    lines += ["## Detection AP on the synthetic val set (pycocotools, percent)", ""]
    lines += ["| model | teacher | KD losses | " + " | ".join(AP_KEYS) + " | ΔAP vs baseline | s/step |",
              "|---|---|---|" + "---|" * len(AP_KEYS) + "---|---|"]
    if teacher:
        lines.append("| **teacher** | – | – | " + " | ".join(_ap(teacher[k]) for k in AP_KEYS) + " | | |")
    for name, mode, losses, m, step in rows:
        if not m:
            lines.append(f"| {name} | {mode} | (not run) |" + " |" * (len(AP_KEYS) + 2))
            continue
        delta = f"{m['AP'] - baseline['AP']:+.2f}" if baseline and losses else ""
        loss_text = ", ".join(f"{k} {v:g}" for k, v in losses.items()) or "none (baseline)"
        lines.append(f"| {name} | {mode} | {loss_text} | " + " | ".join(_ap(m[k]) for k in AP_KEYS)
                     + f" | {delta} | {step:.3f} |")
    lines.append("")
    pairs = _online_offline_pairs(rows)
    if pairs:
        lines += ["## Online vs offline (same losses)", ""]
        for off, on in pairs:
            lines.append(f"- {off[0]} (cached teacher) AP {off[3]['AP']:.2f}, {off[4]:.3f} s/step; "
                         f"{on[0]} (live teacher) AP {on[3]['AP']:.2f}, {on[4]:.3f} s/step; "
                         f"online/offline step time = {on[4] / off[4]:.2f}x")
        lines.append("")

    _plot_ap(rows, teacher, plots_dir / "ap.png")
    _plot_curves(logs, plots_dir / "training_curves.png")
    lines += ["![AP per student](report/ap.png)", "", "![training curves](report/training_curves.png)", ""]

    losses = {name: spec.get("losses") or {} for name, spec in experiments.items()}
    for i, table in enumerate(speed or []):  # CPU, then CUDA when the report ran on a GPU machine
        png = plots_dir / f"speed_accuracy_{table['device']}.png"
        lines += speed_section(table, losses, export if i == 0 else None, png)

    cache = _read_json(cache_report)
    if cache:
        lines += _cache_section(cache, plots_dir / "cache_bytes.png")
    text = "\n".join(lines) + "\n"
    out_md.write_text(text)
    return text


def _online_offline_pairs(rows):
    pairs = []
    for on in rows:
        if on[1] != "online" or not on[3]:
            continue
        for off in rows:
            if off[1] == "offline" and off[2] == on[2] and off[3]:
                pairs.append((off, on))
                break
    return pairs


def _cache_section(cache: dict, png: Path) -> list[str]:
    summary = cache.get("summary", {})
    lines = ["## Teacher cache", ""]
    families = summary.get("families", {})
    if families:
        lines += ["| target | codec | bytes / image | float32 bytes / image | ratio |", "|---|---|---|---|---|"]
        codecs = summary.get("codecs", {})
        for family, f in families.items():
            lines.append(f"| {family} | {codecs.get(family, 'raw+zstd')} | {f['stored_bytes_per_record']:,.0f} | "
                         f"{f['raw_float32_bytes_per_record']:,.0f} | {f['compression_ratio']:.1f}x |")
        lines.append("")
        fig, ax = plt.subplots(figsize=(6, 3))
        names = list(families)
        ax.bar(names, [families[n]["stored_bytes_per_record"] / 1024 for n in names])
        ax.set_ylabel("KiB / record")
        ax.set_title("cache size per target (one image under one view)")
        fig.tight_layout()
        fig.savefig(png, dpi=80)
        plt.close(fig)
        lines += [f"![cache bytes](report/{png.name})", ""]
    if "records" in summary:
        lines.append(f"- {summary['records']} records ({summary.get('images', '?')} images x views), "
                     f"{summary.get('stored_bytes_per_record', 0) / 1024:.1f} KiB per record, "
                     f"{summary.get('compression_ratio', 0):.1f}x smaller than float32; on disk: {summary.get('disk_bytes')}")
    fidelity = cache.get("fidelity", {})
    if fidelity:
        lines += ["", "Fidelity against the live teacher (inspect_cache --fidelity): per target, the cached map's "
                  "cosine and max error, and the relative error of a plain KD loss for a proxy student 10 % of the "
                  "teacher's spread away (a nearly converged student: the strictest reading):", "",
                  "| target | cosine | max abs error | relative KD-loss error (proxy) |", "|---|---|---|---|"]
        for target, f in fidelity.items():
            lines.append(f"| {target} | {f['cosine']:.5f} | {f['max_abs_error']:.4g} | {f['rel_kd_loss_error']:.2e} |")
    grads = cache.get("fidelity_gradients", {})
    if grads.get("grad_cosine"):
        lines += ["", f"Per method, the real loss modules on cached vs live targets ({grads.get('student', 'a student')}): "
                  "cosine of the KD loss's gradients w.r.t. the student's outputs (min over images) and relative "
                  f"KD-loss error (max); goals: cosine >= {GRAD_COSINE_GOAL}, error <= {LOSS_ERR_GOAL:.0%}:", "",
                  "| method | gradient cosine | relative loss error | goals |", "|---|---|---|---|"]
        misses = []
        for method, cos in grads["grad_cosine"].items():
            err = grads.get("loss_rel_err", {}).get(method, float("nan"))
            missed = [f"cosine {cos:.3f} < {GRAD_COSINE_GOAL}"] * (cos < GRAD_COSINE_GOAL)
            missed += [f"error {err:.2%} > {LOSS_ERR_GOAL:.0%}"] * (err > LOSS_ERR_GOAL)
            lines.append(f"| {method} | {cos:.5f} | {err:.2e} | {'MISSED' if missed else 'met'} |")
            if missed:
                misses.append(f"- **{method} misses the goal** ({', '.join(missed)}): "
                              f"{MISS_REASONS.get(method, 'its cached targets are lossy (see the per-target table)')}.")
        lines += ["", *misses] if misses else []
    lines.append("")
    return lines


def _plot_ap(rows, teacher, png: Path) -> None:
    names = [r[0] for r in rows if r[3]]
    aps = [r[3]["AP"] for r in rows if r[3]]
    if teacher:
        names, aps = ["teacher", *names], [teacher["AP"], *aps]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names)), 3.5))
    ax.bar(names, aps, color=["tab:gray" if n in ("teacher", "baseline") else "tab:blue" for n in names])
    ax.set_ylabel("val AP (%)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def _plot_curves(logs: dict[str, list[dict[str, float]]], png: Path) -> None:
    """Two panels: the GT detection loss (comparable across students) and the KD terms' sum."""
    fig, (det_ax, kd_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    for i, (name, rows) in enumerate(logs.items()):
        if not rows:
            continue
        color = f"C{i % 10}"  # the same colour for a student in both panels
        steps = [r["step"] for r in rows]
        det = [sum(v for k, v in r.items() if k not in _LOG_META and "/" not in k) for r in rows]
        kd = [sum(v for k, v in r.items() if "/" in k) for r in rows]
        det_ax.plot(steps, det, label=name, color=color)
        if any(kd):
            kd_ax.plot(steps, kd, label=name, color=color)
    det_ax.set(xlabel="step", ylabel="GT detection loss", title="detection loss")
    kd_ax.set(xlabel="step", ylabel="sum of KD terms (weighted)", title="distillation loss", yscale="log")
    det_ax.legend(fontsize=7)
    kd_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


_LOG_META = ("step", "lr", "sec_per_step", "loss")
