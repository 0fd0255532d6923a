"""Stage 1's encoding cost per record: the default codecs against a per-record FPN basis
(`bench.realscale.BEFORE_SET`: pca64s0.25+pco FPN, topk24f0.01 class maps, int8c boxes, all under pcodec / zstd).

    python -m bench.realscale --teachers coco-synth20 --workdir W ...   # keeps W/realscale-store-coco-synth20
    python -m bench.encode_cost W/realscale-store-coco-synth20 [--rounds 3]

Reads each record of a realscale store back to float32 maps (the reference decode, with the store's
PCA basis), then encodes it with `stores.encode_record` under each codec set, alternating the sets
round by round, on one thread (a stage-1 encoder thread's view of the work). The maps are the
stored ones, not the teacher's live maps: their statistics are the teacher's up to the codecs' error,
which is what LZ4HC / zstd / pcodec time depends on. Writes bench/results/encode_cost.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch

from bench.common import RESULTS_DIR, dump_json, interleaved, machine_info
from bench.realscale import BEFORE_SET, CODEC_SETS
from stores import encode_record, open_reader


def measure(root: Path, rounds: int) -> dict:
    reader = open_reader(root, "zarr")
    bases = reader.codec_bases()
    basis_maps = bases.by_name if bases is not None else {}
    records = []
    for image_id, view in reader.keys():
        rec = reader.get(image_id, view)
        records.append((image_id, view, rec.meta, rec.arrays))
    # classes per anchor, as stage 1 groups the class maps: the stored topk blobs record it
    first = reader.get(*records[0][:2], targets=["cls"], compact=True).arrays
    stored = next((c.parts["classes"] for c in first.values() if "classes" in c.parts), None)
    num_classes = int(np.asarray(stored)[0]) if stored is not None else None
    sets = {"default": CODEC_SETS["default"], BEFORE_SET: CODEC_SETS[BEFORE_SET]}
    sizes = {name: 0 for name in sets}

    def side(name):
        def run():
            total = 0
            for image_id, view, meta, arrays in records:
                rec = encode_record(image_id, view, meta, arrays, sets[name], num_classes=num_classes, bases=basis_maps)
                total += sum(len(b) for b in rec.blobs.values())
            sizes[name] = total / len(records)
        return run

    timing = interleaved({name: side(name) for name in sets}, rounds)
    return {
        "store": str(root),
        "records": len(records),
        "codecs": sets,
        "encode_s_per_record": {name: s / len(records) for name, s in timing["median_s"].items()},
        "bytes_per_record": sizes,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path, help="a store written by bench.realscale (its --workdir keeps it)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per codec set (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default bench/results)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    t0 = time.perf_counter()
    results = measure(args.store, args.rounds)
    out = {"benchmark": "encode_cost", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "python -m bench.encode_cost " + " ".join(argv), "machine": machine_info("cpu"),
           "wall_s": time.perf_counter() - t0, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "encode_cost.json"
    path.write_text(dump_json(out, indent=1))
    print(dump_json(results["encode_s_per_record"]), dump_json(results["bytes_per_record"]))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
