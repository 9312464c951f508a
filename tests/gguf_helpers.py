"""GGUF test helpers: the fixture files, a file rebuilt with some defect, tensor bytes as llama.cpp's
Python reader (gguf.GGUFReader) sees them."""

from __future__ import annotations

from pathlib import Path

from reapsurgery.common.gguf_file import GGUFFile, GGUFTensor, read_gguf
from reapsurgery.surgery.gguf_header import encode_header, encode_tensor_infos


def raw_records(g: GGUFFile) -> dict[str, bytes]:
    """Each key-value record of a file as its bytes, in file order."""
    with open(g.path, "rb") as f:
        head = f.read(g.kv_end)
    return {k: head[kv.start:kv.end] for k, kv in g.kv.items()}


def rebuild(src: Path, dst: Path, records: dict[str, bytes] | None = None, tensors: list[GGUFTensor] | None = None,
            version: int | None = None, n_kv: int | None = None, alignment: int | None = None,
            data: bytes | None = None) -> Path:
    """src with its header re-encoded from (possibly changed) records and tensor infos, then its data."""
    g = read_gguf(src)
    records = raw_records(g) if records is None else records
    tensors = g.tensors if tensors is None else tensors
    header = encode_header(version or g.version, records.values(), len(records) if n_kv is None else n_kv,
                           len(tensors), encode_tensor_infos(tensors), alignment or g.alignment)
    with open(src, "rb") as f:
        f.seek(g.data_offset)
        body = f.read() if data is None else data
    dst.write_bytes(header + body)
    return dst


def reader_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], int, bytes]]:
    """name -> (ne, ggml type, data bytes), read by the gguf package's own reader."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    return {t.name: (tuple(int(x) for x in t.shape), int(t.tensor_type), bytes(t.data.tobytes())) for t in r.tensors}


def reader_fields(path: Path) -> dict[str, object]:
    """Every metadata key -> its value (arrays as lists), read by the gguf package's own reader."""
    from gguf import GGUFReader
    from gguf.constants import GGUFValueType

    out = {}
    for name, field in GGUFReader(path).fields.items():
        if name.startswith("GGUF."):
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            out[name] = list(field.contents())
        else:
            out[name] = field.contents()
    return out
