"""GGUF files at the byte level: read and check the header (key-values, tensor infos), find split parts.

The facts (magic, value types, ggml block sizes, key names) come from the `gguf` package,
llama.cpp's own Python library. Its constants module is loaded on its own: the package's
`__init__` imports numpy (0.2 s of start-up, most of a warm 1 GiB copy), and nothing here
needs it. Its GGUFReader is not used for the same reason and one more: it builds a numpy
view per string of the tokenizer (hundreds of thousands), where surgery needs only where
each key-value record lies, the few values it rewrites, and the tensor infos.

The checks are llama.cpp's own (ggml/src/gguf.cpp, gguf_init_from_file_impl, and the model
loader's bounds check), so a file refused here is one llama.cpp refuses too: every tensor lies
in the data section back to back in info order, each padded to `general.alignment`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from ..errors import ReapError

GGML_MAX_NAME = 64  # ggml.h: tensor names are shorter than this
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")  # llama_split_path
_READ = 1 << 20  # header bytes read at a time
_DECODED_ARRAY = 1 << 16  # numeric arrays up to this many items are decoded (per-layer counts); longer ones kept as extents


def constants() -> ModuleType:
    """The gguf package's constants module (GGUF_MAGIC, GGUFValueType, GGML_QUANT_SIZES, Keys...),
    without importing the package (and numpy) where it is not imported already."""
    if "gguf.constants" in sys.modules:
        return sys.modules["gguf.constants"]
    name = "reapsurgery._gguf_constants"
    if name not in sys.modules:
        spec = importlib.util.find_spec("gguf")
        if spec is None or not spec.origin:
            raise ReapError(None, "reading GGUF files needs the gguf package (pip install gguf)")
        path = Path(spec.origin).with_name("constants.py")
        loader = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def is_gguf(path: str | os.PathLike) -> bool:
    """A path that names a GGUF file (by its suffix): apply, verify and inspect take those as GGUF."""
    return str(path).endswith(".gguf")


class KV(NamedTuple):
    """One metadata record: where its bytes lie (start..end, the key's length prefix included),
    its type, and its value where decoded (scalars, strings, numeric arrays up to 65536 items)."""

    key: str
    type: int  # GGUFValueType; ARRAY for arrays
    value: Any  # None for string arrays and long numeric arrays
    start: int
    end: int
    item_type: int | None = None  # arrays: the items' type
    count: int | None = None  # arrays: how many items


class GGUFTensor(NamedTuple):
    """One tensor info: ne[0] fastest; `offset` relative to the data section."""

    name: str
    ne: tuple[int, ...]
    type: int  # GGMLQuantizationType
    offset: int
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    size: int  # bytes on disk
    version: int
    alignment: int
    kv: dict[str, KV]  # in file order
    tensors: list[GGUFTensor]  # in info order, which is data order
    kv_end: int  # where the tensor infos start
    info_end: int  # where the tensor infos end (the data section starts at the next multiple of alignment)
    data_offset: int
    data_end: int = field(default=0)  # end of the last tensor's data, padding excluded

    def value(self, key: str, default: Any = None) -> Any:
        kv = self.kv.get(key)
        return default if kv is None else kv.value

    @property
    def arch(self) -> str | None:
        return self.value(constants().Keys.General.ARCHITECTURE)

    def arch_key(self, template: str) -> str:
        """A `{arch}.` key of this file's architecture, e.g. Keys.LLM.EXPERT_COUNT -> qwen3moe.expert_count."""
        return template.format(arch=self.arch)

    def split(self) -> tuple[int, int, int | None]:
        """(split.no, split.count, split.tensors.count); (0, 1, None) for a file that is not a split part."""
        keys = constants().Keys.Split
        count = self.value(keys.LLM_KV_SPLIT_COUNT, 1)
        return self.value(keys.LLM_KV_SPLIT_NO, 0), count, self.value(keys.LLM_KV_SPLIT_TENSORS_COUNT)


def pad(n: int, alignment: int) -> int:
    return -n % alignment


def type_name(ggml_type: int) -> str:
    try:
        return constants().GGMLQuantizationType(ggml_type).name
    except ValueError:
        return str(ggml_type)


def tensor_nbytes(ne: tuple[int, ...], ggml_type: int) -> int:
    """ggml_nbytes: whole blocks of ne[0], times the slower axes."""
    block, size = constants().GGML_QUANT_SIZES[constants().GGMLQuantizationType(ggml_type)]
    n = ne[0] // block * size
    for d in ne[1:]:
        n *= d
    return n


class _Cursor:
    """Reads the header front to back, a MiB at a time; every short read is a truncated file."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # file offset of the next byte

    def _need(self, n: int, what: str) -> int:
        """Make n bytes from pos available; returns their index in buf."""
        i = self.pos - self.base
        if i + n > len(self.buf):
            if self.pos + n > self.size:
                raise ReapError(self.path, f"truncated GGUF file: {what} at byte {self.pos} runs past the end "
                                           f"of the file ({self.size} bytes)")
            self.f.seek(self.pos)
            self.buf = self.f.read(max(n, _READ))
            self.base, i = self.pos, 0
            if len(self.buf) < n:
                raise ReapError(self.path, f"truncated GGUF file: {what} at byte {self.pos} runs past the end of the file")
        return i

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        i = self._need(fmt.size, what)
        self.pos += fmt.size
        return fmt.unpack_from(self.buf, i)

    def raw(self, n: int, what: str) -> bytes:
        i = self._need(n, what)
        self.pos += n
        return self.buf[i:i + n]

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise ReapError(self.path, f"truncated GGUF file: {what} at byte {self.pos} runs past the end "
                                       f"of the file ({self.size} bytes)")
        self.pos += n

    def string(self, what: str) -> bytes:
        (n,) = self.unpack(_U64, what)
        return self.raw(n, what)

    def skip_strings(self, count: int, what: str) -> None:
        """Step over `count` strings (a tokenizer's hundreds of thousands) without decoding them: one
        tight loop over the buffer, refilled as it runs out."""
        unpack = _U64.unpack_from
        buf, i = self.buf, self.pos - self.base
        for _ in range(count):
            if i + 8 > len(buf):
                self.pos = self.base + i
                i = self._need(8, what)
                buf = self.buf
            i += 8 + unpack(buf, i)[0]
        self.pos = self.base + i
        if self.pos > self.size:
            raise ReapError(self.path, f"truncated GGUF file: {what} runs past the end of the file ({self.size} bytes)")


_U32, _U64, _HEAD = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<4sIQQ")
_SCALAR = {"UINT8": "B", "INT8": "b", "UINT16": "H", "INT16": "h", "UINT32": "I", "INT32": "i", "FLOAT32": "f",
           "BOOL": "?", "UINT64": "Q", "INT64": "q", "FLOAT64": "d"}


def scalar_format(value_type: int) -> struct.Struct | None:
    """The little-endian struct of a scalar GGUF value type; None for STRING and ARRAY."""
    name = constants().GGUFValueType(value_type).name
    return struct.Struct("<" + _SCALAR[name]) if name in _SCALAR else None


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and check one GGUF file's header; every defect is a ReapError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _read(f, path, size)
    except IsADirectoryError:
        raise ReapError(path, "is a directory, not a GGUF file") from None
    except FileNotFoundError:
        raise ReapError(path, "GGUF file not found") from None
    except OSError as e:
        raise ReapError(path, f"cannot read GGUF file: {e.strerror or e}") from None


def read_gguf_header(raw: bytes, path: str | os.PathLike) -> GGUFFile:
    """Parse a header held in memory (one surgery wrote), without the data it describes."""
    import io

    return _read(io.BytesIO(raw), Path(path), len(raw), data=False)


def _read(f, path: Path, size: int, data: bool = True) -> GGUFFile:
    c = constants()
    VT = c.GGUFValueType
    cur = _Cursor(f, path, size)
    if size < _HEAD.size:
        raise ReapError(path, f"not a GGUF file: {size} bytes, too short for a GGUF header")
    magic, version, n_tensors, n_kv = cur.unpack(_HEAD, "the header")
    if magic != struct.pack("<I", c.GGUF_MAGIC):
        raise ReapError(path, f"not a GGUF file: starts with {magic!r}, not b'GGUF'")
    if version & 0xFFFF == 0:
        raise ReapError(path, f"GGUF version {version:#x}: a big-endian file (byte-swapped); only little-endian "
                              "GGUF files are supported")
    if version == 1 or version > c.GGUF_VERSION or version == 0:
        raise ReapError(path, f"GGUF version {version} is not supported (llama.cpp reads versions 2 and "
                              f"{c.GGUF_VERSION})")
    # every record takes at least 12 bytes (a key-value: key length, type; a tensor info: name length, n_dims)
    if n_kv * 12 > size or n_tensors * 12 > size:
        raise ReapError(path, f"corrupt GGUF header: it announces {n_kv} key-values and {n_tensors} tensors, "
                              f"more than a file of {size} bytes holds")
    kv: dict[str, KV] = {}
    for _ in range(n_kv):
        start = cur.pos
        raw_key = cur.string("a metadata key")
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            raise ReapError(path, f"corrupt GGUF metadata: key at byte {start} is not UTF-8") from None
        if not key:
            raise ReapError(path, f"corrupt GGUF metadata: empty key at byte {start}")
        if key in kv:
            raise ReapError(path, f"corrupt GGUF metadata: key {key!r} appears twice")
        (vtype,) = cur.unpack(_U32, f"the type of {key!r}")
        kv[key] = _value(cur, key, vtype, start, VT)
    alignment = c.GGUF_DEFAULT_ALIGNMENT
    if c.Keys.General.ALIGNMENT in kv:
        a = kv[c.Keys.General.ALIGNMENT]
        if a.type != VT.UINT32:
            raise ReapError(path, f"{c.Keys.General.ALIGNMENT} must be a UINT32, not {VT(a.type).name}")
        alignment = a.value
        if alignment == 0 or alignment & (alignment - 1):
            raise ReapError(path, f"{c.Keys.General.ALIGNMENT} {alignment} is not a power of 2")
    kv_end = cur.pos
    tensors = _tensor_infos(cur, n_tensors, c)
    info_end = cur.pos
    data_offset = info_end + pad(info_end, alignment)
    expected = 0
    for t in tensors:
        if t.offset != expected:
            before = f"the tensors before it end at {expected}" if expected else "the first tensor must start at 0"
            what = "overlaps the tensor before it" if t.offset < expected else "leaves a gap after the tensor before it"
            raise ReapError(path, f"corrupt GGUF tensor info: {t.name!r} starts at data offset {t.offset}, {before} "
                                  f"(padded to {alignment}): it {what}")
        expected += t.nbytes + pad(t.nbytes, alignment)
    data_end = data_offset + tensors[-1].offset + tensors[-1].nbytes if tensors else info_end
    if data and data_end > size:
        last = next(t for t in tensors if data_offset + t.offset + t.nbytes > size)
        raise ReapError(path, f"truncated GGUF file: tensor {last.name!r} ends at byte "
                              f"{data_offset + last.offset + last.nbytes}, past the end of the file ({size} bytes)")
    return GGUFFile(path, size, version, alignment, kv, tensors, kv_end, info_end, data_offset, data_end)


def _value(cur: _Cursor, key: str, vtype: int, start: int, VT) -> KV:
    path = cur.path
    try:
        VT(vtype)
    except ValueError:
        raise ReapError(path, f"corrupt GGUF metadata: {key!r} has unknown value type {vtype}") from None
    if vtype == VT.STRING:
        raw = cur.string(f"the value of {key!r}")
        return KV(key, vtype, raw.decode("utf-8", errors="replace"), start, cur.pos)
    if vtype != VT.ARRAY:
        (value,) = cur.unpack(scalar_format(vtype), f"the value of {key!r}")
        return KV(key, vtype, value, start, cur.pos)
    item, count = cur.unpack(struct.Struct("<IQ"), f"the array header of {key!r}")
    try:
        VT(item)
    except ValueError:
        raise ReapError(path, f"corrupt GGUF metadata: array {key!r} has unknown item type {item}") from None
    if item == VT.ARRAY:
        raise ReapError(path, f"corrupt GGUF metadata: {key!r} is an array of arrays, which llama.cpp does not read")
    if item == VT.STRING:
        if count * 8 > cur.size:
            raise ReapError(path, f"truncated GGUF file: array {key!r} of {count} strings runs past the end of the file")
        cur.skip_strings(count, f"an item of {key!r}")
        return KV(key, vtype, None, start, cur.pos, item, count)
    fmt = scalar_format(item)
    if count <= _DECODED_ARRAY:
        values = list(struct.unpack(f"<{count}{fmt.format[1:]}", cur.raw(count * fmt.size, f"the items of {key!r}")))
        return KV(key, vtype, values, start, cur.pos, item, count)
    cur.skip(count * fmt.size, f"the items of {key!r}")
    return KV(key, vtype, None, start, cur.pos, item, count)


def _tensor_infos(cur: _Cursor, n: int, c) -> list[GGUFTensor]:
    path = cur.path
    tensors: list[GGUFTensor] = []
    seen: set[str] = set()
    sizes = c.GGML_QUANT_SIZES
    for _ in range(n):
        start = cur.pos
        raw = cur.string("a tensor name")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ReapError(path, f"corrupt GGUF tensor info: the name at byte {start} is not UTF-8") from None
        if len(raw) >= GGML_MAX_NAME:
            raise ReapError(path, f"corrupt GGUF tensor info: name {name!r} is {len(raw)} bytes; llama.cpp allows "
                                  f"{GGML_MAX_NAME - 1}")
        if name in seen:
            raise ReapError(path, f"corrupt GGUF tensor info: tensor {name!r} appears twice")
        seen.add(name)
        (n_dims,) = cur.unpack(_U32, f"the dimensions of {name!r}")
        if not 1 <= n_dims <= 4:
            raise ReapError(path, f"corrupt GGUF tensor info: {name!r} has {n_dims} dimensions (ggml has 1 to 4)")
        ne = cur.unpack(struct.Struct(f"<{n_dims}q"), f"the shape of {name!r}")
        ggml_type, offset = cur.unpack(struct.Struct("<IQ"), f"the type and offset of {name!r}")
        if any(d < 0 for d in ne):
            raise ReapError(path, f"corrupt GGUF tensor info: {name!r} has a negative dimension {list(ne)}")
        try:
            block, _ = sizes[c.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ReapError(path, f"tensor {name!r} has ggml type {ggml_type}, which this gguf package "
                                  "does not know (upgrade gguf)") from None
        if ne[0] % block:
            raise ReapError(path, f"corrupt GGUF tensor info: {name!r} has {ne[0]} values per row, not a multiple of "
                                  f"the {type_name(ggml_type)} block of {block}")
        tensors.append(GGUFTensor(name, tuple(ne), ggml_type, offset, tensor_nbytes(ne, ggml_type)))
    return tensors


# -- split files (gguf-split, convert_hf_to_gguf.py --split-max-*) ---------------------------


def split_paths(first: Path, count: int) -> list[Path]:
    """The parts of a split set from the first one's name, as llama.cpp names them
    (llama_split_path: PREFIX-00001-of-00004.gguf)."""
    m = SPLIT_NAME.match(first.name)
    if not m or int(m["no"]) != 1 or int(m["count"]) != count:
        raise ReapError(first, f"is the first of {count} split parts but is not named "
                               f"PREFIX-00001-of-{count:05d}.gguf, so its other parts cannot be found")
    return [first.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def read_gguf_set(path: str | os.PathLike) -> list[GGUFFile]:
    """A GGUF file, or every part of a split set given its first part, checked to belong together:
    each part numbered as named, the same count and total tensor count in each, the tensors
    adding up to that total, no tensor in two parts, and no part of another model."""
    path = Path(path)
    first = read_gguf(path)
    no, count, total = first.split()
    keys = constants().Keys.Split
    if count == 1:
        return [first]
    if not isinstance(count, int) or count < 1 or not isinstance(no, int):
        raise ReapError(path, f"corrupt GGUF split keys: {keys.LLM_KV_SPLIT_COUNT}={count!r}, "
                              f"{keys.LLM_KV_SPLIT_NO}={no!r}")
    if no != 0:
        m = SPLIT_NAME.match(path.name)
        first_name = f"{m['prefix']}-00001-of-{m['count']}.gguf" if m else "the first part"
        raise ReapError(path, f"is split part {no + 1} of {count}; give the first part ({first_name})")
    parts = [first]
    names = {t.name for t in first.tensors}
    for i, part_path in enumerate(split_paths(path, count)[1:], 1):
        if not part_path.is_file():
            raise ReapError(part_path, f"split part {i + 1} of {count} of {path.name} is missing")
        part = read_gguf(part_path)
        p_no, p_count, p_total = part.split()
        if (p_no, p_count, p_total) != (i, count, total):
            raise ReapError(part_path, f"is not part {i + 1} of {path.name}'s set: its split keys say part "
                                       f"{p_no + 1 if isinstance(p_no, int) else p_no} of {p_count} with {p_total} "
                                       f"tensors, the first part says {count} parts with {total} tensors")
        arch = part.arch
        if arch is not None and arch != first.arch:
            raise ReapError(part_path, f"is a part of another model: general.architecture is {arch!r}, "
                                       f"{first.arch!r} in {path.name}")
        twice = next((t.name for t in part.tensors if t.name in names), None)
        if twice is not None:
            raise ReapError(part_path, f"tensor {twice!r} is also in an earlier part of {path.name}")
        names.update(t.name for t in part.tensors)
        parts.append(part)
    if total is not None and len(names) != total:
        raise ReapError(path, f"the {count} split parts hold {len(names)} tensors but "
                              f"{keys.LLM_KV_SPLIT_TENSORS_COUNT} says {total}")
    return parts


def gguf_model_path(path: str | os.PathLike) -> Path | None:
    """The GGUF file a command should read for `path`: the path itself when it names a .gguf file, the
    first file of the one GGUF model a directory without config.json holds (apply's output for a split
    set), else None (a safetensors checkpoint)."""
    path = Path(path)
    if is_gguf(path):
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(p for p in path.iterdir() if is_gguf(p) and not p.name.startswith("."))
    firsts = [p for p in files if (m := SPLIT_NAME.match(p.name)) and int(m["no"]) == 1]
    if len(files) == 1:
        return files[0]
    return firsts[0] if len(firsts) == 1 else None
