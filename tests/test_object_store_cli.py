"""Stage 1 and the inspection tools on a real S3 API (moto's server on 127.0.0.1), through the CLI.

- the access probe: a missing bucket, a wrong endpoint and missing credentials each end the run with
  one line naming the URL and the fix, before any teacher work;
- a dask scheduler + 2 worker processes writing to the bucket, one worker SIGKILLed mid-block: the
  bucket's store equals the local single-process store value for value and verifies;
- the leftovers of a writer killed mid-upload (an unmarked, partial shard object and open multipart
  uploads) are never read and are gone after the rerun;
- inspect_cache --verify names a damaged block of a URL store, cache_teacher --repair rewrites it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import replace

import pytest

from stores import StoreReadError
from stores.url import as_path
from stores.verify import verify_store
from stores.zarr_store import ZarrCacheReader
from tests.cache_fixtures import (
    all_records,
    assert_same_records,
    run_main,
    subprocess_env,
    tiny_params,
    write_params,
)
from tests.s3_server import BUCKET, free_port, s3_fs, s3_root, s3_server  # noqa: F401  (fixtures)
from tests.test_dask_cluster import ROOT, cluster, cluster_env, kill_a_busy_worker  # noqa: F401  (the cluster fixture)

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache


def on_s3(params, url: str, tmp_path):
    return replace(params, cache=replace(params.cache, path=url, receipt=str(tmp_path / "receipt.json")))


def open_uploads(url: str) -> list[str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return [u["Key"] for u in s3_fs().call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])]


def cli(params, tmp_path, *extra, env=None, module="cache_teacher") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"pipeline.{module}", "--params", str(write_params(params, tmp_path / "p.yaml")), *extra]
    return subprocess.run(cmd, cwd=ROOT, env={**subprocess_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=300)


def test_probe_refuses_in_one_line_before_teacher_work(s3_server, tiny_coco, tiny_teacher, tmp_path):  # noqa: F811
    """A missing bucket, a wrong endpoint, missing credentials: exit 1 with one line naming the URL and
    the fix (the three runs go side by side: most of each is the interpreter starting)."""
    none = str(tmp_path / "none")
    cases = {
        "bucket": ("s3://no-such-kdcache-bucket/cache", {}, "does not exist"),
        "endpoint": (f"s3://{BUCKET}/probe", {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, "AWS_ENDPOINT_URL"),
        "credentials": (f"s3://{BUCKET}/probe", {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "",
                        "AWS_SHARED_CREDENTIALS_FILE": none, "AWS_CONFIG_FILE": none,
                        "AWS_EC2_METADATA_DISABLED": "true"}, "AWS_ACCESS_KEY_ID"),
    }
    runs = {}
    for case, (url, env, _) in cases.items():
        params = on_s3(tiny_params(tiny_coco, tiny_teacher, tmp_path / case), url, tmp_path / case)
        (tmp_path / case).mkdir()
        cmd = [sys.executable, "-m", "pipeline.cache_teacher", "--params", str(write_params(params, tmp_path / case / "p.yaml"))]
        runs[case] = subprocess.Popen(cmd, cwd=ROOT, env={**subprocess_env(), **env}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
    for case, (url, _, fix) in cases.items():
        out, _ = runs[case].communicate(timeout=300)
        lines = [ln for ln in out.splitlines() if ln.strip()]
        assert runs[case].returncode == 1 and len(lines) == 1, out
        msg = lines[0]
        assert msg.startswith("error: ") and url in msg and fix in msg, msg
        assert not (tmp_path / case / "receipt.json").exists()
        print(f"{case}: {msg}")


def test_dask_workers_write_to_the_bucket_one_killed(cluster, s3_root, tiny_cache, tiny_coco, tiny_teacher, tmp_path):  # noqa: F811
    address, workers = cluster
    params = on_s3(tiny_params(tiny_coco, tiny_teacher, tmp_path), s3_root, tmp_path)
    cmd = [sys.executable, "-m", "pipeline.cache_teacher", "--params", str(write_params(params, tmp_path / "p.yaml")),
           "--scheduler", address, "--stats", str(tmp_path / "stats.json")]
    run = subprocess.Popen(cmd, cwd=ROOT, env=cluster_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    fs, done = s3_fs(), s3_root.removeprefix("s3://") + "/zarr/done/"
    killed = None
    try:
        killed = kill_a_busy_worker(address, run, lambda: fs.exists(done) and bool(fs.ls(done)), 240)
        out, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, out.decode()[-4000:]
    assert killed in workers and workers[killed].wait(timeout=10) == -signal.SIGKILL
    stats = json.loads((tmp_path / "stats.json").read_text())["stats"]
    assert sorted({s["block"] for s in stats}) == [0, 1, 2, 3]
    report = verify_store(s3_root)
    assert report.ok and not report.missing_blocks, report.errors
    assert not open_uploads(s3_root)
    for fmt in ("zarr", "wds"):
        assert_same_records(all_records(s3_root, fmt), all_records(tiny_cache.cache.path, fmt), fmt)
    marker = json.loads((as_path(s3_root) / "zarr" / "done" / "block-000000.json").read_text())
    assert marker["objects"]["meta/c/0"] > 0 and all(v > 0 for v in marker["objects"].values())


def test_killed_writer_leftovers_never_read_and_cleaned(s3_root, tiny_cache, tiny_coco, tiny_teacher, tmp_path):  # noqa: F811
    params = on_s3(tiny_params(tiny_coco, tiny_teacher, tmp_path), s3_root, tmp_path)
    assert run_main(params, tmp_path) == ""
    root, fs = as_path(s3_root), s3_fs()
    prefix = s3_root.removeprefix("s3://")
    # a writer of block 1 killed mid-upload: no marker, a shard object cut short, uploads left open
    (root / "zarr" / "done" / "block-000001.json").unlink()
    (root / "wds" / "shard-000001.tar").unlink()
    shard = f"{prefix}/zarr/targets/fpn/c/1"
    fs.pipe_file(shard, fs.cat_file(shard)[:100])
    key_base = prefix.removeprefix(BUCKET + "/")
    for k in (f"{key_base}/zarr/targets/fpn/c/1", f"{key_base}/wds/shard-000001.tar"):
        fs.call_s3("create_multipart_upload", Bucket=BUCKET, Key=k)
    assert len(open_uploads(s3_root)) == 2
    reader = ZarrCacheReader(s3_root)
    plan = reader.manifest.plan
    assert 1 not in reader.completed_blocks() and plan[4] not in reader.keys()
    with pytest.raises(StoreReadError, match="block 1, which is not written yet"):
        reader.get(*plan[4])
    report = verify_store(s3_root)
    assert report.missing_blocks == [1] and not report.damaged_blocks
    assert run_main(params, tmp_path) == ""  # the rerun writes block 1 only, and cleans up
    assert not open_uploads(s3_root)
    assert verify_store(s3_root).ok
    for fmt in ("zarr", "wds"):
        assert_same_records(all_records(s3_root, fmt), all_records(tiny_cache.cache.path, fmt), fmt)


def test_verify_and_repair_on_a_url(s3_root, tiny_cache, tiny_coco, tiny_teacher, tmp_path):  # noqa: F811
    params = on_s3(tiny_params(tiny_coco, tiny_teacher, tmp_path), s3_root, tmp_path)
    assert run_main(params, tmp_path) == ""
    fs, prefix = s3_fs(), s3_root.removeprefix("s3://")
    shard = f"{prefix}/wds/shard-000002.tar"
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the middle of block 2's shard
    fs.pipe_file(shard, bytes(data))
    run = cli(params, tmp_path, "--verify", module="inspect_cache")
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "shard-000002" in run.stderr and s3_root in run.stderr, run.stderr
    run = cli(params, tmp_path, "--repair")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "repair: 1 damaged blocks [2]" in run.stdout, run.stdout
    run = cli(params, tmp_path, "--verify", module="inspect_cache")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["verify"]["ok"]
    assert_same_records(all_records(s3_root, "wds"), all_records(tiny_cache.cache.path, "wds"), "wds")
