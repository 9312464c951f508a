"""Calibration data: token-id samples from a local file, a cached hub dataset, or the built-in text.

Everything here works offline. Sources, by what `dataset` is:

- a local file:
  - ``.jsonl`` / ``.ndjson``: one JSON row per line (blank lines ignored);
  - ``.json``: a list of rows, or an object holding the list under ``"data"`` (or under its
    only list-valued key);
  - ``.parquet``: read with pyarrow, which is needed for this format only;
  - ``.txt``: one sample per paragraph, paragraphs separated by blank lines; a file with no
    blank line at all gives one sample per non-empty line.
- a hub dataset id, ``"name"`` or ``"name:config"`` (``"allenai/c4:en"``): loaded with the
  ``datasets`` library from its local cache only, never downloaded;
- ``None``: the short mixed text shipped with the package (``calibration_text.txt``), so that
  a demo runs with no data at hand.

A row is either a plain string (text) or an object:

- ``input_ids``: a list of token ids, used as given (no tokenizer needed);
- ``messages``: a chat, a list of ``{"role", "content"}``, rendered by the tokenizer's chat
  template and tokenized without adding special tokens again (the template has them);
- otherwise text, from ``text_field`` when given, else the first of ``text``, ``content``,
  ``prompt`` that the row has. Text is tokenized with the tokenizer's special tokens (BOS...).

Rows are shuffled with ``random.Random(seed)`` and taken in that order until ``num_samples``
non-empty samples are collected, each truncated to ``max_length`` tokens. Fewer rows than
asked is not an error: all are used and the description says so. Problems raise ReapError
naming the file and the row.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..common.files import loads_strict
from ..errors import ReapError

TEXT_FIELDS = ("text", "content", "prompt")
BUILTIN_NAME = "builtin:reapsurgery-default"
BUILTIN_PATH = Path(__file__).with_name("calibration_text.txt")
FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".txt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model", "vocab.txt", "tokenizer.tiktoken", "tiktoken.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


@dataclass
class CalibrationData:
    """Token-id samples (each at most max_length long, no padding) and what they came from."""

    samples: list[list[int]]
    description: str

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.samples)


@dataclass
class _Source:
    name: str                          # for messages and the description
    rows: Sequence[Any]                # list of rows, or a datasets.Dataset (lazy rows)
    labels: list[str] | None = None    # "line 7" per row for .jsonl; default "row i+1"
    builtin: bool = False

    def label(self, i: int) -> str:
        return self.labels[i] if self.labels is not None else f"row {i + 1}"


def load_samples(
    dataset: str | os.PathLike | None,
    tokenizer_dir: str | os.PathLike | None,
    num_samples: int = 512,
    max_length: int = 2048,
    seed: int = 0,
    text_field: str | None = None,
    split: str = "train",
    vocab_size: int | None = None,
) -> CalibrationData:
    """Load calibration samples as token ids; see the module docstring for sources and rows.

    tokenizer_dir is the checkpoint directory; its tokenizer is loaded only if some row
    needs tokenizing. vocab_size, when given, bounds every token id.
    """
    if num_samples < 1:
        raise ReapError(None, f"num_samples must be at least 1, got {num_samples}")
    if max_length < 1:
        raise ReapError(None, f"max_length must be at least 1, got {max_length}")
    source = _open_source(dataset, split)
    n = len(source.rows)
    lazy = not isinstance(source.rows, list)
    kinds: list[tuple[str, Any] | None] = [None] * n
    if not lazy:  # a malformed row is an error whatever the seed selects
        for i, row in enumerate(source.rows):
            kinds[i] = _classify(row, text_field, source, i)

    tokenizer = _LazyTokenizer(tokenizer_dir, source.name)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    samples: list[list[int]] = []
    used_kinds: set[str] = set()
    for i in order:
        if len(samples) >= num_samples:
            break
        kind, payload = kinds[i] or _classify(source.rows[i], text_field, source, i)
        ids = _encode(kind, payload, tokenizer, max_length, source, i)
        if not ids:
            continue
        _check_ids(ids, vocab_size, source, i)
        samples.append(ids)
        used_kinds.add(kind)
    if not samples:
        raise ReapError(source.name, f"no non-empty sample in {n} rows")

    if source.builtin:
        description = source.name
    else:
        description = f"{source.name} ({'+'.join(sorted(used_kinds))})"
    if len(samples) < num_samples:
        description += f" [only {len(samples)} samples, {num_samples} requested]"
    return CalibrationData(samples=samples, description=description)


# --- sources -------------------------------------------------------------------------------


def _open_source(dataset: str | os.PathLike | None, split: str) -> _Source:
    if dataset is None:
        return _Source(BUILTIN_NAME, _read_txt(BUILTIN_PATH, BUILTIN_NAME), builtin=True)
    spec = os.fspath(dataset)
    path = Path(spec)
    if path.is_dir():
        raise ReapError(spec, "is a directory; pass a .jsonl, .json, .parquet or .txt file "
                              "or a hub dataset id")
    if path.is_file():
        return _read_file(path, spec)
    if path.suffix.lower() in FILE_SUFFIXES or not _HUB_ID.match(spec) or spec.startswith("."):
        raise ReapError(spec, "no such file")
    return _load_hub(spec, split)


def _read_file(path: Path, name: str) -> _Source:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows, labels = [], []
        for lineno, line in enumerate(_read_text(path, name).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(loads_strict(line.encode(), name, "row"))
            except ReapError as e:
                raise ReapError(name, f"line {lineno}: {e.message}") from None
            labels.append(f"line {lineno}")
        return _Source(name, rows, labels)
    if suffix == ".json":
        data = loads_strict(_read_text(path, name).encode(), name, "dataset file")
        if isinstance(data, dict):
            lists = [k for k, v in data.items() if isinstance(v, list)]
            key = "data" if isinstance(data.get("data"), list) else (lists[0] if len(lists) == 1 else None)
            if key is None:
                raise ReapError(name, "expected a list of rows, or an object with the rows under "
                                      f"\"data\"; found an object with keys {sorted(data)}")
            data = data[key]
        if not isinstance(data, list):
            raise ReapError(name, f"expected a list of rows, found {type(data).__name__}")
        return _Source(name, data)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ReapError(name, "reading .parquet needs pyarrow, which is not installed: "
                                  "pip install 'reapsurgery[data]' (or convert the file to .jsonl)") from None
        try:
            return _Source(name, pq.read_table(path).to_pylist())
        except Exception as e:  # pyarrow raises several types for a bad file
            raise ReapError(name, f"cannot read parquet: {_one_line(e)}") from None
    if suffix == ".txt":
        return _Source(name, _read_txt(path, name))
    raise ReapError(name, f"unsupported file type {path.suffix or '(none)'!r}; "
                          "use .jsonl, .json, .parquet or .txt")


def _read_text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReapError(name, f"not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ReapError(name, f"cannot read: {e.strerror or e}") from None


def _read_txt(path: Path, name: str) -> list[str]:
    """Paragraphs separated by blank lines; one sample per line when there is no blank line."""
    text = _read_text(path, name).replace("\r\n", "\n")
    parts = re.split(r"\n[ \t]*\n", text)
    if len(parts) == 1:
        parts = text.split("\n")
    return [p.strip("\n") for p in parts if p.strip()]


def _load_hub(spec: str, split: str) -> _Source:
    name, _, config = spec.partition(":")
    hint = "download it first with network access (datasets.load_dataset) or pass a local " \
           ".jsonl/.json/.parquet/.txt file"
    try:
        import datasets
    except ImportError:
        raise ReapError(spec, "is not a local file, and loading a hub dataset needs the `datasets` "
                              f"library, which is not installed (pip install 'reapsurgery[data]'); {hint}") from None
    with _offline(datasets):
        try:
            ds = datasets.load_dataset(name, config or None, split=split)
        except Exception as e:  # offline misses surface as several exception types
            raise ReapError(spec, f"is not a local file and is not in the local datasets cache "
                                  f"(split {split!r}; offline: {_one_line(e)}); {hint}") from None
    label = f"{spec}[{split}]"
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
        return _Source(label, ds)
    return _Source(label, list(ds))  # an iterable dataset: materialise


@contextlib.contextmanager
def _offline(datasets_module) -> Iterator[None]:
    """Run datasets/huggingface_hub offline: from the cache only, failing fast otherwise."""
    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    patched: list[tuple[Any, str, Any]] = []
    modules = [getattr(datasets_module, "config", None)]
    try:
        import huggingface_hub.constants as hub_constants
        modules.append(hub_constants)
    except ImportError:
        pass
    try:
        for k in saved_env:
            os.environ[k] = "1"
        for mod in modules:
            for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
                if mod is not None and hasattr(mod, attr):
                    patched.append((mod, attr, getattr(mod, attr)))
                    setattr(mod, attr, True)
        yield
    finally:
        for mod, attr, value in reversed(patched):
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- rows ----------------------------------------------------------------------------------


def _classify(row: Any, text_field: str | None, source: _Source, i: int) -> tuple[str, Any]:
    """(kind, payload): ("input_ids", ids) | ("messages", chat) | (field name, text)."""
    where = source.label(i)
    if isinstance(row, str):
        return "text", row
    if not isinstance(row, dict):
        raise ReapError(source.name, f"{where}: expected an object or a string, found "
                                     f"{type(row).__name__}")
    if text_field is not None:
        if text_field not in row:
            raise ReapError(source.name, f"{where}: no field {text_field!r} (text field asked for); "
                                         f"keys present: {sorted(row)}")
        field, value = text_field, row[text_field]
    elif "input_ids" in row:
        field, value = "input_ids", row["input_ids"]
    elif "messages" in row:
        field, value = "messages", row["messages"]
    else:
        field = next((f for f in TEXT_FIELDS if f in row), None)
        if field is None:
            raise ReapError(source.name, f"{where}: no text field (none of "
                                         f"{', '.join(TEXT_FIELDS + ('input_ids', 'messages'))}); "
                                         f"keys present: {sorted(row)}; pass --text-field NAME")
        value = row[field]

    if value is None or isinstance(value, str):
        return field, value or ""
    if isinstance(value, (list, tuple)):
        if all(isinstance(m, dict) for m in value) and (value or field == "messages"):
            for m in value:
                if "role" not in m or "content" not in m:
                    raise ReapError(source.name, f"{where}: {field!r} is not a chat: every message "
                                                 f"needs 'role' and 'content', found keys {sorted(m)}")
            return "messages", list(value)
        if field == "messages":  # not token ids under another name: a chat that is not one
            raise ReapError(source.name, f"{where}: 'messages' is not a chat: expected a list of objects "
                                         "with 'role' and 'content'")
        if field == "input_ids" or all(not isinstance(t, (dict, str)) for t in value):
            return "input_ids", list(value)
    raise ReapError(source.name, f"{where}: field {field!r} is {type(value).__name__}, expected "
                                 "text, a list of token ids, or a list of chat messages")


def _encode(kind: str, payload: Any, tokenizer: "_LazyTokenizer", max_length: int,
            source: _Source, i: int) -> list[int]:
    if kind == "input_ids":
        return list(payload[:max_length])
    if kind == "messages":
        if not payload:
            return []
        tok = tokenizer.get()
        if not getattr(tok, "chat_template", None):
            raise ReapError(tokenizer.path, f"has no chat template, needed for the 'messages' rows "
                                            f"of {source.name}")
        try:
            text = tok.apply_chat_template(payload, tokenize=False)
        except Exception as e:  # jinja raises on chats the template refuses
            raise ReapError(source.name, f"{source.label(i)}: chat template failed: "
                                         f"{_one_line(e)}") from None
        add_special = False  # the template already wrote BOS and the like
    else:
        if not payload.strip():
            return []
        tok, text, add_special = tokenizer.get(), payload, True
    ids = tok(text, add_special_tokens=add_special, truncation=True, max_length=max_length)["input_ids"]
    return list(ids[:max_length])


def _check_ids(ids: list[Any], vocab_size: int | None, source: _Source, i: int) -> None:
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ReapError(source.name, f"{source.label(i)}: token ids must be non-negative "
                                         f"integers, found {t!r}")
        if t >= (vocab_size if vocab_size is not None else 2**63):
            raise ReapError(source.name, f"{source.label(i)}: token id {t} is out of range for "
                                         f"the model's vocab_size {vocab_size}" if vocab_size is not None else
                                         f"{source.label(i)}: token id {t} does not fit in 64 bits")


# --- tokenizer -----------------------------------------------------------------------------


class _LazyTokenizer:
    """The checkpoint's tokenizer, loaded on first use only (pre-tokenised data never needs it)."""

    def __init__(self, path: str | os.PathLike | None, data_name: str):
        self.path = None if path is None else os.fspath(path)
        self.data_name = data_name
        self._tok = None

    def get(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.path, self.data_name)
        return self._tok


def load_tokenizer(path: str | os.PathLike | None, data_name: str = "calibration data"):
    """AutoTokenizer from a local checkpoint directory, never from the network."""
    if path is None:
        raise ReapError(data_name, "rows are text, not pre-tokenised input_ids, and no tokenizer "
                                   "directory was given")
    p = Path(path)
    if not p.is_dir():
        raise ReapError(path, "is not a directory; cannot load a tokenizer from it")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ReapError(path, f"has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}), "
                              f"needed to tokenize {data_name}: copy the base model's tokenizer "
                              "files there, or pass pre-tokenised input_ids rows")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        from transformers import AutoConfig

        try:  # the tokenizer reads config.json too: a value transformers refuses there is named there
            AutoConfig.from_pretrained(p, local_files_only=True)
        except Exception as bad_config:  # noqa: BLE001
            raise ReapError(p / "config.json", f"transformers cannot read it: {_one_line(bad_config)}") from None
        raise ReapError(path, f"cannot load its tokenizer: {_one_line(e)}") from None


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__: list[str] = ["CalibrationData", "load_samples", "load_tokenizer", "BUILTIN_NAME"]
