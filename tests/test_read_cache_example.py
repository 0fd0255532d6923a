"""docs/read_cache_example.py, the standalone reader of docs/cache-format.md, against the stores' own decode.

The example imports nothing from kdcache; if the format changes and the spec does not, these fail.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

from stages.config import CacheParams
from stores import codecs
from stores.cache_basis import CacheBases
from stores.zarr_store import ZarrCacheReader
from tests.cache_fixtures import build_cache, tiny_params

pytest_plugins = ["tests.cache_fixtures"]

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "read_cache_example.py"
ALLOWED = {"numpy", "zarr", "webdataset", "numcodecs"}


def _example():
    spec = importlib.util.spec_from_file_location("read_cache_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_imports_only_numpy_zarr_webdataset_numcodecs_and_the_standard_library():
    tree = ast.parse(EXAMPLE.read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    foreign = {r for r in roots - ALLOWED - {"__future__"} if r not in sys.stdlib_module_names}
    assert not foreign, f"docs/read_cache_example.py imports {sorted(foreign)}"


@pytest.fixture(scope="module")
def default_cache(tiny_coco, tiny_teacher, tmp_path_factory):
    """A real stage-1 cache (Zarr + WebDataset) with the project's default codecs, cpca basis included."""
    params = tiny_params(tiny_coco, tiny_teacher, tmp_path_factory.mktemp("example"),
                         codecs=dict(CacheParams().codecs), basis_images=4)
    build_cache(params)
    return Path(params.cache.path)


def test_example_decodes_every_record_as_the_stores_do(default_cache):
    example = _example()
    reader = ZarrCacheReader(default_cache)
    keys = list(reader.keys())
    chains = set()
    for image_id, view in keys[:4]:  # two images, both views
        ref = reader.get(image_id, view)
        for fmt in ("zarr", "wds"):
            meta, arrays = example.read_record(default_cache, image_id, view, fmt)
            assert meta == ref.meta
            assert sorted(arrays) == sorted(ref.arrays), fmt
            for name, want in ref.arrays.items():
                got = arrays[name]
                assert got.dtype == want.dtype and got.shape == want.shape, (fmt, name)
                np.testing.assert_array_equal(got, want, err_msg=f"{fmt} {name}")
        chains |= {b["chain"] for b in map(codecs.blob_info, reader.get_encoded(image_id, view).blobs.values())}
    # the default chains really were read (fpn against the cache's basis, topk class maps, int8c boxes)
    assert {"cpca64s0.25+lz4", "topk24f0.015+lz4", "int8c+lz4"} <= chains


def _class_map(rng):
    """[15, 30, 30] probabilities, 3 anchors x 5 classes: a dense patch of kept classes, two isolated
    ones far from it (index gaps past 255: "delta8" escapes) and a background far below every floor."""
    c = (1.0 / (1.0 + np.exp(-rng.normal(-9.0, 0.5, size=(15, 30, 30))))).astype(np.float32)
    c[0:5, 0:10, :] = rng.uniform(0.3, 0.9, size=(5, 10, 30))
    c[10, 15, 15], c[14, 29, 29] = 0.9, 0.95
    return c


# chain -> what its blob must exercise here, so the example's handling of it is tested
EXERCISES = {"topk1f0.2+zstd": ("delta8", True), "pca8s0.25+lz4": ("int8e", True), "cpca6s0.25+lz4": ("int8e", True),
             "int8c+zstd": ("delta", False), "int8c+lz4": ("delta", False)}


@pytest.mark.parametrize("chain", [
    "raw+none", "raw+zstd", "fp16+blosc", "bitround7+bzstd", "int8c+lz4", "int8c+zstd", "u8p+zstd",
    "sparse0.05+zstd", "topk2f0.05+lz4", "topk24f0.015+lz4", "topk1f0.2+zstd", "mask0.3+zstd",
    "pca4+zstd", "pca8s0.25+lz4", "pca8s0.25+pco", "cpca6s0.25+lz4",
])
def test_example_inverts_each_chain_exactly(chain):
    """Every chain the example reads, on maps where the transform does something (kept classes above
    the floor and dropped ones below, masked cells, escaped codes and index gaps), equals
    stores.codecs.decode bit for bit."""
    from stores.cache_basis import BasisFit, basis_id

    example = _example()
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, size=(8, 30, 30)).astype(np.float32)
    x[0, 0, :3] = [1000.0, -800.0, 900.0]  # coefficients past int8 at 0.25-0.5 x rms: int8e escapes
    kw, bases = {}, {}
    if chain.startswith(("topk", "sparse", "u8p")):
        x = _class_map(rng)
        kw = {"classes": 5} if chain.startswith("topk") else {}
    elif chain.startswith("mask"):
        kw = {"score": _class_map(rng)}
    elif chain.startswith("int8c"):  # a smooth ramp per channel: neighbouring codes close, the delta filter pays
        x = (np.arange(1, 9)[:, None, None] * (1 + np.arange(900).reshape(30, 30) / 900)).astype(np.float32)
    elif chain.startswith("cpca"):
        fit = BasisFit()
        for _ in range(3):
            fit.add("fpn.0", x + rng.normal(0, 0.1, size=x.shape))
        kw = {"basis": fit.bases(6)["fpn.0"]}
        bases = {basis_id(kw["basis"]).tobytes(): kw["basis"]}
    blob = codecs.encode(x, chain, **kw)
    want = codecs.decode(blob, CacheBases(fit.bases(6)) if chain.startswith("cpca") else None)
    got = example.decode_blob(blob, bases)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    if chain in EXERCISES:
        filt, escaped = EXERCISES[chain]
        parts = msgpack.unpackb(blob)["parts"].values()
        assert any(e["filter"] == filt and (not escaped or e["escapes"]["shape"][0] > 0) for e in parts), \
            f"{chain}: the test maps no longer exercise {filt}"


def test_example_runs_as_a_script(default_cache):
    out = subprocess.run([sys.executable, str(EXAMPLE), str(default_cache), "--format", "wds"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert '"image_id"' in out and "fpn.0" in out and "cls.0" in out and "box.0" in out
