"""Shared by the loader tests: flip bytes of one part's compressed frame and count what the decoder does."""

from __future__ import annotations

import msgpack
import numpy as np

from stores.codecs import BlobDecodeError, unpack


def refused_flips(blob: bytes, part: str, positions) -> tuple[int, int]:
    """(refused, tried): for each position, flip one bit of `part`'s stored bytes and unpack; every
    flip must either be refused (BlobDecodeError) or decode to exactly the undamaged values."""
    header = msgpack.unpackb(blob, raw=False)
    frame = header["parts"][part]["bytes"]
    want = unpack(blob).parts[part]
    refused, tried = 0, 0
    for at in positions:
        bad = bytearray(frame)
        bad[at] ^= 0x20
        header["parts"][part]["bytes"] = bytes(bad)
        tried += 1
        try:
            got = unpack(msgpack.packb(header, use_bin_type=True)).parts[part]
        except BlobDecodeError:
            refused += 1
            continue
        np.testing.assert_array_equal(got, want, err_msg=f"byte {at} flipped decodes to other values")
    return refused, tried
