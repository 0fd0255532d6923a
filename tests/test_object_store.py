"""The store conformance suite on a real S3 API (moto's server on 127.0.0.1), plus what differs on an
object store: the probe's one-line errors, ranged reads, the marker's object sizes, leftovers of a
killed writer."""

from __future__ import annotations

import pytest

from stores import WdsCacheReader, WdsCacheWriter, ZarrCacheReader, ZarrCacheWriter
from stores.url import as_path
from tests.s3_server import s3_root, s3_server  # noqa: F401  (fixtures)
from tests.store_conformance import StoreConformance


class _OnS3:
    @pytest.fixture
    def root(self, s3_root):  # noqa: F811
        return as_path(s3_root)


class TestZarrOnS3(_OnS3, StoreConformance):
    writer_cls = ZarrCacheWriter
    reader_cls = ZarrCacheReader
    fmt = "zarr"


class TestWdsOnS3(_OnS3, StoreConformance):
    writer_cls = WdsCacheWriter
    reader_cls = WdsCacheReader
    fmt = "wds"
