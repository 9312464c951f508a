"""Reading and writing the small files reapsurgery handles, strictly and atomically.

Every JSON file (config, index, mask, saliency, layout, resume state) goes through
`read_json`, so any defect -- a binary file, UTF-16, bytes that are not UTF-8, duplicate
keys, Infinity/NaN, nesting too deep -- becomes one ReapError naming the file, never a
traceback and never a silently different meaning (json's last-duplicate-wins).
Every file reapsurgery writes goes through `write_atomic`: complete or absent, never a
leftover `.partial`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import ReapError

MAX_JSON = 1 << 30  # refuse to read more than this as JSON (a shard passed by mistake)


class _Invalid(ValueError):
    """Raised inside the json hooks; turned into a ReapError with the file's name."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Invalid(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Invalid(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Invalid(f"number {text} is out of range")
    return value


def check_text(raw: bytes, path: str | os.PathLike, what: str = "file") -> None:
    """Refuse UTF-16 text and binary files by their first bytes, with a message that says which."""
    sample = raw[:64]
    ascii_utf16 = len(sample) >= 4 and any(not any(sample[i::2]) and all(sample[1 - i::2]) for i in (0, 1))
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or ascii_utf16:
        raise ReapError(path, f"{what} is UTF-16 text, not UTF-8 JSON; save it as UTF-8")
    if b"\x00" in raw[:4096]:
        raise ReapError(path, f"{what} is a binary file, not JSON")


def loads_strict(raw: bytes, path: str | os.PathLike, what: str = "file") -> Any:
    """Parse UTF-8 JSON bytes strictly; raises ReapError(path, ...) on any defect."""
    check_text(raw, path, what)
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark changes nothing
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ReapError(path, f"{what} is not UTF-8 text (invalid byte at offset {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                          parse_float=_finite_float)
    except _Invalid as e:
        raise ReapError(path, f"{what} is not valid JSON ({e})") from None
    except json.JSONDecodeError as e:
        raise ReapError(path, f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ReapError(path, f"{what} is not valid JSON (nested too deeply)") from None


def read_bytes(path: str | os.PathLike, what: str = "file", limit: int = MAX_JSON) -> bytes:
    """A whole small file, with OS errors as ReapError naming it (a directory, missing, unreadable)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < limit:
                raise ReapError(path, f"is a safetensors file (weights), not a {what}")
            if os.fstat(f.fileno()).st_size > limit:
                raise ReapError(path, f"{what} is larger than {limit >> 20} MiB; not a JSON file reapsurgery reads")
            return head + f.read()
    except FileNotFoundError:
        raise ReapError(path, "does not exist") from None
    except IsADirectoryError:
        raise ReapError(path, f"is a directory, expected a {what}") from None
    except OSError as e:
        raise ReapError(path, f"cannot read {what}: {e.strerror or e}") from None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Strictly parsed JSON of a file; every failure is a ReapError naming the file."""
    return loads_strict(read_bytes(path, what), path, what)


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ReapError(path, f"{what} is not a JSON object (found a {type(data).__name__})")
    return data


def layer_key(key: Any) -> int | None:
    """A layer index written as a canonical decimal string ("0", "17"), else None.

    "00", "+1", " 1" and non-ASCII digits ("²") are refused: two keys must never mean one layer."""
    if isinstance(key, str) and key.isascii() and key.isdigit() and (key == "0" or not key.startswith("0")):
        return int(key)
    return None


# -- outputs --------------------------------------------------------------------------


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_output_file(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                      input_dirs: Iterable[str | os.PathLike] = (), flag: str = "-o") -> Path:
    """Refuse, before any work, an output file that would replace an input or cannot be written.

    inputs: files the command reads; input_dirs: directories it reads (a checkpoint), inside
    which nothing may be written. Probes the directory by creating and removing a file there.
    """
    out = Path(out)
    out_r = out.resolve()
    for src in inputs:
        if Path(src).resolve() == out_r:
            raise ReapError(out, f"{flag} would overwrite the input {src}; choose another output file")
    for d in input_dirs:
        if out_r == Path(d).resolve():
            raise ReapError(out, f"{flag} is the input checkpoint; give a file name outside it")
        if _inside(out_r, Path(d).resolve()):
            raise ReapError(out, f"{flag} is inside the input checkpoint {d}; write outside it")
    if out.is_dir():
        raise ReapError(out, f"{flag} is a directory; give a file name")
    parent = out_r.parent
    if not parent.is_dir():
        raise ReapError(out, f"cannot write: directory {out.parent} does not exist")
    probe = parent / f".{out.name}.{os.getpid()}.probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.unlink(probe)
    except OSError as e:
        raise ReapError(out, f"cannot write in {out.parent}: {e.strerror or e}") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise ReapError(out, "cannot write: the file is read-only")
    return out


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a file that is either complete or absent: a hidden sibling renamed into place."""
    path = Path(path)
    if path.is_dir():
        raise ReapError(path, "is a directory; give a file name")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise ReapError(path, f"cannot write: {e.strerror or e}") from None
        raise


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    write_atomic(path, (json.dumps(data, indent=indent) + "\n").encode())
