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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..common.checkpoint import Checkpoint
from ..common.saliency import LayerStats
from ..errors import ReapError
from .timing import TIMINGS

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
    """The resume state in `directory` (None: no state kept), saved at most every `every` seconds."""

    def __init__(self, directory: Path | None, key: str, every: float = 600.0):
        self.dir, self.key, self.every = directory, key, every
        self._last = time.monotonic()
        self._writer: ThreadPoolExecutor | None = None  # one thread for every save, in order
        self._pending: Future | None = None
        self.saves, self.save_seconds = 0, 0.0  # for the benchmark's table
        self.saved_next: tuple[int, int] | None = None  # (chunk, next_layer) of the last save started

    @property
    def file(self) -> Path | None:
        return self.dir / "state.pt" if self.dir else None

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
            raise ReapError(self.file, f"unreadable resume state ({type(e).__name__}); delete {self.dir} "
                                       "or drop --resume") from None
        if found_key != self.key:
            raise ReapError(self.dir, "resume state was written for other data, options or checkpoint weights; "
                                      "delete it or drop --resume")
        return next_layer, layers, hidden, dict(state.get("extra") or {})

    def due(self) -> bool:
        return self.dir is not None and time.monotonic() - self._last >= self.every

    def save(self, next_layer: int, layers: dict[int, LayerStats], hidden: list[torch.Tensor],
             extra: dict | None = None, background: bool = True) -> None:
        """Write the state (after the previous write has finished), in the background by default."""
        if self.dir is None:
            return
        self.wait()
        state = {"format": FORMAT, "key": self.key, "next_layer": next_layer,
                 "layers": {str(k): v.to_json() for k, v in layers.items()},
                 "hidden": list(hidden), "extra": extra or {}}
        self._last, self.saved_next = time.monotonic(), ((extra or {}).get("chunk", 0), next_layer)
        if background:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resume-state")
            self._pending = self._writer.submit(self._write, state)
        else:
            self._write(state)

    def wait(self) -> None:
        """Let a background write finish; re-raises its failure (a full disk) here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def clear(self) -> None:
        """Remove the state: only once the result it leads to is safely written."""
        self.wait()
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _write(self, state: dict) -> None:
        t0 = time.perf_counter()
        state["hidden"] = [h.detach().cpu() for h in state["hidden"]]
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "state.pt.partial"
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
        self.saves += 1
        self.save_seconds += time.perf_counter() - t0
        TIMINGS.add("state save", time.perf_counter() - t0)
