"""Observing the model's real routing where each family combines its experts' outputs.

transformers v5 hands every MoE family's routing to one call, `experts(hidden_states,
top_k_index, top_k_weights)`, whose implementation (`ExpertsInterface`: batched_mm, grouped_mm)
returns the weighted sum of each routed pair's output. Some families wrap that call in a forward
of their own (Ergo applies a per-expert norm to each pair's output, then the weights). That call,
made by the MoE block, is observed: each routed (token, expert) pair runs through the module's
own forward as a token of its own with weight 1 (its f, as the family computes it), REAP
statistics are recorded with the block's weights as g, and the weighted sum is formed as the
implementations form it. Only routed pairs are computed.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..common.model_map import is_interface_experts


@dataclass
class ExpertStats:
    """float64 accumulators for one experts module, on the device the experts run on."""

    tokens: torch.Tensor
    count: torch.Tensor
    gate_sum: torch.Tensor
    norm_sum: torch.Tensor
    reap_sum: torch.Tensor
    max_activation: torch.Tensor  # -inf where never routed

    @classmethod
    def zeros(cls, n: int, device) -> "ExpertStats":
        z = lambda: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        return cls(torch.zeros((), dtype=torch.float64, device=device), z(), z(), z(), z(),
                   torch.full((n,), float("-inf"), dtype=torch.float64, device=device))


@dataclass
class Observer:
    """Accumulates statistics per experts module; `token_mask` marks real (non-padding) tokens."""

    token_mask: torch.Tensor | None = None  # bool [B*T], in the flattened order the experts see
    names: dict[int, str] = field(default_factory=dict)  # id(experts module) -> qualified name
    stats: dict[str, ExpertStats] = field(default_factory=dict)

    @torch.no_grad()
    def record(self, module: nn.Module, f: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        name = self.names[id(module)]
        n_tokens, k = top_k_index.shape
        mask = self.token_mask
        if mask is None:
            mask = torch.ones(n_tokens, dtype=torch.bool, device=f.device)
        if mask.numel() != n_tokens:
            raise RuntimeError(f"{name}: token mask has {mask.numel()} entries, experts saw {n_tokens} tokens")
        mask = mask.to(f.device)
        ids = top_k_index.reshape(-1)
        # padding; EP sentinels; and pairs handed over with weight 0, which add nothing: not routes (LongCat-Flash
        # passes its zero-computation experts' pairs to the experts that way, on a routed expert's index)
        valid = mask.repeat_interleave(k) & (ids >= 0) & (ids < module.num_experts) & (top_k_weights.reshape(-1) != 0)
        everything = bool(valid.all())  # no padding: skip the copies that indexing makes
        e = ids if everything else ids[valid]
        g = (top_k_weights.reshape(-1) if everything else top_k_weights.reshape(-1)[valid]).double()
        fv = f if everything else f[valid]
        norm = torch.linalg.vector_norm(fv, dim=-1, dtype=torch.float64)  # accumulated in float64
        s = self.stats.get(name)
        if s is None:
            s = self.stats[name] = ExpertStats.zeros(module.num_experts, f.device)
        s.tokens += mask.sum()
        s.count.index_add_(0, e, torch.ones_like(g))
        s.gate_sum.index_add_(0, e, g)
        s.norm_sum.index_add_(0, e, norm)
        s.reap_sum.index_add_(0, e, g * norm)
        if e.numel():
            s.max_activation.scatter_reduce_(0, e, fv.amax(-1).double(), reduce="amax")


_ACTIVE: Observer | None = None


@contextlib.contextmanager
def observing(observer: Observer) -> Iterator[Observer]:
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, observer
    try:
        yield observer
    finally:
        _ACTIVE = previous


def observed_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The experts module's own call, `experts(hidden_states, top_k_index, top_k_weights)`, which
    also records statistics when observing.

    Each (token, expert) pair is passed to the module's own forward as a token of its own, top-1
    with weight 1.0, so what comes back is f as the family computes it (its activation, clamps,
    per-expert norm: whatever its forward does after the stock implementation), unweighted; the
    pairs are then weighted by the routing weights the block passed and summed per token, which
    is how every experts forward combines them (transformers' batched_mm and grouped_mm, Ergo's
    own forward after its per-expert norm)."""
    own = type(self).forward
    observer = _ACTIVE
    if observer is None:
        return own(self, hidden_states, top_k_index, top_k_weights)
    n, k = top_k_index.shape
    pairs = hidden_states.repeat_interleave(k, dim=0)
    ones = torch.ones(n * k, 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
    f = own(self, pairs, top_k_index.reshape(-1, 1), ones)
    observer.record(self, f, top_k_index, top_k_weights)
    out = (f * top_k_weights.reshape(-1, 1)).view(n, k, -1).sum(dim=1)
    return out.to(hidden_states.dtype)


INTERFACE_ARGS = ("hidden_states", "top_k_index", "top_k_weights")
OBSERVED = "_reapsurgery_observed"  # an experts module whose call is observed_experts_forward
SCALED_INPUT = "_reapsurgery_scaled_input"  # Llama-4's experts, observed from their router


def is_experts_module(m: nn.Module) -> bool:
    """Routed experts observed here (once `observe_experts` has run on the model)."""
    return getattr(m, OBSERVED, False) or getattr(m, SCALED_INPUT, False)


def _called_as_interface(m: nn.Module) -> bool:
    """A module the MoE block calls as `experts(hidden_states, top_k_index, top_k_weights)`:
    wrapped by transformers' use_experts_implementation (whatever its class's forward then does
    around the dispatch: Ergo's per-expert norm), or a class with that signature that transformers
    does not dispatch (Step-3.7's experts in transformers 5.24)."""
    if not isinstance(getattr(m, "num_experts", None), int) or isinstance(m.num_experts, bool):
        return False
    if is_interface_experts(m):
        return True
    try:
        params = list(inspect.signature(type(m).forward).parameters)[1:]
    except (TypeError, ValueError):
        return False
    return tuple(params[:3]) == INTERFACE_ARGS


def observe_experts(model: nn.Module) -> int:
    """Observe every MoE block's routing where the family combines its experts' outputs; returns
    how many experts modules are observed.

    The experts module the block calls with the routing (the outermost one: Ergo's class wraps the
    stock interface call in a forward of its own) gets `observed_experts_forward` over its class's
    forward, so g is the weight the block hands it and f the module's own output for one pair,
    for every family alike.

    One family routes differently in transformers 5: Llama-4. Its block has `router` (an nn.Linear with
    `top_k` that returns sigmoid scores, 0 outside the top-k, and the logits) and `experts`
    (every expert run densely on [E*T, H] inputs already multiplied by their score, summed by the
    block): no call carries routing weights to wrap, and the score scales the expert's input, not
    its output. There g is the router's sigmoid score of a routed pair and f the expert's output
    on the token itself (unscaled, as every other family's f): recorded from a hook on the router,
    whose input is the block's tokens, by calling the experts module on the routed pairs only.
    """
    count = 0
    outer: list[str] = []  # observed modules' names: what lies inside one is its own business
    for name, m in model.named_modules():  # parents before children
        if any(name.startswith(o + ".") for o in outer):
            continue
        if is_experts_module(m) or _called_as_interface(m):
            outer.append(name)
        if _called_as_interface(m) and not is_experts_module(m):
            setattr(m, OBSERVED, True)
            m.forward = types.MethodType(observed_experts_forward, m)
            count += 1
    for block in model.modules():
        experts, router = getattr(block, "experts", None), getattr(block, "router", None)
        if (experts is None or router is None or is_experts_module(experts)
                or not isinstance(router, nn.Linear) or not hasattr(router, "top_k")
                or not hasattr(experts, "num_experts")):
            continue
        setattr(experts, SCALED_INPUT, True)
        router.register_forward_hook(lambda mod, args, out, experts=experts: _record_scaled_input(experts, mod, args, out))
        count += 1
    return count


@torch.no_grad()
def _record_scaled_input(experts: nn.Module, router: nn.Module, args: tuple, out: tuple) -> None:
    observer = _ACTIVE
    if observer is None:
        return
    hidden = args[0].reshape(-1, args[0].shape[-1])
    scores, logits = out
    top_k_index = torch.topk(logits, router.top_k, dim=-1).indices  # the router's own selection
    top_k_weights = scores.gather(1, top_k_index)
    E, k = experts.num_experts, top_k_index.shape[1]
    ids = top_k_index.reshape(-1)
    # the experts module takes [E * c, H]: c rows per expert; put each routed pair in its expert's rows
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=E)
    c = max(int(counts.max()), 1)
    starts = torch.cumsum(counts, 0) - counts
    sorted_ids = ids[order]
    rank = torch.arange(ids.numel(), device=ids.device) - starts[sorted_ids]
    rows = torch.zeros(E, c, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    rows[sorted_ids, rank] = hidden.repeat_interleave(k, dim=0)[order]
    out_rows = experts(rows.reshape(E * c, -1)).reshape(E, c, -1)
    f = torch.empty(ids.numel(), out_rows.shape[-1], dtype=out_rows.dtype, device=out_rows.device)
    f[order] = out_rows[sorted_ids, rank]
    observer.record(experts, f, top_k_index, top_k_weights)
