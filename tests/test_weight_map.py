"""The index's weight map is scanned from bytes and held compactly (surgery's memory at Kimi-K2's
139k tensors); it must read every index exactly as the strict JSON reader does, and refuse
what it refuses with the same message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reapsurgery.common.files import read_json_object
from reapsurgery.common.weight_map import WeightMap, read_index
from reapsurgery.errors import ReapError

PAIRS = {"model.layers.0.mlp.experts.0.w1.weight": "model-00001-of-00002.safetensors",
         "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
         "lm_head.weight": "model-00002-of-00002.safetensors",
         "model.layers.0.ünïcode.weight": "model-00002-of-00002.safetensors"}


def _write(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "model.safetensors.index.json"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def _strict(path: Path) -> tuple[dict, dict]:
    index = read_json_object(path, "index")
    return index["weight_map"], index.get("metadata") or {}


VALID = {
    "as transformers writes it": json.dumps({"metadata": {"total_size": 12}, "weight_map": PAIRS}, indent=2),
    "compact, weight_map first": json.dumps({"weight_map": PAIRS, "metadata": {"total_size": 12}}, separators=(",", ":")),
    "escaped names and shard": json.dumps({"weight_map": {**PAIRS, "a\"b\\c\u00e9\n": "x\u002fy.safetensors"}}),
    "non-ASCII written raw": json.dumps({"weight_map": PAIRS}, ensure_ascii=False),
    "byte-order mark": "\ufeff" + json.dumps({"weight_map": PAIRS}),
    "a nested weight_map key in metadata": json.dumps({"metadata": {"weight_map": {"a": "b"}}, "weight_map": PAIRS}),
    "the key spelt with an escape": '{"weight\\u005fmap": ' + json.dumps(PAIRS) + "}",
    "other keys after": json.dumps({"weight_map": PAIRS, "extra": [1, {"weight_map": 2}], "z": None}),
    "odd whitespace": '\r\n\t{ "weight_map" :\n{' + ",\n\t".join(f' {json.dumps(k)} :{json.dumps(v)} ' for k, v in PAIRS.items()) + "}\n}\n\n",
}


@pytest.mark.parametrize("case", VALID)
def test_every_valid_index_reads_as_the_strict_reader_reads_it(tmp_path, case):
    path = _write(tmp_path, VALID[case])
    weight_map, metadata = read_index(path)
    expected_map, expected_meta = _strict(path)
    assert list(weight_map.items()) == list(expected_map.items())  # the index's order too
    assert dict(weight_map) == expected_map and metadata == expected_meta
    assert weight_map.shards == sorted(set(expected_map.values()))
    for name, shard in expected_map.items():
        assert name in weight_map and weight_map[name] == shard
    assert "model.layers.0.mlp.experts.1.w1.weight" not in weight_map and weight_map.get("x") is None


def _refusal(tmp_path: Path, text: str | bytes) -> str:
    with pytest.raises(ReapError) as e:
        read_index(_write(tmp_path, text))
    return str(e.value)


BAD = {
    "a name twice in weight_map": ('{"weight_map": {"a": "s.safetensors", "b": "s.safetensors", "a": "t.safetensors"}}', "duplicate key 'a'"),
    "weight_map twice": ('{"weight_map": {"a": "s.safetensors"}, "weight_map": {"b": "s.safetensors"}}', "duplicate key 'weight_map'"),
    "metadata twice around it": ('{"metadata": {}, "weight_map": {"a": "s.safetensors"}, "metadata": {}}', "duplicate key 'metadata'"),
    "a value that is a number": ('{"weight_map": {"a": "s.safetensors", "b": 3}}', "is not a shard file name"),
    "a shard outside the checkpoint": ('{"weight_map": {"a": "../s.safetensors"}}', "not a plain file name inside"),
    "trailing garbage": ('{"weight_map": {"a": "s.safetensors"}} x', "not valid JSON"),
    "a missing comma": ('{"weight_map": {"a": "s.safetensors" "b": "s.safetensors"}}', "not valid JSON"),
    "an invalid escape": ('{"weight_map": {"a\\x": "s.safetensors"}}', "not valid JSON"),
    "a raw control character": ('{"weight_map": {"a\x01": "s.safetensors"}}', "not valid JSON"),
    "bytes that are not UTF-8": (b'{"weight_map": {"a\xff": "s.safetensors"}}', "not UTF-8"),
    "UTF-8 split across two names": (b'{"weight_map": {"a\xc3": "s.safetensors", "\xa9b": "s.safetensors"}}', "not UTF-8"),
    "an empty weight_map": ('{"weight_map": {}}', "no 'weight_map' object"),
    "no weight_map": ('{"metadata": {}}', "no 'weight_map' object"),
    "metadata a list": ('{"metadata": [1], "weight_map": {"a": "s.safetensors"}}', "'metadata' is not a JSON object"),
    "NaN in metadata": ('{"metadata": {"total_size": NaN}, "weight_map": {"a": "s.safetensors"}}', "not a JSON number"),
    "a list, not an object": ('[{"weight_map": {"a": "s.safetensors"}}]', "not a JSON object"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_index_is_refused_naming_the_file_and_the_defect(tmp_path, case):
    text, message = BAD[case]
    error = _refusal(tmp_path, text)
    assert "model.safetensors.index.json" in error and message in error, error


def test_names_that_hash_alike_are_told_apart(monkeypatch):
    """The lookup table probes on equal hashes and compares the names, so it is exact."""
    import reapsurgery.common.weight_map as module

    names = [f"model.layers.{i}.mlp.experts.{j}.weight" for i in range(12) for j in range(25)]
    shards = [f"s{i % 7}.safetensors" for i in range(len(names))]
    for collide in (False, True):
        if collide:  # every name in one probe chain
            monkeypatch.setattr(module, "hash", lambda s: 12345, raising=False)
        wm = WeightMap.from_pairs(zip(names, shards))
        assert [wm[n] for n in names] == shards and list(wm) == names and len(wm) == len(names)
        assert not any(n + "x" in wm for n in names[:50])
        with pytest.raises(ReapError, match="duplicate key 'model.layers.3"):
            WeightMap.from_pairs(zip(names + names[80:81], shards + shards[:1]))
