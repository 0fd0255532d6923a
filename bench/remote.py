"""A cache in object storage against the same cache on local disk, side by side in one run.

The object store is moto's S3 server on 127.0.0.1, started here in a subprocess (its own process, so
serving requests does not share the reader's interpreter). It runs moto's WSGI app behind a small
counting layer that logs every request it answers (method, key, query, response bytes): the GET
requests and bytes per record below are what the server sent, not what a client believes it asked.

Loader, one process, one thread (a DataLoader worker's share), every record of one store read once
per pass, sides alternated round by round:

  zarr disk / zarr s3      `ZarrCacheReader.get(..., compact=True)` in a seeded random order (what
                           `CachedViewDataset` does): on S3 ranged GETs of the shard objects (the shard
                           index once per shard, then each record's chunk), a fresh reader per pass
  wds disk / wds s3        the shards streamed as `wds_batches` streams them (`shard_samples_of`,
                           `decode_sample`): on S3 one GET of each whole shard (`stores.url.open_shard`)
  wds s3 cold / warm       the same through `cache.local` (`stores.local_cache`): emptied before each
                           cold pass, filled by the pass before each warm one

The store: `bench.loader.synthetic_store` at 800x1344 with RetinaNet COCO shapes (FPN 256 channels,
80 classes) and the default codecs of `CacheParams`, written once on disk and copied object by
object to the bucket.

Stage 1 (`--stage1`): `bench.cache_throughput`'s sides at 800x1344 (the demo teacher, params.yaml's
R50 FPN-64, random weights: its speed is a trained one's): the teacher's forward alone, and the
caching loop writing a fresh store to disk and to the bucket.

Goals (loopback): wds s3 >= 0.8x disk, zarr s3 >= 0.5x disk, warm local cache >= 0.95x disk,
<= 2 GET requests per record for wds, <= 1 per target family for zarr.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Scale,
    interleaved,
    make_parser,
    paired_ratio,
    print_table,
    settings_from,
    setup_torch,
    workdir,
    write_result,
)

NAME = "remote"
BUCKET = "kdcache-bench"
RECORDS = 16
BLOCK = 8
SERVER = r'''
import sys, threading
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server
app, log, lock = DomainDispatcherApplication(create_backend_app), open(sys.argv[2], "a"), threading.Lock()
def counting(environ, start_response):
    sent = 0
    for chunk in app(environ, start_response):
        sent += len(chunk)
        yield chunk
    with lock:
        log.write(f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} {environ.get('QUERY_STRING', '')!r} {sent}\n")
        log.flush()
make_server("127.0.0.1", int(sys.argv[1]), counting, threaded=True).serve_forever()
'''


class CountingS3:
    """moto's server in a subprocess on a free loopback port, with the request log it writes."""

    def __init__(self, work: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = work / "s3-requests.log"
        self.log.write_text("")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(self.port), str(self.log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.05)
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"})

    def mark(self) -> int:
        time.sleep(0.05)  # the server logs after the last byte went out
        return self.log.stat().st_size

    def requests(self, since: int) -> list[tuple[str, str, str, int]]:
        with open(self.log) as f:
            f.seek(since)
            rows = [line.rsplit(" ", 1) for line in f.read().splitlines() if line]
        return [(*head.split(" ", 2), int(n)) for head, n in rows]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def upload(local: Path, url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    for p in sorted(local.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            fs.pipe_file(f"{url.removeprefix('s3://')}/{p.relative_to(local)}", p.read_bytes())


def loader_sides(disk: Path, url: str, scratch: Path) -> dict[str, Any]:
    """One callable per side; each reads every record once."""
    import shutil

    import webdataset as wds

    from stages.distill.loader import tune_malloc
    from stores import open_reader
    from stores.local_cache import install
    from stores.wds_store import decode_sample, shard_samples_of

    tune_malloc()
    keys = open_reader(disk, "zarr").keys()
    order = list(keys)
    random.Random(0).shuffle(order)

    def zarr_pass(root):
        def run():
            reader = open_reader(root, "zarr")  # a fresh reader: its shard index reads count too
            for image_id, view in order:
                reader.get(image_id, view, compact=True, defer_delta=True)
        return run

    def wds_pass(root, local: str = "", cold: bool = False):
        def run():
            if cold:
                shutil.rmtree(scratch, ignore_errors=True)
            install(str(root), local, 10.0)
            try:
                reader = open_reader(root, "wds")
                n = 0
                for sample in wds.DataPipeline(wds.SimpleShardList(reader.shard_paths()), shard_samples_of(None)):
                    decode_sample(sample, None, compact=True, defer_delta=True, bases=reader.codec_bases())
                    n += 1
            finally:
                install(str(root), "", 1.0)
            if n != len(keys):
                raise RuntimeError(f"streamed {n} of {len(keys)} records from {root}")
        return run

    def get_only():  # the server's ceiling: every shard object fetched whole, nothing decoded
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        for shard in open_reader(disk, "wds").shard_paths():
            fs.cat_file(f"{url}/wds/{Path(shard).name}")

    return {"records": len(keys), "sides": {
        "s3 GET only": get_only,
        "zarr disk": zarr_pass(disk), "zarr s3": zarr_pass(url),
        "wds disk": wds_pass(disk), "wds s3": wds_pass(url),
        "wds s3 cold": wds_pass(url, str(scratch), cold=True), "wds s3 warm": wds_pass(url, str(scratch)),
    }}


def measure_loader(disk: Path, url: str, work: Path, server: CountingS3, rounds: int) -> dict[str, Any]:
    built = loader_sides(disk, url, work / "local-cache")
    n = built["records"]
    traffic: dict[str, list[dict]] = {}

    def counted(name, fn):
        def run():
            start = server.mark()
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
            reqs = server.requests(start)
            obj_gets = [r for r in reqs if r[0] == "GET" and r[2] == "''"]
            traffic.setdefault(name, []).append({
                "get_object": len(obj_gets), "list": sum(r[0] == "GET" and r[2] != "''" for r in reqs),
                "head": sum(r[0] == "HEAD" for r in reqs), "bytes": sum(r[3] for r in obj_gets)})
            return elapsed
        return run

    sides = built["sides"]
    sides_timed = {name: counted(name, fn) for name, fn in sides.items()}
    # warm must follow a pass that filled the local cache: run cold right before warm in every round
    timing = interleaved(sides_timed, rounds)
    families = len(open_reader_families(disk))
    per_record = {name: {k: sum(t[k] for t in ts[1:] or ts) / len(ts[1:] or ts) / n for k in ts[0]}
                  for name, ts in traffic.items()}
    rps = {name: n / s for name, s in timing["median_s"].items()}
    ratios = {
        "s3_get_only_vs_wds_disk": 1 / paired_ratio(timing, "s3 GET only", "wds disk"),
        "wds_s3_vs_disk": 1 / paired_ratio(timing, "wds s3", "wds disk"),
        "zarr_s3_vs_disk": 1 / paired_ratio(timing, "zarr s3", "zarr disk"),
        "wds_s3_cold_vs_disk": 1 / paired_ratio(timing, "wds s3 cold", "wds disk"),
        "wds_s3_warm_vs_disk": 1 / paired_ratio(timing, "wds s3 warm", "wds disk"),
    }
    goals = {
        "wds_s3 >= 0.8x disk": ratios["wds_s3_vs_disk"] >= 0.8,
        "zarr_s3 >= 0.5x disk": ratios["zarr_s3_vs_disk"] >= 0.5,
        "warm local cache >= 0.95x disk": ratios["wds_s3_warm_vs_disk"] >= 0.95,
        "wds <= 2 GETs per record": per_record["wds s3"]["get_object"] <= 2,
        "zarr <= 1 GET per record and family": per_record["zarr s3"]["get_object"] <= families,
    }
    return {"records": n, "target_families": families, "records_per_s": rps, "ratios": ratios,
            "requests_per_record": per_record, "goals_met": goals, "timing": timing}


def open_reader_families(disk: Path) -> list[str]:
    from stores import open_reader

    return open_reader(disk, "zarr").families()


def measure_stage1(work: Path, url: str, rounds: int, images: int) -> dict[str, Any]:
    """Teacher forward alone vs the caching loop writing to disk and to the bucket, at 800x1344."""
    import torch

    from bench.cache_throughput import teacher_pass
    from bench.fixtures import fixture
    from stages.cache.plan import prepare_store
    from stages.cache.worker import cache_blocks
    from stages.config import ModelParams
    from stages.data.coco import CocoDataset
    from stages.detectors.build import load_detector
    from stores.url import as_path, remove_tree

    demo = ModelParams(arch="retinanet", backbone="resnet50", fpn_channels=64, head_convs=2, anchor_size=16)
    scale = Scale(name="remote", num_images=images, image_sides=(480, 640), view=(800, 1344), teacher=demo,
                  student=demo, batch_size=2, rounds=rounds, archs=("retinanet",), loader_workers=0)
    fix = fixture(work, scale, "retinanet", images, 2)
    device = torch.device("cpu")
    job, manifest = prepare_store(fix.params(work / "s1-plan", cache={"device": "cpu"}), overwrite=True)
    dataset = CocoDataset(fix.images_dir, fix.ann_file)
    teacher = load_detector(fix.checkpoint).to(device).eval()
    count = iter(range(1_000_000))

    def caching(base: str):
        def run():
            path = f"{base}-{next(count)}"
            fresh, m = prepare_store(fix.params(path, cache={"device": "cpu"}), overwrite=True)
            t0 = time.perf_counter()
            stats = list(cache_blocks(fresh, range(m.num_blocks())))
            elapsed = time.perf_counter() - t0
            remove_tree(as_path(path))
            if any(s["skipped"] for s in stats):
                raise RuntimeError(f"{path}: a block was skipped in a fresh store")
            return elapsed
        return run

    sides = {"teacher": lambda: teacher_pass(teacher, dataset, job, manifest, device, False),
             "caching disk": caching(str(work / "s1-disk")), "caching s3": caching(f"{url}-stage1")}
    timing = interleaved(sides, rounds)
    n = len(manifest.plan)
    return {"records": n, "image_hw": [800, 1344], "padded_size": list(fix.padded_size),
            "teacher": {"backbone": demo.backbone, "fpn_channels": demo.fpn_channels, "weights": "random"},
            "codecs": manifest.fingerprint["codecs"],
            "records_per_s": {k: n / s for k, s in timing["median_s"].items()},
            "ratio_caching_disk_vs_teacher": 1 / paired_ratio(timing, "caching disk", "teacher"),
            "ratio_caching_s3_vs_teacher": 1 / paired_ratio(timing, "caching s3", "teacher"),
            "ratio_caching_s3_vs_disk": 1 / paired_ratio(timing, "caching s3", "caching disk"),
            "timing": timing}


def main(argv: list[str] | None = None) -> dict:
    p = make_parser(NAME, __doc__)
    p.add_argument("--records", type=int, default=RECORDS, help=f"records of the loader store (default {RECORDS})")
    p.add_argument("--block", type=int, default=BLOCK, help=f"records per shard (default {BLOCK})")
    p.add_argument("--stage1", type=int, default=2, help="images for the stage-1 sides (x2 views; 0: skip)")
    args = p.parse_args(argv)
    settings = settings_from(args, argv)
    env = setup_torch(settings)
    t0 = time.perf_counter()
    with workdir(settings) as work:
        work = Path(work)
        server = CountingS3(work)
        try:
            import bench.loader
            from bench.loader import synthetic_store

            # shards of --block records (bench.loader's own store has 2; stage 1 writes cache.block_size,
            # 32 in params.yaml): per-shard requests (HEAD, sidecar) are spread over that many records
            bench.loader.BIG_BLOCK = args.block
            disk = synthetic_store(work / f"store-800x1344-b{args.block}", args.records)
            url = f"s3://{BUCKET}/store-800x1344-b{args.block}"
            upload(disk, url)
            results: dict[str, Any] = {"server": "moto (subprocess, 127.0.0.1), request log of its WSGI app",
                                       "loader": measure_loader(disk, url, work, server, settings.rounds)}
            if args.stage1:
                results["stage1"] = measure_stage1(work, f"s3://{BUCKET}/s1", settings.rounds, args.stage1)
        finally:
            server.stop()
    results["loadavg_after"] = os.getloadavg()
    loader = results["loader"]
    print_table("loader records/s per worker", ["side", "rec/s", "GETs/rec", "bytes/rec"],
                [[s, r, loader["requests_per_record"].get(s, {}).get("get_object", 0),
                  loader["requests_per_record"].get(s, {}).get("bytes", 0)] for s, r in loader["records_per_s"].items()])
    print(json.dumps({"ratios": loader["ratios"], "goals_met": loader["goals_met"]}, indent=1))
    if "stage1" in results:
        print(json.dumps({k: v for k, v in results["stage1"].items() if k != "timing"}, indent=1))
    path = write_result(NAME, settings, env, results, time.perf_counter() - t0)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
