"""Per-expert tensors read straight into the fused tensor transformers builds from them.

transformers v5 stacks a layer's per-expert tensors (`MergeModulelist`) and, for gate and up,
concatenates the stacks (`Concatenate`); done on tensors read first, a layer's experts sit in
memory up to three times at once (the tensors read, the stacks, their concatenation). Here the
fused tensor is allocated once and each expert's bytes are read (pread, no memory map) into its
slot: slot e of a stack is the e-th key of its source pattern in transformers' own key order,
and concatenation follows the converter's source-pattern order, as those two operations do.
Only converters made of exactly these operations, on unquantized tensors, take this path;
everything else goes through transformers' conversion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

from .checkpoint import Checkpoint
from .errors import ReapError

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@dataclass
class FusedTarget:
    """One fused parameter: its converter and, per source pattern, the checkpoint keys in slot order."""

    name: str
    converter: WeightConverter
    keys: dict[str, list[str]] = field(default_factory=dict)  # pattern -> keys (as converted)


def stacks_only(converter: WeightConverter) -> bool:
    """MergeModulelist(dim=0), optionally followed by Concatenate over a non-expert axis."""
    ops = converter.operations
    if not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0:
        return False
    if len(ops) == 1:
        return len(converter.source_patterns) == 1
    return len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim >= 1


def read_fused(ckpt: Checkpoint, target: FusedTarget, source_of: dict[str, str], dtype: torch.dtype,
               want: torch.Size) -> torch.Tensor:
    """The fused tensor of `target`, built in `dtype`; `source_of` maps a key as converted to its
    name in the checkpoint. Raises ReapError when the pieces do not make a tensor of shape `want`."""
    patterns = [p for p in target.converter.source_patterns if p in target.keys]
    infos = {k: _info(ckpt, source_of[k]) for p in patterns for k in target.keys[p]}
    counts = {len(target.keys[p]) for p in patterns}
    shapes = {p: {infos[k][1].shape for k in target.keys[p]} for p in patterns}
    ops = target.converter.operations
    axis = ops[1].dim - 1 if len(ops) == 2 else None  # concatenation axis within one expert
    if len(counts) != 1 or any(len(s) != 1 for s in shapes.values()):
        raise ReapError(ckpt.path, f"{target.name}: expert tensors differ in number or shape across experts")
    n, per = counts.pop(), [next(iter(shapes[p])) for p in patterns]
    shape = list(per[0])
    if axis is not None:
        shape[axis] = sum(s[axis] for s in per)
    if torch.Size([n, *shape]) != want:
        raise ReapError(ckpt.path, f"{target.name}: checkpoint experts make shape {[n, *shape]}, the model "
                                   f"expects {list(want)}")
    out = torch.empty((n, *shape), dtype=dtype)
    offset = 0
    with _Reader(ckpt) as reader:
        for p, s in zip(patterns, per):
            for e, key in enumerate(target.keys[p]):
                slot = out[e] if axis is None else out[e].narrow(axis, offset, s[axis])
                slot.copy_(reader.read(*infos[key]))
            offset += s[axis] if axis is not None else 0
    return out


def readable(ckpt: Checkpoint, key: str) -> bool:
    """Stored in a dtype this reader knows (an unquantized float)."""
    _, info = _info(ckpt, key)
    return info.dtype in TORCH_DTYPES


def _info(ckpt: Checkpoint, key: str):
    shard = ckpt.weight_map[key]
    return shard, ckpt.header(shard).tensors[key]


class _Reader:
    """pread into one reusable buffer per size; one open file per shard."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.fds, self.buffers = ckpt, {}, {}

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def read(self, shard: str, info) -> torch.Tensor:
        if shard not in self.fds:
            self.fds[shard] = os.open(self.ckpt.path / shard, os.O_RDONLY)
        buf = self.buffers.get(info.nbytes)
        if buf is None:
            buf = self.buffers[info.nbytes] = torch.empty(info.nbytes, dtype=torch.uint8)
        view, pos = memoryview(buf.numpy()), 0
        start = self.ckpt.header(shard).data_offset + info.start
        while pos < info.nbytes:
            got = os.preadv(self.fds[shard], [view[pos:]], start + pos)
            if got <= 0:
                raise ReapError(self.ckpt.path / shard, f"tensor {info.name!r}: file ends inside its data")
            pos += got
        return buf.view(TORCH_DTYPES[info.dtype]).view(info.shape)
