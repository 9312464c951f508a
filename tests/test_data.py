"""Calibration data: every source a user can pass gives the token ids they expect, offline."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest
from transformers import AutoTokenizer

from reapsurgery.calibration.data import BUILTIN_NAME, CalibrationData, load_samples
from reapsurgery.errors import ReapError

VOCAB = 320  # the fixture models' vocab_size


@pytest.fixture(scope="module")
def tok_dir(checkpoints):
    return checkpoints["qwen3_moe"]


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def as_set(data: CalibrationData) -> set[tuple[int, ...]]:
    return {tuple(s) for s in data.samples}


def test_fixture_checkpoints_load_a_tokenizer_within_the_model_vocab(checkpoints):
    from fixtures.build import FAMILIES

    for family in [*FAMILIES, "single_file"]:
        path = checkpoints[family]
        t = AutoTokenizer.from_pretrained(path)
        ids = t("Grüße, 世界! <|im_end|>")["input_ids"]
        assert t.bos_token and t.eos_token and t.pad_token and t.chat_template, family
        assert ids[0] == t.bos_token_id and max(ids) < VOCAB and len(t) <= VOCAB, family
        assert t.decode(ids, skip_special_tokens=False).startswith(t.bos_token + "Grüße, 世界!")


def test_jsonl_text_rows_are_tokenized_with_the_checkpoint_tokenizer(tmp_path, tok_dir, tok):
    texts = ["The cat sat on the mat.", "Two plus two is four.", "def f(x): return x"]
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    data = load_samples(path, tok_dir, num_samples=3, vocab_size=VOCAB)
    assert sorted(data.samples) == sorted(tok(t)["input_ids"] for t in texts)
    assert data.description == f"{path} (text)"


def test_text_field_falls_back_to_content_then_prompt_and_can_be_named(tmp_path, tok_dir, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "alpha", "body": "one"},
                                              {"prompt": "beta", "body": "two"}])
    assert as_set(load_samples(path, tok_dir)) == {tuple(tok("alpha")["input_ids"]),
                                                   tuple(tok("beta")["input_ids"])}
    named = load_samples(path, tok_dir, text_field="body")
    assert as_set(named) == {tuple(tok("one")["input_ids"]), tuple(tok("two")["input_ids"])}
    assert "(body)" in named.description


def test_pretokenised_rows_need_no_tokenizer(tmp_path):
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}, {"input_ids": []}]
    data = load_samples(write_jsonl(tmp_path / "ids.jsonl", rows), None, num_samples=10)
    assert sorted(data.samples) == [[5, 6, 7], [8, 9]]  # used as given, the empty one skipped
    assert "input_ids" in data.description and "only 2 samples, 10 requested" in data.description


def test_text_rows_without_a_tokenizer_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    with pytest.raises(ReapError, match="no tokenizer"):
        load_samples(path, None)
    with pytest.raises(ReapError, match="has no tokenizer files") as e:
        load_samples(path, tmp_path)  # a directory without tokenizer files
    assert e.value.path == str(tmp_path)


def test_chat_rows_are_rendered_by_the_template_without_doubling_special_tokens(tmp_path, tok_dir, tok):
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    data = load_samples(write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}]), tok_dir)
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in rendered
    assert data.samples == [tok(rendered, add_special_tokens=False)["input_ids"]]
    assert data.samples[0].count(tok.bos_token_id) == 1
    assert "messages" in data.description


def test_txt_is_one_sample_per_paragraph(tmp_path, tok_dir, tok):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph,\nstill the first.\n\n\nSecond one.\n  \nThird.\n")
    data = load_samples(path, tok_dir)
    expected = ["First paragraph,\nstill the first.", "Second one.", "Third."]
    assert as_set(data) == {tuple(tok(t)["input_ids"]) for t in expected}
    lines = tmp_path / "lines.txt"
    lines.write_text("one line\nanother line\n")  # no blank line at all: one sample per line
    assert len(load_samples(lines, tok_dir).samples) == 2


def test_json_list_and_data_object(tmp_path, tok_dir, tok):
    (tmp_path / "list.json").write_text(json.dumps([{"text": "a b"}, "plain string row"]))
    (tmp_path / "obj.json").write_text(json.dumps({"data": [{"text": "a b"}, {"text": "c"}]}))
    assert as_set(load_samples(tmp_path / "list.json", tok_dir)) == {
        tuple(tok("a b")["input_ids"]), tuple(tok("plain string row")["input_ids"])}
    assert len(load_samples(tmp_path / "obj.json", tok_dir).samples) == 2


def test_builtin_default_runs_with_no_dataset(tok_dir, tok):
    data = load_samples(None, tok_dir, num_samples=16, max_length=64, vocab_size=VOCAB)
    assert len(data.samples) == 16 and data.description == BUILTIN_NAME
    assert all(0 < len(s) <= 64 and s[0] == tok.bos_token_id for s in data.samples)
    everything = load_samples(None, tok_dir, num_samples=10_000)
    assert 40 <= len(everything.samples) <= 80 and "10000 requested" in everything.description
    assert len(set(map(tuple, everything.samples))) == len(everything.samples)  # varied paragraphs


def test_selection_is_deterministic_by_seed(tmp_path):
    rows = [{"input_ids": [i, i + 1]} for i in range(50)]
    path = write_jsonl(tmp_path / "ids.jsonl", rows)
    a = load_samples(path, None, num_samples=10, seed=0)
    assert a.samples == load_samples(path, None, num_samples=10, seed=0).samples
    assert as_set(a) != as_set(load_samples(path, None, num_samples=10, seed=1))
    assert len(a.samples) == 10 and "only" not in a.description


def test_samples_are_truncated_to_max_length(tmp_path, tok_dir):
    long_text = "word " * 200
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": long_text}, {"input_ids": list(range(100))}])
    data = load_samples(path, tok_dir, max_length=17)
    assert sorted(len(s) for s in data.samples) == [17, 17]
    assert list(range(17)) in data.samples


def test_bad_row_error_names_file_row_and_keys(tmp_path, tok_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"body": "x", "meta": 1}\n')
    with pytest.raises(ReapError) as e:
        load_samples(path, tok_dir, num_samples=1)  # refused whatever rows the seed selects
    msg = str(e.value)
    assert msg.startswith(str(path)) and "line 3" in msg and "['body', 'meta']" in msg
    assert "\n" not in msg
    with pytest.raises(ReapError, match="line 1: no field 'body'"):
        load_samples(write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}]), tok_dir, text_field="body")


def test_out_of_range_and_invalid_token_ids_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2]}, {"input_ids": [3, VOCAB]}])
    with pytest.raises(ReapError, match=r"line 2: token id 320 is out of range for .*vocab_size 320"):
        load_samples(path, None, vocab_size=VOCAB)
    bad = write_jsonl(tmp_path / "neg.jsonl", [{"input_ids": [1, -4]}])
    with pytest.raises(ReapError, match="non-negative integers, found -4"):
        load_samples(bad, None)


def test_missing_file_and_unsupported_format(tmp_path):
    with pytest.raises(ReapError, match="no such file"):
        load_samples(tmp_path / "absent.jsonl", None)
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ReapError, match="unsupported file type '.csv'"):
        load_samples(tmp_path / "data.csv", None)


def test_parquet_is_read_with_pyarrow_or_says_how_to_install_it(tmp_path):
    path = tmp_path / "d.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(ReapError, match=r"pip install 'reapsurgery\[data\]'"):
            load_samples(path, None)
        return
    pq.write_table(pa.table({"input_ids": [[1, 2], [3]]}), path)
    assert sorted(load_samples(path, None).samples) == [[1, 2], [3]]


def test_hub_id_not_cached_fails_fast_and_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    start = time.monotonic()
    with pytest.raises(ReapError) as e:
        load_samples("reapsurgery-test/no-such-dataset:en", None)
    assert time.monotonic() - start < 30
    msg = str(e.value)
    assert msg.startswith("reapsurgery-test/no-such-dataset:en: is not a local file")
    assert "local file" in msg and ("not installed" in msg or "cache" in msg)


def test_hub_dataset_is_loaded_offline_through_datasets(monkeypatch):
    """The `datasets` wiring, with a stand-in module: offline mode on, name:config and split passed."""
    seen = {}

    def load_dataset(name, config, split):
        seen.update(name=name, config=config, split=split, offline=fake.config.HF_HUB_OFFLINE)
        if name == "missing/ds":
            raise ConnectionError("Couldn't reach 'missing/ds' on the Hub (offline mode is enabled)")
        return [{"input_ids": [1, 2, 3]}, {"input_ids": [4]}]

    fake = types.SimpleNamespace(load_dataset=load_dataset,
                                 config=types.SimpleNamespace(HF_HUB_OFFLINE=False))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    data = load_samples("org/ds:cfg", None, split="validation")
    assert seen == dict(name="org/ds", config="cfg", split="validation", offline=True)
    assert fake.config.HF_HUB_OFFLINE is False  # restored afterwards
    assert sorted(data.samples) == [[1, 2, 3], [4]]
    assert data.description.startswith("org/ds:cfg[validation] (input_ids)")
    with pytest.raises(ReapError, match="not in the local datasets cache.*download it first"):
        load_samples("missing/ds", None)
