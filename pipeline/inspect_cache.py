"""Inspect a teacher cache: what is in it, is it intact, how exact is it.

Without options: a summary (records, views, targets, bytes per image per target, compression
ratio against float32, codecs). --verify checks every planned block is complete, checksums
match, every record decodes, every store / marker / sidecar was written for this manifest (a zarr/
or wds/ copied from another teacher's cache fails) and the zarr index agrees with the plan; it
exits non-zero naming the first bad image/block/file. A damaged store or an unreadable manifest is
repaired by `python -m pipeline.cache_teacher --repair` (this command only reads).
--fidelity N re-runs the live teacher (teacher.checkpoint, which must be the cache's teacher) on
N cached records and reports per target cosine, max abs error and the relative KD-loss error, and
(`fidelity_gradients`) per KD method the cosine between its gradient w.r.t. a student's outputs with
cached vs live targets and its relative loss error (--student CKPT: a trained student; default untrained).
--show IMAGE_ID writes a PNG with the image, the teacher's boxes and a heat-map of each FPN level.
Exit status: 0 when everything asked for succeeded, 1 otherwise (the last stderr line says why).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.params import make_parser, params_from_args, positive_int

SUMMARY_RECORDS = 256  # bytes per target are averaged over the first records (reading all is verify's job)


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("inspect_cache", __doc__)
    parser.add_argument("store", nargs="?", help="cache folder (default: cache.path)")
    parser.add_argument("--format", choices=["zarr", "wds"], default=None,
                        help="which store to read (default: zarr if present, else wds)")
    parser.add_argument("--verify", action="store_true", help="check completeness, checksums, decodability")
    parser.add_argument("--fidelity", type=positive_int, metavar="N", help="compare N records with the live teacher")
    parser.add_argument("--student", metavar="CKPT",
                        help="--fidelity: the student whose KD-loss gradients are compared (default: a seeded, "
                             "untrained student.model)")
    parser.add_argument("--show", type=int, metavar="IMAGE_ID", help="write a PNG of one cached image")
    parser.add_argument("--out", help="PNG path for --show / JSON path for the report (default: print)")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    from stores.url import as_path

    root = as_path(args.store or params.cache.path)  # a local folder or a URL (s3://...)

    from stages.cache.plan import open_reader
    from stores.base import StoreError
    from stores.verify import store_summary, verify_store

    fmt = args.format or ("zarr" if (root / "zarr").exists() or not (root / "wds").exists() else "wds")
    try:
        reader = open_reader(root, fmt)
    except (FileNotFoundError, ValueError, StoreError) as err:
        raise SystemExit(f"error: {err}") from None
    report: dict = {}
    failure = ""
    try:
        report["summary"] = store_summary(root, fmt=fmt, max_records=SUMMARY_RECORDS)
    except (StoreError, ValueError, OSError) as err:  # a damaged store: --verify says where
        report["summary"] = {"error": str(err)}
        failure = f"cannot summarise {root}: {err}"
    if args.verify:
        result = verify_store(root, progress=sys.stderr.isatty())  # bars only for a person watching
        report["verify"] = {"ok": result.ok, "records": result.n_records, "errors": result.errors[:50],
                            "missing_blocks": sorted(result.missing_blocks), "warnings": result.warnings[:20]}
        if not result.ok:
            first = result.errors[0] if result.errors else "incomplete blocks"
            failure = f"cache {root} failed verification ({len(result.errors)} errors), first: {first}"
    try:
        if args.fidelity:
            report["fidelity"], report["fidelity_gradients"] = _fidelity(reader, params, args.fidelity, args.student)
        if args.show is not None:
            from stages.cache.show import show_record
            from stages.data.coco import CocoDataset

            dataset = CocoDataset.from_params(params.data, "train")
            png = Path(args.out if args.out and args.out.endswith(".png") else f"cache_{args.show}.png")
            report["show"] = str(show_record(reader, dataset, args.show, png))
    except (KeyError, ValueError, OSError, StoreError) as err:
        text = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise SystemExit(f"error: {text}") from None
    text = json.dumps(report, indent=2, default=str)
    if args.out and not args.out.endswith(".png"):
        Path(args.out).write_text(text + "\n")
    print(text)
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(1)


def _fidelity(reader, params, n: int, student_ckpt: str | None = None) -> tuple[dict, dict]:
    """measure_fidelity against teacher.checkpoint, refusing a teacher or dataset other than the cache's,
    and the KD-loss gradient fidelity of every method the cache's targets allow (`_gradients`)."""
    from stages.cache.fingerprint import check_blocks_current, dataset_identity
    from stages.cache.plan import resolve_train_teacher
    from stages.data.coco import CocoDataset
    from stages.fidelity import measure_fidelity
    from stages.training import resolve_device

    fp = reader.manifest.fingerprint
    ckpt = params.teacher.checkpoint
    dataset = CocoDataset.from_params(params.data, "train")
    resolved = resolve_train_teacher(params, dataset)  # the checkpoint is read here, once
    if resolved.sha256 != fp.get("teacher_weights"):
        raise ValueError(f"teacher.checkpoint {ckpt} is not the teacher cache {reader.root} was built from "
                         "(weights differ): point teacher.checkpoint at that teacher to measure fidelity")
    if dataset_identity(dataset) != fp.get("dataset"):
        raise ValueError(f"data.train_* ({dataset.ann_file}) is not the dataset cache {reader.root} was built from: "
                         "point data.train_images / train_ann at it to measure fidelity")
    check_blocks_current(reader.manifest, dataset, reader.root)  # same image content, block by block
    device = resolve_device(params.cache.device, "cache.device")
    teacher = resolved.build().to(device).eval()  # mapped onto the dataset the cache was built from (checked above)
    return measure_fidelity(reader, teacher, dataset, n, device), _gradients(reader, params, teacher, dataset, n,
                                                                             device, student_ckpt)


def _gradients(reader, params, teacher, dataset, n: int, device, student_ckpt: str | None) -> dict:
    """Per method: min gradient cosine / max relative KD-loss error, cached vs live (stages.fidelity),
    for the methods whose teacher fields the cache holds; the others are listed as skipped."""
    import torch

    from stages.config import ConfigError
    from stages.detectors.build import build_detector, load_detector
    from stages.distill.run import detector_arch, loss_context, run_from_index
    from stages.fidelity import cached_gradient_fidelity
    from stages.losses.registry import LOSS_NAMES, build_kd_losses

    torch.manual_seed(params.train.seed)
    if student_ckpt:
        student = load_detector(student_ckpt)
    else:
        student = build_detector(params.student.model, teacher.num_classes)
    student = student.to(device).train()
    ctx = loss_context(student, detector_arch(teacher), teacher.num_classes, teacher.box_dim, teacher.has_quality)
    cached = set(reader.manifest.fingerprint["targets"])
    kd, skipped = {}, {}
    for method in LOSS_NAMES:
        try:
            loss = build_kd_losses({method: 1.0}, ctx, params.distill).to(device)
        except ConfigError as err:
            skipped[method] = str(err)
            continue
        missing = sorted(loss.needs() - cached)
        if missing:
            skipped[method] = f"the cache has no {', '.join(missing)}"
        else:
            kd[method] = loss
    index = run_from_index(params.distill, teacher.arch, teacher.head_convs)
    res = cached_gradient_fidelity(reader, teacher, student, kd, dataset, n, device, index) if kd else {}
    out = {k: res[k] for k in ("grad_cosine", "loss_rel_err", "targets", "teacher_cls") if k in res}
    out["student"] = student_ckpt or f"untrained {params.student.model.backbone} (seed {params.train.seed})"
    out["skipped"] = skipped
    return out


if __name__ == "__main__":
    from pipeline.cli import run

    run(main, interrupted="the cache was only read, nothing changed")
