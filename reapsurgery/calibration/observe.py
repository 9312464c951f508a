"""Observing the model's real routing through transformers' experts interface.

transformers v5 routes every MoE family through `experts(hidden_states, top_k_index,
top_k_weights)`, dispatched by `ExpertsInterface`. We register one more implementation that
computes each routed (token, expert) pair's unweighted output f with a stock implementation
(so each family's own gate, biases and layout apply), records REAP statistics, and combines
the outputs exactly as the stock implementations do. Only routed pairs are computed.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from ..common.model_map import is_interface_experts

IMPL_NAME = "reapsurgery_observe"


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

    base_impl: str = "grouped_mm"
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
        valid = mask.repeat_interleave(k) & (ids >= 0) & (ids < module.num_experts)  # padding, EP sentinels
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


def _stock_forward(module: nn.Module, impl: str):
    if getattr(module, PLAIN_INTERFACE, False):  # its class's own forward is the only implementation
        return type(module).forward
    if impl == "eager":
        return type(module).forward.__wrapped__  # the class's own forward, under use_experts_implementation
    return ALL_EXPERTS_FUNCTIONS[impl]


def observed_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Same contract as the stock implementations; also records statistics when observing.

    Each (token, expert) pair is passed as its own token, top-1 with weight 1.0, so the stock
    implementation returns the unweighted f; the weighted sum is then formed as batched_mm and
    grouped_mm form it.
    """
    observer = _ACTIVE
    base = _stock_forward(self, observer.base_impl if observer else "grouped_mm")
    n, k = top_k_index.shape
    pairs = hidden_states.repeat_interleave(k, dim=0)
    ones = torch.ones(n * k, 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
    f = base(self, pairs, top_k_index.reshape(-1, 1), ones)
    if observer is not None:
        observer.record(self, f, top_k_index, top_k_weights)
    out = (f * top_k_weights.reshape(-1, 1)).view(n, k, -1).sum(dim=1)
    return out.to(hidden_states.dtype)


ExpertsInterface.register(IMPL_NAME, observed_experts_forward)


def is_experts_module(m: nn.Module) -> bool:
    """Routed experts observed here: through ExpertsInterface, or by `attach_router_hooks`."""
    return is_interface_experts(m) or getattr(m, SCALED_INPUT, False) or getattr(m, PLAIN_INTERFACE, False)


# -- experts outside ExpertsInterface ---------------------------------------------------

SCALED_INPUT = "_reapsurgery_scaled_input"
PLAIN_INTERFACE = "_reapsurgery_plain_interface"
INTERFACE_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def _has_interface_signature(m: nn.Module) -> bool:
    """An experts module called as the interface's are, `experts(hidden_states, top_k_index,
    top_k_weights)`, whose class transformers did not wrap with use_experts_implementation
    (Step-3.7's Step3p7Experts, which clamps its SwiGLU)."""
    if is_interface_experts(m) or not isinstance(getattr(m, "num_experts", None), int):
        return False
    try:
        params = list(inspect.signature(type(m).forward).parameters)[1:]
    except (TypeError, ValueError):
        return False
    return tuple(params[:3]) == INTERFACE_ARGS


def attach_router_hooks(model: nn.Module) -> int:
    """Observe MoE blocks that transformers runs outside ExpertsInterface; returns how many.

    Experts modules with the interface's call but not dispatched by it get the interface's
    observed forward over their class's own forward: each routed pair runs through the class's
    code top-1 with weight 1 (its f, with the family's own activation and clamps), and the
    weighted sum is formed as for every other family.

    One family routes differently in transformers 5: Llama-4. Its block has `router` (an nn.Linear with
    `top_k` that returns sigmoid scores, 0 outside the top-k, and the logits) and `experts`
    (every expert run densely on [E*T, H] inputs already multiplied by their score). There,
    g is the router's sigmoid score of a routed pair and f the expert's output on the token
    itself (unscaled, as every other family's f): recorded from a hook on the router, whose
    input is the block's tokens, by calling the experts module on the routed pairs only.
    """
    count = 0
    for m in model.modules():
        if _has_interface_signature(m) and not getattr(m, PLAIN_INTERFACE, False):
            setattr(m, PLAIN_INTERFACE, True)
            m.forward = types.MethodType(observed_experts_forward, m)
            count += 1
    for block in model.modules():
        experts, router = getattr(block, "experts", None), getattr(block, "router", None)
        if (experts is None or router is None or is_interface_experts(experts)
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
