"""Reading GGUF files: what llama.cpp's reader sees, and every defect refused in one line naming the file."""

from __future__ import annotations

import shutil
import struct

import pytest

from reapsurgery.common.gguf_file import GGUFTensor, read_gguf, read_gguf_set
from reapsurgery.errors import ReapError
from reapsurgery.surgery.gguf_header import encode_kv
from tests.gguf_helpers import raw_records, rebuild, reader_fields, reader_tensors


def test_reader_agrees_with_the_gguf_package(gguf_files):
    for name in ("single", "fused", "bias"):
        path = gguf_files[name]
        g = read_gguf(path)
        theirs = reader_tensors(path)
        assert [t.name for t in g.tensors] == list(theirs)
        with open(path, "rb") as f:
            for t in g.tensors:
                f.seek(g.data_offset + t.offset)
                assert (t.ne, t.type, f.read(t.nbytes)) == theirs[t.name], t.name
        fields = reader_fields(path)
        assert list(g.kv) == list(fields)
        assert {k: kv.value for k, kv in g.kv.items() if kv.value is not None} == \
            {k: v for k, v in fields.items() if g.kv[k].value is not None}


def test_reencoding_the_header_gives_the_same_bytes(gguf_files, tmp_path):
    """The header encoder writes what the gguf package's writer wrote (records copied, tensor infos encoded)."""
    for name in ("single", "fused"):
        src = gguf_files[name]
        assert rebuild(src, tmp_path / "same.gguf").read_bytes() == src.read_bytes()


def test_split_set_is_read_part_by_part(gguf_files):
    parts = read_gguf_set(gguf_files["split"])
    assert len(parts) > 2 and [p.split()[0] for p in parts] == list(range(len(parts)))
    assert sum(len(p.tensors) for p in parts) == parts[0].split()[2]
    assert parts[0].arch == "qwen3moe" and all(p.arch is None for p in parts[1:])


def _tensors(g, i, **changes) -> list[GGUFTensor]:
    tensors = list(g.tensors)
    tensors[i] = tensors[i]._replace(**changes)
    return tensors


def _header_cut(g) -> int:
    return g.kv_end + 10


def case_bad_magic(src, dst):
    dst.write_bytes(b"GGUX" + src.read_bytes()[4:])


def case_too_short(src, dst):
    dst.write_bytes(src.read_bytes()[:10])


def case_version(version):
    return lambda src, dst: rebuild(src, dst, version=version)


def case_big_endian(src, dst):
    raw = bytearray(src.read_bytes())
    raw[4:8] = struct.pack(">I", 3)
    dst.write_bytes(bytes(raw))


def case_cut(where):
    def make(src, dst):
        g = read_gguf(src)
        dst.write_bytes(src.read_bytes()[:where(g)])
    return make


def case_tensors(i, **changes):
    def make(src, dst):
        g = read_gguf(src)
        rebuild(src, dst, tensors=_tensors(g, i, **changes))
    return make


def case_records(edit):
    def make(src, dst):
        g = read_gguf(src)
        records = raw_records(g)
        n_kv = edit(records)
        rebuild(src, dst, records=records, n_kv=n_kv)
    return make


def _duplicate_key(records):
    records["general.name#2"] = records["general.name"]
    return None


def _add(key, vtype, value, item=None):
    def edit(records):
        records[key] = encode_kv(key, vtype, value, item)
    return edit


def _unknown_value_type(records):
    records["x.weird"] = b"".join([struct.pack("<Q", 7), b"x.weird", struct.pack("<I", 99), b"\0" * 4])


def _array_of_arrays(records):
    records["x.nested"] = b"".join([struct.pack("<Q", 8), b"x.nested", struct.pack("<IIQ", 9, 9, 1),
                                    struct.pack("<IQ", 4, 1), b"\0" * 4])


def _two_tensors_one_name(src, dst):
    g = read_gguf(src)
    tensors = list(g.tensors)
    tensors[2] = tensors[2]._replace(name=tensors[1].name)
    rebuild(src, dst, tensors=tensors)


def _absurd_counts(src, dst):
    raw = bytearray(src.read_bytes())
    raw[16:24] = struct.pack("<Q", 1 << 40)
    dst.write_bytes(bytes(raw))


U32, U64, STR = 4, 10, 8
CASES = {
    "bad magic": (case_bad_magic, "not a GGUF file: starts with b'GGUX'"),
    "too short": (case_too_short, "too short for a GGUF header"),
    "version 1": (case_version(1), "GGUF version 1 is not supported"),
    "version 4": (case_version(4), "GGUF version 4 is not supported"),
    "big-endian": (case_big_endian, "big-endian"),
    "absurd counts": (_absurd_counts, "more than a file of"),
    "truncated in the metadata": (case_cut(lambda g: g.kv["tokenizer.ggml.tokens"].end - 5),
                                  "truncated GGUF file: an item of 'tokenizer.ggml.tokens'"),
    "truncated in the tensor infos": (case_cut(_header_cut), "truncated GGUF file"),
    "data past the end": (case_cut(lambda g: g.data_end - 1), "truncated GGUF file: tensor 'output.weight' ends at"),
    "overlapping tensors": (case_tensors(3, offset=0), "'blk.0.ffn_norm.weight' starts at data offset 0, the tensors "
                                                       "before it end at"),
    "gap between tensors": (lambda s, d: case_tensors(3, offset=read_gguf(s).tensors[3].offset + 32)(s, d),
                            "leaves a gap"),
    "duplicate key": (case_records(_duplicate_key), None),
    "duplicate tensor name": (_two_tensors_one_name, "appears twice"),
    "unknown ggml type": (case_tensors(1, type=99), "ggml type 99"),
    "five dimensions": (case_tensors(1, ne=(256, 1, 1, 1, 1)), "5 dimensions"),
    "row not whole blocks": (case_tensors(0, ne=(250, 300)), "250 values per row, not a multiple of the Q8_0 block"),
    "name too long": (case_tensors(0, name="x" * 64), "llama.cpp allows 63"),
    "unknown value type": (case_records(_unknown_value_type), "unknown value type 99"),
    "array of arrays": (case_records(_array_of_arrays), "array of arrays"),
    "alignment not a power of 2": (case_records(_add("general.alignment", U32, 48)), "48 is not a power of 2"),
    "alignment of the wrong type": (case_records(_add("general.alignment", U64, 64)), "must be a UINT32, not UINT64"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_gguf_is_refused_naming_the_file(gguf_files, tmp_path, case):
    make, message = CASES[case]
    bad = tmp_path / "bad.gguf"
    if case == "duplicate key":  # the record appears twice under one name
        g = read_gguf(gguf_files["single"])
        records = list(raw_records(g).values())
        from reapsurgery.surgery.gguf_header import encode_header, encode_tensor_infos

        with open(gguf_files["single"], "rb") as f:
            f.seek(g.data_offset)
            body = f.read()
        bad.write_bytes(encode_header(g.version, records + [records[0]], len(records) + 1, len(g.tensors),
                                      encode_tensor_infos(g.tensors), g.alignment) + body)
        message = f"key {next(iter(g.kv))!r} appears twice"
    else:
        make(gguf_files["single"], bad)
    with pytest.raises(ReapError) as e:
        read_gguf_set(bad)
    assert e.value.path == str(bad)
    assert message in e.value.message, e.value.message
    assert "\n" not in str(e.value)


def _copy_set(gguf_files, tmp_path, name="split"):
    first = gguf_files[name]
    dst = tmp_path / name
    shutil.copytree(first.parent, dst)
    return dst / first.name, sorted(dst.glob("*.gguf"))


def test_split_set_with_a_missing_part(gguf_files, tmp_path):
    first, parts = _copy_set(gguf_files, tmp_path)
    parts[2].unlink()
    with pytest.raises(ReapError, match=rf"{parts[2].name}: split part 3 of {len(parts)} of {first.name} is missing"):
        read_gguf_set(first)


def test_split_set_with_a_part_of_another_set(gguf_files, tmp_path):
    """A part of another model's split set (other split counts) in place of part 2."""
    first, parts = _copy_set(gguf_files, tmp_path)
    other, _ = _copy_set(gguf_files, tmp_path, "nextn_split")
    shutil.copy(sorted(other.parent.glob("*.gguf"))[1], parts[1])
    with pytest.raises(ReapError, match=rf"{parts[1].name}: is not part 2 of {first.name}'s set"):
        read_gguf_set(first)


def test_split_set_with_a_part_of_another_architecture(gguf_files, tmp_path):
    first, parts = _copy_set(gguf_files, tmp_path)
    records = raw_records(read_gguf(parts[1]))
    records["general.architecture"] = encode_kv("general.architecture", STR, "llama")
    rebuild(parts[1], parts[1].with_suffix(".tmp"), records=records).replace(parts[1])
    with pytest.raises(ReapError, match=r"is a part of another model: general.architecture is 'llama'"):
        read_gguf_set(first)


def test_split_set_given_by_a_later_part(gguf_files, tmp_path):
    first, parts = _copy_set(gguf_files, tmp_path)
    with pytest.raises(ReapError, match=rf"is split part 2 of {len(parts)}; give the first part \({first.name}\)"):
        read_gguf_set(parts[1])


def test_split_part_renamed(gguf_files, tmp_path):
    first, parts = _copy_set(gguf_files, tmp_path)
    renamed = first.with_name("model.gguf")
    first.rename(renamed)
    with pytest.raises(ReapError, match="is not named PREFIX-00001-of-0000"):
        read_gguf_set(renamed)


def test_split_set_with_a_tensor_in_two_parts(gguf_files, tmp_path):
    first, parts = _copy_set(gguf_files, tmp_path)
    g = read_gguf(parts[1])
    tensors = _tensors(g, 0, name=read_gguf(first).tensors[0].name)
    rebuild(parts[1], parts[1].with_suffix(".tmp"), tensors=tensors).replace(parts[1])
    with pytest.raises(ReapError, match="is also in an earlier part"):
        read_gguf_set(first)
