"""Safetensors at the byte level: parse and validate headers, write headers, copy byte ranges.

The `safetensors` library can only write a whole dict of tensors at once; surgery
streams, so it writes the header itself and moves bytes by ranges.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import ReapError
from .files import loads_strict

# Bits per element; F4/F6 shapes count logical elements.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
MAX_HEADER = 100_000_000
COPY_CHUNK = 8 << 20


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a shard: where its bytes are, relative to the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    data_offset: int  # absolute file offset of the data buffer
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    return (bits + 7) // 8


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and check a shard header against the file size; raises ReapError on any defect."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ReapError(path, "truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ReapError(path, f"corrupt safetensors header length {n} for a file of {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise ReapError(path, f"cannot read shard: {e.strerror or e}") from None
    try:
        header = loads_strict(raw, path, "header")
    except ReapError as e:
        raise ReapError(path, f"corrupt safetensors header: {e.message}") from None
    if not isinstance(header, dict):
        raise ReapError(path, "corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(v, str) for v in metadata.values())):
        raise ReapError(path, "corrupt safetensors header: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry)
    # Readers require the ranges to tile the buffer exactly.
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != pos:
            raise ReapError(path, f"corrupt safetensors header: tensor {t.name!r} starts at {t.start}, expected {pos}")
        pos = t.end
    expected = 8 + n + pos
    if size != expected:
        what = "is truncated" if size < expected else "has trailing bytes"
        raise ReapError(path, f"shard {what}: {size} bytes on disk, header describes {expected}")
    return ShardHeader(path, 8 + n, tensors, metadata)


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor_info(path: Path, name: str, entry) -> TensorInfo:
    """One header entry, checked as the format requires: a known dtype, a shape of
    non-negative integers, and integer offsets whose range holds exactly that many bytes."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ReapError(path, f"corrupt safetensors header entry for {name!r} "
                              "(needs dtype, shape and data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ReapError(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise ReapError(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(x) for x in offsets)):
        raise ReapError(path, f"tensor {name!r}: data_offsets {offsets!r} are not two non-negative integers")
    start, end = offsets
    if end - start != tensor_nbytes(dtype, shape):
        raise ReapError(path, f"tensor {name!r}: byte range {start}..{end} does not fit {dtype} {shape}")
    return TensorInfo(name, dtype, tuple(shape), start, end)


PAGE = 4096


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None,
                  data_phase: int | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors laid out back to back in the given order.

    entries: (name, dtype, shape, nbytes). The JSON is padded with spaces to a multiple of 8
    so that the data buffer starts aligned, as the official writer does. `data_phase` (a
    multiple of 8) pads further, so that the data starts at that offset modulo PAGE: where
    it matches the source's, a range copy moves whole pages instead of splitting each in two.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    if data_phase is not None and data_phase % 8 == 0:
        raw += b" " * ((data_phase - 8 - len(raw)) % PAGE)
    else:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_order(entries: list[tuple[str, str]]) -> list[int]:
    """Indices of (name, dtype) sorted like the official writer: dtype size descending, then name.

    This order keeps every tensor aligned to its element size.
    """
    return sorted(range(len(entries)), key=lambda i: (-DTYPE_BITS[entries[i][1]], entries[i][0]))


# errnos meaning "copy_file_range cannot do this pair of files" (e.g. across filesystems)
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
_kernel_copy = {"copy_file_range": hasattr(os, "copy_file_range"), "sendfile": hasattr(os, "sendfile")}


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Append `length` bytes of src starting at `offset` to dst, in the kernel where possible.

    copy_file_range first; sendfile where it is unsupported (other filesystem); a buffered
    copy last. Real I/O errors (ENOSPC, EIO) propagate.
    """
    while length > 0:
        n = _copy_some(src_fd, dst_fd, offset, min(length, 1 << 30))
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of file while copying {length} bytes at offset {offset}")
        offset += n
        length -= n


def _copy_some(src_fd: int, dst_fd: int, offset: int, count: int) -> int:
    for method in ("copy_file_range", "sendfile"):
        if not _kernel_copy[method]:
            continue
        try:
            if method == "copy_file_range":
                return os.copy_file_range(src_fd, dst_fd, count, offset)
            return os.sendfile(dst_fd, src_fd, offset, count)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            _kernel_copy[method] = False
    buf = os.pread(src_fd, min(COPY_CHUNK, count), offset)
    view = memoryview(buf)
    while view:
        view = view[os.write(dst_fd, view):]
    return len(buf)
