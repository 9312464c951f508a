"""Safetensors output shards: each an encoded header plus the coalesced source ranges of its data.

An output shard is what the format-neutral writer (writer.py) needs, a header and byte ranges of one
source file, built from the tensors surgery keeps or slices; large ones are split for the copy workers.
"""

from __future__ import annotations

import json
import math
from array import array
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

from ..common.safetensors_io import DTYPE_BITS, PAGE, TensorInfo, encode_header, write_order
from ..errors import ReapError
from .copier import MAX_JOBS, coalesce


@dataclass(slots=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    ranges: list[tuple[int, int]]  # (absolute offset in the source shard, length)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.ranges)


class Entry(NamedTuple):
    """One tensor of an output shard, as its header states it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(slots=True)
class OutShard:
    """An output shard, compact: its encoded header and its coalesced source ranges, not one
    record per tensor (a plan of Kimi-K2's 139k tensors then holds a few MB)."""

    source: str
    header: bytes  # length prefix included, as written
    ranges: array  # offset, length, offset, length... of the source shard, output order, coalesced
    nbytes: int
    elements: int
    name: str = ""

    @classmethod
    def build(cls, source: str, tensors: list[OutTensor], metadata: dict | None, name: str = "") -> "OutShard":
        """The shard holding `tensors` in write order (dtype size descending, then name)."""
        order = write_order([(t.name, t.dtype) for t in tensors])
        tensors = [tensors[i] for i in order]
        ranges = array("Q", chain.from_iterable(coalesce(r for t in tensors for r in t.ranges)))
        header = encode_header([(t.name, t.dtype, t.shape, t.nbytes) for t in tensors], metadata,
                               _phase(ranges))
        return cls(source, header, ranges,
                   sum(t.nbytes for t in tensors), sum(math.prod(t.shape) for t in tensors), name)

    def split(self, parts: int) -> list["OutShard"]:
        """This shard as up to `parts` shards of about equal bytes, cut between tensors (each
        part still in write order), its source ranges cut at the same output offsets."""
        if parts <= 1:
            return [self]
        metadata, tensors = self._read_back()
        groups: list[list[Entry]] = [[]]
        done = 0
        for t in tensors:
            if groups[-1] and done >= len(groups) * self.nbytes / parts:
                groups.append([])
            groups[-1].append(t)
            done += t.nbytes
        if len(groups) == 1:
            return [self]
        ranges = zip(self.ranges[::2], self.ranges[1::2])
        off = left = 0
        out = []
        for group in groups:
            nbytes = need = sum(t.nbytes for t in group)
            cut = array("Q")
            while need:
                if not left:
                    off, left = next(ranges)
                take = min(need, left)
                cut.extend((off, take))
                off, left, need = off + take, left - take, need - take
            out.append(OutShard(self.source, encode_header(group, metadata, _phase(cut)), cut, nbytes,
                                sum(math.prod(t.shape) for t in group)))
        return out

    @property
    def tensors(self) -> list[Entry]:
        """The shard's tensors in output order, read back from its header."""
        return self._read_back()[1]

    def _read_back(self) -> tuple[dict | None, list[Entry]]:
        """The header's metadata and its tensors in output order."""
        entries = json.loads(self.header[8:])
        metadata = entries.pop("__metadata__", None)
        return metadata, [Entry(k, v["dtype"], tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0])
                          for k, v in entries.items()]


def _phase(ranges: array) -> int | None:
    """Where in its page the shard's first source range starts: the output's data starts there too."""
    return ranges[0] % PAGE if ranges else None


PART_MIN = 256 << 20  # no shard is split below this size: smaller files gain nothing


def for_writers(shards: list[OutShard]) -> list[OutShard]:
    """The shards, those larger than the output's share per worker (of MAX_JOBS) split, so that
    every worker can write a file of its own (see copier). Depends only on the plan, never on
    --jobs, so a mask gives the same files on every machine; a real checkpoint, with more
    shards than workers, is left as it is."""
    share = max(PART_MIN, -(-sum(s.nbytes for s in shards) // MAX_JOBS))
    return [part for s in shards for part in s.split(-(-s.nbytes // share))]


def index_runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of ascending indices as (start, count)."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def slice_ranges(info: TensorInfo, base: int, axis: int, kept: list[int], n_experts: int) -> list[tuple[int, int]]:
    """Byte ranges that hold the retained experts of a tensor whose `axis` is the expert axis."""
    outer = math.prod(info.shape[:axis])
    inner_bits = math.prod(info.shape[axis + 1 :]) * DTYPE_BITS[info.dtype]
    if inner_bits % 8:
        raise ReapError(None, f"tensor {info.name!r}: an expert's slice is not a whole number of bytes")
    inner = inner_bits // 8
    if inner == 0:  # no bytes (a zero dimension): nothing to copy, however many rows a header claims
        return []
    ranges: list[tuple[int, int]] = []
    for o in range(outer):
        row = base + info.start + o * n_experts * inner
        for start, count in index_runs(kept):
            off, n = row + start * inner, count * inner
            if ranges and ranges[-1][0] + ranges[-1][1] == off:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
            else:
                ranges.append((off, n))
    return ranges
