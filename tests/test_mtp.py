"""Multi-token-prediction layers (DeepSeek-V3, GLM-4.x): dropped by default; with
`calibrate --mtp calibrate` measured from the MTP block's own inputs, kept and pruned by apply.

The reference needs no MTP code of ours: given one more decoder layer in its config,
transformers loads the MTP layer's decoder-layer tensors itself (its own conversion) as layer
num_hidden_layers, and a pre-hook on that layer gives it the MTP block's input, computed here
from the block's tensors read with safetensors.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from fixtures.build import build
from reapsurgery.calibration.calibrate import calibrate
from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.common.saliency import LayerStats, Saliency
from reapsurgery.plan import plan_mask
from tests.helpers import (assert_output_is_input_slices, cli, output_tensors, stack_prefix, tensor_bytes,
                           write_mask)
from tests.reference import assert_stats_close, decoder_layers, load, logits, pruned_in_memory, reference_stats
from tests.test_calibrate import texts

MTP_FAMILIES = ["deepseek_v3", "glm4_moe", "glm4_moe_lite", "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text",
                # derived layouts whose MTP block is data (mtp_blocks.json): DeepSeek-V3.2, GLM-5 and Ling-3 store it
                # as decoder layer N, as DeepSeek-V3 does
                "deepseek_v32", "glm_moe_dsa", "bailing_hybrid"]
# blocks stored under mtp.* (Qwen3-Next, Qwen3.5-MoE whose text model is model.language_model.*, and that text
# model saved alone)
PREFIX_FAMILIES = ("qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text")
COUNT_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers")
# where each style keeps the block's own modules: (embed norm, hidden norm, projection), and its
# decoder layers: DeepSeek-V3/GLM as layer n + d, Qwen3-Next and Qwen3.5 under mtp.layers.{d} with one shared set
LAYER_STYLE = ("enorm", "hnorm", "eh_proj")
PREFIX_STYLE = ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc")


def mtp_depths(config) -> int:
    text = config.get_text_config()
    return next(getattr(text, k) for k in COUNT_KEYS if getattr(text, k, None) is not None)


def text_config_json(path) -> dict:
    """config.json's text model part (a multimodal wrapper's text_config, else the whole)."""
    config = json.loads((path / "config.json").read_text())
    return config.get("text_config") or config


def trunk_shared(weight_map) -> set[str]:
    """The trunk's input embeddings and LM head, which an MTP draft shares."""
    return {f"{stack_prefix(weight_map)[: -len('layers.')]}embed_tokens.weight", "lm_head.weight"}


def mtp_as_decoder_layer(path):
    """The checkpoint's config with its MTP layers as more decoder layers, for transformers to load
    (the engines run Qwen3-Next's MTP layer as a full-attention layer)."""
    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config()  # the text config itself (a wrapper's text_config), changed in place
    n, depths = text.num_hidden_layers, mtp_depths(config)
    text.num_hidden_layers = n + depths
    for attr, types in list(vars(text).items()):  # per-layer lists (layer types, GLM-5's indexer kinds, Ling's limits)
        if isinstance(types, list) and len(types) == n:
            extra = "full_attention" if "full_attention" in types else types[-1]
            setattr(text, attr, types + [extra] * depths)
    return config


def layer_style_copy(src, dst):
    """A copy of a checkpoint whose mtp.layers.{d}.* tensors are renamed as stack layer n + d
    (model.layers.{n + d}.*, Qwen3.5's model.language_model.layers.{n + d}.*), so that transformers
    loads them as decoder layers; written with safetensors, any other checkpoint as is."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    n = text_config_json(src)["num_hidden_layers"]
    layers = stack_prefix(index["weight_map"])
    if not any(name.startswith("mtp.layers.") for name in index["weight_map"]):
        return src
    shutil.copytree(src, dst)
    renamed = {}
    for name, shard in index["weight_map"].items():
        if name.startswith("mtp.layers."):
            depth, rest = name[len("mtp.layers."):].split(".", 1)
            renamed[name] = f"{layers}{n + int(depth)}.{rest}"
    for shard in set(index["weight_map"][k] for k in renamed):
        with safe_open(src / shard, "pt") as f:
            tensors = {renamed.get(k, k): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, dst / shard, metadata={"format": "pt"})
    index["weight_map"] = {renamed.get(k, k): v for k, v in index["weight_map"].items()}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def mtp_tensors(path, layer: int) -> dict[str, torch.Tensor]:
    """An MTP depth's block tensors: embed_norm, hidden_norm, proj, and embed where it has its own;
    its output head: head_norm, and head where it has its own (else the LM head drafts)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    if any(name.startswith("mtp.") for name in index):
        names = dict(zip(("embed_norm", "hidden_norm", "proj", "head_norm"),
                         (f"mtp.{m}.weight" for m in (*PREFIX_STYLE, "norm"))))
    else:
        names = dict(zip(("embed_norm", "hidden_norm", "proj", "embed", "head_norm", "head"),
                         (f"model.layers.{layer}.{m}.weight"
                          for m in (*LAYER_STYLE, "embed_tokens", "shared_head.norm", "shared_head.head"))))
        if f"model.layers.{layer}.final_layernorm.weight" in index:  # Ling-3's head norm
            names["head_norm"] = f"model.layers.{layer}.final_layernorm.weight"
    out = {}
    for role, name in names.items():
        if name in index:
            with safe_open(path / index[name], "pt") as f:
                out[role] = f.get_tensor(name)
    return out


def final_norm(model):
    """transformers' own final norm: the `norm` of the module holding the decoder layers."""
    layers = decoder_layers(model)
    return next(m for m in model.modules() if getattr(m, "layers", None) is layers).norm


def norm_like(model, weight):
    """transformers' own final norm of the model (Qwen3-Next's scales by 1 + w) with another weight."""
    norm = copy.deepcopy(final_norm(model))
    norm.weight = torch.nn.Parameter(weight, requires_grad=False)
    return norm


def feed_mtp_inputs(model, src, n: int, depths: int) -> None:
    """Pre-hooks on transformers' layers n.. (the MTP layers loaded as decoder layers): depth d
    (layer n+d-1) is fed, at position t, proj([embed_norm(embed(token t+d)); hidden_norm(h)]), where h
    is the previous depth's output at t (the main model's, through its final norm, for d = 1)."""
    seen = {}
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.__setitem__("ids", a[0]))

    def mtp_input(module, args, kwargs, d, w):
        h = args[0] if args else kwargs["hidden_states"]
        ids = seen["ids"]
        ahead = torch.cat([ids[:, d:], torch.zeros_like(ids[:, :d])], dim=1)[:, : ids.shape[1]]
        embed = w.get("embed", model.get_input_embeddings().weight)
        e = norm_like(model, w["embed_norm"])(torch.nn.functional.embedding(ahead, embed))
        prev = final_norm(model)(h) if d == 1 else h
        x = torch.cat([e, norm_like(model, w["hidden_norm"])(prev)], dim=-1) @ w["proj"].T
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    for d in range(1, depths + 1):
        decoder_layers(model)[n + d - 1].register_forward_pre_hook(
            lambda m, a, kw, d=d, w=mtp_tensors(src, n + d - 1): mtp_input(m, a, kw, d, w), with_kwargs=True)


def reference_with_mtp(src, samples, tmp_path=None):
    """Statistics of every MoE layer and of the MTP layers, from transformers' own model whose extra
    last layers are the MTP layers, fed as `feed_mtp_inputs` says."""
    config = mtp_as_decoder_layer(src)
    model, info = load(layer_style_copy(src, tmp_path / "layer-style") if tmp_path else src, config=config)
    depths = mtp_depths(config)
    n = config.get_text_config().num_hidden_layers - depths
    assert not [k for k in info["missing_keys"] if any(f"layers.{n + d}." in k for d in range(depths))], info
    feed_mtp_inputs(model, src, n, depths)
    stats = reference_stats(src, samples, model=model, uncounted_tail={n + d - 1: d for d in range(1, depths + 1)})
    return stats


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_mtp_statistics_equal_the_reference(checkpoints, family, tmp_path):
    src = checkpoints[family]
    n = Checkpoint.open(src).num_hidden_layers
    samples = texts()
    saliency = calibrate(src, samples, batch_size=2, device="cpu", dtype="float32", mtp="calibrate")
    assert saliency.mtp_layers == [n] and saliency.calibration["mtp"] == "calibrate"
    assert saliency.layers[n].tokens == sum(len(s) - 1 for s in samples)  # the last token has no next token
    assert_stats_close(saliency.layers, reference_with_mtp(src, samples, tmp_path))
    dropped = calibrate(src, samples, batch_size=2, device="cpu", dtype="float32", mtp="drop")
    assert sorted(dropped.layers) == sorted(set(saliency.layers) - {n}) and dropped.calibration["mtp"] == "drop"


def test_two_mtp_depths_chain(tmp_path):
    """Depth 2 reads depth 1's output and the token two ahead (no released model has two MTP
    layers yet; the checkpoint format and the engines allow it)."""
    src = build("glm4_moe", tmp_path / "glm", overrides={"num_nextn_predict_layers": 2})
    samples = texts()
    saliency = calibrate(src, samples, batch_size=2, device="cpu", dtype="float32", mtp="calibrate")
    assert saliency.mtp_layers == [3, 4]
    assert saliency.layers[4].tokens == sum(max(len(s) - 2, 0) for s in samples)
    assert_stats_close(saliency.layers, reference_with_mtp(src, samples))


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text",
                                    "deepseek_v32", "glm_moe_dsa", "bailing_hybrid"])
def test_calibrate_plan_apply_keeps_a_pruned_mtp_layer_that_transformers_loads(checkpoints, tmp_path, family):
    src = checkpoints[family]
    ckpt = Checkpoint.open(src)
    n = ckpt.num_hidden_layers
    r = cli("calibrate", src, "-o", tmp_path / "s.json", "--mtp", "calibrate", "--num-samples", "8",
            "--max-length", "32", "-q")
    assert r.returncode == 0 and f"multi-token-prediction layers [{n}] included" in r.stdout, r.stderr
    r = cli("inspect", tmp_path / "s.json")
    assert r.returncode == 0 and f"mtp layers      {n} (calibrated with --mtp calibrate" in r.stdout, r.stdout
    r = cli("plan", tmp_path / "s.json", "--ckpt", src, "--keep", "4", "-o", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    keep = {int(k): v for k, v in json.loads((tmp_path / "m.json").read_text())["layers"].items()}
    assert sorted(keep) == [*ckpt.moe_layers, n]
    r = cli("apply", tmp_path / "m.json", src, tmp_path / "out", "-q")
    assert r.returncode == 0 and f"kept multi-token-prediction layers [{n}]" in r.stdout, r.stderr
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    text = config.get("text_config") or config
    count_key = next(k for k in COUNT_KEYS if k in text)
    assert text[count_key] == 1 and text[ckpt.layout.num_experts_keys[0]] == 4
    assert cli("verify", out).returncode == 0

    # transformers, as it runs the model: the MTP layer is ignored, the stack matches in-memory pruning
    pruned, info = load(out)
    assert not info["missing_keys"]
    assert torch.equal(logits(pruned), logits(pruned_in_memory(src, keep, 4)))
    # transformers with the MTP layer as a decoder layer: every tensor in place, equal to in-memory pruning
    pruned, info = load(layer_style_copy(out, tmp_path / "out-layers"), config=mtp_as_decoder_layer(out))
    assert not info["missing_keys"]
    reference = pruned_in_memory(layer_style_copy(src, tmp_path / "src-layers"), keep, 4,
                                 config=mtp_as_decoder_layer(src))
    assert torch.equal(logits(pruned), logits(reference))


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_mask_with_the_mtp_layer_slices_it_byte_for_byte(checkpoints, tmp_path, family):
    src = checkpoints[family]
    ckpt = Checkpoint.open(src)
    keep = [0, 2, 5, 7]
    mask = write_mask(src, {l: keep for l in [*ckpt.moe_layers, ckpt.num_hidden_layers]}, tmp_path / "m.json")
    assert cli("apply", mask, src, tmp_path / "out", "-q").returncode == 0
    got = assert_output_is_input_slices(src, tmp_path / "out", keep, keep_mtp=True)
    experts = "mtp.layers.0.mlp.experts" if family in PREFIX_FAMILIES else f"model.layers.{ckpt.num_hidden_layers}.mlp.experts"
    if any(name.startswith(f"{experts}.0.") for name in ckpt.weight_map):  # one tensor per expert
        assert any(name.startswith(f"{experts}.3.") for name in got)
        assert not any(name.startswith(f"{experts}.4.") for name in got)
    else:  # stacked [E, ...] on disk (Qwen3.5): the MTP layer's experts hold the 4 kept ones
        stacked = [name for name in got if name.startswith(f"{experts}.")]
        assert stacked and all(got[name][1].shape[0] == len(keep) for name in stacked)


def test_verify_reports_an_mtp_layer_left_with_the_old_expert_count(checkpoints, tmp_path):
    """An output whose stack is pruned but whose MTP layer is not would break vLLM's MTP loading."""
    src = checkpoints["deepseek_v3"]
    n = Checkpoint.open(src).num_hidden_layers
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    assert cli("apply", mask, src, tmp_path / "out", "-q").returncode == 0
    out = tmp_path / "out"
    # put the source's unpruned MTP layer back, as a tool unaware of MTP layers would have kept it
    shutil.copy(src / "model-mtp.safetensors", out / "model-mtp.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name, (_, info) in output_tensors(src).items():
        if name.startswith(f"model.layers.{n}."):
            index["weight_map"][name] = "model-mtp.safetensors"
            index["metadata"]["total_size"] += info.nbytes
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    r = cli("verify", out)
    assert r.returncode != 0
    assert f"MoE layer {n} has tensors of experts [4, 5, 6, 7]; config says 4 experts" in r.stdout + r.stderr


def test_mtp_calibrate_refusals(checkpoints, tmp_path):
    r = cli("calibrate", checkpoints["qwen3_moe"], "-o", tmp_path / "s.json", "--mtp", "calibrate", "-q")
    assert r.returncode == 2 and "config.json" in r.stderr and "describes no multi-token-prediction block" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    bare = build("deepseek_v3", tmp_path / "no_mtp", with_mtp=False)
    r = cli("calibrate", bare, "-o", tmp_path / "s.json", "--mtp", "calibrate", "-q")
    assert r.returncode == 2 and "no multi-token-prediction layer on disk" in r.stderr, r.stderr
    assert not (tmp_path / "s.json").exists()


def test_mask_with_an_mtp_layer_on_a_fine_tune_without_one(checkpoints, tmp_path):
    """Fine-tunes saved by transformers lose the MTP layer: the mask still applies, with a note."""
    src = checkpoints["deepseek_v3"]
    n = Checkpoint.open(src).num_hidden_layers
    tuned = build("deepseek_v3", tmp_path / "tuned", seed=7, with_mtp=False)
    mask = write_mask(src, {1: [0, 2, 5, 7], 2: [0, 2, 5, 7], n: [0, 2, 5, 7]}, tmp_path / "m.json")
    r = cli("apply", mask, tuned, tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    assert f"multi-token-prediction layers [{n}], which this checkpoint does not store" in r.stdout
    assert not any(name.startswith(f"model.layers.{n}.") for name in output_tensors(tmp_path / "out"))
    # the output's config says what it stores, so verify (and vLLM, llama.cpp) agree with it
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert cli("verify", tmp_path / "out").returncode == 0


def _stats(values: list[float]) -> LayerStats:
    return LayerStats(10, [1.0] * len(values), [0.5] * len(values), list(values), list(values), list(values))


def test_mtp_layers_leave_the_stack_plan_unchanged():
    """Super experts are found among the stack's layers; an outlier in the MTP layer moves nothing."""
    model = {"architecture": "DeepseekV3ForCausalLM", "model_type": "deepseek_v3", "num_hidden_layers": 4,
             "moe_layers": [0, 1, 2, 3], "num_experts": 4, "num_experts_per_tok": 1, "n_group": None}
    stack = {l: _stats([1.0 + l, 2.0, 50.0 if l == 0 else 3.0, 4.0]) for l in range(4)}
    with_mtp = {**stack, 4: _stats([1000.0, 1.0, 2.0, 3.0])}
    a = plan_mask(Saliency(model, {}, stack), keep=2, preserve_super_experts=True)
    b = plan_mask(Saliency(model, {}, with_mtp), keep=2, preserve_super_experts=True)
    assert a.mask.layers == {l: b.mask.layers[l] for l in stack}
    assert a.mask.provenance["preserved"] == b.mask.provenance["preserved"]
    assert b.mask.provenance["preserved"]["super_experts"] == {"0": [2]}
    assert b.mask.layers[4] == [0, 3] and b.mask.provenance["mtp_layers"] == [4]



@pytest.mark.parametrize("family,default", [("deepseek_v3", "drop"), ("glm4_moe", "drop"), ("qwen3_next", "calibrate"),
                                            ("qwen3_5_moe", "calibrate"), ("qwen3_5_moe_text", "calibrate")])
def test_the_default_keeps_the_mtp_block_where_a_loader_needs_it(checkpoints, tmp_path, family, default):
    """llama.cpp's converter stops on a Qwen3-Next checkpoint without its MTP block: calibrate measures
    it by default there (so apply keeps it); a checkpoint without one falls back to dropping."""
    from reapsurgery.calibration.calibrate import resolve_mtp

    assert resolve_mtp(Checkpoint.open(checkpoints[family]), "auto") == default
    assert resolve_mtp(Checkpoint.open(build(family, tmp_path / "bare", with_mtp=False)), "auto") == "drop"


@pytest.mark.parametrize("family", MTP_FAMILIES)
def test_verify_catches_a_stale_mtp_count_key(checkpoints, tmp_path, family):
    """vLLM and llama.cpp size the MTP block from the count key: it must match what is stored.
    (verify runs in-process here: each edited config of a derived family is derived again, and a
    command would import torch for it every time; the command's own output is tested elsewhere.)"""
    from reapsurgery.surgery.verify import verify

    src = checkpoints[family]
    ckpt = Checkpoint.open(src)
    keep = [0, 2, 5, 7]
    for name, layers, stale in (("drop", ckpt.moe_layers, 1), ("keep", [*ckpt.moe_layers, ckpt.num_hidden_layers], 0)):
        out = tmp_path / name
        assert cli("apply", write_mask(src, {l: keep for l in layers}, tmp_path / f"{name}.json"), src, out, "-q").returncode == 0
        assert verify(out).ok
        config = json.loads((out / "config.json").read_text())
        text = config.get("text_config") or config  # the text model's config holds the count key
        key = next(k for k in COUNT_KEYS if k in text)
        text[key] = stale
        (out / "config.json").write_text(json.dumps(config))
        report = verify(out)
        assert not report.ok
        assert any(f"config.json: {key}={stale} announces {stale} multi-token-prediction layers" in p
                   for p in report.problems), report.problems


# not qwen3_5_moe: its layout is derived, and a draft directory holds no trunk layer to derive it from
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_next"])
def test_keep_full_writes_the_unpruned_mtp_block_as_a_draft(checkpoints, tmp_path, family):
    """OUT/mtp-draft: the source's config (original expert count) and its MTP tensors byte for byte,
    with the embeddings and LM head it shares; transformers loads the MTP layer from it in place."""
    src = checkpoints[family]
    ckpt = Checkpoint.open(src)
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    r = cli("apply", mask, src, tmp_path / "out", "-q", "--mtp", "keep-full")
    assert r.returncode == 0 and "wrote mtp-draft/" in r.stdout, r.stderr
    draft = tmp_path / "out" / "mtp-draft"
    assert json.loads((draft / "config.json").read_text()) == ckpt.config
    names = set(output_tensors(draft))
    n = ckpt.num_hidden_layers
    mtp = {k for k in ckpt.weight_map if k.startswith(("mtp.", f"model.layers.{n}."))}
    assert names == mtp | trunk_shared(ckpt.weight_map)
    for name in names:
        assert tensor_bytes(draft / Checkpoint.open(draft).weight_map[name], name) == \
            tensor_bytes(src / ckpt.weight_map[name], name), name
    assert cli("verify", draft).returncode == 0 and cli("verify", tmp_path / "out").returncode == 0
    loaded, info = load(layer_style_copy(draft, tmp_path / "draft-layers"), config=mtp_as_decoder_layer(draft))
    assert not [k for k in info["missing_keys"] if f"layers.{n}." in k]
    reference, _ = load(layer_style_copy(src, tmp_path / "src-layers"), config=mtp_as_decoder_layer(src))
    got, want = decoder_layers(loaded)[n].state_dict(), decoder_layers(reference)[n].state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_keep_full_is_refused_where_the_layout_is_derived(checkpoints, tmp_path):
    """Qwen3.5-MoE's layout is derived: a draft of the MTP block alone could not be opened again."""
    src = checkpoints["qwen3_5_moe"]
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    r = cli("apply", mask, src, tmp_path / "out", "-q", "--mtp", "keep-full")
    assert r.returncode == 2 and "--mtp keep-full" in r.stderr and "derived" in r.stderr, r.stderr
    assert [l.startswith("error: ") for l in r.stderr.strip().splitlines() if not l.startswith("note: ")] == [True]
    assert not (tmp_path / "out").exists()


def test_ernie_dense_mtp_block_is_kept_and_transformers_drafts_with_it(tmp_path):
    """ERNIE-4.5-MoE's MTP block (model.mtp_block.0 with mtp_emb_norm.0, mtp_hidden_norm.0, mtp_linear_proj.0;
    num_nextn_predict_layers) is a dense decoder layer: transformers' MtpModel builds it with layer index 0,
    below moe_layer_start_index, and vLLM's ErnieMTP as a dense LlamaDecoderLayer. It holds no routed
    experts, so the pruned output keeps it byte for byte with its count, and transformers' own MTP loader
    (generate(..., use_mtp=True)) loads it beside the pruned trunk."""
    from transformers.modeling_layers import MtpModel

    src = build("ernie4_5_moe", tmp_path / "ernie", overrides={"num_mtp_layers": 1})
    ckpt = Checkpoint.open(src)
    mtp = sorted(name for name in ckpt.weight_map if name.startswith("model.mtp_"))
    assert "model.mtp_block.0.mlp.gate_proj.weight" in mtp and not any(".experts." in name for name in mtp)
    out = tmp_path / "out"
    assert cli("apply", write_mask(src, [0, 2, 5, 7], tmp_path / "m.json"), src, out, "-q").returncode == 0
    assert cli("verify", out).returncode == 0
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    pruned = Checkpoint.open(out)
    for name in mtp:
        assert tensor_bytes(out / pruned.weight_map[name], name) == tensor_bytes(src / ckpt.weight_map[name], name)
    drafts = []
    for path in (src, out):
        model, _ = load(path)
        block = MtpModel.from_pretrained(model)  # raises on a missing MTP weight
        assert type(block.layers[0].mtp_block.mlp).__name__ == "Ernie4_5_MoeMLP"
        drafts.append(block.layers[0].state_dict())
    assert drafts[0].keys() == drafts[1].keys() and all(torch.equal(drafts[0][k], drafts[1][k]) for k in drafts[0])
