"""Writing a GGUF header: key-value records and tensor infos, as llama.cpp's gguf.cpp reads them.

Records surgery does not change are copied from the source as bytes; only rewritten values are
encoded here, with the same value type they had (a UINT32 count stays a UINT32).
"""

from __future__ import annotations

import struct
from typing import Any, Iterable

from ..common.gguf_file import GGUFTensor, constants, pad, scalar_format

_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def encode_string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return _U64.pack(len(raw)) + raw


def encode_kv(key: str, value_type: int, value: Any, item_type: int | None = None) -> bytes:
    """One key-value record: the key, the value's type, the value (an array: item type, count, items)."""
    VT = constants().GGUFValueType
    out = encode_string(key) + _U32.pack(value_type)
    if value_type == VT.ARRAY:
        out += _U32.pack(item_type) + _U64.pack(len(value))
        return out + b"".join(_encode_value(item_type, v) for v in value)
    return out + _encode_value(value_type, value)


def _encode_value(value_type: int, value: Any) -> bytes:
    if value_type == constants().GGUFValueType.STRING:
        return encode_string(value)
    return scalar_format(value_type).pack(value)


def encode_tensor_info(t: GGUFTensor) -> bytes:
    return encode_string(t.name) + _U32.pack(len(t.ne)) + struct.pack(f"<{len(t.ne)}q", *t.ne) + \
        struct.pack("<IQ", t.type, t.offset)


def encode_tensor_infos(tensors) -> bytes:
    return b"".join(encode_tensor_info(t) for t in tensors)


def unpadded_size(records: Iterable[bytes], infos: bytes) -> int:
    """Bytes of encode_header's output before the padding to the data section."""
    return struct.calcsize("<IIQQ") + sum(map(len, records)) + len(infos)


def encode_header(version: int, kv_records: Iterable[bytes], n_kv: int, n_tensors: int, infos: bytes,
                  alignment: int) -> bytes:
    """The whole header up to the data section: magic, version, counts, the records, the encoded tensor
    infos, and zeros up to the next multiple of `alignment` (where the data starts)."""
    c = constants()
    head = struct.pack("<IIQQ", c.GGUF_MAGIC, version, n_tensors, n_kv)
    raw = b"".join([head, *kv_records, infos])
    return raw + b"\0" * pad(len(raw), alignment)
