"""NaN and infinity, refused where they arise: in a tensor as it is read from the shards, and in
what a layer computes from finite weights (its statistics, its outputs).

One NaN in one expert's weights makes that layer's statistics NaN, and every later layer's; a run
would write a saliency file (or an evaluation report) that looks complete and is not. So every
weight is checked as it is read, naming the checkpoint tensor and its shard, and what a layer
computes is checked once per layer, naming the layer: with finite weights a non-finite result is
an overflow of the compute dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ReapError

CHECKED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in `t`, in one reduction in its own dtype (no boolean copy of it): a
    non-finite element makes the sum non-finite; a non-finite sum of finite elements (an overflow)
    is told apart element by element."""
    if t.dtype not in CHECKED or torch.isfinite(t.sum()):
        return True
    return bool(torch.isfinite(t).all())


def _what(t: torch.Tensor) -> str:
    return "NaN" if bool(torch.isnan(t).any()) else "infinity"


def check_weight(shard: Path, key: str, t: torch.Tensor) -> None:
    """A checkpoint tensor (dequantised where quantized) as read: refused if it holds NaN or infinity."""
    if not is_finite(t):
        raise ReapError(shard, f"tensor {key!r} holds {_what(t)}: every statistic and output computed "
                               "from it would be NaN; the checkpoint is damaged")


def check_computed(where: Path, what: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    """What a layer computed from finite weights (statistics, hidden states, logits)."""
    if not is_finite(t):
        hint = "; try --dtype float32" if dtype != torch.float32 else ""
        raise ReapError(where, f"{what} holds {_what(t)} although the weights it read are finite numbers: "
                               f"the computation overflows in {str(dtype).removeprefix('torch.')}{hint}")
