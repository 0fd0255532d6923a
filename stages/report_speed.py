"""The report's speed/accuracy part: AP next to parameters, GFLOPs and latency, and its plot.

Input: `stages.export.speed.measure_side_by_side`'s result, the AP metrics of the teacher and of
each student, and the record of the ONNX export of the best student (if the DAG made one).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPEED_AP_KEYS = ("AP", "AP50", "APs", "APm", "APl")


def speed_accuracy(speed: dict, ap: dict[str, dict]) -> dict:
    """The dvc metrics file: per model the AP keys plus params, gflops, latency_ms, images_per_s."""
    models = {name: {k: (ap.get(name) or {}).get(k) for k in SPEED_AP_KEYS} | cost
              for name, cost in speed["models"].items()}
    return {"machine": speed["machine"], "device": speed["device"], "input": speed["input"], "models": models}


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def speed_section(table: dict, losses: dict[str, dict], export: dict | None, png: Path) -> list[str]:
    """Markdown lines: the table, the AP-vs-latency plot, and the exported file."""
    models = table["models"]
    teacher = models.get("teacher")
    inp = table["input"]
    lines = ["## Speed / accuracy", "",
             f"Measured side by side in one process on **{table['machine']}** ({table['device']}): eval mode, "
             f"detections included; latency = median of {inp['latency_runs']} batch-1 runs on a val image "
             f"({inp['batch1'][2]}x{inp['batch1'][3]} padded) after {inp['warmup']} warm-up runs; images/s from "
             f"the median of {inp['throughput_runs']} batch-{inp['batch8'][0]} runs; GFLOPs of one batch-1 forward "
             "(torch.utils.flop_counter).", "",
             "| model | KD losses | " + " | ".join(SPEED_AP_KEYS)
             + " | params (M) | GFLOPs | latency b1 (ms) | images/s b8 | latency / teacher's |",
             "|---|---|" + "---|" * len(SPEED_AP_KEYS) + "---|---|---|---|---|"]
    for name, m in models.items():
        kd = "–" if name == "teacher" else (", ".join(f"{k} {v:g}" for k, v in losses.get(name, {}).items())
                                            or "none (baseline)")
        ratio = f"{m['latency_ms'] / teacher['latency_ms']:.2f}x" if teacher else ""
        lines.append(f"| {'**teacher**' if name == 'teacher' else name} | {kd} | "
                     + " | ".join(_fmt(m.get(k), ".2f") for k in SPEED_AP_KEYS)
                     + f" | {m['params'] / 1e6:.2f} | {m['gflops']:.3f} | {m['latency_ms']:.2f} | "
                     f"{m['images_per_s']:.1f} | {ratio} |")
    lines.append("")
    _plot(models, losses, png)
    lines += [f"![AP against latency](report/{png.name})", ""]
    if export:
        lines += [f"Deployable model: the best student by val AP, **{export['experiment']}** (AP "
                  f"{_fmt(models.get(export['experiment'], {}).get('AP'), '.2f')}), exported to ONNX as "
                  f"`{export['path']}` (opset {export.get('opset', '?')}; source sha256 "
                  f"{export['source_sha256'][:12]}). Inputs, outputs and the other formats: docs/deploy.md.", ""]
    return lines


def _plot(models: dict, losses: dict[str, dict], png: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in models.items():
        if m.get("AP") is None:
            continue
        if name == "teacher":
            style = {"marker": "*", "s": 160, "color": "tab:gray", "label": "teacher"}
        elif not losses.get(name):
            style = {"marker": "s", "s": 60, "color": "black", "label": "baseline (no KD)"}
        else:
            style = {"marker": "o", "s": 50, "color": "tab:blue", "label": "distilled"}
        ax.scatter(m["latency_ms"], m["AP"], **style)
        ax.annotate(name, (m["latency_ms"], m["AP"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set(xlabel="latency per image, batch 1 (ms)", ylabel="val AP (%)", title="AP against latency")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
