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


def test_overwrite_removes_only_a_kdcache_prefix(s3_root):  # noqa: F811
    """--overwrite's check and removal on a URL: a prefix holding a cache and nothing else is removed
    object by object; a prefix holding a foreign object, or no manifest, is refused and left whole."""
    from stores.manifest import NotAStoreError, check_cache_folder, remove_store
    from tests.s3_server import s3_fs
    from tests.store_conformance import block_records, make_manifest

    root, fs = as_path(s3_root), s3_fs()
    m = make_manifest()
    ZarrCacheWriter(root, m).write_block(0, block_records(m, 0))
    WdsCacheWriter(root, m).write_block(0, block_records(m, 0))
    fs.pipe_file(s3_root.removeprefix("s3://") + "/notes.txt", b"mine")
    with pytest.raises(NotAStoreError, match="notes.txt.*--overwrite will not delete it"):
        check_cache_folder(root, overwrite=True)
    assert (root / "manifest.json").exists() and (root / "zarr" / "zarr.json").exists()
    (root / "notes.txt").unlink()
    remove_store(root)
    assert not fs.find(s3_root.removeprefix("s3://"))
    other = as_path(s3_root + "-foreign")
    fs.pipe_file(s3_root.removeprefix("s3://") + "-foreign/data/x.bin", b"x")
    with pytest.raises(NotAStoreError, match="not a kdcache cache"):
        check_cache_folder(other, overwrite=True)
    assert (other / "data" / "x.bin").exists()
