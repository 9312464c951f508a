"""Layer-streamed calibration equals statistics computed on the whole model's real forward pass."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures.build import FAMILIES
from reapsurgery.calibrate import calibrate
from reapsurgery.checkpoint import Checkpoint
from tests.reference import decoder_layers, load, text_model

LENGTHS = [7, 12, 3, 10, 5]
RTOL = 1e-5
# transformers' own forward is not batch-invariant for Qwen3-Next's linear attention (its reference
# gated-delta-rule kernel: a padded batch differs from one sample by up to 2e-5), so the comparison
# with unpadded single samples runs unpadded there; padding is covered by test_padding_never_counts
BATCH_SIZE = {"qwen3_next": 1}


def texts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in LENGTHS]


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


def reference_stats(src, samples):
    """Statistics from the full model (from_pretrained, default experts implementation), one
    unpadded sample at a time: the experts' real routing is captured by a forward hook, and each
    routed pair's unweighted output is recomputed by calling the expert module with weight 1."""
    model, _ = load(src)
    experts = {n: m for n, m in model.named_modules() if hasattr(m, "has_gate") and hasattr(m, "num_experts")}
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
    outputs = []
    layer_hooks = [l.register_forward_hook(lambda m, a, out, i=i: outputs.append((i, out[0] if isinstance(out, tuple) else out)))
                   for i, l in enumerate(decoder_layers(model))]
    per_layer_hidden = {}
    with torch.no_grad():
        for sample in samples:
            captured.clear()
            outputs.clear()
            text_model(model)(input_ids=torch.tensor([sample]))
            for i, out in outputs:
                per_layer_hidden.setdefault(i, []).append(out[0])
            routed = list(captured)  # calling the experts below fires the hook again
            for name, E, hidden, idx, weights, unweighted in routed:
                s = stats.setdefault(layer_of[name], {"tokens": 0, "count": [0.0] * E, "gate_sum": [0.0] * E,
                                                      "norm_sum": [0.0] * E, "reap_sum": [0.0] * E,
                                                      "max_activation": [None] * E})
                s["tokens"] += hidden.shape[0]
                k = idx.shape[1]
                # each routed pair through the expert alone, weight 1: its unweighted output
                f = unweighted(hidden.repeat_interleave(k, 0), idx.reshape(-1, 1)).double()
                for p, (e, g) in enumerate(zip(idx.reshape(-1).tolist(), weights.reshape(-1).tolist())):
                    norm = float(f[p].norm())
                    s["count"][e] += 1
                    s["gate_sum"][e] += g
                    s["norm_sum"][e] += norm
                    s["reap_sum"][e] += g * norm
                    m = float(f[p].max())
                    s["max_activation"][e] = m if s["max_activation"][e] is None else max(m, s["max_activation"][e])
    for h in hooks + layer_hooks:
        h.remove()
    return stats, per_layer_hidden


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


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_statistics_and_hidden_states_equal_full_model(checkpoints, family):
    src = checkpoints[family]
    samples = texts()
    captured: dict[int, list[torch.Tensor]] = {}
    resident: list[list[int]] = []

    def on_layer(i, streamed):
        resident.append(streamed.resident_layers())
        streamed.layers[i].register_forward_hook(
            lambda m, a, out: captured.setdefault(i, []).append((out[0] if isinstance(out, tuple) else out).clone()))

    saliency = calibrate(src, samples, batch_size=BATCH_SIZE.get(family, 2), device="cpu", dtype="float32",
                         on_layer=on_layer)
    ref, ref_hidden = reference_stats(src, samples)
    assert_stats_close(saliency.layers, ref)
    ckpt = Checkpoint.open(src)
    assert sorted(saliency.layers) == ckpt.moe_layers
    assert saliency.model == ckpt.fingerprint()
    assert saliency.dense_layers == [i for i in range(ckpt.num_hidden_layers) if i not in ckpt.moe_layers]
    # streaming: at each layer exactly that layer holds real memory
    assert resident == [[i] for i in range(ckpt.num_hidden_layers)]
    # hidden states after each streamed layer equal the full model's, on real tokens
    for i, batches in captured.items():
        rows = [b[j] for b in batches for j in range(b.shape[0])]
        for row, want in zip(rows, ref_hidden[i]):
            torch.testing.assert_close(row[: want.shape[0]], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_padding_never_counts(checkpoints, family):
    samples = texts(seed=3)
    padded = calibrate(checkpoints[family], samples, batch_size=5, device="cpu", dtype="float32")
    single = calibrate(checkpoints[family], samples, batch_size=1, device="cpu", dtype="float32")
    assert {k: v.tokens for k, v in padded.layers.items()} == {k: sum(LENGTHS) for k in padded.layers}
    for layer in padded.layers:
        a, b = padded.layers[layer].to_json(), single.layers[layer].to_json()
        assert a["count"] == b["count"]
        for key in ("gate_sum", "norm_sum", "reap_sum"):
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), rtol=RTOL, atol=1e-6)


def test_resume_after_crash_gives_identical_output(checkpoints, tmp_path):
    src = checkpoints["qwen3_moe"]
    samples = texts()
    state = tmp_path / "s.json.resume"
    whole = calibrate(src, samples, batch_size=2, device="cpu", dtype="float32")

    class Crash(Exception):
        pass

    def crash_at_2(i, streamed):
        if i == 2:
            raise Crash

    with pytest.raises(Crash):
        calibrate(src, samples, batch_size=2, device="cpu", dtype="float32", state_dir=state, on_layer=crash_at_2)
    assert json.loads((state / "state.json").read_text())["next_layer"] == 2
    started = []
    resumed = calibrate(src, samples, batch_size=2, device="cpu", dtype="float32", state_dir=state, resume=True,
                        on_layer=lambda i, s: started.append(i))
    assert started == [2]  # finished layers were not recomputed
    assert resumed.to_json() == whole.to_json()
    assert not state.exists()  # cleaned up after success
