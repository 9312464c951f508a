"""Tensors read from shards with pread: one open file per shard, headers parsed once.

`safe_open` re-parses a shard's header on every call (0.7 s per layer at Kimi-K2's tensor
count when called per 16 experts) and serves tensors from a memory map whose pages fault
in one by one; here the header comes from the checkpoint's cache and the bytes go straight
into a tensor with preadv (released GIL, so a background thread reads while the layer runs).
Tensors are stored raw (quantized bytes stay quantized: they are decoded on the compute device).
"""

from __future__ import annotations

import os
import time

import torch

from ..common.checkpoint import Checkpoint
from ..errors import ReapError
from .timing import TIMINGS

RAW_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    **({"F8_E8M0": torch.float8_e8m0fnu} if hasattr(torch, "float8_e8m0fnu") else {}),
}


class ShardFiles:
    """Open shards of one checkpoint; `read(key)` returns the stored tensor (a new CPU tensor,
    or `into` when given: a buffer of at least the tensor's bytes, e.g. reused or pinned)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.fds = ckpt, {}

    def __enter__(self) -> "ShardFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def info(self, key: str):
        shard = self.ckpt.weight_map[key]
        return shard, self.ckpt.header(shard).tensors[key]

    def read(self, key: str, into: torch.Tensor | None = None) -> torch.Tensor:
        shard, info = self.info(key)
        dtype = RAW_DTYPES.get(info.dtype)
        if dtype is None:
            raise ReapError(self.ckpt.path / shard, f"tensor {key!r}: dtype {info.dtype} cannot be read for calibration")
        if shard not in self.fds:
            self.fds[shard] = os.open(self.ckpt.path / shard, os.O_RDONLY)
        buf = torch.empty(info.nbytes, dtype=torch.uint8) if into is None else into.view(torch.uint8).reshape(-1)[: info.nbytes]
        t0 = time.perf_counter()
        view, pos = memoryview(buf.numpy()), 0
        start = self.ckpt.header(shard).data_offset + info.start
        while pos < info.nbytes:
            got = os.preadv(self.fds[shard], [view[pos:]], start + pos)
            if got <= 0:
                raise ReapError(self.ckpt.path / shard, f"tensor {key!r}: file ends inside its data")
            pos += got
        TIMINGS.add("read", time.perf_counter() - t0)
        TIMINGS.bytes_read += info.nbytes
        return buf.view(dtype).view(info.shape)
