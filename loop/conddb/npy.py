"""Reading untrusted ``.npy`` payloads without letting their header decide the memory.

``np.load`` trusts the header: a 100-byte file that announces a shape of 10^12 makes it
allocate the whole array before it notices that the data is missing. Here the header is
read with a bounded size, the announced array size is compared with the bytes actually
present, and only then is the array built (over those bytes, no further allocation).
Only plain ``.npy`` is a payload: ``.npz`` archives, pickles and object arrays are
refused.
"""

from __future__ import annotations

import io
import math

import numpy as np
from numpy.lib import format as npy_format

from loop.errors import ConditionsError

MAX_HEADER_BYTES = 4096  # numpy writes ~128; a longer header is not from np.save


class BadPayload(ConditionsError):
    """Bytes that are not a plain ``.npy`` array."""


def load_npy(data: bytes) -> np.ndarray:
    """The array in ``data`` (one ``.npy``), checked before anything is allocated."""
    stream = io.BytesIO(data)
    try:
        version = npy_format.read_magic(stream)
        shape, fortran, dtype = _read_header(stream, version)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise BadPayload(f"payload is not a .npy array ({_first_line(exc)})") from None
    if dtype.hasobject:
        raise BadPayload("payload is an object array (pickles are refused)")
    expected = math.prod(shape) * dtype.itemsize
    present = len(data) - stream.tell()
    if expected != present:
        raise BadPayload(
            f"payload header announces {expected} data bytes, the payload holds {present}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    # a copy: writeable like np.load's arrays, and no larger than the bytes received
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


def _read_header(
    stream: io.BytesIO, version: tuple[int, int]
) -> tuple[tuple[int, ...], bool, np.dtype]:
    # versions 1.0 and 2.0 are what np.save writes for arrays without unicode field names
    if version == (1, 0):
        return npy_format.read_array_header_1_0(stream, max_header_size=MAX_HEADER_BYTES)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(stream, max_header_size=MAX_HEADER_BYTES)
    raise ValueError(f"unsupported .npy version {version}")


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
