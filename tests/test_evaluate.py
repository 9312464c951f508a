"""`evaluate` reports what the checkpoint `apply` writes would do: every metric equals the one
computed from the original and the apply-written checkpoint loaded whole with from_pretrained."""

from __future__ import annotations

import json
import math

import pytest
import torch

from reapsurgery.calibration.calibrate import make_batches
from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.common.mask import load_mask
from reapsurgery.evaluation.evaluate import evaluate
from reapsurgery.evaluation.variants import resident, sized_variant
from tests.helpers import apply_leaving_source_untouched, cli, write_mask
from tests.reference import decoder_layers, load, text_model

LENGTHS = [7, 12, 3, 10, 5]
RTOL = 1e-4
# softmax router; group-limited sigmoid router with correction bias (and an MTP layer on disk);
# stacked experts with biases; stacked experts outside ExpertsInterface, multimodal wrapper
FAMILIES = {"qwen3_moe": [[0, 2, 3, 5], [1, 6]],
            "deepseek_v3": [[0, 2, 5, 7], [1, 3, 4, 6]],  # n_group=2: the same count kept per group
            "gpt_oss": [[0, 2, 3, 5], [4, 7]],
            "llama4": [[1, 2, 4, 7], [0, 5]]}


def samples(seed: int = 2) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in LENGTHS]


def variants_for(src, keeps, tmp_path):
    ckpt = Checkpoint.open(src)
    out = []
    for j, keep in enumerate(keeps):
        path = write_mask(src, keep, tmp_path / f"mask{j}.json")
        mask = load_mask(path)
        out.append(sized_variant(mask, path, str(path), mask.sha256, ckpt))
    return out


def reference(path, batches):
    """Log-probs at every predicted position and each decoder layer's output on real positions,
    from the whole model loaded with from_pretrained, on the same padded batches."""
    model, info = load(path)
    assert not info["missing_keys"]  # (a source's MTP layer is unexpected: transformers does not run it)
    outputs = []
    hooks = [l.register_forward_hook(lambda m, a, out, i=i: outputs.append((i, out[0] if isinstance(out, tuple) else out)))
             for i, l in enumerate(decoder_layers(model))]
    logp, layers, targets = [], {}, []
    with torch.no_grad():
        for ids, am in batches:
            outputs.clear()
            logits = text_model(model)(input_ids=ids, attention_mask=am).logits.float()
            real = am.reshape(-1).bool()
            for i, h in outputs:
                layers.setdefault(i, []).append(h.reshape(-1, h.shape[-1])[real].double())
            predicted = am[:, :-1].bool() & am[:, 1:].bool()
            logp.append(torch.log_softmax(logits[:, :-1][predicted], dim=-1).double())
            targets.append(ids[:, 1:][predicted])
    for h in hooks:
        h.remove()
    return torch.cat(logp), torch.cat(targets), {i: torch.cat(v) for i, v in layers.items()}


def perplexity(logp, y) -> float:
    return math.exp(float(-logp.gather(1, y[:, None]).mean()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_metrics_equal_those_of_the_applied_checkpoint(checkpoints, tmp_path, family):
    src = checkpoints[family]
    keeps = FAMILIES[family]
    variants = variants_for(src, keeps, tmp_path)
    residency: list[tuple] = []

    def on_layer(i, v, streamed, skeletons):
        distinct = {id(s): s for s in skeletons}  # variants keeping as many experts share one skeleton
        pruned = [(w, l) for w, s in enumerate(skeletons) for l in resident(s) if distinct.pop(id(s), None) is not None]
        residency.append((i, v, streamed.resident_layers(), pruned, resident(skeletons[v]) if v is not None else None))

    result = evaluate(src, variants, samples(), batch_size=2, device="cpu", dtype="float32", on_layer=on_layer)
    report = result.to_json()
    ckpt = Checkpoint.open(src)
    batches = make_batches(samples(), 2)

    lo, y, layers_o = reference(src, batches)
    assert report["original"]["perplexity"] == pytest.approx(perplexity(lo, y), rel=RTOL)
    assert report["data"]["predicted_positions"] == y.numel() == sum(n - 1 for n in LENGTHS)
    assert report["model"] == ckpt.fingerprint()
    assert [v["mask_sha256"] for v in report["variants"]] == [v.sha256 for v in variants]
    for j, (keep, got) in enumerate(zip(keeps, report["variants"])):
        out = tmp_path / f"out{j}"
        apply_leaving_source_untouched(variants[j].mask_path, src, out)
        lv, yv, layers_v = reference(out, batches)
        assert torch.equal(y, yv)
        kl = float((lo.exp() * (lo - lv)).sum(-1).mean())
        assert got["kl_mean"] == pytest.approx(kl, rel=RTOL, abs=1e-7)
        assert got["top1_agreement"] == float((lo.argmax(-1) == lv.argmax(-1)).double().mean())
        assert got["perplexity"] == pytest.approx(perplexity(lv, yv), rel=RTOL)
        assert got["experts_kept"] == len(keep)
        assert got["sparsity"] == (ckpt.num_experts - len(keep)) / ckpt.num_experts
        written = Checkpoint.open(out).tensors().values()
        assert got["bytes"] == sum(info.nbytes for _, info in written)
        assert got["params"] == sum(math.prod(info.shape) for _, info in written)
        assert sorted(map(int, got["layers"])) == ckpt.moe_layers
        for l, e in got["layers"].items():
            ref = float((layers_v[int(l)] - layers_o[int(l)]).norm() / layers_o[int(l)].norm())
            assert e["relative_error"] == pytest.approx(ref, rel=RTOL, abs=1e-6)
    # memory: at each step only layer i of the original, and at most variant v's copy of it, hold tensors
    n = ckpt.num_hidden_layers
    assert [step[:2] for step in residency] == [(i, v) for i in range(n) for v in [None, *range(len(keeps))]]
    for i, v, original, pruned, mine in residency:
        assert original == [i]
        if v is None or i not in ckpt.moe_layers:
            assert pruned == []
        else:
            assert len(pruned) == 1 and pruned[0][1] == i and mine == [i]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_keeping_every_expert_costs_nothing(checkpoints, tmp_path, family):
    src = checkpoints[family]
    (variant,) = variants_for(src, [list(range(8))], tmp_path)
    report = evaluate(src, [variant], samples(3), batch_size=3, device="cpu", dtype="float32").to_json()
    (got,) = report["variants"]
    assert got["kl_mean"] == pytest.approx(0, abs=1e-9)
    assert got["top1_agreement"] == 1.0
    assert got["perplexity"] == pytest.approx(report["original"]["perplexity"], rel=1e-9)
    assert all(e["relative_error"] == pytest.approx(0, abs=1e-9) for e in got["layers"].values())
