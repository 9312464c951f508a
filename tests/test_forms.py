"""Both on-disk forms of a per-expert family: per-expert tensors (hub checkpoints, and what
`save_pretrained` writes by default) and stacked ones (`save_pretrained(save_original_format=False)`,
transformers' fused in-memory names). The same mask prunes either to the same model."""

from __future__ import annotations

import pytest
import torch

from fixtures.build import build
from reapsurgery.calibration.calibrate import calibrate
from reapsurgery.common.checkpoint import Checkpoint
from tests.helpers import cli, write_mask
from tests.reference import load, logits, pruned_in_memory
from tests.test_calibrate import texts

FAMILIES = ["qwen3_moe", "mixtral", "minimax_m2"]


def kinds(path) -> set[str]:
    c = Checkpoint.open(path)
    return {role.kind for role in map(c.layout.classify, c.weight_map) if role is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_per_expert_and_stacked_forms_prune_to_the_same_model(checkpoints, tmp_path, family):
    per_expert = checkpoints[family]
    stacked = build(family, tmp_path / "stacked", save_original_format=False)
    assert kinds(per_expert) == {"expert", "router"}
    assert kinds(stacked) == {"stacked", "router"}
    assert Checkpoint.open(stacked).fingerprint() == Checkpoint.open(per_expert).fingerprint()

    keep = [0, 2, 5, 7]
    mask = write_mask(per_expert, keep, tmp_path / "mask.json")  # one mask for both forms
    outputs = {}
    for form, src in (("per_expert", per_expert), ("stacked", stacked)):
        r = cli("apply", mask, src, tmp_path / f"out-{form}", "-q")
        assert r.returncode == 0, r.stderr
        assert kinds(tmp_path / f"out-{form}") == kinds(src)  # each stays in its own form
        model, info = load(tmp_path / f"out-{form}")
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        outputs[form] = logits(model)
    assert torch.equal(outputs["per_expert"], outputs["stacked"])
    ckpt = Checkpoint.open(per_expert)
    reference = pruned_in_memory(per_expert, {l: keep for l in ckpt.moe_layers}, len(keep))
    assert torch.equal(outputs["per_expert"], logits(reference))


def test_both_forms_calibrate_to_the_same_saliency(checkpoints, tmp_path):
    per_expert = checkpoints["qwen3_moe"]
    stacked = build("qwen3_moe", tmp_path / "stacked", save_original_format=False)
    a = calibrate(per_expert, texts(), batch_size=2, device="cpu", dtype="float32")
    b = calibrate(stacked, texts(), batch_size=2, device="cpu", dtype="float32")
    assert a.model == b.model
    assert {l: s.to_json() for l, s in a.layers.items()} == {l: s.to_json() for l, s in b.layers.items()}


def test_llama4_text_only_checkpoint(tmp_path):
    """Llama4ForCausalLM saves the text model alone: model.layers.*, model_type llama4_text."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from fixtures.build import FAMILIES, perturb, save_tokenizer

    torch.manual_seed(0)
    model = Llama4ForCausalLM(Llama4TextConfig(**FAMILIES["llama4"]["text_config"]))
    perturb(model, 0)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="24KB")
    save_tokenizer(src)
    ckpt = Checkpoint.open(src)
    assert ckpt.layout.name == "llama4" and ckpt.fingerprint()["model_type"] == "llama4_text"
    assert any(n.startswith("model.layers.1.feed_forward.experts.") for n in ckpt.weight_map)
    keep = [1, 3, 4, 6]
    r = cli("apply", write_mask(src, keep, tmp_path / "m.json"), src, tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    pruned, info = load(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reference = pruned_in_memory(src, {l: keep for l in ckpt.moe_layers}, len(keep))
    assert torch.equal(logits(pruned), logits(reference))
