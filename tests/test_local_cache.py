"""stores.local_cache: the node-local cache of remote objects, through a real fsspec filesystem.

Remote objects are files read through fsspec's own local filesystem ("file" protocol), subclassed
only to count GETs (each ``get_file`` appends a line to a log file, so counts add up across
processes). Concurrency is real: several spawned processes open the same objects at once.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import google_crc32c
import pytest
from fsspec.implementations.local import LocalFileSystem

from stores.local_cache import LocalCacheError, LocalObjectCache
from tests.s3_server import s3_root, s3_server  # noqa: F401  (fixtures)


class CountingFileSystem(LocalFileSystem):
    """fsspec's local filesystem, logging every whole-object GET (one line per get_file)."""

    def __init__(self, log: str = "", **kwargs):
        super().__init__(**kwargs)
        self.log = log

    def get_file(self, rpath, lpath, **kwargs):
        with open(self.log, "a") as f:  # O_APPEND: lines from several processes never interleave
            f.write(f"{rpath}\n")
        return super().get_file(rpath, lpath, **kwargs)


def gets(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def remote(tmp_path):
    """Three 'shards' of 3000, 4000, 5000 bytes, as file:// URLs."""
    root = tmp_path / "bucket"
    root.mkdir()
    urls = {}
    for i, n in enumerate((3000, 4000, 5000)):
        p = root / f"shard-{i:06d}.tar"
        p.write_bytes(os.urandom(n))
        urls[i] = f"file://{p}"
    return urls


def make_cache(tmp_path, max_bytes=1 << 20) -> tuple[LocalObjectCache, Path]:
    log = tmp_path / "gets.log"
    return LocalObjectCache(tmp_path / "scratch", max_bytes, fs=CountingFileSystem(log=str(log))), log


def body(url: str) -> bytes:
    return Path(url.removeprefix("file://")).read_bytes()


def test_first_open_fetches_then_hits_and_a_restart_keeps_the_cache(tmp_path, remote):
    cache, log = make_cache(tmp_path)
    assert cache.read(remote[0]) == body(remote[0])
    assert cache.read(remote[0], size=3000, crc32c=google_crc32c.value(body(remote[0]))) == body(remote[0])
    assert len(gets(log)) == 1 and cache.stats["hits"] == 1 and cache.stats["bytes_fetched"] == 3000
    again, _ = make_cache(tmp_path)  # a restarted job on the same scratch folder
    assert again.read(remote[0]) == body(remote[0])
    assert len(gets(log)) == 1, "a restart reuses the cached file"


def _reader(scratch: str, log: str, urls: list[str], start, out):
    cache = LocalObjectCache(scratch, 1 << 20, fs=CountingFileSystem(log=log))
    start.wait()
    digests = [google_crc32c.value(cache.read(u)) for u in urls]
    out.put(digests)


def test_concurrent_processes_fetch_each_object_once(tmp_path, remote):
    log = tmp_path / "gets.log"
    urls = [remote[i] for i in (0, 1, 2)]
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(str(tmp_path / "scratch"), str(log), urls[k:] + urls[:k], start, out))
             for k in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    want = {google_crc32c.value(body(u)) for u in urls}
    assert all(set(r) == want for r in results)
    assert sorted(gets(log)) == sorted(urls), "four processes, three objects: three GETs"


def test_least_recently_used_objects_are_evicted_to_stay_under_max_bytes(tmp_path, remote):
    cache, log = make_cache(tmp_path, max_bytes=9500)  # room for shards 0 + 1 (7000) or 0 + 2 (8000)
    cache.read(remote[0])
    time.sleep(0.01)
    cache.read(remote[1])
    time.sleep(0.01)
    cache.read(remote[0])  # 0 is now the most recently used
    time.sleep(0.01)
    cache.read(remote[2])  # 12000 bytes: 1, the least recently used, goes
    names = {name for _, _, name in cache.entries()}
    assert names == {cache.name_of(remote[0]), cache.name_of(remote[2])}
    assert cache.size_bytes() <= 9500 and cache.stats["evicted"] == 1
    n = len(gets(log))
    cache.read(remote[0])
    assert len(gets(log)) == n, "the kept object is still served locally"
    cache.read(remote[1])
    assert len(gets(log)) == n + 1, "the evicted one is fetched again"


def test_objects_named_like_records_are_counted_and_evicted(tmp_path):
    side = tmp_path / "bucket" / "shard-000000.json"  # a sidecar is a .json object
    side.parent.mkdir()
    side.write_bytes(os.urandom(4000))
    cache, _ = make_cache(tmp_path, max_bytes=3000)
    cache.read(f"file://{side}")
    assert [size for _, size, _ in cache.entries()] == [4000], "kept while it is the one just fetched"
    cache.evict()
    assert cache.entries() == [] and cache.stats["evicted"] == 1


def test_leftover_part_files_of_killed_fetches_are_cleaned(tmp_path, remote):
    cache, _ = make_cache(tmp_path)
    part = tmp_path / "scratch" / "objects" / "x.part-4242"
    part.write_bytes(b"half")
    os.utime(part, (time.time() - 7200, time.time() - 7200))
    fresh = tmp_path / "scratch" / "objects" / "y.part-4243"  # a fetch in progress right now: kept
    fresh.write_bytes(b"half")
    assert cache.clean_partial(older_than_s=3600) == 1 and not part.exists() and fresh.exists()


def test_a_partial_or_damaged_local_copy_is_never_served(tmp_path, remote):
    cache, log = make_cache(tmp_path)
    url = remote[1]
    name = cache.name_of(url)
    objects = tmp_path / "scratch" / "objects"
    # a fetch killed mid-way leaves only a part file: ignored
    (objects / f"{name}.part-999999").write_bytes(body(url)[:100])
    assert cache.read(url) == body(url) and len(gets(log)) == 1
    # the local copy cut short: its size disagrees with its record
    data = objects / name
    data.write_bytes(body(url)[:1000])
    assert LocalObjectCache(tmp_path / "scratch", 1 << 20, fs=cache.fs).read(url) == body(url)
    assert len(gets(log)) == 2
    # one flipped byte, same size: the crc32c of the record catches it (in a fresh process' view)
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert LocalObjectCache(tmp_path / "scratch", 1 << 20, fs=cache.fs).read(url) == body(url)
    assert len(gets(log)) == 3
    # a data file with no record (killed between the two renames of an older layout) is refetched
    (tmp_path / "scratch" / "records" / f"{name}.json").unlink()
    assert cache.read(url) == body(url) and len(gets(log)) == 4


def test_a_rewritten_remote_object_is_fetched_again_when_the_block_says_so(tmp_path, remote):
    cache, log = make_cache(tmp_path)
    url = remote[0]
    cache.read(url)
    new = os.urandom(3000)  # a repair run rewrote the block: same name, same size, new bytes
    Path(url.removeprefix("file://")).write_bytes(new)
    assert cache.read(url, size=3000, crc32c=google_crc32c.value(new)) == new
    assert len(gets(log)) == 2


def test_an_object_that_disagrees_with_its_block_is_refused_in_one_line(tmp_path, remote):
    cache, _ = make_cache(tmp_path)
    with pytest.raises(LocalCacheError) as err:
        cache.read(remote[2], size=4096)
    msg = str(err.value)
    assert remote[2] in msg and "4096" in msg and "inspect_cache --verify" in msg and "\n" not in msg
    assert cache.entries() == [], "nothing of the refused object is kept"


def test_a_failed_fetch_leaves_nothing_behind(tmp_path, remote):
    def half_then_fail(url: str, local: str) -> None:
        Path(local).write_bytes(body(url)[:50])
        raise ConnectionError(f"connection reset reading {url}")

    cache = LocalObjectCache(tmp_path / "scratch", 1 << 20, fetch=half_then_fail)
    with pytest.raises(ConnectionError):
        cache.read(remote[0])
    assert list((tmp_path / "scratch" / "objects").iterdir()) == []
    good, log = make_cache(tmp_path)
    assert good.read(remote[0]) == body(remote[0]) and len(gets(log)) == 1


# ------------------------------------------------------------------------------------------------
# the same through a real S3 API (moto's server on 127.0.0.1): GETs counted by the filesystem

def _counting_s3(log: str):
    from s3fs import S3FileSystem

    class CountingS3(S3FileSystem):
        async def _get_file(self, rpath, lpath, **kwargs):
            with open(log, "a") as f:
                f.write(f"{rpath}\n")
            return await super()._get_file(rpath, lpath, **kwargs)

    return CountingS3(skip_instance_cache=True, use_listings_cache=False)


def _s3_reader(scratch: str, log: str, env: dict, urls: list[str], start, out):
    os.environ.update(env)  # the spawned process finds the server as any AWS client would
    cache = LocalObjectCache(scratch, 1 << 20, fs=_counting_s3(log))
    start.wait()
    out.put([google_crc32c.value(cache.read(u)) for u in urls])


def test_concurrent_processes_fetch_each_s3_object_once(tmp_path, s3_root, s3_server, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="werkzeug")  # moto's server logs each request it answers
    from tests.s3_server import s3_fs

    fs = s3_fs()
    bodies = {f"{s3_root}/wds/shard-{i:06d}.tar": os.urandom(2000 + 1000 * i) for i in range(3)}
    for url, data in bodies.items():
        fs.pipe_file(url, data)
    log = tmp_path / "gets.log"
    urls = list(bodies)
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_s3_reader, args=(str(tmp_path / "scratch"), str(log), s3_server.env(),
                                                  urls[k:] + urls[:k], start, out)) for k in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for r in results:  # each process read every object, in its own order, with the right bytes
        assert sorted(r) == sorted(google_crc32c.value(b) for b in bodies.values())
    keys = sorted(u.removeprefix("s3://") for u in urls)
    assert sorted(g.removeprefix("s3://").lstrip("/") for g in gets(log)) == keys, "three processes, three objects: three GETs"
    served = [r.getMessage() for r in caplog.records if r.name == "werkzeug" and '"GET /' in r.getMessage()]
    assert sorted(m.split('"GET /', 1)[1].split(" ", 1)[0] for m in served) == keys, "the server saw three GETs"
