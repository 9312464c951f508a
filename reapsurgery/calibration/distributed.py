"""Calibration under torchrun: each rank takes a share of the batches, statistics are summed.

`torchrun --nproc-per-node N -m reapsurgery calibrate ...` (or several nodes with the usual
--nnodes/--rdzv options) starts N processes with RANK/WORLD_SIZE/LOCAL_RANK set; each runs the
layer stream on its own device (cuda:LOCAL_RANK, or the CPU) over batches rank, rank+N, ...,
and after every layer the per-expert float64 accumulators are all-reduced with
torch.distributed (NCCL on GPUs, gloo on CPU): sums for counts and sums, max for the maximum
activation. Every rank then holds the whole run's statistics; rank 0 writes the result.

Disk reads: every rank reads every layer's bytes. On one node the ranks stream the same
layers in lockstep (the all-reduce after every layer), so all but the first read of a byte
range come from the page cache: measured with `benchmarks/bench_calibrate.py --ranks-io 2`
(two ranks fetch 1.03 x one process's bytes from storage in all; README, "Ranks on one node").
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch

from ..errors import ReapError
from .observe import ExpertStats


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Ranks:
    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "Ranks | None":
        """The torchrun environment, or None when run as one process."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return None
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, device: str) -> str:
        """cuda:LOCAL_RANK for auto/cuda on GPUs; the CPU otherwise."""
        if device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return "cpu" if device == "auto" else device

    def start(self, device: torch.device) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            # ours, so ours to end: a process group still alive when the interpreter is torn down
            # can abort it (gloo's threads free tensors that need the GIL: SIGABRT; pytorch#179291)
            atexit.register(_end_process_group)
        if dist.get_world_size() != self.world:
            raise ReapError(None, f"torch.distributed has {dist.get_world_size()} ranks, WORLD_SIZE says {self.world}")

    def share(self, items: list) -> list:
        if len(items) < self.world:
            raise ReapError(None, f"{len(items)} batches for {self.world} ranks: every rank needs one; "
                                  "use more samples or a smaller --batch-size")
        return items[self.rank :: self.world]

    def same_count(self, chunks: list[list[int]]) -> list[list[int]]:
        """Every rank streams the layers the same number of times (the most any rank needs): this
        rank's batches re-split evenly into that many chunks."""
        import torch.distributed as dist

        n = torch.tensor([len(chunks)], dtype=torch.int64)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        batches = [b for c in chunks for b in c]
        n = int(n.item())
        if len(batches) < n:
            raise ReapError(None, f"--hidden-memory: {n} chunks but this rank has {len(batches)} batches")
        return [batches[len(batches) * i // n : len(batches) * (i + 1) // n] for i in range(n)]

    @staticmethod
    def reduce(s: ExpertStats) -> None:
        """Sum the accumulators (max for max_activation) over all ranks, in place."""
        import torch.distributed as dist

        sums = torch.cat([s.tokens.reshape(1), s.count, s.gate_sum, s.norm_sum, s.reap_sum])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(s.max_activation, op=dist.ReduceOp.MAX)
        n = s.count.numel()
        s.tokens.copy_(sums[0])
        for i, t in enumerate((s.count, s.gate_sum, s.norm_sum, s.reap_sum)):
            t.copy_(sums[1 + i * n : 1 + (i + 1) * n])

    @staticmethod
    def barrier() -> None:
        import torch.distributed as dist

        dist.barrier()
