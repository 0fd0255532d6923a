"""Stage 1, before the workers start: fit what the cache's codecs take from the cache itself, once.

A ``cpcaKsS`` chain (`stores.cache_basis`) codes every record's feature maps against one basis per
level, fitted here from a sample of the plan's records (``cache.basis_images``, spread evenly over
the plan), with the same teacher, views and device autocast as the workers. The bases go to
``static/codec_basis.npz``, their sha256 into the manifest's ``statics``; a resumed run reuses them
(a refit would differ in the last bits and orphan the blocks already written). A ``topkKfFpP`` class
chain's floor is fitted the same way, over the same sample (`stores.cache_basis.ClassFloorFit`), into
``static/class_floor.npz``.
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
from stores.base import read_static, target_family
from stores.cache_basis import BASIS_STATIC, CLASS_FLOOR_STATIC, BasisFit, ClassFloorFit, class_floor_chains
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


def teacher_maps(teacher, batches, families, num_classes: int, device: torch.device, desc: str,
                 progress: bool = False, total: int | None = None):
    """(target name, map) of `families` (extract_records' target names: fpn, cls) for each image of
    `batches` (collated dicts with "images", "image_sizes", "targets"), as the workers see them."""
    targets = sorted(families)
    for batch in tqdm(batches, desc=desc, unit="batch", total=total, disable=not progress):
        images = batch["images"].to(device)
        gt = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = teacher(images, batch["image_sizes"], with_detections=False)
            for rec in extract_records(out, targets, gt, None, num_classes):
                for name, t in rec.items():
                    if target_family(name) in families:
                        yield name, t.float()


def fit_bases(teacher, batches, families: Mapping[str, int], num_classes: int, device: torch.device,
              progress: bool = False, total: int | None = None) -> dict[str, np.ndarray]:
    """{target name: float16 [C, K]} from the teacher's maps of `families` over `batches`."""
    fit = BasisFit()
    for name, t in teacher_maps(teacher, batches, families, num_classes, device, "cache: fitting the PCA basis",
                                progress, total):
        fit.add(name, t)
    out = {}
    for family, k in families.items():
        out.update({n: b for n, b in fit.bases(k).items() if target_family(n) == family})
    return out


def fit_class_floors(teacher, batches, chains: Mapping, num_classes: int, device: torch.device,
                     progress: bool = False, total: int | None = None) -> dict[str, float]:
    """{family: floor} of the topkKfFpP `chains` ({family: CodecChain}) over `batches`."""
    fits = {family: ClassFloorFit(chain.param[1]) for family, chain in chains.items()}
    for name, t in teacher_maps(teacher, batches, fits, num_classes, device, "cache: fitting the class floor",
                                progress, total):
        fits[target_family(name)].add(t)
    return {family: fits[family].floor(chain.param[2]) for family, chain in chains.items()}


def ensure_bases(root: Path, manifest: Manifest, codecs: Mapping[str, str], teacher, dataset: CocoDataset,
                 n_images: int, device_spec: str, writer) -> Manifest:
    """The cache's fitted statics (cpca bases, topkKfFpP class floors): kept when recorded and intact,
    fitted and recorded otherwise. A recorded one that is missing or damaged while blocks coded
    against it exist is an error, not a refit."""
    families, floors = cpca_families(codecs), class_floor_chains(codecs)
    todo = [name for name, need in ((BASIS_STATIC, families), (CLASS_FLOOR_STATIC, floors))
            if need and not _recorded(root, manifest, name, writer)]
    if not todo:
        return manifest
    picks = sample_records(manifest, n_images)
    if not picks:
        raise ValueError(f"cache.basis_images is {n_images}: the chains {sorted(families) + sorted(floors)} fit "
                         "their basis / class floor on the cache's images: set cache.basis_images >= 1, e.g. 16")
    views = {View.from_dict(v).key: View.from_dict(v) for v in manifest.fingerprint["views"]}
    items = ViewDataset.from_pairs(dataset, [(image_id, views[key]) for image_id, key in picks])
    device = resolve_device(device_spec)
    was_training = teacher.training
    teacher.to(device).eval()
    fitted = {}
    try:
        for name in todo:
            batches = (collate([items[i]]) for i in range(len(items)))  # one image each: no padding in the fit
            if name == BASIS_STATIC:
                fitted[name] = fit_bases(teacher, batches, families, teacher.num_classes, device, progress=True,
                                         total=len(items))
            else:
                fitted[name] = {f: np.array([v]) for f, v in fit_class_floors(
                    teacher, batches, floors, teacher.num_classes, device, progress=True, total=len(items)).items()}
    finally:  # the driver's teacher goes back to the host: the workers need the GPU, the head static is read on it
        teacher.to("cpu").train(was_training)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name, arrays in fitted.items():
        writer.write_static(name, arrays)
        manifest = replace(manifest, statics={**manifest.statics, name: sha256_file(root / "static" / f"{name}.npz")})
    manifest.save(root / MANIFEST_NAME)
    return manifest


def _recorded(root: Path, manifest: Manifest, name: str, writer) -> bool:
    """Whether static `name` is recorded and intact; ValueError when it is recorded but missing or
    damaged and blocks coded against it exist (a refit would differ and orphan them)."""
    path = root / "static" / f"{name}.npz"
    want = manifest.statics.get(name)
    if want and path.exists() and sha256_file(path) == want:
        return True
    if want and writer.completed_blocks():
        what = "cpca feature maps" if name == BASIS_STATIC else "class maps"
        raise ValueError(f"{path} is {'damaged' if path.exists() else 'missing'}, and the cache's {what} "
                         f"were coded against it: rebuild the cache with python -m pipeline.cache_teacher --overwrite")
    return False


def load_class_floors(root: Path, manifest: Manifest) -> dict[str, float] | None:
    """{family: fitted floor} from static/class_floor.npz, if the manifest records one (sha256 checked)."""
    want = manifest.statics.get(CLASS_FLOOR_STATIC)
    if not want:
        return None
    path = Path(root) / "static" / f"{CLASS_FLOOR_STATIC}.npz"
    if not path.exists() or sha256_file(path) != want:
        raise ValueError(f"{path} is {'damaged' if path.exists() else 'missing'} (its manifest records another "
                         "sha256): rebuild the cache with python -m pipeline.cache_teacher --overwrite")
    return {family: float(v[0]) for family, v in read_static(Path(root), CLASS_FLOOR_STATIC).items()}
