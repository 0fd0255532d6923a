"""A real S3 API for the object-storage tests: moto's server on 127.0.0.1, as s3fs's own tests run it.

`s3_server` (session-scoped) starts ``moto.server.ThreadedMotoServer`` on a free loopback port and points
the standard AWS environment at it (dummy credentials, AWS_ENDPOINT_URL), so s3fs, zarr's
FsspecStore and every subprocess (the CLI, dask workers) find it the way they would find MinIO or
AWS. `s3_root` is a fresh ``s3://kdcache-test/<random>`` prefix per test. `restartable_server`
stops and restarts the server on the same port (the bucket's objects are kept in-process by moto).

Import the fixtures into a test module: ``from tests.s3_server import s3_root, s3_server  # noqa: F401``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

import pytest

BUCKET = "kdcache-test"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # a down server fails fast: the tests stop it on purpose
    "AWS_MAX_ATTEMPTS": "2",
    "AWS_RETRY_MODE": "standard",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._cls = ThreadedMotoServer
        self._server = None

    def start(self) -> None:
        self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        for _ in range(100):  # until it accepts connections
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def env(self) -> dict[str, str]:
        return {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}


_SERVER: S3Server | None = None  # one per test process: every module that imports the fixture shares it


@pytest.fixture(scope="session")
def s3_server():
    """The process's S3 server (started on first use, stopped when the process exits: moto serves from a
    daemon thread), with the AWS environment pointing at it."""
    global _SERVER
    pytest.importorskip("moto.server")
    if _SERVER is None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        server = S3Server()
        server.start()
        os.environ.update(server.env())
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET, exist_ok=True)
        _SERVER = server
    if _SERVER._server is None:  # a test stopped it and failed before restarting it
        _SERVER.start()
    yield _SERVER


@pytest.fixture
def s3_root(s3_server):
    """A fresh prefix in the test bucket, as the URL string a user puts in cache.path."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def s3_fs():
    import fsspec

    return fsspec.filesystem("s3", use_listings_cache=False)
