"""Layouts derived from the model transformers builds (reapsurgery.common.derive) say what the
hand-written entries of layouts.json say, on every built-in family's fixture.

Compared: the routed-expert keys and top-k keys present in the config, the MoE layer list, the
fingerprint, which tensors are MTP tensors, and the TensorRole of every tensor of the checkpoint
(as verify and apply classify them, quantized companions included). Not compared, because shapes
cannot tell them: `mtp_block` (MTP modules have no transformers class), `defaults` (a derived
layout lists the MoE layers themselves), `groups.min_per_group` (how a group is scored is code:
derived layouts ask for 2), and the MTP key where config.json does not have it.
"""

from __future__ import annotations

import json
import time

import pytest

from fixtures.build import FAMILIES, build
from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.common.derive import derive_layout, derived_layout, logical_names
from reapsurgery.errors import ReapError
from reapsurgery.common.layouts import Layout, builtin_layouts
from reapsurgery.surgery.verify import tensor_role
from tests.helpers import cli


def derived(path) -> Checkpoint:
    ckpt = Checkpoint.open(path)
    return Checkpoint.open(path, derived_layout(ckpt.config, ckpt.weight_map))


def facts(ckpt: Checkpoint) -> dict:
    cfg, layout = ckpt.cfg, ckpt.layout
    n = ckpt.num_hidden_layers
    return {
        "num_experts keys": sorted(k for k in layout.num_experts_keys if k in cfg),
        "top_k keys": sorted(k for k in layout.top_k_keys if k in cfg),
        "group keys": sorted(v for k, v in (layout.groups or {}).items() if k != "min_per_group" and v in cfg),
        "mtp key": layout.mtp_key if layout.mtp_key in cfg else None,
        "fingerprint": ckpt.fingerprint(),
        "mtp tensors": sorted(t for t in ckpt.weight_map if layout.is_mtp(t, n)),
        # roles of MTP tensors outside the stack need mtp_block, which derivation cannot tell
        "roles": {name: role for name, (_, info) in ckpt.tensors().items()
                  if (role := tensor_role(ckpt, name, info)) is not None and layout.mtp_prefix_of(name) is None},
    }


def assert_same_facts(path, builtin: Checkpoint | None = None) -> None:
    want = facts(builtin or Checkpoint.open(path))
    got = facts(derived(path))
    for key in want:
        assert got[key] == want[key], key
    assert want["roles"]  # the comparison is not vacuous


@pytest.mark.parametrize("family", sorted(set(FAMILIES) & set(builtin_layouts())))
def test_derived_layout_says_what_the_builtin_entry_says(checkpoints, family):
    assert_same_facts(checkpoints[family])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "minimax_m2"])
def test_derived_layout_of_the_stacked_form(tmp_path, family):
    """save_original_format=False: transformers' fused names on disk, stacked experts."""
    src = build(family, tmp_path / "stacked", save_original_format=False)
    assert_same_facts(src)
    assert {r.kind for r in facts(derived(src))["roles"].values()} == {"stacked", "router"}


# config variants that move the MoE layers (test_layouts.VARIANTS without removed keys)
VARIANTS = [("qwen3_moe", {"mlp_only_layers": [0, 2]}), ("qwen3_moe", {"decoder_sparse_step": 2}),
            ("qwen2_moe", {"decoder_sparse_step": 3}), ("deepseek_v2", {"first_k_dense_replace": 2}),
            ("deepseek_v3", {"first_k_dense_replace": 0}), ("glm4_moe", {"first_k_dense_replace": 2}),
            ("glm4_moe_lite", {"mlp_layer_types": ["sparse", "dense", "sparse"]}),
            ("ernie4_5_moe", {"moe_layer_start_index": 0, "moe_layer_end_index": -1, "moe_layer_interval": 2}),
            ("ernie4_5_moe", {"moe_layer_start_index": 0, "moe_layer_end_index": 1})]


@pytest.mark.parametrize("family,overrides", VARIANTS, ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_derived_moe_layers_follow_the_config(tmp_path, family, overrides):
    src = build(family, tmp_path / "src", overrides=overrides, with_mtp=False)
    assert_same_facts(src)


def test_llama4_text_only_checkpoint(tmp_path):
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    Llama4ForCausalLM(Llama4TextConfig(**FAMILIES["llama4"]["text_config"])).save_pretrained(tmp_path, max_shard_size="24KB")
    assert_same_facts(tmp_path)
    assert derived(tmp_path).layout.layer_prefix == "model.layers.{layer}."


def test_quantized_checkpoints(checkpoints, tmp_path):
    """Derived from the names an unquantized checkpoint would have; companions follow their weight."""
    from fixtures.quantize import build_gpt_oss_for_mxfp4, to_fp8_block, to_mxfp4

    fp8 = to_fp8_block(checkpoints["deepseek_v3"], tmp_path / "fp8", block=(8, 8))
    assert any(n.endswith("experts.3.down_proj.weight_scale_inv") for n in Checkpoint.open(fp8).weight_map)
    assert_same_facts(fp8)
    mxfp4 = to_mxfp4(build_gpt_oss_for_mxfp4(tmp_path / "gpt"), tmp_path / "mxfp4")
    assert any(n.endswith("gate_up_proj_blocks") for n in Checkpoint.open(mxfp4).weight_map)
    assert_same_facts(mxfp4)


def test_compressed_tensors_checkpoint(checkpoints, tmp_path):
    pytest.importorskip("compressed_tensors")
    from fixtures.quantize import to_compressed_tensors

    assert_same_facts(to_compressed_tensors(checkpoints["qwen3_moe"], tmp_path / "ct", "W4A16"))


def test_logical_names_group_companions():
    names = ["a.weight", "a.weight_scale_inv", "b.gate_up_proj_blocks", "b.gate_up_proj_scales",
             "c.weight_packed", "c.weight_scale", "c.weight_shape", "d.bias"]
    assert logical_names(names) == {"a.weight": ["a.weight", "a.weight_scale_inv"],
                                    "b.gate_up_proj": ["b.gate_up_proj_blocks", "b.gate_up_proj_scales"],
                                    "c.weight": ["c.weight_packed", "c.weight_scale", "c.weight_shape"],
                                    "d.bias": ["d.bias"]}


def test_per_layer_counts(checkpoints, tmp_path):
    """Older Hunyuan configs give num_experts per layer: equal entries are that count, others refused."""
    ckpt = Checkpoint.open(checkpoints["hunyuan_v1_moe"])
    config = dict(ckpt.config, num_experts=[8, 8])
    layout = derived_layout(config, ckpt.weight_map)
    assert layout.num_experts(config) == 8 and "num_experts" in layout.num_experts_keys
    with pytest.raises(ReapError, match=r"num_experts differs per layer \(\[8, 16\]\)"):
        derive_layout(dict(ckpt.config, num_experts=[8, 16]), ckpt.weight_map)


def test_missing_expert_tensors_refused(checkpoints):
    ckpt = Checkpoint.open(checkpoints["qwen3_moe"])
    names = [n for n in ckpt.weight_map if not n.startswith("model.layers.1.mlp.experts.")]
    with pytest.raises(ReapError, match=r"no checkpoint tensor loads into the expert-indexed parameter "
                                        r"'model\.layers\.1\.mlp\.experts\.down_proj'"):
        derive_layout(ckpt.config, names)


def test_an_expert_number_past_the_count_refused(checkpoints):
    ckpt = Checkpoint.open(checkpoints["qwen3_moe"])
    with pytest.raises(ReapError, match=r"is expert 8 of a layer with 8 routed experts"):
        derive_layout(ckpt.config, [*ckpt.weight_map, "model.layers.0.mlp.experts.8.up_proj.weight"])


def meta_model(model_type: str, arch: str | None = None, **kwargs):
    """(config dict, tensor names) of a model built on the meta device, names as transformers saves them."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    cfg = AutoConfig.for_model(model_type, **kwargs)
    with torch.device("meta"):
        model = getattr(transformers, arch)._from_config(cfg) if arch else AutoModelForCausalLM.from_config(cfg)
    d = cfg.to_dict()
    d["architectures"] = [type(model).__name__]
    return d, list(revert_weight_conversion(model, model.state_dict()))


TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, head_dim=16)
REFUSED = {
    "dbrx": (("dbrx",), dict(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=64,
                             attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
                             ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2)),
             r"grows by 32 per expert .*experts fused into another axis"),
    "jetmoe": (("jetmoe",), dict(TINY, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                 intermediate_size=16, kv_channels=16),
               r"decoder layer 0 has 2 separately routed expert sets"),
    # text and vision experts, each routed, in every MoE layer
    "ernie4_5_vl_moe": (("ernie4_5_vl_moe", "Ernie4_5_VLMoeForConditionalGeneration"),
                        dict(text_config=dict(TINY, num_hidden_layers=2, intermediate_size=32, moe_intermediate_size=[16, 8],
                                              moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0,
                                              rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                   mrope_section=[2, 3, 3])),
                             vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, patch_size=14,
                                                spatial_merge_size=2, temporal_patch_size=2)),
                        r"decoder layer 1 has 2 separately routed expert sets .*text_moe.*vision_moe"),
    "llama": (("llama",), dict(TINY, num_hidden_layers=2, intermediate_size=32), r"not an MoE model"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_families(case):
    args, kwargs, message = REFUSED[case]
    config, names = meta_model(*args, **kwargs)
    with pytest.raises(ReapError, match=message):
        derive_layout(config, names)


def test_a_family_transformers_cannot_build_is_refused_by_every_command(tmp_path):
    """Qwen3-Omni-MoE: transformers 5.24 fails to build Qwen3OmniMoeForConditionalGeneration from any
    config (its talker reads attributes its config does not define); nothing can be derived."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from fixtures.build import save_tokenizer
    from tests.test_refusals import refused

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = AutoConfig.for_model("qwen3_omni_moe").to_dict()
    config["architectures"] = ["Qwen3OmniMoeForConditionalGeneration"]
    (ckpt / "config.json").write_text(json.dumps(config))
    save_file({"thinker.model.layers.0.mlp.gate.weight": torch.zeros(128, 8)}, ckpt / "model.safetensors")
    save_tokenizer(ckpt)
    # every command opens the checkpoint through Checkpoint.open (apply's mask needs its fingerprint first)
    for args in (("inspect", ckpt), ("calibrate", ckpt, "-o", tmp_path / "s.json")):
        refused(cli(*args), "config.json", "Qwen3OmniMoeForConditionalGeneration", "cannot build this model")
    assert not (tmp_path / "s.json").exists()


# Routers that also score experts that are not pruned, after the routed experts' rows (router_rows.json says
# where the family's code puts them): zero-computation, skip and shared experts' rows are kept
OTHER_ROWS = {
    "longcat_flash": (dict(TINY, num_key_value_heads=4, num_layers=2, n_routed_experts=8, zero_expert_num=4, moe_topk=2,
                           expert_ffn_hidden_size=16, ffn_hidden_size=32, q_lora_rank=16, kv_lora_rank=16,
                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
                      {"mlp.router.classifier.weight": 4, "mlp.router.e_score_correction_bias": 4}),
    "zaya": (dict(TINY, num_hidden_layers=2, num_experts=8, num_experts_per_tok=1, moe_intermediate_size=16,
                  router_hidden_size=16),
             {"mlp.gate.router_mlp.out_proj.weight": 1, "mlp.gate.balancing_biases": 1}),
}


@pytest.mark.parametrize("family", sorted(OTHER_ROWS))
def test_router_rows_of_experts_that_are_not_pruned_are_kept(family, monkeypatch):
    kwargs, kept = OTHER_ROWS[family]
    config, names = meta_model(family, **kwargs)
    entry = derive_layout(config, names)
    assert {p: n for p, n in entry.get("kept_router_rows", {}).items()} == kept
    assert set(kept) <= set(entry["routers"])
    # without router_rows.json's word on where the other experts' rows are, shapes cannot tell: refused
    monkeypatch.setattr("reapsurgery.common.derive.router_rows_facts", lambda config: None)
    with pytest.raises(ReapError, match=r"entries on its expert axis for 8 routed experts.*router_rows\.json"):
        derive_layout(config, names)


def test_hash_routed_layers_refused():
    """DeepSeek-V4's first layers pick experts from a token-id table (tid2eid), not a router."""
    config, names = meta_model("deepseek_v4")
    with pytest.raises(ReapError, match=r"tid2eid.*hash routing"):
        derive_layout(config, names)


def test_a_real_size_config_derives_in_seconds():
    """Kimi-K2: 61 layers, 384 experts, 138k tensor names (block FP8) — skeletons on meta, two of them."""
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "hidden_size": 7168,
           "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
           "num_attention_heads": 64, "num_key_value_heads": 64, "n_routed_experts": 384, "n_shared_experts": 1,
           "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 1536,
           "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
           "vocab_size": 163840, "num_nextn_predict_layers": 0,
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.0.mlp.gate_proj.weight"]
    for layer in range(1, 61):
        p = f"model.layers.{layer}."
        names += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
        names += [f"{p}mlp.experts.{e}.{w}.weight{s}" for e in range(384) for w in ("gate_proj", "up_proj", "down_proj")
                  for s in ("", "_scale_inv")]
    config, small = meta_model("deepseek_v3", **FAMILIES["deepseek_v3"])
    derive_layout(config, small)  # transformers' modules imported outside the timing
    start = time.perf_counter()
    entry = derive_layout(cfg, names)
    elapsed = time.perf_counter() - start
    assert entry["moe_layers"]["indices"] == list(range(1, 61))
    assert entry["experts"] == ["mlp.experts.{expert}."] and entry["num_experts"][0] == "n_routed_experts"
    assert elapsed < 20, elapsed


def test_layout_file_with_malformed_indices_refused():
    bad = {"num_experts": ["n"], "top_k": ["k"], "layer_prefix": "model.layers.{layer}.",
           "moe_layers": {"indices": "0,1"}}
    with pytest.raises(ReapError, match="moe_layers.indices must be a list of layer numbers"):
        Layout.from_dict("bad", bad)


def test_derived_entry_is_a_layout_file(checkpoints, tmp_path):
    """The entry is the layouts.json format: written to a file it is a --layout file."""
    from reapsurgery.common.layouts import load_layout_file

    ckpt = Checkpoint.open(checkpoints["mixtral"])
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(derive_layout(ckpt.config, ckpt.weight_map)))
    layout = load_layout_file(str(path))
    assert layout.moe_layers(ckpt.cfg) == builtin_layouts()["mixtral"].moe_layers(ckpt.cfg)
    assert layout.experts == ("block_sparse_moe.experts.{expert}.",)


@pytest.mark.parametrize("family", ["mistral4", "step3p7"])
def test_a_config_without_architectures_derives_the_same_layout(checkpoints, family):
    """These families are only in transformers' image-text-to-text auto map: with no class named,
    derivation picks that map as calibration does, not AutoModelForCausalLM."""
    ckpt = Checkpoint.open(checkpoints[family])
    config = {k: v for k, v in ckpt.config.items() if k != "architectures"}
    named = derive_layout(ckpt.config, ckpt.weight_map)
    unnamed = derive_layout(config, ckpt.weight_map)
    facts = lambda entry: {k: v for k, v in entry.items() if k not in ("derived", "architectures")}
    assert facts(unnamed) == facts(named) and named["architectures"]


def test_a_list_that_merely_contains_the_expert_count_is_not_one():
    """Kolibri-1.1's kv_source_layers gives each layer the index of the layer whose keys and values it
    reads: [0, 1, 2, 3, 4] on 5 layers holds 4, which is also its expert count here. Raising the
    entries equal to E does not change the experts, so it is no per-layer expert count."""
    config, names = meta_model("kolibri1_1", **dict(TINY, num_hidden_layers=5, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                                   mlp_only_intermediate_size=32, index_num_heads=2,
                                                   sliding_window=8))
    assert 4 in config["kv_source_layers"] and len(set(config["kv_source_layers"])) > 1
    entry = derive_layout(config, names)
    assert "kv_source_layers" not in entry["num_experts"]
    assert set(entry["num_experts"]) == {"num_experts", "num_local_experts"}  # the attribute and its alias
    assert entry["moe_layers"]["indices"] == [2, 3, 4]  # mlp_only_layers: the first two are dense
