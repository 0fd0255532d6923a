"""Stage 1, before the workers start: fit the cache's PCA bases for cpca feature chains, once.

A ``cpcaKsS`` chain (`stores.cache_basis`) codes every record's feature maps against one basis per
level, fitted here from a sample of the plan's records (``cache.basis_images``, spread evenly over
the plan), with the same teacher, views and device autocast as the workers. The bases go to
``static/codec_basis.npz``, their sha256 into the manifest's ``statics``; a resumed run reuses them
(a refit would differ in the last bits and orphan the blocks already written).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.cache.targets import extract_records
from stages.data.batching import ViewDataset, collate
from stages.data.coco import CocoDataset
from stages.data.views import View
from stages.training import resolve_device
from stores.base import target_family
from stores.cache_basis import BASIS_STATIC, BasisFit
from stores.chains import parse_chain
from stores.manifest import MANIFEST_NAME, Manifest, sha256_file

CPCA_FAMILIES = ("fpn",)  # feature maps [C, H, W] whose channels a basis can explain


def cpca_families(codecs: Mapping[str, str]) -> dict[str, int]:
    """{family: K} of the families whose chain is cpcaKsS."""
    out = {}
    for family, spec in codecs.items():
        chain = parse_chain(spec)
        if chain.transform == "cpca":
            out[family] = int(chain.param[0])
    return out


def sample_records(manifest: Manifest, n: int) -> list[tuple[int, str]]:
    """n (image_id, view) records spread evenly over the plan (dropped images skipped)."""
    dropped = set(manifest.dropped)
    live = [k for k in manifest.plan if k[0] not in dropped]
    if n <= 0 or not live:
        return []
    picks = np.unique(np.linspace(0, len(live) - 1, num=min(n, len(live))).round().astype(int))
    return [tuple(live[i]) for i in picks]


def fit_bases(teacher, batches, families: Mapping[str, int], num_classes: int, device: torch.device,
              progress: bool = False, total: int | None = None) -> dict[str, np.ndarray]:
    """{target name: float16 [C, K]} from the teacher's maps of `families` over `batches`
    (collated dicts with "images", "image_sizes", "targets")."""
    fit = BasisFit()
    targets = sorted(families)  # family names are extract_records' target names (fpn)
    for batch in tqdm(batches, desc="cache: fitting the PCA basis", unit="batch", total=total, disable=not progress):
        images = batch["images"].to(device)
        gt = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = teacher(images, batch["image_sizes"], with_detections=False)
            for rec in extract_records(out, targets, gt, None, num_classes):
                for name, t in rec.items():
                    if target_family(name) in families:
                        fit.add(name, t.float())
    out = {}
    for family, k in families.items():
        out.update({n: b for n, b in fit.bases(k).items() if target_family(n) == family})
    return out


def ensure_bases(root: Path, manifest: Manifest, codecs: Mapping[str, str], teacher, dataset: CocoDataset,
                 n_images: int, device_spec: str, writer) -> Manifest:
    """The cache's bases: kept when recorded and intact, fitted and recorded otherwise. A recorded
    basis that is missing or damaged while blocks coded against it exist is an error, not a refit."""
    families = cpca_families(codecs)
    if not families:
        return manifest
    path = root / "static" / f"{BASIS_STATIC}.npz"
    want = manifest.statics.get(BASIS_STATIC)
    if want and path.exists() and sha256_file(path) == want:
        return manifest
    if want and writer.completed_blocks():
        raise ValueError(f"{path} is {'damaged' if path.exists() else 'missing'}, and the cache's cpca feature maps "
                         f"were coded against it: rebuild the cache with python -m pipeline.cache_teacher --overwrite")
    picks = sample_records(manifest, n_images)
    if not picks:
        raise ValueError(f"cache.basis_images is {n_images}: the cpca chains {sorted(families)} need at least one "
                         "image to fit their basis (set cache.basis_images >= 1, e.g. 16)")
    views = {View.from_dict(v).key: View.from_dict(v) for v in manifest.fingerprint["views"]}
    items = ViewDataset.from_pairs(dataset, [(image_id, views[key]) for image_id, key in picks])
    device = resolve_device(device_spec)
    was_training = teacher.training
    teacher.to(device).eval()
    batches = (collate([items[i]]) for i in range(len(items)))  # one image each: no padding in the fit
    try:
        bases = fit_bases(teacher, batches, families, teacher.num_classes, device, progress=True, total=len(items))
    finally:  # the driver's teacher goes back to the host: the workers need the GPU, the head static is read on it
        teacher.to("cpu").train(was_training)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    writer.write_static(BASIS_STATIC, bases)
    manifest = replace(manifest, statics={**manifest.statics, BASIS_STATIC: sha256_file(path)})
    manifest.save(root / MANIFEST_NAME)
    return manifest
