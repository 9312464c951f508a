"""Layer-streamed evaluation of pruned variants against the original model, in one pass.

Each decoder layer is read from the shards once and run over every batch for the original
model; then, for each variant in turn, the layer as the pruned checkpoint holds it (built
for the pruned expert count, filled with sliced tensors; dense layers are the original's)
runs over that variant's own hidden states, and is released. So memory holds one layer,
one variant's pruned copy of it, and the hidden states of the original and every variant.
At the end the final norm and LM head (read once) turn every final hidden state into
next-token metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..calibration.calibrate import BarFactory, make_batches, resolve_device, resolve_dtype
from ..calibration.finite import check_computed
from ..calibration.streaming import StreamedModel, fill_carried
from ..common.checkpoint import Checkpoint
from ..common.layouts import Layout
from ..errors import ReapError
from .head import LayerError, TokenMetrics, head_only, load_head, score
from .mtp import MtpDepth, evaluate_mtp, mtp_to_run
from .report import EVALUATION_FORMAT
from .variants import Variant, fill_pruned, pruned_skeleton, release


@dataclass
class VariantResult:
    variant: Variant
    metrics: TokenMetrics
    layers: dict[int, LayerError]
    mtp: list[MtpDepth] = field(default_factory=list)  # the MTP layers run
    mtp_skipped: dict[int, str] = field(default_factory=dict)  # the MTP layers the mask keeps that are not: why

    def to_json(self, num_experts: int) -> dict:
        after = self.variant.size["after"]
        return {
            "source": self.variant.label,
            "mask_sha256": self.variant.sha256,
            "made": self.variant.made,
            "sparsity": (num_experts - self.variant.experts_kept) / num_experts,
            "experts_kept": self.variant.experts_kept,
            "params": after["params"],
            "active_params": after["active_params"],
            "bytes": after["bytes"],
            **self.metrics.to_json(),
            "layers": {str(l): {"relative_error": e.relative()} for l, e in sorted(self.layers.items())},
            # None: the mask keeps no MTP layer, so the checkpoint apply writes has none
            "mtp": {**{str(d.layer): d.to_json() for d in self.mtp},
                    **{str(l): {"evaluated": False, "reason": r} for l, r in sorted(self.mtp_skipped.items())}} or None,
        }


@dataclass
class Evaluation:
    model: dict
    data: dict
    original: TokenMetrics
    original_size: dict
    variants: list[VariantResult]
    notes: list[str] = field(default_factory=list)
    original_mtp: list[MtpDepth] = field(default_factory=list)

    def to_json(self) -> dict:
        E = self.model["num_experts"]
        return {
            "format": EVALUATION_FORMAT,
            "version": 1,
            "model": self.model,
            "data": self.data,
            "original": {"experts": E, "params": self.original_size["params"],
                         "active_params": self.original_size["active_params"], "bytes": self.original_size["bytes"],
                         **self.original.to_json(original=True),
                         "mtp": {str(d.layer): d.to_json(original=True) for d in self.original_mtp} or None},
            "variants": [v.to_json(E) for v in self.variants],
            "notes": self.notes,
        }


@torch.no_grad()
def evaluate(
    ckpt_path: str | Path,
    variants: list[Variant],
    samples: list[list[int]],
    *,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    provenance: dict | None = None,
    bar: BarFactory | None = None,
    layout: Layout | None = None,
    on_layer: Callable[[int, int | None, StreamedModel, list], None] | None = None,
) -> Evaluation:
    """Metrics of each variant (mask) against the original checkpoint on `samples` (token ids).

    `on_layer(i, v, streamed, skeletons)` is called before layer i runs for the original
    (v None) and for variant v, with every variant's pruned layer list (to check memory)."""
    if not variants:
        raise ReapError(None, "nothing to evaluate: give at least one --mask, or a saliency file with --sparsity/--keep")
    if not samples or all(len(s) < 2 for s in samples):
        raise ReapError(None, "no evaluation sample has two tokens: nothing to predict")
    ckpt = Checkpoint.open(ckpt_path, layout)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    streamed = StreamedModel(ckpt, dt, dev, trust_remote_code)
    n_layers = len(streamed.layers)
    moe = set(ckpt.moe_layers)
    mtp, mtp_of, mtp_skipped, notes = mtp_to_run(streamed, variants)
    skeletons = {}  # one meta model per pruned expert count
    for v in variants:
        if v.experts_kept not in skeletons:
            skeletons[v.experts_kept] = pruned_skeleton(streamed, v, trust_remote_code)
    variant_layers = [skeletons[v.experts_kept] for v in variants]

    pad_id = streamed.model.config.get_text_config().pad_token_id or 0
    batches = make_batches(samples, batch_size, pad_id)
    original, calls, masks = streamed.layer_inputs(batches)
    hidden = [list(original) for _ in variants]
    carried = [[() for _ in batches] for _ in range(len(variants) + 1)]  # [original, *variants]
    errors: list[dict[int, LayerError]] = [{} for _ in variants]

    outer = bar(total=n_layers + 1, desc="layers", unit="layer") if bar else None
    for i in range(n_layers):
        layer = streamed.load_layer(i)
        inner = bar(total=len(batches) * (1 + len(variants)), desc=f"layer {i}", unit="batch", leave=False) if bar else None
        if on_layer:
            on_layer(i, None, streamed, variant_layers)
        checked = partial(check_computed, ckpt.path, dtype=dt)
        original, carried[0] = _run(layer, original, carried[0], calls, i, inner,
                                    lambda h: checked(f"decoder layer {i}: its output", h))
        for v, variant in enumerate(variants):
            pruned = layer
            if i in moe:
                pruned = fill_pruned(variant_layers[v][i], layer, variant.mask.layers[i], ckpt.num_experts,
                                     f"decoder layer {i}, {variant.label}")
            if on_layer:
                on_layer(i, v, streamed, variant_layers)
            hidden[v], carried[v + 1] = _run(pruned, hidden[v], carried[v + 1], calls, i, inner,
                                             lambda h: checked(f"decoder layer {i} pruned by {variant.label}: its output", h))
            if i in moe:
                release(pruned)
                err = errors[v][i] = LayerError()
                for b in range(len(batches)):
                    err.add(hidden[v][b], original[b], masks[b])
        if inner:
            inner.close()
        streamed.release_layer(i)
        if outer:
            outer.update(1)

    lm_head = load_head(streamed).weight
    inner = bar(total=len(batches) * (1 + len(mtp)), desc="LM head", unit="batch", leave=False) if bar else None
    vocab = streamed.model.config.get_text_config().vocab_size
    with head_only(streamed) as logits_of:
        base, metrics = score(logits_of, vocab, original, hidden, batches, inner)
    base_mtp, variant_mtp = [], [[] for _ in variants]
    if mtp:  # after the stack: the MTP blocks read the last layer's outputs
        base_mtp, variant_mtp = evaluate_mtp(streamed, mtp, mtp_of, variants, variant_layers, original, hidden, calls,
                                             batches, max(l for l in moe if l < n_layers), lm_head, vocab, inner)
    if inner:
        inner.close()
    if outer:
        outer.update(1)
        outer.close()

    data = {**(provenance or {}), "samples": len(samples), "tokens": sum(len(s) for s in samples),
            "predicted_positions": base.positions, "batch_size": batch_size,
            "dtype": str(dt).removeprefix("torch."), "device": dev.type, "reapsurgery": __version__}
    return Evaluation(ckpt.fingerprint(), data, base, variants[0].size["before"],
                      [VariantResult(*r) for r in zip(variants, metrics, errors, variant_mtp, mtp_skipped)],
                      notes, base_mtp)


def _run(layer, hidden: list[torch.Tensor], carried: list[tuple], calls: list, i: int,
         bar, check: Callable[[torch.Tensor], None]) -> tuple[list[torch.Tensor], list[tuple]]:
    """Layer i over every batch: its hidden states (each `check`ed: NaN or infinity is refused at
    the layer that makes it), and what it hands the next layer's call (GLM-5's shared indexer: the
    top-k indices), as calibration carries them."""
    out, passed = [], []
    for h, c, layer_calls in zip(hidden, carried, calls):
        args, kwargs = fill_carried(*layer_calls[i], i - 1, c)
        o = layer(h, *args, **kwargs)
        out.append(o[0] if isinstance(o, tuple) else o)
        check(out[-1])
        passed.append(tuple(o[1:]) if isinstance(o, tuple) else ())
        if bar:
            bar.update(1)
    return out, passed
