"""Growing a Zarr store when its manifest's plan gains records (an appended dataset version).

Record r of the plan is row r of every array, and a block is one shard (``block_size`` rows), so
appended records are new rows at the end: every array is resized to the new record count (its
``zarr.json`` rewritten whole; no shard object of an existing block is touched), the index rows of
the new records are written, and the group's ``num_records`` attribute goes LAST. A grow killed
half-way leaves the old ``num_records``, so the next run grows again (every step is idempotent);
a reader pinned to the older plan reads the rows it knows, which are unchanged.
"""

from __future__ import annotations

import numpy as np
import zarr

from stores.manifest import Manifest
from stores.zarr_layout import quiet, store_attrs, zarr_url

ROW_ARRAYS = ("meta", "index/image_id", "index/view", "index/image_size", "index/level_sizes")


def grow_zarr_store(store, manifest: Manifest) -> bool:
    """Resize the store at `store` (``<cache>/zarr``) to `manifest`'s plan when that plan extends the
    one it was built for; True if it grew. A store already at the plan's size is left alone."""
    attrs = store_attrs(store)
    have, want = int(attrs.get("num_records", 0)), len(manifest.plan)
    if have >= want:
        return False
    if int(attrs.get("block_size", 0)) != manifest.block_size:
        raise ValueError(f"{store}: block size {attrs.get('block_size')} is not the manifest's {manifest.block_size}")
    views = list(attrs.get("views") or [])
    views += sorted({v for _, v in manifest.plan[have:]} - set(views))  # new view keys: after the old indices
    with quiet():
        group = zarr.open_group(zarr_url(store), mode="r+")
        names = list(ROW_ARRAYS) + [f"targets/{name}" for name, _ in group["targets"].arrays()]
        for name in names:
            arr = group[name]
            arr.resize((want, *arr.shape[1:]))
        new = manifest.plan[have:]
        group["index/image_id"][have:want] = np.array([i for i, _ in new], dtype=np.int64)
        group["index/view"][have:want] = np.array([views.index(v) for _, v in new], dtype=np.int32)
        group.attrs["kdcache"] = {**attrs, "num_records": want, "views": views}  # last: the grow is done
    return True
