"""Inspect a teacher cache: what is in it, is it intact, how exact is it.

Without options: a summary (records, views, targets, bytes per image per target, compression
ratio against float32, codecs). --verify checks every planned block is complete, checksums
match and every record decodes; it exits non-zero naming the first bad image/block/file.
--fidelity N re-runs the live teacher (teacher.checkpoint) on N cached records and reports per
target cosine, max abs error and the relative KD-loss error. --show IMAGE_ID writes a PNG with
the image, the teacher's boxes and a heat-map of each FPN level.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.params import make_parser, params_from_args


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("inspect_cache", __doc__)
    parser.add_argument("store", nargs="?", help="cache folder (default: cache.path)")
    parser.add_argument("--format", choices=["zarr", "wds"], default="zarr", help="which store to read (default zarr)")
    parser.add_argument("--verify", action="store_true", help="check completeness, checksums, decodability")
    parser.add_argument("--fidelity", type=int, metavar="N", help="compare N records with the live teacher")
    parser.add_argument("--show", type=int, metavar="IMAGE_ID", help="write a PNG of one cached image")
    parser.add_argument("--out", help="PNG path for --show / JSON path for the report (default: print)")
    args = parser.parse_args(argv)
    params = params_from_args(args)
    root = Path(args.store or params.cache.path)

    from stores.verify import store_summary, verify_store

    from stages.caching import open_reader

    try:
        reader = open_reader(root, args.format)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    report: dict = {"summary": store_summary(root)}
    if args.verify:
        result = verify_store(root, progress=True)
        report["verify"] = {"ok": result.ok, "records": result.n_records, "errors": result.errors[:50],
                            "missing_blocks": sorted(result.missing_blocks)}
    if args.fidelity:
        from stages.detectors.build import load_detector

        from stages.data.coco import CocoDataset
        from stages.fidelity import measure_fidelity
        from stages.training import resolve_device

        device = resolve_device(params.cache.device)
        teacher = load_detector(params.teacher.checkpoint).to(device).eval()
        dataset = CocoDataset(params.data.train_images, params.data.train_ann)
        report["fidelity"] = measure_fidelity(reader, teacher, dataset, args.fidelity, device)
    if args.show is not None:
        from stages.cache_show import show_record
        from stages.data.coco import CocoDataset

        dataset = CocoDataset(params.data.train_images, params.data.train_ann)
        png = Path(args.out if args.out and args.out.endswith(".png") else f"cache_{args.show}.png")
        report["show"] = str(show_record(reader, dataset, args.show, png))
    text = json.dumps(report, indent=2, default=str)
    if args.out and not args.out.endswith(".png"):
        Path(args.out).write_text(text + "\n")
    print(text)
    if args.verify and not report["verify"]["ok"]:
        first = report["verify"]["errors"][0] if report["verify"]["errors"] else "incomplete blocks"
        print(f"error: cache {root} failed verification: {first}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
