"""A bounded node-local cache of remote store objects (shards, sidecars) on scratch disk.

`LocalObjectCache` wraps a fetch of a whole object (by default an fsspec filesystem's ``get_file``)
so that every loader worker and every training process of one node reads a remote shard from local
disk, and the node fetches each shard once:

- **One fetch per node.** A reader takes an exclusive ``fcntl.flock`` on a per-object lock file
  under ``<path>/locks`` before it looks for the object; the first one fetches, the others wait and
  then find it. A lock, not "temp name + os.replace and let duplicate fetches race": a race is
  harmless for correctness but costs the node one GET of the whole shard per concurrent reader,
  which is what the cache exists to avoid. flock is safe here because the lock files live on the
  node's own scratch disk (never on NFS or the object store, where the commit protocol uses no
  locks); the kernel releases a killed holder's lock.
- **Never a partial file.** An object is fetched to ``<name>.part-<pid>`` and renamed into place only
  after its size (and checksum, when the caller knows one) matched; its record
  ``records/<name>.json`` (URL, size, crc32c of the bytes) is written before the rename, so a data file is
  trusted only next to the record of the same bytes.
- **Verified before trusted.** A cached file is served only if its size equals the record's and the
  size / crc32c the caller expects (from the block's sidecar or done marker, which the reader reads
  fresh, so a block rewritten by a repair run is fetched again). The crc32c of a cached file is
  checked once per process and file (inode + size: a refetched object is a new inode); a damaged
  file is fetched again.
- **Survives a restart, bounded, least recently used out.** The cache is just the files: a hit
  touches the data file's mtime (atime is unreliable on relatime/noatime mounts), and after every
  fetch the oldest files are removed until the cache holds at most ``max_bytes``. Eviction skips an
  object whose lock is held (being fetched or verified); a reader that already opened a file keeps
  reading it after an unlink (POSIX), so `open` hands out open files, never paths.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import google_crc32c

Fetch = Callable[[str, str], None]  # (url, local path) -> the object's bytes written to that path
_CHUNK = 8 << 20


class LocalCacheError(OSError):
    """An object could not be fetched into, or served from, the local cache; names the URL and the fix."""


def crc32c_file(path: str | Path) -> int:
    """crc32c of a file's bytes (hardware crc32c, ~10 GB/s: cheap next to one network fetch)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = google_crc32c.extend(crc, chunk)
    return crc


class LocalObjectCache:
    """Whole remote objects cached under `root`, at most `max_bytes` in all (see the module docstring).

    `fs`: an fsspec filesystem whose ``get_file(url, local_path)`` fetches one object; or `fetch`,
    any callable with that signature. Picklable (DataLoader workers, spawned processes) when the
    filesystem or fetch function is."""

    def __init__(self, root: str | Path, max_bytes: int, fs=None, fetch: Fetch | None = None):
        if (fs is None) == (fetch is None):
            raise ValueError("LocalObjectCache needs exactly one of fs (an fsspec filesystem) or fetch")
        if max_bytes <= 0:
            raise ValueError(f"local cache {root}: max_bytes must be > 0, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.fs = fs
        self._fetch = fetch
        self.stats = {"hits": 0, "fetches": 0, "bytes_fetched": 0, "evicted": 0}
        self._checked: dict[str, tuple[int, int]] = {}  # name -> (inode, size) whose crc32c this process checked
        try:
            (self.root / "locks").mkdir(parents=True, exist_ok=True)
            (self.root / "objects").mkdir(parents=True, exist_ok=True)
            (self.root / "records").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LocalCacheError(err.errno, f"cannot create the local cache at {self.root} ({err.strerror}): "
                                  "set cache.local.path to a writable scratch folder") from None

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_checked": {}}

    # -------------------------------------------------------------------------------------------
    # reading

    def open(self, url: str, size: int | None = None, crc32c: int | None = None) -> BinaryIO:
        """The object at `url` as an open local file, fetched first unless a verified copy is cached.

        `size` / `crc32c`: what the object must be (from its block's sidecar or marker); a cached
        copy that differs is fetched again, a fetched one that differs raises LocalCacheError."""
        name = self.name_of(url)
        with self._locked(name):
            f = self._open_cached(name, url, size, crc32c)
            if f is not None:
                self.stats["hits"] += 1
                return f
            f = self._fetch_into(name, url, size, crc32c)
        self.evict(keep=name)
        return f

    def read(self, url: str, size: int | None = None, crc32c: int | None = None) -> bytes:
        with self.open(url, size, crc32c) as f:
            return f.read()

    @staticmethod
    def name_of(url: str) -> str:
        """The cache's file name for `url`: a digest (any URL is a safe name) plus the object's own
        name, so a person listing the folder sees which shard is which."""
        tail = "".join(c if c.isalnum() or c in "-_." else "_" for c in url.rstrip("/").rsplit("/", 1)[-1])[-64:]
        return f"{hashlib.sha256(url.encode()).hexdigest()[:24]}-{tail}"

    def _data(self, name: str) -> Path:
        return self.root / "objects" / name

    def _record(self, name: str) -> Path:
        return self.root / "records" / f"{name}.json"  # apart: an object may itself be named *.json

    def _open_cached(self, name: str, url: str, size: int | None, crc32c: int | None) -> BinaryIO | None:
        data = self._data(name)
        try:
            record = json.loads(self._record(name).read_text())
            f = open(data, "rb")  # noqa: SIM115 (handed to the caller)
        except (OSError, ValueError):
            return None
        st = os.fstat(f.fileno())
        good = (record.get("url") == url and st.st_size == record.get("size")
                and (size is None or st.st_size == size) and (crc32c is None or record.get("crc32c") == crc32c))
        stamp = (st.st_ino, st.st_size)  # a file fetched again is a new inode (os.replace)
        if good and self._checked.get(name) != stamp:
            good = crc32c_file(data) == record.get("crc32c")  # the local disk kept the bytes
        if not good:
            f.close()
            self._remove(name)
            return None
        now = time.time_ns()
        os.utime(data, ns=(now, now))  # the last use, for least-recently-used eviction
        self._checked[name] = stamp
        return f

    def _fetch_into(self, name: str, url: str, size: int | None, crc32c: int | None) -> BinaryIO:
        part = self.root / "objects" / f"{name}.part-{os.getpid()}"
        try:
            self._get(url, str(part))
            got = part.stat().st_size
            crc = crc32c_file(part)
        except BaseException as err:  # a failed or interrupted fetch leaves no part file behind
            with contextlib.suppress(OSError):
                part.unlink()
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LocalCacheError(err.errno, f"local cache {self.root} is out of disk space fetching {url}: "
                                      "lower cache.local.max_gb or free the scratch disk") from None
            raise
        self.stats["fetches"] += 1
        self.stats["bytes_fetched"] += got
        if (size is not None and got != size) or (crc32c is not None and crc != crc32c):
            part.unlink()
            raise LocalCacheError(
                errno.EIO, f"{url} fetched {got} bytes (crc32c {crc}) but its block records "
                f"{size} bytes (crc32c {crc32c}): the object is damaged or was replaced mid-read; "
                "rerun inspect_cache --verify on the store")
        record = json.dumps({"url": url, "size": got, "crc32c": crc}).encode()
        tmp = self._record(name).with_name(f"{name}.json.part-{os.getpid()}")
        tmp.write_bytes(record)
        os.replace(tmp, self._record(name))  # the record first: a data file is trusted only beside it
        os.replace(part, self._data(name))
        f = open(self._data(name), "rb")  # noqa: SIM115 (handed to the caller)
        self._checked[name] = (os.fstat(f.fileno()).st_ino, got)
        return f

    def _get(self, url: str, local: str) -> None:
        if self._fetch is not None:
            self._fetch(url, local)
        else:
            self.fs.get_file(url, local)

    # -------------------------------------------------------------------------------------------
    # locking and eviction

    @contextlib.contextmanager
    def _locked(self, name: str, blocking: bool = True) -> Iterator[bool]:
        with open(self.root / "locks" / f"{name}.lock", "a+b") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def entries(self) -> list[tuple[int, int, str]]:
        """(last use in ns, bytes, name) of every complete cached object, oldest first."""
        out = []
        for p in (self.root / "objects").iterdir():
            if ".part-" in p.name:
                continue
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                out.append((st.st_mtime_ns, st.st_size, p.name))
        return sorted(out)

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, keep: str | None = None) -> int:
        """Remove least recently used objects until the cache holds at most max_bytes (never `keep`,
        the object just fetched, nor one another process holds locked). Returns bytes removed."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = 0
        for _, size, name in entries:
            if total <= self.max_bytes:
                break
            if name == keep:
                continue
            with self._locked(name, blocking=False) as mine:
                if not mine:
                    continue
                self._remove(name)
            total -= size
            removed += size
            self.stats["evicted"] += 1
        return removed

    def _remove(self, name: str) -> None:
        """Data first, then its record: a data file is never left beside no record it could be checked by."""
        for path in (self._data(name), self._record(name)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._checked.pop(name, None)

    def clean_partial(self, older_than_s: float = 3600.0) -> int:
        """Remove ``.part-<pid>`` files a killed fetch left behind (older than `older_than_s`)."""
        cutoff = time.time() - older_than_s
        n = 0
        for p in [*(self.root / "objects").glob("*.part-*"), *(self.root / "records").glob("*.part-*")]:
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    n += 1
        return n


def install(cache_path: str, local_path: str, max_gb: float) -> LocalObjectCache | None:
    """Route this process's shard reads (`stores.url.open_shard`, and so its forked loader workers')
    of the cache at `cache_path` through a node-local cache at `local_path`, when the cache is at a
    URL and `local_path` is set; otherwise read directly. Returns the cache (None: direct reads)."""
    from stores.url import as_path, is_remote, set_shard_opener

    root = as_path(cache_path)
    if not local_path or not is_remote(root):
        set_shard_opener(None)
        return None
    cache = LocalObjectCache(local_path, max(1, int(max_gb * 1e9)), fs=root.fs)
    set_shard_opener(cache.open)
    return cache
