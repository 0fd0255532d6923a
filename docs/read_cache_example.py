"""Read one record of a kdcache cache with numpy, zarr, webdataset and numcodecs alone.

    python docs/read_cache_example.py CACHE [--image-id N] [--view KEY] [--format zarr|wds]

Imports nothing from kdcache: it follows docs/cache-format.md, so another tool can read a cache
the same way. It finds the record in the manifest's plan, checks that its block is committed
(done marker / shard present), reads the record's blobs from the Zarr store or the WebDataset
shard, and decodes every dense target (fpn.*, cls.*, box.*, quality.*) and the small exact ones
(det.*, cand.*, tower.*) to numpy arrays, checking each part's checksum on the way.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
import zlib
from pathlib import Path

import numcodecs
import numpy as np
import webdataset as wds
import zarr
from webdataset.autodecode import msgpack_loads  # msgpack without pickle: maps, strings, bytes

# ------------------------------------------------------------------------------- the lossless stage

_ZSTD, _BLOSC = numcodecs.Zstd(), numcodecs.Blosc()  # decoders read their settings from the frame


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`: numcodecs' CRC32C codec appends it, little-endian."""
    return int.from_bytes(bytes(numcodecs.CRC32C().encode(np.frombuffer(data, np.uint8)))[-4:], "little")


def stored_array(entry: dict) -> np.ndarray:
    """A part's entry -> the array as stored (before its filter is undone), checksums checked."""
    codec, raw = entry["codec"], entry["bytes"]
    if codec == "none":
        data = raw
    elif codec == "zstd":  # the frame carries its own checksum, checked by zstd
        data = bytes(_ZSTD.decode(raw))
    elif codec == "blosc":  # lz4 / bzstd / blz4 / blosc stages: one blosc frame, settings inside
        data = bytes(_BLOSC.decode(raw))
    elif codec == "pco":  # pcodec stream of the part's numbers (pip install pcodec)
        from numcodecs.pcodec import PCodec

        data = np.ascontiguousarray(PCodec().decode(raw)).tobytes()
    else:
        raise ValueError(f"unknown lossless codec {codec!r}")
    if "crc32" in entry and zlib.crc32(data) != entry["crc32"]:
        raise ValueError("part fails its crc32")
    if "crc32c" in entry and crc32c(data) != entry["crc32c"]:
        raise ValueError("part fails its crc32c")
    return np.frombuffer(data, dtype=np.dtype(entry["dtype"])).reshape(entry["shape"]).copy()


def part(entry: dict) -> np.ndarray:
    """A part's entry -> the transform's part: the filter undone (delta / delta8 / int8e)."""
    a, filt = stored_array(entry), entry.get("filter", "none")
    if filt == "none":
        return a
    if filt == "delta":  # running sum in the part's own wrapping arithmetic (uint32 idx, int8 codes)
        return np.cumsum(a.reshape(-1), dtype=a.dtype).reshape(a.shape)
    escapes = stored_array(entry["escapes"])  # the true values of the marked entries, in order
    if filt == "delta8":  # uint8 differences, 255 = the next escape; then the uint32 running sum
        d = a.astype(np.uint32)
        d[a == 255] = escapes
        return np.cumsum(d, dtype=np.uint32)
    if filt == "int8e":  # int16 codes as int8, -128 = the next escape (C order)
        q = a.astype(np.int16)
        q[a == -128] = escapes
        return q
    raise ValueError(f"unknown filter {filt!r}")


# ------------------------------------------------------------------------------- the transforms


def logit_centres(floor: float) -> np.ndarray:
    """float32 [256]: the probability each topk code stands for (255 equal logit steps up to 9)."""
    lo = np.log(floor) - np.log1p(-floor)
    step = (max(9.0, lo + 1e-3) - lo) / 255.0
    return (1.0 / (1.0 + np.exp(-(lo + step * np.arange(256, dtype=np.float64))))).astype(np.float32)


def topk_map(p: dict, shape: tuple, k: int, floor: float) -> np.ndarray:
    """Kept classes at their codes; every other element the rank-one background bgc[c] * bgs[n],
    capped per (anchor, cell) group at its smallest kept value when the group kept min(k, G)
    classes (top-k may have dropped classes above the floor there), else at the floor."""
    c, cells = shape[0], int(np.prod(shape[1:]))
    idx, vals = p["idx"].astype(np.int64), logit_centres(floor)[p["q"]]
    bg = p["bgc"][:, None] * p["bgs"].astype(np.float32)[None, :]  # [C, N]
    if "classes" in p:
        g = int(p["classes"][0])
        group = idx // cells // g * cells + idx % cells
        smallest = np.ones(c // g * cells, np.float32)
        np.minimum.at(smallest, group, vals)
        full = np.bincount(group, minlength=c // g * cells) >= min(k, g)
        cap = np.where(full, smallest, np.float32(floor)).reshape(c // g, 1, cells)
        bg = np.minimum(bg.reshape(c // g, g, cells), cap)
    else:  # a blob without the classes part: capped at the floor everywhere
        bg = np.minimum(bg, np.float32(floor))
    out = bg.reshape(-1)
    out[idx] = vals
    return out.reshape(shape)


def decode_blob(blob: bytes, bases: dict[bytes, np.ndarray]) -> np.ndarray:
    """One blob -> its array: float32 for lossy chains, the stored dtype for raw."""
    h = msgpack_loads(blob)
    if h.get("format") != "kdcache-blob" or h.get("version") != 1:
        raise ValueError(f"not a kdcache blob of format version 1: {h.get('format')!r} {h.get('version')!r}")
    p = {name: part(e) for name, e in h["parts"].items()}
    transform, shape = h["chain"].split("+")[0], tuple(h["shape"])
    num = [float(x) for x in re.findall(r"\d+\.?\d*(?:e-?\d+)?", transform)]
    if transform == "raw":
        return p["data"].astype(h["dtype"])
    if transform == "fp16" or transform.startswith("bitround"):
        return p["data"].astype(np.float32)
    if transform == "u8p":
        return p["q"].astype(np.float32) / np.float32(255)
    if transform == "int8c":  # per-channel scale on axis 0
        c = shape[0] if shape else 1
        return (p["q"].reshape(c, -1).astype(np.float32) * p["scale"][:, None]).reshape(shape)
    if transform.startswith("sparse"):
        out = np.zeros(int(np.prod(shape)), np.float32)
        out[p["idx"]] = p["val"].astype(np.float32)
        return out.reshape(shape)
    if transform.startswith("topk"):  # topkKfF
        return topk_map(p, shape, int(num[0]), num[1])
    if transform.startswith("mask"):  # int8c columns at the kept cells, zeros elsewhere
        out = np.zeros((shape[0], int(np.prod(shape[1:]))), np.float32)
        out[:, p["idx"]] = p["q"].astype(np.float32) * p["scale"][:, None]
        return out.reshape(shape)
    if transform.startswith(("pca", "cpca")):  # basis @ coefficients + mean, per level
        if transform.startswith("cpca"):  # the cache's basis, named by the blob's 8-byte id
            p["basis"] = bases[p["bid"].tobytes()][:, : p["q"].shape[0]]
        scale = p["step"][0] if "step" in p else p["scale"][:, None]  # pcaKsS / cpcaKsS : pcaK
        coeff = p["q"].reshape(p["q"].shape[0], int(np.prod(shape[1:]))).astype(np.float32) * scale
        return (p["basis"].astype(np.float32) @ coeff + p["mean"][:, None]).reshape(shape)
    raise ValueError(f"{h['chain']}: zfp / sz chains need zfpy / pysz, not read here")


def cache_bases(root: Path) -> dict[bytes, np.ndarray]:
    """static/codec_basis.npz: the cpca chains' bases, by id (sha256 of shape and float16 bytes)."""
    import hashlib

    path = root / "static" / "codec_basis.npz"
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as npz:
        bases = [np.ascontiguousarray(npz[name], dtype="<f2") for name in npz.files]
    return {hashlib.sha256(repr(b.shape).encode() + b.tobytes()).digest()[:8]: b for b in bases}


# ------------------------------------------------------------------------------- the stores


def record_blobs(root: Path, image_id: int, view: str, fmt: str) -> tuple[dict, dict[str, bytes]]:
    """(meta, {target name: blob}) of one record, from a committed block only."""
    manifest = json.loads((root / "manifest.json").read_text())
    plan = [(int(i), str(v)) for i, v in manifest["plan"]]
    r = plan.index((image_id, view))
    block = r // manifest["block_size"]
    if fmt == "zarr":
        if not (root / "zarr" / "done" / f"block-{block:06d}.json").exists():
            raise ValueError(f"block {block} of record ({image_id}, {view}) is not committed (no done marker)")
        with warnings.catch_warnings():  # zarr warns of done/ (not zarr) and of vlen bytes' draft spec
            warnings.simplefilter("ignore")
            group = zarr.open_group(str(root / "zarr"), mode="r")
            families = list(group["targets"].array_keys())  # one array per family, one element per record
            element = {name: group[name][r : r + 1][0] for name in ["meta"] + [f"targets/{f}" for f in families]}
        blobs = {}
        for family in families:
            blobs.update(msgpack_loads(element[f"targets/{family}"]))
        return json.loads(element["meta"]), blobs
    shard = root / "wds" / f"shard-{block:06d}.tar"  # present = committed (written whole, marker last)
    key = f"{image_id:012d}_{view}"
    for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
        if sample["__key__"] == key:
            blobs = {k[: -len(".msgpack")]: v for k, v in sample.items() if k.endswith(".msgpack")}
            return json.loads(sample["meta.json"]), blobs
    raise ValueError(f"{shard} does not hold record {key}")


def read_record(root: str | Path, image_id: int, view: str, fmt: str = "zarr") -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, {target name: decoded array}) of one record."""
    root = Path(root)
    meta, blobs = record_blobs(root, image_id, view, fmt)
    bases = cache_bases(root)
    return meta, {name: decode_blob(blob, bases) for name, blob in sorted(blobs.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", type=Path, help="the cache folder (holds manifest.json)")
    ap.add_argument("--image-id", type=int, help="default: the plan's first record")
    ap.add_argument("--view", help="view key, e.g. s800m1333f0 (default: the plan's first for the image)")
    ap.add_argument("--format", choices=("zarr", "wds"), default="zarr")
    args = ap.parse_args()
    plan = json.loads((args.cache / "manifest.json").read_text())["plan"]
    image_id = plan[0][0] if args.image_id is None else args.image_id
    view = args.view or next(v for i, v in plan if i == image_id)
    meta, arrays = read_record(args.cache, image_id, view, args.format)
    print(json.dumps(meta))
    for name, a in arrays.items():
        print(f"{name:24s} {str(a.dtype):8s} {a.shape}")


if __name__ == "__main__":
    main()
