"""Independent references that tests compare reapsurgery's output against."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

RTOL = 1e-5  # statistics: float64 sums of float32 values computed in another order


def model_class(path: Path):
    """The class config.json names (architectures[0]): the multimodal class for Llama-4, so that
    every tensor of the checkpoint has a place and none is missing."""
    import json

    import transformers

    arch = (json.loads((Path(path) / "config.json").read_text()).get("architectures") or [None])[0]
    return getattr(transformers, arch, None) or transformers.AutoModelForCausalLM


def load(path: Path, quantization_config=None, config=None):
    """fp32 model; a quantized checkpoint is loaded with `quantization_config` (e.g. dequantize=True);
    `config` replaces the checkpoint's own."""
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    if config is not None:
        extra["config"] = config
    model, info = model_class(path).from_pretrained(path, dtype=torch.float32, output_loading_info=True, **extra)
    # Parameters memory-mapped from a shard sit wherever the file puts them; some CPU kernels
    # (grouped_mm for Granite's experts) round differently by address alignment. Fresh copies
    # make the comparison one of values, as between two models built in memory.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    return model.eval(), info


def decoder_layers(model):
    """The decoder layer list (Llama4ForCausalLM.get_decoder() answers the wrapper itself)."""
    for _, module in model.get_decoder().named_modules():
        if isinstance(getattr(module, "layers", None), torch.nn.ModuleList):
            return module.layers
    raise AssertionError(f"{type(model).__name__} has no layer list")


def pruned_in_memory(src: Path, keep: dict[int, list[int]], n_kept: int, quantization_config=None, config=None):
    """The source model loaded normally, with dropped experts removed from its parameters.

    A quantized source is loaded with `quantization_config` (which must dequantise: the
    pruned model is built from the config without quantization and gets the loaded values).

    Independent of reapsurgery's layouts: the expert axis of every parameter is found by
    comparing the shapes of the full model with those of a model built for n_kept experts.
    """
    from transformers import AutoConfig

    import copy

    full, _ = load(src, quantization_config, config)
    config = copy.deepcopy(config) if config is not None else AutoConfig.from_pretrained(src)
    if quantization_config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    text = getattr(config, "text_config", None) or config
    n_experts = _routed_experts(text)
    for attr in EXPERT_COUNTS:
        if hasattr(text, attr):
            setattr(text, attr, n_kept)
    small = model_class(src)._from_config(config, dtype=torch.float32)
    target = small.state_dict()
    state = {}
    for name, tensor in full.state_dict().items():
        want = target[name].shape
        if tensor.shape != want:
            (axis,) = [i for i, (a, b) in enumerate(zip(tensor.shape, want)) if a != b]
            layer = int(name.split("layers.")[1].split(".")[0])
            # a router axis that also scores other experts (zero-computation, skip, shared) has their rows
            # after the routed experts' (the family's code says so); they are kept
            rows = [*keep[layer], *range(n_experts or tensor.shape[axis], tensor.shape[axis])]
            tensor = tensor.index_select(axis, torch.tensor(rows))
        state[name] = tensor
    small.load_state_dict(state, strict=True)
    return small.eval()


EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _routed_experts(text_config) -> int | None:
    return next((getattr(text_config, a) for a in EXPERT_COUNTS if isinstance(getattr(text_config, a, None), int)), None)


def logits(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (2, 12), generator=g)
    with torch.no_grad():
        return text_model(model)(input_ids=ids).logits


def text_model(model):
    """What runs text: the model, or a multimodal model's language model. Llama4ForConditionalGeneration's
    text-only forward fails in transformers 5.24 (its output object asks the language model's output
    for 'image_outputs'); without images it only runs that language model, so run it directly."""
    lm = getattr(model, "language_model", None)
    return lm if lm is not None and hasattr(lm, "lm_head") else model


def _scaled_input_routing(block, args, out):
    """Llama-4 (outside ExpertsInterface): the router returns sigmoid scores (0 outside the top-k)
    and logits, and the block multiplies tokens by their score before running every expert. g is
    a routed pair's score, f the expert's output on the unscaled token, computed here from the
    expert's weights."""
    hidden = args[0]
    scores, logits = out
    idx = torch.topk(logits, block.router.top_k, dim=-1).indices
    ex = block.experts

    def unweighted(hidden_rep, flat_idx):
        rows = []
        for x, e in zip(hidden_rep, flat_idx.reshape(-1).tolist()):
            gate, up = (x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
            rows.append((up * ex.act_fn(gate)) @ ex.down_proj[e])
        return torch.stack(rows)

    return hidden, idx, scores.gather(1, idx), unweighted


def layer_outputs(model, batches) -> dict[int, list[torch.Tensor]]:
    """Each decoder layer's output hidden states per batch, from the full model's own forward over
    `batches` ((input_ids, attention_mask) pairs, padded as calibration pads them). Compared with
    the streamed layers over the same batches: the model's own forward is not batch-invariant (a
    linear layer's rows round differently in a batch of 2 x 12 tokens than of 1 x 7 on CPU), so
    only the same batches make an exact reference."""
    outputs: dict[int, list[torch.Tensor]] = {}
    hooks = [l.register_forward_hook(lambda m, a, out, i=i: outputs.setdefault(i, []).append(
        (out[0] if isinstance(out, tuple) else out).clone())) for i, l in enumerate(decoder_layers(model))]
    with torch.no_grad():
        for ids, am in batches:
            text_model(model)(input_ids=ids, attention_mask=am)
    for h in hooks:
        h.remove()
    return outputs


def reference_stats(src, samples, model=None, uncounted_tail: dict[int, int] | None = None):
    """Statistics from the full model (from_pretrained, default experts implementation), one
    unpadded sample at a time: the experts' real routing is captured by a forward hook, and each
    routed pair's unweighted output is recomputed by calling the expert module with weight 1.

    `model` replaces the one loaded from `src`; `uncounted_tail` {layer: n} leaves each sample's
    last n tokens out of that layer's statistics (an MTP layer has no input there)."""
    if model is None:
        model, _ = load(src)
    uncounted_tail = uncounted_tail or {}
    # experts modules: transformers' experts interface, or a module called like it that transformers
    # does not dispatch through it (Step-3.7's Step3p7Experts)
    experts = {n: m for n, m in model.named_modules() if hasattr(m, "num_experts") and (
        hasattr(m, "has_gate") or "top_k_index" in inspect.signature(type(m).forward).parameters)}
    scaled = {n: m for n, m in model.named_modules()
              if hasattr(m, "router") and hasattr(m, "experts") and not hasattr(m.experts, "has_gate")}
    layer_of = {n: int(n.split("layers.")[1].split(".")[0]) for n in [*experts, *scaled]}
    stats = {}
    captured = []
    hooks = [m.register_forward_hook(
        lambda mod, args, out, n=n: captured.append((n, mod.num_experts, *args,
                                                     lambda h, i, mod=mod: mod(h, i, torch.ones(i.numel(), 1)))))
        for n, m in experts.items()]
    hooks += [m.router.register_forward_hook(
        lambda mod, args, out, n=n, m=m: captured.append((n, m.experts.num_experts, *_scaled_input_routing(m, args, out))))
        for n, m in scaled.items()]
    with torch.no_grad():
        for sample in samples:
            captured.clear()
            text_model(model)(input_ids=torch.tensor([sample]))
            routed = list(captured)  # calling the experts below fires the hook again
            for name, E, hidden, idx, weights, unweighted in routed:
                tail = uncounted_tail.get(layer_of[name], 0)
                if tail:
                    hidden, idx, weights = hidden[:-tail], idx[:-tail], weights[:-tail]
                s = stats.setdefault(layer_of[name], {"tokens": 0, "count": [0.0] * E, "gate_sum": [0.0] * E,
                                                      "norm_sum": [0.0] * E, "reap_sum": [0.0] * E,
                                                      "max_activation": [None] * E})
                s["tokens"] += hidden.shape[0]
                k = idx.shape[1]
                # each routed pair through the expert alone, weight 1: its unweighted output
                f = unweighted(hidden.repeat_interleave(k, 0), idx.reshape(-1, 1)).double()
                for p, (e, g) in enumerate(zip(idx.reshape(-1).tolist(), weights.reshape(-1).tolist())):
                    if g == 0:  # adds nothing to the output: not a route (LongCat's zero-computation experts)
                        continue
                    norm = float(f[p].norm())
                    s["count"][e] += 1
                    s["gate_sum"][e] += g
                    s["norm_sum"][e] += norm
                    s["reap_sum"][e] += g * norm
                    m = float(f[p].max())
                    s["max_activation"][e] = m if s["max_activation"][e] is None else max(m, s["max_activation"][e])
    for h in hooks:
        h.remove()
    return stats


def assert_stats_close(layers, ref):
    assert sorted(layers) == sorted(ref)
    for layer, r in ref.items():
        mine = layers[layer].to_json()
        assert mine["tokens"] == r["tokens"]
        assert mine["count"] == r["count"]
        for key in ("gate_sum", "norm_sum", "reap_sum"):
            torch.testing.assert_close(torch.tensor(mine[key]), torch.tensor(r[key]), rtol=RTOL, atol=1e-6)
        assert [v is None for v in mine["max_activation"]] == [v is None for v in r["max_activation"]]
        seen = [i for i, v in enumerate(r["max_activation"]) if v is not None]
        torch.testing.assert_close(torch.tensor([mine["max_activation"][i] for i in seen]),
                                   torch.tensor([r["max_activation"][i] for i in seen]), rtol=RTOL, atol=1e-6)
