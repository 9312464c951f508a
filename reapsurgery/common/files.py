"""Reading and writing the small files reapsurgery handles, strictly and atomically.

Every JSON file (config, index, mask, saliency, layout, resume state) goes through
`read_json`, so any defect -- a binary file, UTF-16, bytes that are not UTF-8, duplicate
keys, Infinity/NaN, nesting too deep -- becomes one ReapError naming the file, never a
traceback and never a silently different meaning (json's last-duplicate-wins).
Every file reapsurgery writes is checked first by `check_output_file` (never onto an input,
never over an existing file without --overwrite) and written by `write_atomic`: complete or
absent, nothing left behind (common/staging.py).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import re
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
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                          parse_float=_finite_float)
    except _Invalid as e:
        raise ReapError(path, f"{what} is not valid JSON ({e})") from None
    except json.JSONDecodeError as e:
        raise ReapError(path, f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ReapError(path, f"{what} is not valid JSON (nested too deeply)") from None
    if _SURROGATE_ESCAPE.search(text):  # rare: only then is every string looked at
        lone = _lone_surrogate(data)
        if lone is not None:
            raise ReapError(path, f"{what} is not valid JSON text: the string {ascii(lone[:40])} holds a lone "
                                  "UTF-16 surrogate (an escape like \\ud800 that is half of a character)")
    return data


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(data: Any) -> str | None:
    """The first string (key or value) that is not valid Unicode: a surrogate escape without its pair."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return data
        return None
    items = data.items() if isinstance(data, dict) else ((None, v) for v in data) if isinstance(data, list) else ()
    for key, value in items:
        found = _lone_surrogate(key) if key is not None else None
        found = found or _lone_surrogate(value)
        if found is not None:
            return found
    return None


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


def real_path(path: str | os.PathLike) -> Path:
    """Where writing `path` lands: symlinks (its own and its parents'), `.` and `..` resolved."""
    return Path(os.path.realpath(path))


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _up(path: Path) -> set[tuple[int, int]]:
    """The identities of `path` and every directory above it that exists."""
    return {i for p in (path, *path.parents) if (i := _identity(p)) is not None}


def input_clash(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                input_dirs: Iterable[str | os.PathLike] = (), directory: bool = False) -> str | None:
    """Why writing `out` would touch an input of the command, or None.

    inputs: files the command reads (never replaced); input_dirs: directories it reads (a
    checkpoint), inside which nothing is written; directory: `out` is a directory that replaces
    what it holds (apply --overwrite), so it may not hold an input either. Compared by real path
    (symlinks, `..`, relative spellings) and by device and inode (hard links, bind mounts)."""
    out = Path(out)
    spots = {real_path(out), real_path(out.parent) / out.name}
    out_id = _identity(out)
    around = _up(real_path(out).parent) | _up(real_path(out.parent))
    for src in inputs:
        if real_path(src) in spots or (out_id is not None and out_id == _identity(src)):
            return f"would overwrite the input {src}"
        if directory and out_id is not None and out_id in _up(real_path(src).parent):
            return f"contains the input {src}"
    for d in input_dirs:
        d_id = _identity(d)
        if d_id is None:
            continue
        if out_id == d_id:
            return f"is the input checkpoint {d}"
        if d_id in around:
            return f"is inside the input checkpoint {d}"
        if directory and out_id is not None and out_id in _up(real_path(d).parent):
            return f"contains the input checkpoint {d}"
        if out_id is not None and not directory:  # a file of it reached by a symlink (a hub snapshot's blobs)
            for root, _, names in os.walk(d):
                if any(_identity(os.path.join(root, n)) == out_id for n in names):
                    return f"would overwrite a file of the input checkpoint {d}"
    return None


def check_output_file(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                      input_dirs: Iterable[str | os.PathLike] = (), flag: str = "-o",
                      overwrite: bool = False) -> Path:
    """Refuse, before any work, an output file that would touch an input (input_clash), that
    exists (unless `overwrite`), or that cannot be written there (probed by creating and removing
    a file beside it). Claims it as the command's output (staging.claim)."""
    from .staging import claim, deferred_signals

    out = Path(out)
    clash = input_clash(out, inputs, input_dirs)
    if clash:
        raise ReapError(out, f"{flag} {clash}; choose another output file")
    target = real_path(out)
    if target.is_dir():
        raise ReapError(out, f"{flag} is a directory; give a file name")
    if not target.parent.is_dir():
        raise ReapError(out, f"cannot write: directory {out.parent} does not exist")
    if os.path.lexists(target) and not overwrite:
        raise ReapError(out, "already exists (pass --overwrite to replace it)")
    check_replaceable(out, target)
    try:
        with deferred_signals():  # an interrupt cannot leave the probe behind
            fd, probe = tempfile.mkstemp(prefix=f".{target.name[:120]}.", suffix=".probe", dir=target.parent)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ReapError(out, f"cannot write in {out.parent}: {e.strerror or e}") from None
    if target.exists() and not os.access(target, os.W_OK):
        raise ReapError(out, "cannot write: the file is read-only")
    claim(out)
    return out


def check_replaceable(out: str | os.PathLike, target: str | os.PathLike | None = None) -> None:
    """Refuse an existing output that is not a regular file: a device (/dev/null), a FIFO or a
    socket would be replaced by the published file, not written to, even under --overwrite."""
    import stat

    try:
        mode = os.stat(target if target is not None else real_path(Path(out))).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ReapError(out, f"cannot check it: {e.strerror or e}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ReapError(out, "is not a regular file (a device, FIFO or socket), which the output would replace; "
                             "give the path of a file")


def write_atomic(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> None:
    """Write a file that is either complete or absent (common/staging.py), where a symlink points;
    never over an existing file unless `overwrite`."""
    from .staging import publish_file, staged

    path = Path(path)
    target = real_path(path)
    if target.is_dir():
        raise ReapError(path, "is a directory; give a file name")
    if not target.parent.is_dir():
        raise ReapError(path, f"cannot write: directory {path.parent} does not exist")
    check_replaceable(path, target)
    try:
        with staged(target, lambda tmp: publish_file(tmp, target, overwrite), shown=path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except FileExistsError:
        raise ReapError(path, "was created by another process while this run was writing it; it was left as "
                              "it is and nothing of this run was written (pass --overwrite to replace it)") from None
    except OSError as e:
        raise ReapError(path, f"cannot write: {e.strerror or e}") from None


def _first_nonfinite(data: Any, where: str = "") -> str | None:
    """Where the first NaN or infinity in `data` is, as `layers.3.reap_sum[2]`."""
    if isinstance(data, float) and not math.isfinite(data):
        return f"{where or 'the value'} is {data}"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        found = _first_nonfinite(value, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found:
            return found
    return None


def json_bytes(data: Any, path: str | os.PathLike | None = None, indent: int | None = 2) -> bytes:
    """`data` as strict JSON text. Python's json writes NaN and Infinity as bare words that JSON does
    not have (and no strict reader, ours included, takes back): here they are a ReapError naming the
    file and where the value is, and nothing is written."""
    try:
        return (json.dumps(data, indent=indent, allow_nan=False) + "\n").encode()
    except ValueError:
        raise ReapError(path, f"not written: {_first_nonfinite(data)}, which JSON cannot hold") from None


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2, overwrite: bool = False) -> None:
    write_atomic(path, json_bytes(data, path, indent), overwrite)
