"""The resume state of a calibration run: one file, written whole or not at all.

`state.pt` holds everything `--resume` needs (the key, the next layer, the finished layers'
statistics, the hidden states that are the next layer's inputs) in a single file that is
written as `state.pt.partial`, flushed to disk, and renamed over the old one; a kill at any
write or rename leaves either the previous state or the new one, never a mix (the old
two-file layout could pair one layer's statistics with another layer's hidden states).

The key covers what makes the state valid: the checkpoint's weights (per shard: size,
mtime, and a hash of the header and of bytes sampled across the data, so two checkpoints
of the same config differ), the samples, and every option that changes the numbers.

Saving is rate-limited (`every` seconds, `--checkpoint-every`) and runs on a background
thread: it holds references to one earlier generation of hidden states while it writes
(the layer loop replaces, never modifies, them), so at most two generations are alive.

A save that fails (a full disk, EIO, no permission) leaves no partial file and no directory this
run made, is said once as a note, and the run goes on: the state is insurance, the result is what
was asked for. The directory is calibrate's own only (statedir.py: marked, never a user's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..common.checkpoint import Checkpoint
from ..common.saliency import LayerStats
from ..errors import ReapError
from . import statedir
from .timing import TIMINGS

log = logging.getLogger("reapsurgery")

FORMAT = "reapsurgery.resume/2"
SAMPLE_SPOTS, SAMPLE_BYTES = 16, 4096


def weights_identity(ckpt: Checkpoint) -> list:
    """Per shard: name, size, mtime and sha256 of its header and of 16 x 4 KiB sampled across
    its data (64 KiB read per shard): checkpoints of one config with other weights differ."""
    out = []
    for shard in ckpt.shards:
        path = ckpt.path / shard
        st = path.stat()
        data_offset = ckpt.header(shard).data_offset
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(data_offset))
            span = max(st.st_size - data_offset - SAMPLE_BYTES, 0)
            for i in range(SAMPLE_SPOTS):
                f.seek(data_offset + span * i // max(SAMPLE_SPOTS - 1, 1))
                h.update(f.read(SAMPLE_BYTES))
        out.append([shard, st.st_size, st.st_mtime_ns, h.hexdigest()])
    return out


def state_key(ckpt: Checkpoint, samples: list[list[int]], options: dict[str, Any]) -> str:
    """sha256 of the checkpoint's config fingerprint and weights, the samples and the options."""
    ident = [ckpt.fingerprint(), weights_identity(ckpt), samples, options]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


class ResumeState:
    """The resume state in `root` (None: no state kept; `sub`: this rank's directory in it under
    torchrun), saved at most every `every` seconds."""

    def __init__(self, root: Path | None, key: str, every: float = 600.0, sub: str | None = None):
        self.root, self.key, self.every = root, key, every
        self.dir = root / sub if root is not None and sub else root
        self._last = time.monotonic()
        self._writer: ThreadPoolExecutor | None = None  # one thread for every save, in order
        self._pending: Future | None = None
        self._failed = False  # a save failed (said once)
        self.saves, self.save_seconds = 0, 0.0  # for the benchmark's table
        self.saved_next: tuple[int, int] | None = None  # (chunk, next_layer) of the last save started

    @property
    def file(self) -> Path | None:
        return self.dir / statedir.STATE if self.dir else None

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Refuse a path that is not ours or an earlier state neither flag settles; --overwrite
        without --resume discards this process's earlier state."""
        if self.root is None:
            return
        statedir.check_state_dir(self.root, resume, overwrite)
        if overwrite and not resume and statedir.is_ours(self.root):
            for name in (statedir.STATE, statedir.PARTIAL):
                (self.dir / name).unlink(missing_ok=True)

    def load(self) -> tuple[int, dict[int, LayerStats], list[torch.Tensor], dict] | None:
        """(next layer, finished layers' statistics, hidden states, extra) or None when there is no state."""
        if self.dir is None or not self.file.is_file():
            return None
        try:
            state = torch.load(self.file, weights_only=True)
            if state.get("format") != FORMAT:
                raise ValueError("not a resume state")
            layers = {int(k): LayerStats(**v) for k, v in state["layers"].items()}
            found_key, next_layer, hidden = state["key"], int(state["next_layer"]), list(state["hidden"])
        except Exception as e:  # noqa: BLE001  (any defect of the file: refuse it by name)
            raise ReapError(self.file, f"unreadable resume state ({type(e).__name__}); delete {self.root} "
                                       "or drop --resume") from None
        if found_key != self.key:
            raise ReapError(self.root, "resume state was written for other data, options or checkpoint weights; "
                                       "delete it or drop --resume")
        return next_layer, layers, hidden, dict(state.get("extra") or {})

    def due(self) -> bool:
        return self.dir is not None and time.monotonic() - self._last >= self.every

    def save(self, next_layer: int, layers: dict[int, LayerStats], hidden: list[torch.Tensor],
             extra: dict | None = None, background: bool = True) -> bool:
        """Write the state (after the previous write has finished), in the background by default;
        False when a write in the foreground failed (said as a note)."""
        if self.dir is None:
            return False
        self.wait()
        state = {"format": FORMAT, "key": self.key, "next_layer": next_layer,
                 "layers": {str(k): v.to_json() for k, v in layers.items()},
                 "hidden": list(hidden), "extra": extra or {}}
        self._last, self.saved_next = time.monotonic(), ((extra or {}).get("chunk", 0), next_layer)
        if background:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resume-state")
            self._pending = self._writer.submit(self._attempt, state)
            return True
        return self._attempt(state)

    def keep(self, stats: dict[int, LayerStats], chunks: list) -> str:
        """The result could not be written: save every layer's statistics (no hidden states), so that
        --resume writes it without measuring again. Says what is kept, for the error."""
        if self.dir is None:
            return "nothing was kept (no resume state): a new run measures again"
        done = {"chunk": len(chunks), "chunks": chunks, "previous": {str(k): v.to_json() for k, v in stats.items()}}
        if self.save(0, {}, [], done, background=False):
            return (f"every layer's statistics are kept in {self.root}: run the same command with --resume "
                    "to write it without measuring again")
        if statedir.has_state(self.root):
            return f"the state saved earlier is kept in {self.root}: run the same command with --resume to continue"
        return "no resume state could be kept either: a new run measures again"

    def wait(self) -> None:
        """Let a background write finish (its failure was said as a note)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def clear(self) -> None:
        """Remove the state: only once the result it leads to is safely written."""
        self.wait()
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        if self.root is not None and statedir.is_ours(self.root):
            statedir.remove(self.root, self.dir if self.dir != self.root else None)

    def _attempt(self, state: dict) -> bool:
        try:
            self._write(state)
            return True
        except ReapError as e:
            self.saved_next = None  # an interrupt now saves again
            if not self._failed:
                self._failed = True
                kept = "the state saved before" if statedir.has_state(self.root) else "nothing"
                log.info(f"{e}; the run goes on without it (a crash or interrupt now keeps {kept})")
            return False

    def _write(self, state: dict) -> None:
        """One save: state.pt.partial, fsynced, renamed over state.pt; on failure nothing of it is left
        (the partial file, and the directory when this save made it and it holds no state)."""
        t0 = time.perf_counter()
        tmp, made = self.dir / statedir.PARTIAL, False
        try:
            state["hidden"] = [h.detach().cpu() for h in state["hidden"]]
            made = statedir.adopt(self.root)
            if self.dir != self.root:
                self.dir.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.file)
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a power cut
            finally:
                os.close(dir_fd)
        except BaseException as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if made and not statedir.has_state(self.root):
                statedir.remove(self.root, self.dir if self.dir != self.root else None)
            if isinstance(e, (KeyboardInterrupt, ReapError)) or not isinstance(e, Exception):
                raise
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            raise ReapError(self.file, f"cannot save the resume state: {reason}") from None
        self.saves += 1
        self.save_seconds += time.perf_counter() - t0
        TIMINGS.add("state save", time.perf_counter() - t0)
