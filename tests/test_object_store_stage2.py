"""Stage 2 from a bucket (moto's S3 server on 127.0.0.1): the student's batches read by URL equal the
ones read from the local disk store, for Zarr (ranged GETs) and WebDataset (whole-shard GETs); the
server stopped mid-run is retried while it comes back, and named in one line if it stays down."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from stages.distill.run import build_run
from stores import StoreReadError, WdsCacheReader, ZarrCacheReader
from stores.codecs import decode_compact
from tests.s3_server import s3_fs, s3_root, s3_server  # noqa: F401  (fixtures)

pytest_plugins = ["tests.cache_fixtures"]  # tiny_teacher, tiny_cache


@pytest.fixture
def s3_cache(tiny_cache, s3_root):  # noqa: F811
    """The local tiny cache copied object by object into a fresh bucket prefix; params pointing at it."""
    s3_fs().put(tiny_cache.cache.path.rstrip("/") + "/", s3_root.removeprefix("s3://"), recursive=True)
    return replace(tiny_cache, cache=replace(tiny_cache.cache, path=s3_root))


def offline(params, source: str):
    return replace(params, distill=replace(params.distill, teacher="offline", losses={"mse": 1.0}, source=source))


@pytest.mark.parametrize("source", ["zarr", "wds"])
def test_student_batches_from_the_bucket_equal_local(source, s3_cache, tiny_cache):
    remote = next(build_run(offline(s3_cache, source), None).make_batches(0))
    local = next(build_run(offline(tiny_cache, source), None).make_batches(0))
    assert remote["image_ids"] == local["image_ids"] and remote["views"] == local["views"]
    for a, b in zip(remote["teacher"], local["teacher"]):
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(decode_compact(a[name]), decode_compact(b[name]), err_msg=name)


def test_server_restart_is_retried_then_named_if_down(s3_cache, tiny_cache, s3_server):  # noqa: F811
    url = s3_cache.cache.path
    zarr, wds = ZarrCacheReader(url), WdsCacheReader(url)
    local = ZarrCacheReader(tiny_cache.cache.path)
    plan = zarr.manifest.plan
    first, later = plan[0], plan[-1]  # different blocks: the later one's shard index is not read yet
    zarr.get(*first)
    s3_server.stop()
    restart = threading.Timer(0.5, s3_server.start)
    restart.start()
    try:
        t0 = time.monotonic()
        rec = zarr.get(*later)  # the client's retries span the restart
        waited = time.monotonic() - t0
        want = local.get(*later)
        for name, arr in want.arrays.items():
            np.testing.assert_array_equal(rec.arrays[name], arr, err_msg=name)
        assert waited >= 0.3, f"read in {waited:.2f}s: the server was not down"
        restart.join()
        s3_server.stop()  # now it stays down
        for reader, key in ((zarr, plan[len(plan) // 2]), (wds, plan[len(plan) // 2])):
            with pytest.raises(StoreReadError) as info:
                reader.get(*key)
            msg = str(info.value)
            assert "\n" not in msg and url in msg and "AWS_ENDPOINT_URL" in msg, msg
            print(msg)
    finally:
        restart.join()
        if s3_server._server is None:
            s3_server.start()
