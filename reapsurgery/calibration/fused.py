"""Per-expert tensors read straight into the fused tensor transformers builds from them.

transformers v5 stacks a layer's per-expert tensors (`MergeModulelist`) and, for gate and up,
concatenates the stacks (`Concatenate`); done on tensors read first, a layer's experts sit in
memory up to three times at once (the tensors read, the stacks, their concatenation). Here the
fused tensor is allocated once and each expert's tensor is read (pread, no memory map) into its
slot: slot e of a stack is the e-th key of its source pattern in transformers' own key order,
and concatenation follows the converter's source-pattern order, as those two operations do.
A quantized checkpoint's experts are dequantised a few at a time into the fused tensor (in the
compute dtype), instead of all of them in float32 first. Only converters made of exactly these
operations take this path; everything else goes through transformers' conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

from ..common.checkpoint import Checkpoint
from .dequant import is_quantized, read_layer_tensors
from .finite import check_computed, check_weight, is_finite
from .shardread import ShardFiles
from .timing import TIMINGS
from ..errors import ReapError

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


def readable(ckpt: Checkpoint, key: str) -> bool:
    """Stored unquantized in a dtype this reader knows, or quantized (dequantised as read)."""
    if is_quantized(ckpt):
        return True
    return _info(ckpt, key)[1].dtype in TORCH_DTYPES


def read_fused(ckpt: Checkpoint, target: FusedTarget, source_of: dict[str, str], dtype: torch.dtype,
               want: torch.Size, *, device: str | torch.device = "cpu", out: torch.Tensor | None = None,
               files: ShardFiles | None = None) -> torch.Tensor:
    """The fused tensor of `target`, of shape `want` in `dtype`; `source_of` maps a key as converted
    to its name in the checkpoint. Raises ReapError when the experts do not make that tensor.

    `out` (a released layer's tensor of that shape and dtype) is filled instead of a fresh
    allocation whose pages would fault in on first write. A quantized checkpoint's experts are
    decoded on `device`, into `out` there; unquantized ones are read into `out` where it lives."""
    patterns = [p for p in target.converter.source_patterns if p in target.keys]
    ops = target.converter.operations
    axis = ops[1].dim - 1 if len(ops) == 2 else None  # concatenation axis within one expert
    if out is None or out.shape != want or out.dtype != dtype:
        out = torch.empty(want, dtype=dtype, device=device if is_quantized(ckpt) else "cpu")

    def bad(msg: str) -> ReapError:
        return ReapError(ckpt.path, f"{target.name}: {msg}; the model expects {list(want)}")

    offset = 0
    with _Pieces(ckpt, out.device, files) as pieces:
        for p in patterns:
            keys = target.keys[p]
            if len(keys) != want[0]:
                raise bad(f"{len(keys)} experts' tensors match {p}")
            size = None
            for e, (key, piece) in enumerate(pieces.read([source_of[k] for k in keys])):
                if axis is None:
                    slot = out[e]
                else:
                    size = piece.shape[axis] if size is None else size
                    if piece.dim() != out.dim() - 1 or offset + size > want[axis + 1]:
                        raise bad(f"{key} has shape {list(piece.shape)}")
                    slot = out[e].narrow(axis, offset, size)
                if piece.shape != slot.shape:
                    raise bad(f"{key} has shape {list(piece.shape)}")
                with TIMINGS.phase("convert"):
                    slot.copy_(piece)
            offset += size or 0
    if axis is not None and offset != want[axis + 1]:
        raise bad(f"its experts' tensors add up to {offset} along dimension {axis + 1}")
    return out


def check_fused(ckpt: Checkpoint, target: FusedTarget, source_of: dict[str, str], fused: torch.Tensor,
                files: ShardFiles | None = None) -> None:
    """A fused tensor (checked where it lives: on a GPU, at memory speed) holds no NaN or infinity;
    where it does, each of its experts' tensors is read again to name the one that holds it."""
    if is_finite(fused):
        return
    for keys in target.keys.values():
        for key in keys:
            check_weight(ckpt.path / ckpt.weight_map[source_of[key]], source_of[key],
                         read_layer_tensors(ckpt, [source_of[key]], "cpu", files)[source_of[key]])
    check_computed(ckpt.path, f"{target.name} (its experts' tensors fused)", fused, fused.dtype)


class _Pieces:
    """One expert's tensor at a time: pread into a reusable buffer, or, for a quantized checkpoint,
    decoded a few experts at a time on the device of the fused tensor."""

    CHUNK = 16

    def __init__(self, ckpt: Checkpoint, device: torch.device, files: ShardFiles | None):
        self.ckpt, self.device, self.buffers = ckpt, device, {}
        self.own = files is None
        self.files = ShardFiles(ckpt) if self.own else files

    def __enter__(self) -> "_Pieces":
        return self

    def __exit__(self, *exc) -> None:
        if self.own:
            self.files.close()

    def read(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        if is_quantized(self.ckpt):
            for s in range(0, len(keys), self.CHUNK):
                chunk = read_layer_tensors(self.ckpt, keys[s : s + self.CHUNK], self.device, self.files)
                for key in keys[s : s + self.CHUNK]:
                    yield key, chunk.pop(key)
        else:
            for key in keys:
                nbytes = self.files.info(key)[1].nbytes
                buf = self.buffers.get(nbytes)
                if buf is None:
                    buf = self.buffers[nbytes] = torch.empty(nbytes, dtype=torch.uint8)
                yield key, self.files.read(key, into=buf)


def _info(ckpt: Checkpoint, key: str):
    shard = ckpt.weight_map[key]
    return shard, ckpt.header(shard).tensors[key]
