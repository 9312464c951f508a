"""The index's tensor -> shard map, parsed and held compactly.

Kimi-K2's index names 139,583 tensors. Parsed by `json` into a dict of str it costs ~75 MB at
its peak (the text, a pair list, a string per value) and ~25 MB to hold, more than the whole of
surgery needs otherwise. Here the weight_map object is scanned from the file's bytes pair by
pair, and the names are kept as one UTF-8 blob found through a hash table:
~10 MB held, and the parse never holds a Python object per pair. Everything else in the index
(metadata, any other key) still goes through the strict reader, and any input the scan does not
recognise is parsed by the strict reader whole, so the errors and the accepted files are the
same as `read_json`'s.
"""

from __future__ import annotations

import json
import posixpath
import re
from array import array
from bisect import bisect_right
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from ..errors import ReapError
from .files import check_text, loads_strict, read_bytes

_WS = rb"[ \t\n\r]*"
_STRING = rb'"[^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*"'
_PAIR = re.compile(_WS + b"(" + _STRING + b")" + _WS + b":" + _WS + b"(" + _STRING + b")" + _WS + b"([,}])")
_MAP_KEY = re.compile(rb'"weight_map"' + _WS + b":" + _WS + rb"\{")
_EMPTY = re.compile(_WS + rb"\}")


class _NotPlain(Exception):
    """The scan met something it does not handle: the strict reader parses the file instead."""


class WeightMap(Mapping[str, str]):
    """tensor name -> shard file name, in the index's order, at ~70 bytes per tensor: the names
    in one UTF-8 blob, found through an open-addressing table of their (in-process) hashes."""

    def __init__(self, blob: bytearray, ends: array, shard_of: array, shards: list[str], path: Path | None = None):
        self._blob, self._ends, self._shard_of, self._shard_names = blob, ends, shard_of, shards
        n = len(ends)
        size = 1 << max(3, (2 * n).bit_length())  # at most half full: short probes
        self._mask, self._slots = size - 1, array("i", bytes(4 * size))  # slot: name index + 1, 0 = empty
        self._hashes = array("q", bytes(8 * n))
        for i in range(n):
            name = self._name(i)
            self._hashes[i] = hash(name)
            slot, found = self._probe(name, self._hashes[i])
            if found >= 0:
                raise ReapError(path, f"index is not valid JSON (duplicate key {name!r})")
            self._slots[slot] = i + 1
        self.shards = sorted(set(shards[s] for s in set(shard_of)))

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]], path: Path | None = None) -> "WeightMap":
        blob, ends, shard_of, index = bytearray(), array("I"), array("I"), {}
        for name, shard in pairs:
            blob += name.encode("utf-8", "surrogatepass")
            ends.append(len(blob))
            shard_of.append(index.setdefault(shard, len(index)))
        return cls(blob, ends, shard_of, list(index), path)

    def _name(self, i: int) -> str:
        return self._blob[self._ends[i - 1] if i else 0:self._ends[i]].decode("utf-8", "surrogatepass")

    def _probe(self, name: str, h: int) -> tuple[int, int]:
        """(slot, index): where `name` is in the table, or (the empty slot it would take, -1)."""
        slot = h & self._mask
        while (j := self._slots[slot]):
            if self._hashes[j - 1] == h and self._name(j - 1) == name:
                return slot, j - 1
            slot = (slot + 1) & self._mask
        return slot, -1

    def _find(self, name: str) -> int:
        return self._probe(name, hash(name))[1]

    def __getitem__(self, name: str) -> str:
        i = self._find(name) if isinstance(name, str) else -1
        if i < 0:
            raise KeyError(name)
        return self._shard_names[self._shard_of[i]]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) >= 0

    def __iter__(self) -> Iterator[str]:
        return (self._name(i) for i in range(len(self._ends)))

    def __len__(self) -> int:
        return len(self._ends)

    def items(self) -> Iterator[tuple[str, str]]:  # type: ignore[override]
        shards = self._shard_names
        return ((self._name(i), shards[self._shard_of[i]]) for i in range(len(self._ends)))

    def values(self) -> Iterator[str]:  # type: ignore[override]
        shards = self._shard_names
        return (shards[s] for s in self._shard_of)

    def mentions(self, pattern: bytes) -> bool:
        """Whether the bytes regex `pattern` matches in the names' bytes, held back to back (a
        match may run across two names: for a coarse bound that only needs "not anywhere")."""
        return re.search(pattern, self._blob) is not None

    def starting(self, pattern: bytes) -> Iterator[re.Match]:
        """Matches of the bytes regex `pattern` at the start of a name, within it: one scan of the
        names' bytes in C, not a regex call per tensor (139k of them in Kimi-K2's index)."""
        ends, blob, rx = self._ends, self._blob, re.compile(pattern)
        m = rx.search(blob)
        while m is not None:
            at = m.start()
            i = bisect_right(ends, at)
            if i < len(ends) and at == (ends[i - 1] if i else 0) and m.end() <= ends[i]:
                yield m  # within one name: the next name starts after it
                m = rx.search(blob, m.end())
            else:  # across names or inside one: a name may start within it
                m = rx.search(blob, at + 1)


def shard_name(index_path: Path, name, value) -> str:
    """An index weight_map entry: a relative file name inside the checkpoint."""
    if not isinstance(name, str) or not isinstance(value, str) or not value:
        raise ReapError(index_path, f"weight_map entry {name!r}: {value!r} is not a shard file name")
    norm = posixpath.normpath(value)
    if value.startswith(("/", "\\")) or norm == ".." or norm.startswith("../") or "\\" in value or norm != value.removeprefix("./"):
        raise ReapError(index_path, f"weight_map entry {name!r} names {value!r}, which is not a plain file "
                                    "name inside the checkpoint directory")
    return norm


def read_index(index_path: Path) -> tuple[WeightMap, dict]:
    """The index's weight map and its metadata object, strictly read; ReapError naming the file."""
    raw = read_bytes(index_path, "index")
    try:
        *parts, rest = _scan(raw, index_path)
    except _NotPlain:
        parts = None
    if parts is not None:
        del raw  # before the lookup table is built: the two never coexist
        weight_map = WeightMap(*parts, index_path)
    else:  # whatever the scan does not take: the strict reader decides, and says why
        index = loads_strict(raw, index_path, "index")
        del raw
        if not isinstance(index, dict):
            raise ReapError(index_path, f"index is not a JSON object (found a {type(index).__name__})")
        if not isinstance(index.get("weight_map"), dict):
            raise ReapError(index_path, "index has no 'weight_map' object")
        pairs = index.pop("weight_map")
        weight_map = WeightMap.from_pairs(((k, shard_name(index_path, k, v)) for k, v in pairs.items()), index_path)
        rest = index
    if not len(weight_map):
        raise ReapError(index_path, "index has no 'weight_map' object")
    metadata = rest.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ReapError(index_path, "index 'metadata' is not a JSON object")
    return weight_map, metadata


def _scan(raw: bytes, index_path: Path) -> tuple[bytearray, array, array, list[str], dict]:
    """The weight_map object read pair by pair from the bytes, the rest of the file parsed strictly
    around it. Raises _NotPlain for anything but string keys and values in a top-level weight_map."""
    check_text(raw, index_path, "index")
    found = _MAP_KEY.search(raw)
    if found is None:
        raise _NotPlain
    # what precedes the key must be the start of the top-level object (then it is that object's key)
    before = raw[:found.start()].rstrip(b" \t\n\r")
    before = before[:-1] + b"}" if before.endswith(b",") else before + b"}" if before.endswith(b"{") else None
    if before is None:
        raise _NotPlain
    blob, ends, shard_of, index, shard_names = bytearray(), array("I"), array("I"), {}, []
    pos = found.end()
    empty = _EMPTY.match(raw, pos)
    if empty is not None:
        pos = empty.end()
    else:
        for m in _PAIR.finditer(raw, pos):
            if m.start() != pos:
                raise _NotPlain
            key, value, sep = m.groups()
            if key.isascii() and b"\\" not in key:
                blob += key[1:-1]
            else:
                blob += _text(key).encode("utf-8", "surrogatepass")
            ends.append(len(blob))
            if (shard := index.get(value)) is None:
                shard = index[value] = len(index)
                shard_names.append(shard_name(index_path, _text(key), _text(value)))
            shard_of.append(shard)
            pos = m.end()
            if sep == b"}":
                break
        else:
            raise _NotPlain
    after = raw[pos:].strip(b" \t\n\r")
    if after.startswith(b","):
        after = b"{" + after[1:]
    elif after == b"}":
        after = b"{}"
    else:
        raise _NotPlain
    try:
        head, tail = (loads_strict(part, index_path, "index") for part in (before, after))
    except ReapError:
        raise _NotPlain from None
    if set(head) & set(tail) or "weight_map" in head or "weight_map" in tail:
        raise _NotPlain  # a key twice: the strict reader names it
    return blob, ends, shard_of, shard_names, {**head, **tail}


def _text(token: bytes) -> str:
    """A JSON string token's value; escapes and UTF-8 as the strict reader decodes them."""
    try:
        return token[1:-1].decode("utf-8") if b"\\" not in token else json.loads(token.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _NotPlain from None
