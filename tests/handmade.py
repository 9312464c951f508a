"""Hand-made saliency statistics with known answers (calibration is not needed to test planning)."""

from __future__ import annotations

import random
from pathlib import Path

from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.common.saliency import LayerStats, Saliency


def fingerprint(E: int = 8, top_k: int = 2, layers=(0, 1, 2), n_group=None,
                model_type: str = "qwen3_moe", architecture: str = "Qwen3MoeForCausalLM") -> dict:
    return {"architecture": architecture, "model_type": model_type, "num_hidden_layers": max(layers) + 1,
            "moe_layers": list(layers), "num_experts": E, "num_experts_per_tok": top_k, "n_group": n_group}


def stats(count, gate_sum=None, norm_sum=None, reap_sum=None, max_activation=None, tokens=1000) -> LayerStats:
    count = [float(c) for c in count]
    zero = [0.0] * len(count)
    if max_activation is None:
        max_activation = [None if c == 0 else 1.0 for c in count]
    return LayerStats(tokens, count, [float(x) for x in gate_sum or zero], [float(x) for x in norm_sum or zero],
                      [float(x) for x in reap_sum or zero], list(max_activation))


def by_reap(scores, max_activation=None) -> LayerStats:
    """A layer whose REAP score of expert e is scores[e] (None: never routed)."""
    count = [0 if s is None else 10 for s in scores]
    reap = [0 if s is None else 10 * s for s in scores]
    return stats(count, gate_sum=[c * 0.5 for c in count], norm_sum=[r * 2 for r in reap], reap_sum=reap,
                 max_activation=max_activation)


def saliency(model: dict, layers: dict[int, LayerStats]) -> Saliency:
    return Saliency(model, {"dataset": "hand-made", "samples": 1, "tokens": 1000}, layers)


def for_checkpoint(ckpt: Path, seed: int = 0, never_routed: int | None = None) -> Saliency:
    """Deterministic pseudo-random statistics for every MoE layer of a checkpoint."""
    fp = Checkpoint.open(ckpt).fingerprint()
    rnd = random.Random(seed)
    layers = {}
    for layer in fp["moe_layers"]:
        count = [rnd.randint(1, 100) for _ in range(fp["num_experts"])]
        if never_routed is not None:
            count[never_routed] = 0
        gate = [c * rnd.uniform(0.05, 0.5) for c in count]
        norm = [c * rnd.uniform(0.5, 3.0) for c in count]
        reap = [g * rnd.uniform(0.5, 3.0) for g in gate]
        maxact = [None if c == 0 else rnd.uniform(1, 5) for c in count]
        layers[layer] = stats(count, gate, norm, reap, maxact)
    return saliency(fp, layers)
