"""Multi-token-prediction (MTP) layers a mask keeps: run as the engines run them for drafting.

apply keeps the MTP layers a mask covers, pruned like the stack; vLLM and SGLang then use them as
the speculative-decoding draft. Each variant's MTP block is the one calibrate runs
(calibration.mtp.load_mtp_block, its decoder layer rebuilt for the pruned expert count and filled
with sliced tensors, as for the stack) fed with that variant's own last hidden states, so its
metrics are those of the draft the pruned checkpoint gives. Depth d at position t predicts token
t + d + 1; its logits are head(head_norm(out)) with the block's own head (DeepSeek-V3 and GLM's
`shared_head.norm` and `shared_head.head`; Qwen3-Next's `mtp.norm` with the model's LM head).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration.dequant import read_layer_tensors
from ..calibration.mtp import MtpBlock, counted_positions, load_mtp_block, mtp_layers
from ..calibration.streaming import StreamedModel
from ..errors import ReapError
from .head import LayerError, TokenMetrics, score
from .variants import Variant, fill_pruned, release


@dataclass
class MtpDepth:
    """One MTP layer's metrics: next-next-token metrics against the original's draft, and the
    relative error of the MTP layer's output against the original's."""

    layer: int
    depth: int
    metrics: TokenMetrics
    error: LayerError | None = None

    def to_json(self, original: bool = False) -> dict:
        out = {"evaluated": True, "depth": self.depth, "predicted_positions": self.metrics.positions,
               **(self.metrics.to_json(original=original) if self.metrics.positions else {})}
        if self.error is not None:
            out["relative_error"] = self.error.relative()
        return out


def mtp_to_run(streamed: StreamedModel,
               variants: list[Variant]) -> tuple[list[int], list[list[int]], list[dict[int, str]], list[str]]:
    """The MTP layers to run; the ones each variant runs (all where its mask keeps them);
    per variant, the MTP layers its mask keeps that cannot be run, with why (the reason calibrate
    --mtp calibrate would give); and notes saying so."""
    n = len(streamed.layers)
    covered = [sorted(l for l in v.mask.layers if l >= n) for v in variants]
    if not any(covered):
        return [], [[] for _ in variants], [{} for _ in variants], []
    try:
        layers = mtp_layers(streamed)
        if _head_keys(streamed, layers[0])[0] is None:
            raise ReapError(None, f"no head norm ({streamed.ckpt.layout.mtp_modules.get('head')}) stored")
    except ReapError as e:
        reason = e.message
        every = sorted({l for c in covered for l in c})
        return [], [[] for _ in variants], [{l: reason for l in c} for c in covered], [
            f"multi-token-prediction layers {every} are not evaluated ({reason}); "
            "their pruned experts count in params and bytes only"]
    # apply keeps a mask's MTP layers all or none (sized_variant ran its checks): a variant runs every depth
    per_variant = [layers if c else [] for c in covered]
    return layers, per_variant, [{} for _ in variants], []


def _head_keys(streamed: StreamedModel, i: int) -> tuple[str | None, str | None]:
    """Checkpoint keys of MTP layer i's head norm weight and its own head projection (None: the LM head's)."""
    ckpt, layout = streamed.ckpt, streamed.ckpt.layout
    n, head = ckpt.num_hidden_layers, layout.mtp_modules.get("head")
    if head is None:
        return None, None
    keys = list(streamed.mtp_keys.get(i, []))
    if i != n and layout.mtp_block.get("prefix"):  # one shared set of block modules across depths
        keys += streamed.mtp_keys.get(n, [])
    norm = proj = None
    for key in keys:
        _, rel = layout.split_layer(layout.canonical(key, n))
        if rel in (f"{head}.norm.weight", f"{head}.weight") and norm is None:
            norm = key
        elif rel == f"{head}.head.weight":
            proj = key
    return norm, proj


def _load_head(streamed: StreamedModel, i: int, lm_head: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    norm_key, proj_key = _head_keys(streamed, i)
    keys = [k for k in (norm_key, proj_key) if k is not None]
    w = {k: t.to(device=streamed.device, dtype=streamed.dtype)
         for k, t in read_layer_tensors(streamed.ckpt, keys, streamed.device, streamed.files).items()}
    norm = copy.deepcopy(streamed.final_norm())  # same class and epsilon, as calibrate's block norms
    norm.weight = nn.Parameter(w[norm_key], requires_grad=False)
    return norm, (w[proj_key] if proj_key else lm_head)


def _run(block: MtpBlock, hidden: list[torch.Tensor], calls: list, batches: list, template: int) -> list[torch.Tensor]:
    out = []
    for h, layer_calls, (ids, _) in zip(hidden, calls, batches):
        args, kwargs = layer_calls[template]
        out.append(block(h, ids.to(h.device), *args, **kwargs))
    return out


@torch.no_grad()
def evaluate_mtp(streamed: StreamedModel, layers: list[int], per_variant: list[list[int]], variants: list[Variant],
                 variant_layers: list[nn.ModuleList], original: list[torch.Tensor], hidden: list[list[torch.Tensor]],
                 calls: list, batches: list, template: int, lm_head: torch.Tensor, vocab: int,
                 bar=None) -> tuple[list[MtpDepth], list[list[MtpDepth]]]:
    """Run every MTP layer for the original and for each variant whose mask keeps it, chaining
    depths on each one's own outputs; `original`/`hidden` are the stack's last-layer outputs."""
    E = streamed.ckpt.num_experts
    base_out: list[MtpDepth] = []
    results: list[list[MtpDepth]] = [[] for _ in variants]
    for i in layers:
        block = load_mtp_block(streamed, i, template)
        norm, proj = _load_head(streamed, i, lm_head)
        original = _run(block, original, calls, batches, template)
        running = [v for v in range(len(variants)) if i in per_variant[v]]
        outs = []
        for v in running:
            layer = fill_pruned(variant_layers[v][template], block.layer, variants[v].mask.layers[i], E,
                                f"multi-token-prediction layer {i}, {variants[v].label}")
            pruned = MtpBlock(layer, block.embed_norm, block.hidden_norm, block.final_norm, block.proj, block.embed,
                              block.depth)
            hidden[v] = _run(pruned, hidden[v], calls, batches, template)
            release(layer)
            err = LayerError()
            for b, (_, am) in enumerate(batches):
                err.add(hidden[v][b], original[b], counted_positions(am, block.depth).to(original[b].device))
            outs.append(err)
        base, metrics = score(lambda h: F.linear(norm(h), proj), vocab, original, [hidden[v] for v in running],
                              batches, bar, shift=block.depth + 1)
        base_out.append(MtpDepth(i, block.depth, base))
        for v, m, err in zip(running, metrics, outs):
            results[v].append(MtpDepth(i, block.depth, m, err))
        block.to_empty(device="meta")
        del block, norm, proj
    return base_out, results
