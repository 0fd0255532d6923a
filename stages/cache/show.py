"""A picture of one cached record: the image with the teacher's boxes, and each FPN level's energy."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stages.data.coco import CocoDataset  # noqa: E402
from stages.data.views import View  # noqa: E402

SCORE_MIN = 0.3  # detections drawn: those above this score, else the FALLBACK_BOXES best
FALLBACK_BOXES = 5


def show_record(reader, dataset: CocoDataset, image_id: int, out_png: Path, view_key: str | None = None) -> Path:
    """Write `out_png`: the image under the cached view with the teacher's detections (view
    pixels, as cached) and the mean |activation| of each cached FPN level at its own extent."""
    keys = [k for k in reader.keys() if k[0] == image_id and (view_key is None or k[1] == view_key)]
    if not keys:
        raise KeyError(f"image {image_id} (view {view_key or 'any'}) is not in cache {reader.root}")
    image_id, view_key = keys[0]
    record = reader.get(image_id, view_key)
    arrays = record["arrays"]
    view = View.from_key(view_key)
    sample = dataset.load(image_id)
    image, _ = view.apply(sample.image, sample.boxes)
    levels = sorted(int(n.split(".")[1]) for n in arrays if n.startswith("fpn."))
    fig, axes = plt.subplots(1, 1 + len(levels), figsize=(4 * (1 + len(levels)), 4), squeeze=False)
    ax = axes[0, 0]
    ax.imshow(image)
    if "det.boxes" in arrays:
        names = {i: c["name"] for i, c in enumerate(dataset.categories)}
        scores = arrays["det.scores"]
        keep = np.flatnonzero(scores >= SCORE_MIN)
        if keep.size == 0:  # a weak (or untrained) teacher: show its best few rather than nothing
            keep = np.argsort(-scores, kind="stable")[:FALLBACK_BOXES]
        for i in keep:
            box, score, label = arrays["det.boxes"][i], scores[i], arrays["det.labels"][i]
            x1, y1, x2, y2 = box
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1.5))
            ax.text(x1, y1, f"{names.get(int(label), label)} {score:.2f}", color="lime", fontsize=7, va="bottom")
    ax.set_title(f"image {image_id} view {view_key}")
    ax.axis("off")
    for i, lv in enumerate(levels, start=1):
        energy = np.abs(arrays[f"fpn.{lv}"]).mean(axis=0)
        axes[0, i].imshow(energy, cmap="magma")
        axes[0, i].set_title(f"P{lv + 3} {energy.shape[0]}x{energy.shape[1]}")
        axes[0, i].axis("off")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
