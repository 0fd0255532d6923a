"""Where a cache lives: a local folder or an fsspec URL, behind one path type.

`as_path` turns ``cache.path`` into a `pathlib.Path` (a plain local path, or ``file://...``) or a
`upath.UPath` (``s3://bucket/prefix``, ``memory://...``, and ``gs://`` / ``az://`` when gcsfs / adlfs
are installed). Both speak the pathlib API (``/``, ``exists``, ``glob``, ``iterdir``, ``read_text``,
``open``, ``stat``, ``unlink``), so the store modules have one code path; what differs between a disk
and an object store is here:

- `write_whole`: every object is written whole. On disk a temp file + ``os.replace``; on an object
  store one PUT (s3fs sends one ``put_object`` below 100 MB; larger bodies go as a multipart upload,
  which no reader can see until it completes).
- `write_new`: create-if-absent (``If-None-Match: *`` on S3; ``O_EXCL`` on disk); False if it existed.
- `read_range`: ranged GETs (``Range: bytes=a-b``; a negative start reads the object's tail).
- `remove_tree`, `abort_uploads` (multipart uploads a killed writer left open under a prefix).
- `probe`: one list, one conditional write and one delete under the prefix, before any teacher work,
  turning a missing bucket, missing credentials, a wrong endpoint or a denied request into one line.
- `open_shard`: the one place stage 2 opens a shard object; a node-local cache
  (`stores.local_cache`) plugs in with `set_shard_opener`.

Credentials and endpoints come from where boto / the cloud SDKs look: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws/{config,credentials}, and
AWS_ENDPOINT_URL for S3-compatible servers (MinIO, Ceph, R2, moto).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")

# listings are read fresh: another process's marker must be seen by the next scan (S3 is strongly
# consistent; fsspec's listing cache would not be)
_STORAGE_OPTIONS = {"use_listings_cache": False}


def is_url(path: object) -> bool:
    """True for ``proto://...`` other than ``file://`` (which is a local path)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def as_path(path: str | os.PathLike):
    """A `pathlib.Path` for a local path (or ``file://``), a `upath.UPath` for any other URL."""
    if not isinstance(path, str | Path) and hasattr(path, "protocol"):
        return path  # a UPath already
    text = str(path)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if not is_url(text):
        return Path(text)
    from upath import UPath

    try:
        return UPath(text, **_STORAGE_OPTIONS)
    except (ValueError, TypeError, ImportError) as err:  # an unknown protocol, or its package missing
        proto = text.split("://", 1)[0]
        raise ValueError(f"cache.path {text}: fsspec cannot open '{proto}://' URLs ({err}); install its "
                         f"filesystem package (s3fs, gcsfs, adlfs) or use a local path") from None


def is_remote(path) -> bool:
    return not isinstance(path, Path)


def url_of(path) -> str:
    """The user-facing name of `path` (the URL for remote paths)."""
    return str(path)


def _fs_path(path) -> tuple[object, str]:
    return path.fs, path.path


def atomic_write_bytes(path, data: bytes, *, fsync: bool = False) -> None:
    """Write `data` as the whole object at `path`: readers see the old object, the new one or none,
    never part of one. On disk: a temp file next to `path`, then os.replace; on an object store: one PUT."""
    path = as_path(path)
    if is_remote(path):
        fs, p = _fs_path(path)
        fs.pipe_file(p, bytes(data))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


write_whole = atomic_write_bytes


def write_new(path, data: bytes) -> bool:
    """Create the object at `path` only if it does not exist (one conditional PUT, ``If-None-Match: *``,
    on S3; ``O_EXCL`` on disk). True if this call created it."""
    if not is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    fs, p = _fs_path(path)
    try:
        fs.pipe_file(p, bytes(data), mode="create")
    except FileExistsError:
        return False
    except (TypeError, NotImplementedError):  # a filesystem without conditional writes
        if path.exists():
            return False
        fs.pipe_file(p, bytes(data))
    return True


RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0)  # seconds between the attempts of a read the store did not answer


def retrying(call: Callable[[], T]) -> T:
    """`call()`, retried with backoff (`RETRY_DELAYS`, ~4 s in all) when an object store does not
    answer: a restarting server or a network blip costs a pause, not the run. A missing object
    (FileNotFoundError) is an answer and is raised at once; so is the last failure."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return call()
        except FileNotFoundError:
            raise
        except Exception:
            if delay is None:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_range(path, start: int, end: int | None = None) -> bytes:
    """Bytes [start, end) of the object (one ranged GET remotely); a negative `start` reads the tail."""
    if not is_remote(path):
        with open(path, "rb") as f:
            if start < 0:
                size = f.seek(0, os.SEEK_END)
                start = max(0, size + start)
            f.seek(start)
            return f.read(-1 if end is None else end - start)
    fs, p = _fs_path(path)
    return retrying(lambda: fs.cat_file(p, start=start, end=end))


def remove_tree(path) -> None:
    """Delete a file / folder (every object under a prefix); missing is fine."""
    if not is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        return
    fs, p = _fs_path(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(p, recursive=True)


def abort_uploads(path, names: Callable[[str], bool] | None = None) -> list[str]:
    """Abort the multipart uploads left open under prefix `path` (a writer killed mid-upload) whose
    key passes `names`; S3 only (elsewhere there is nothing to abort). Returns the aborted keys."""
    if not is_remote(path) or getattr(path, "protocol", "") not in ("s3", "s3a"):
        return []
    fs, p = _fs_path(path)
    bucket, _, prefix = p.partition("/")
    aborted = []
    try:
        uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])
    except (OSError, ValueError):
        return []
    for up in uploads:
        if names is None or names(up["Key"]):
            with contextlib.suppress(OSError, ValueError):
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                aborted.append(up["Key"])
    return aborted


def local_temp_dir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)


def upload_tree(local: Path, path, last: str) -> None:
    """Copy folder `local` to `path` object by object, the file `last` (relative) at the end: a
    reader that sees `last` sees every other object."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    rel = [str(p.relative_to(local)) for p in files]
    for p, r in sorted(zip(files, rel), key=lambda pr: pr[1] == last):
        write_whole(path / r, p.read_bytes())


# ------------------------------------------------------------------------------------------------
# the probe: one line per way an object store can refuse, before any teacher work


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"


def explain_error(url: str, err: BaseException, action: str) -> str:
    """One line naming `url`, what failed and the fix, for an error of an object-store request."""
    name = type(err).__name__
    text = f"{name}: {err}"
    low = text.lower()
    if "credential" in low or "NoCredentials" in name:
        return (f"{action} {url}: no credentials found ({text[:120]}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials")
    if "nosuchbucket" in low or "bucket does not exist" in low or (
            isinstance(err, FileNotFoundError) and "bucket" in low):
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return (f"{action} {url}: bucket {bucket!r} does not exist at {_endpoint()}; create it "
                f"(aws s3 mb s3://{bucket}) or fix cache.path")
    if isinstance(err, PermissionError) or "accessdenied" in low or "forbidden" in low or "signature" in low \
            or "invalidaccesskeyid" in low:
        return (f"{action} {url}: access denied ({text[:120]}); check the credentials (AWS_PROFILE, "
                "AWS_ACCESS_KEY_ID) and that they may list, put and delete objects under this prefix")
    if "connect" in low or "endpoint" in low or "timeout" in low or "name or service" in low:
        return (f"{action} {url}: cannot reach {_endpoint()} ({text[:120]}); check AWS_ENDPOINT_URL "
                "(S3-compatible servers) and the network")
    return f"{action} {url}: {text[:200]}; check the URL, the credentials and AWS_ENDPOINT_URL"


class StoreAccessError(OSError):
    """The object store at a cache URL cannot be used; the message names the URL and the fix."""


def probe(path) -> None:
    """List the prefix, create and delete a small probe object under it: raises StoreAccessError
    (one line: the URL, what failed, the fix) if the store cannot be read and written. Local paths
    are not probed (the store's own writes report disk errors)."""
    if not is_remote(path):
        return
    url = url_of(path)
    fs, p = _fs_path(path)
    bucket = p.split("/", 1)[0]
    step = "cannot list"
    try:
        if getattr(path, "protocol", "") in ("s3", "s3a"):  # a missing bucket lists as empty: ask for it
            try:
                fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError:
                raise FileNotFoundError(f"NoSuchBucket: bucket {bucket} does not exist") from None
        fs.ls(p, detail=False) if fs.exists(p) else None
        step = "cannot write to"
        name = f"{p.rstrip('/')}/.kdcache-probe-{uuid.uuid4().hex[:12]}"
        try:
            fs.pipe_file(name, b"kdcache probe", mode="create")
        except (TypeError, NotImplementedError):
            fs.pipe_file(name, b"kdcache probe")
        step = "cannot delete from"
        fs.rm_file(name)
    except Exception as err:  # every failure of the SDK stack becomes one line (botocore, aiohttp, ...)
        raise StoreAccessError(explain_error(url, err, step)) from None


# ------------------------------------------------------------------------------------------------
# stage 2's shard reads: one hook for a node-local cache

ShardOpener = Callable[[str], BinaryIO]
_OPENER: ShardOpener | None = None


def set_shard_opener(opener: ShardOpener | None) -> None:
    """Route every `open_shard` of this process through `opener(url) -> binary file` (e.g. a
    `stores.local_cache.LocalObjectCache`'s ``open``); None restores direct reads."""
    global _OPENER
    _OPENER = opener


def open_shard(url: str) -> BinaryIO:
    """A binary file of the shard object at `url` (a local path or a URL). Remote shards are read
    with one GET of the whole object (a streamed shard is read start to end anyway)."""
    if _OPENER is not None:
        return _OPENER(str(url))
    path = as_path(url)
    if not is_remote(path):
        return open(path, "rb")
    fs, p = _fs_path(path)
    return io.BytesIO(retrying(lambda: fs.cat_file(p)))
