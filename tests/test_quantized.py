"""Quantized checkpoints: surgery in their own format, byte for byte; the pruned checkpoint
loads in transformers (dequantising on CPU) and equals in-memory pruning of the source."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from fixtures.quantize import build_gpt_oss_for_mxfp4, to_compressed_tensors, to_fp8_block, to_mxfp4
from reapsurgery.common.checkpoint import Checkpoint
from tests.helpers import (apply_leaving_source_untouched, assert_output_is_input_slices, cli, output_tensors,
                           tensor_bytes, write_mask)
from tests.reference import load, logits, pruned_in_memory

pytest.importorskip("accelerate", reason="transformers needs accelerate to load FP8 checkpoints")

FP8_FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3"]
KEEP = {"qwen3_moe": [0, 2, 5, 7], "mixtral": [1, 6], "deepseek_v3": [1, 2, 5, 6]}


def fp8_dequantize():
    from transformers import FineGrainedFP8Config

    return FineGrainedFP8Config(dequantize=True)


def mxfp4_dequantize():
    from transformers import Mxfp4Config

    return Mxfp4Config(dequantize=True)


@pytest.fixture(scope="session")
def mxfp4(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    return to_mxfp4(build_gpt_oss_for_mxfp4(root / "src"), root / "gpt_oss")


@pytest.fixture(scope="session")
def fp8(checkpoints, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fp8")
    return {f: to_fp8_block(checkpoints[f], root / f) for f in FP8_FAMILIES}


def test_fp8_fixture_is_deepseek_v3_block_fp8(fp8):
    """The fixture has the hub layout: F8 weights, F32 block scales, unquantized routers, and
    scales in another shard than their weight."""
    src = fp8["deepseek_v3"]
    config = json.loads((src / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    t = output_tensors(src)
    w, s = t["model.layers.1.mlp.experts.3.gate_proj.weight"], t["model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv"]
    assert (w[1].dtype, s[1].dtype, s[1].shape) == ("F8_E4M3", "F32", (1, 1))
    assert w[0] != s[0]
    assert t["model.layers.1.mlp.gate.weight"][1].dtype == "F32"
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"][1].dtype == "F32"
    assert t["lm_head.weight"][1].dtype == "F32" and t["model.embed_tokens.weight"][1].dtype == "F32"
    assert t["model.layers.1.self_attn.q_b_proj.weight"][1].dtype == "F8_E4M3"


@pytest.mark.parametrize("family", FP8_FAMILIES)
def test_fp8_pruned_checkpoint_matches_in_memory_pruning(fp8, tmp_path, family):
    src = fp8[family]
    ckpt = Checkpoint.open(src)
    keep = KEEP[family]
    mask = write_mask(src, keep, tmp_path / "mask.json")
    out = tmp_path / "out"
    apply_leaving_source_untouched(mask, src, out)

    # the output is still block FP8, and every tensor is the input's bytes or their slice
    assert json.loads((out / "config.json").read_text())["quantization_config"] == \
        json.loads((src / "config.json").read_text())["quantization_config"]
    got = assert_output_is_input_slices(src, out, keep)
    dtypes = {info.dtype for _, info in got.values()}
    assert {"F8_E4M3", "F32"} <= dtypes
    assert any(f"experts.{len(keep) - 1}." in n and n.endswith("_scale_inv") for n in got)

    pruned, info = load(out, fp8_dequantize())
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reference = pruned_in_memory(src, {l: keep for l in ckpt.moe_layers}, len(keep), fp8_dequantize())
    assert torch.equal(logits(pruned), logits(reference))
    assert cli("verify", out).returncode == 0


def test_mxfp4_fixture_is_gpt_oss_layout(mxfp4):
    t = output_tensors(mxfp4)
    p = "model.layers.1.mlp.experts."
    E, H, I = 8, 32, 32
    assert (t[p + "gate_up_proj_blocks"][1].dtype, t[p + "gate_up_proj_blocks"][1].shape) == ("U8", (E, 2 * I, H // 32, 16))
    assert (t[p + "gate_up_proj_scales"][1].dtype, t[p + "gate_up_proj_scales"][1].shape) == ("U8", (E, 2 * I, H // 32))
    assert t[p + "down_proj_blocks"][1].shape == (E, H, I // 32, 16) and t[p + "down_proj_scales"][1].shape == (E, H, I // 32)
    assert t[p + "gate_up_proj_bias"][1].shape == (E, 2 * I) and t[p + "down_proj_bias"][1].shape == (E, H)
    assert t[p + "gate_up_proj_blocks"][0] != t[p + "gate_up_proj_scales"][0]
    assert json.loads((mxfp4 / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"


def test_mxfp4_dequantisation_is_transformers_own():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from fixtures.quantize import mxfp4_dequantize as deq, mxfp4_quantize

    w = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(0))
    blocks, scales = mxfp4_quantize(w)
    assert torch.equal(deq(blocks, scales), convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    assert (deq(blocks, scales) - w).abs().max() <= w.abs().max() / 4  # coarse, but it is w


@pytest.mark.parametrize("keep", [[0, 2, 5, 7], [1, 6]])
def test_mxfp4_pruned_checkpoint_matches_in_memory_pruning(mxfp4, tmp_path, keep):
    src = mxfp4
    ckpt = Checkpoint.open(src)
    mask = write_mask(src, keep, tmp_path / "mask.json")
    out = tmp_path / "out"
    apply_leaving_source_untouched(mask, src, out)

    got = assert_output_is_input_slices(src, out, keep)
    for name, (path, info) in got.items():
        if name.endswith(("_blocks", "_scales")):
            assert info.dtype == "U8" and info.shape[0] == len(keep)

    pruned, info = load(out, mxfp4_dequantize())
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reference = pruned_in_memory(src, {l: keep for l in ckpt.moe_layers}, len(keep), mxfp4_dequantize())
    assert torch.equal(logits(pruned), logits(reference))
    assert cli("verify", out).returncode == 0


# -- quantization settings that name experts ---------------------------------------

def test_module_names_follow_their_experts():
    from reapsurgery.common.layouts import builtin_layouts
    from reapsurgery.common.quant import rename_module

    layout = builtin_layouts()["deepseek_v3"]
    keep = {1: [1, 2, 5, 6], 2: [0, 3, 4, 7]}
    cases = {
        "model.layers.1.mlp.experts.5.gate_proj": "model.layers.1.mlp.experts.2.gate_proj",
        "model.layers.1.mlp.experts.5": "model.layers.1.mlp.experts.2",
        "model.layers.2.mlp.experts.7.down_proj": "model.layers.2.mlp.experts.3.down_proj",
        "model.layers.1.mlp.experts.1.up_proj": "model.layers.1.mlp.experts.0.up_proj",
        "model.layers.1.mlp.experts.0.up_proj": None,  # dropped expert
        "model.layers.2.mlp.experts.5": None,
        "model.layers.1.mlp.gate": "model.layers.1.mlp.gate",  # router: kept, sliced
        "model.layers.1.mlp.shared_experts.gate_proj": "model.layers.1.mlp.shared_experts.gate_proj",
        "model.layers.1.mlp.experts": "model.layers.1.mlp.experts",
        "model.layers.0.mlp.gate_proj": "model.layers.0.mlp.gate_proj",
        "model.layers.3.mlp.experts.0.gate_proj": "model.layers.3.mlp.experts.0.gate_proj",  # not a masked layer
        "re:.*mlp.experts.0.*": "re:.*mlp.experts.0.*",
        "model.layers.*.mlp.experts.0.gate_proj": "model.layers.*.mlp.experts.0.gate_proj",
        "lm_head": "lm_head",
    }
    for name, want in cases.items():
        assert rename_module(name, layout, keep) == want, name


def test_quantization_config_and_hf_quant_config_rewritten_by_apply(fp8, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(fp8["deepseek_v3"], src)
    config = json.loads((src / "config.json").read_text())
    names = ["lm_head", "re:.*mlp\\.gate$", "model.layers.1.mlp.experts.0.gate_proj",
             "model.layers.1.mlp.experts.6.down_proj", "model.layers.2.mlp.experts.5", "model.layers.1.mlp.gate"]
    config["quantization_config"]["modules_to_not_convert"] = list(names)
    config["quantization_config"]["config_groups"] = {"group_0": {"targets": ["Linear", "model.layers.2.mlp.experts.3.up_proj"]}}
    (src / "config.json").write_text(json.dumps(config, indent=2))
    modelopt = {"producer": {"name": "modelopt"},
                "quantization": {"quant_algo": "NVFP4", "exclude_modules": list(names) + ["model.layers.*.mlp.gate"]}}
    (src / "hf_quant_config.json").write_text(json.dumps(modelopt))
    keep = [1, 2, 5, 6]
    r = cli("apply", write_mask(src, keep, tmp_path / "m.json"), src, tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    want = ["lm_head", "re:.*mlp\\.gate$", "model.layers.1.mlp.experts.3.down_proj", "model.layers.2.mlp.experts.2",
            "model.layers.1.mlp.gate"]
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    qc = out["quantization_config"]
    assert qc["modules_to_not_convert"] == want
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert {k: v for k, v in qc.items() if k not in ("modules_to_not_convert", "config_groups")} == \
        {k: v for k, v in config["quantization_config"].items() if k not in ("modules_to_not_convert", "config_groups")}
    hq = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())
    assert hq["quantization"]["exclude_modules"] == want + ["model.layers.*.mlp.gate"]
    assert hq["producer"] == modelopt["producer"]
    # the output still loads (dequantised) and is reported
    pruned, info = load(tmp_path / "out", fp8_dequantize())
    assert not info["missing_keys"] and not info["unexpected_keys"]


def _quantize_routers_nvfp4(src, dst):
    """ModelOpt-NVFP4-style routers: weight U8 [E, H/2], weight_scale F8 [E, H/16], scalars."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    ckpt = Checkpoint.open(dst)
    for shard in ckpt.shards:
        with safe_open(dst / shard, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for name in [n for n in tensors if n.endswith("mlp.gate.weight")]:
            E, H = tensors[name].shape
            g = torch.Generator().manual_seed(len(name))
            tensors[name] = torch.randint(0, 256, (E, H // 2), generator=g, dtype=torch.uint8)
            base = name.removesuffix("weight")
            tensors[base + "weight_scale"] = torch.rand(E, H // 16, generator=g).to(torch.float8_e4m3fn)
            tensors[base + "weight_scale_2"] = torch.tensor(0.5)
            tensors[base + "input_scale"] = torch.tensor([0.25])
        save_file(tensors, dst / shard, metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in ckpt.shards:
        with safe_open(dst / shard, "pt") as f:
            index["weight_map"].update({k: shard for k in f.keys()})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_quantized_router_rows_sliced_in_weight_and_scales(checkpoints, tmp_path):
    src = _quantize_routers_nvfp4(checkpoints["qwen3_moe"], tmp_path / "src")
    keep = [0, 3, 4, 6]
    assert cli("apply", write_mask(src, keep, tmp_path / "m.json"), src, tmp_path / "out", "-q").returncode == 0
    inp, out = output_tensors(src), output_tensors(tmp_path / "out")
    routers = {n for n in inp if ".mlp.gate." in n}
    assert len(routers) == 4 * 3 and routers <= set(out)
    for name in routers:
        path, info = out[name]
        with safe_open(inp[name][0], "pt") as f:
            t = f.get_tensor(name)
        if t.dim() and t.shape[0] == 8:
            t = t.view(torch.uint8)[keep]
            assert info.shape[0] == len(keep)
        want = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert tensor_bytes(path, name) == want, name


def test_block_quantized_router_spanning_experts_refused(checkpoints, tmp_path):
    """A block scale shared by several experts' rows cannot follow a row slice."""
    src = _quantize_routers_nvfp4(checkpoints["qwen3_moe"], tmp_path / "src")
    from safetensors.torch import save_file

    ckpt = Checkpoint.open(src)
    name = "model.layers.1.mlp.gate.weight_scale"
    shard = ckpt.weight_map[name]
    with safe_open(src / shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = torch.ones(2, 1)  # [ceil(E/4), ...]: rows of 4 experts share a scale
    save_file(tensors, src / shard, metadata={"format": "pt"})
    r = cli("apply", write_mask(src, [0, 3, 4, 6], tmp_path / "m.json"), src, tmp_path / "out", "-q")
    assert r.returncode != 0 and "re-quantizing the router" in r.stderr
    assert not (tmp_path / "out").exists()


# -- calibration on quantized checkpoints ------------------------------------------

def _dequantised_twin(src, dst, quantization_config):
    """The quantized checkpoint as transformers dequantises it, saved unquantized."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model, _ = load(src, quantization_config)
    config = AutoConfig.from_pretrained(src)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.save_pretrained(dst, max_shard_size="24KB")
    return dst


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "gpt_oss_mxfp4", "ct-qwen3_moe-W4A16",
                                    "ct-deepseek_v3-FP8_DYNAMIC"])
def test_calibration_on_quantized_equals_dequantised_twin(request, fp8, mxfp4, tmp_path, family):
    from reapsurgery.calibration.calibrate import calibrate
    from reapsurgery.calibration.streaming import StreamedModel
    from tests.test_calibrate import assert_stats_close, texts

    if family.startswith("ct-"):
        _, fam, scheme = family.split("-")
        src, qc = request.getfixturevalue("compressed")[(fam, scheme)], ct_dequantize()
    elif family == "gpt_oss_mxfp4":
        src, qc = mxfp4, mxfp4_dequantize()
    else:
        src, qc = fp8[family], fp8_dequantize()
    twin = _dequantised_twin(src, tmp_path / "twin", qc)
    loaded: list[set] = []

    def on_layer(i, streamed: StreamedModel):
        loaded.append({n for n, p in streamed.layers[i].named_parameters()})
        assert all(p.dtype == torch.float32 for p in streamed.layers[i].parameters())

    samples = texts()
    q = calibrate(src, samples, batch_size=2, device="cpu", dtype="float32", on_layer=on_layer)
    t = calibrate(twin, samples, batch_size=2, device="cpu", dtype="float32")
    assert q.model == t.model
    assert_stats_close(q.layers, {k: v.to_json() for k, v in t.layers.items()})
    assert not any("scale" in n or n.endswith(("_blocks", "_scales")) for names in loaded for n in names)


def test_inspect_reports_quantization_and_bytes_saved(fp8, mxfp4, checkpoints, tmp_path):
    src = fp8["deepseek_v3"]
    r = cli("inspect", src, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quantization"] == {"method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    assert json.loads(cli("inspect", mxfp4, "--json").stdout)["quantization"] == {"method": "mxfp4"}
    assert json.loads(cli("inspect", checkpoints["qwen3_moe"], "--json").stdout)["quantization"] is None
    assert "quantization    fp8 (e4m3, blocks 128x128)" in cli("inspect", src).stdout

    mask = write_mask(src, [1, 2, 5, 6], tmp_path / "m.json")
    size = json.loads(cli("inspect", mask, "--ckpt", src, "--json").stdout)["size"]
    assert cli("apply", mask, src, tmp_path / "out", "-q").returncode == 0
    written = sum(info.nbytes for _, info in output_tensors(tmp_path / "out").values())
    before = sum(info.nbytes for _, info in output_tensors(src).values())
    assert size["bytes_saved"] == before - written > 0
    assert size["quantization"]["method"] == "fp8"
    assert "bytes saved: " in cli("inspect", mask, "--ckpt", src).stdout


# -- compressed-tensors (llm-compressor output), made with the compressed-tensors library ----

CT_CASES = [("qwen3_moe", "W4A16"), ("deepseek_v3", "W4A16"), ("mixtral", "FP8_DYNAMIC"), ("deepseek_v3", "FP8_DYNAMIC"),
            ("qwen3_moe", "NVFP4A16")]


def ct_dequantize():
    from transformers import CompressedTensorsConfig

    return CompressedTensorsConfig(dequantize=True)


@pytest.fixture(scope="session")
def compressed(checkpoints, tmp_path_factory) -> dict:
    pytest.importorskip("compressed_tensors")
    root = tmp_path_factory.mktemp("ct")
    return {(f, s): to_compressed_tensors(checkpoints[f], root / f"{f}-{s}", s) for f, s in CT_CASES}


def test_compressed_tensors_fixture_layout(compressed):
    t = output_tensors(compressed[("qwen3_moe", "W4A16")])
    p = "model.layers.1.mlp.experts.3.up_proj."
    assert (t[p + "weight_packed"][1].dtype, t[p + "weight_packed"][1].shape) == ("I32", (16, 4))  # 32 int4 per row
    assert t[p + "weight_scale"][1].shape == (16, 2) and t[p + "weight_shape"][1].dtype == "I64"
    assert t[p + "weight_packed"][0] != t[p + "weight_scale"][0]
    assert p + "weight" not in t and t["model.layers.1.mlp.gate.weight"][1].dtype == "F32"
    qc = json.loads((compressed[("qwen3_moe", "W4A16")] / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert "model.layers.1.mlp.gate" in qc["ignore"]
    t = output_tensors(compressed[("mixtral", "FP8_DYNAMIC")])
    assert t["model.layers.1.block_sparse_moe.experts.3.w1.weight"][1].dtype == "F8_E4M3"
    assert t["model.layers.1.block_sparse_moe.experts.3.w1.weight_scale"][1].shape == (16, 1)


@pytest.mark.parametrize("case", CT_CASES, ids=lambda c: "-".join(c))
def test_compressed_tensors_pruned_checkpoint_matches_in_memory_pruning(compressed, tmp_path, case):
    src = compressed[case]
    ckpt = Checkpoint.open(src)
    keep = KEEP[case[0]]
    r = cli("apply", write_mask(src, keep, tmp_path / "mask.json"), src, tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["quantization_config"] == \
        json.loads((src / "config.json").read_text())["quantization_config"]
    assert_output_is_input_slices(src, out, keep)
    if case[1] == "NVFP4A16":
        return  # transformers 5.24 dequantises NVFP4 experts without their global scale: no reference to load

    pruned, info = load(out, ct_dequantize())
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reference = pruned_in_memory(src, {l: keep for l in ckpt.moe_layers}, len(keep), ct_dequantize())
    assert torch.equal(logits(pruned), logits(reference))


def test_calibration_refuses_a_quantization_it_cannot_dequantise(fp8, tmp_path):
    import shutil

    from reapsurgery.calibration.calibrate import calibrate
    from reapsurgery.errors import ReapError

    src = tmp_path / "src"
    shutil.copytree(fp8["qwen3_moe"], src)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ReapError, match="cannot dequantise quant_method 'gptq'"):
        calibrate(src, [[1, 2, 3]], device="cpu", dtype="float32")


def test_fp8_block_dequantisation_follows_the_block_definition():
    """Edge blocks are cut, not stretched: weight[i, j] * scale_inv[i // bo, j // bi]."""
    from reapsurgery.calibration.dequant import dequantize_fp8_block

    from fixtures.quantize import fp8_block_quantize

    g = torch.Generator().manual_seed(0)
    for shape, block in [((40, 72), (16, 32)), ((200, 136), (128, 128)), ((3, 8, 20), (8, 8))]:
        w = torch.randn(*shape, generator=g)
        if w.dim() == 3:
            pairs = [fp8_block_quantize(x, block) for x in w]
            q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        else:
            q, s = fp8_block_quantize(w, block)
        got = dequantize_fp8_block(q, s, block)
        want = torch.empty(q.shape)
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in q.shape]).tolist():
            *lead, i, j = idx
            want[tuple(idx)] = q[tuple(idx)].float() * s[(*lead, i // block[0], j // block[1])]
        assert torch.equal(got, want), shape
        assert (got - w).abs().max() <= 0.07 * w.abs().max()


def test_calibration_on_fp8_with_small_blocks_equals_dequantised_twin(checkpoints, tmp_path):
    """16x16 blocks give real scale grids (and edge blocks: kv_a_proj_with_mqa has 24 rows)."""
    from fixtures.quantize import dequantized_twin
    from reapsurgery.calibration.calibrate import calibrate
    from tests.test_calibrate import assert_stats_close, texts

    src = to_fp8_block(checkpoints["deepseek_v3"], tmp_path / "fp8", block=(16, 16))
    t = output_tensors(src)
    assert t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"][1].shape == (2, 2)
    twin = dequantized_twin(src, tmp_path / "twin")
    q = calibrate(src, texts(), batch_size=2, device="cpu", dtype="float32")
    d = calibrate(twin, texts(), batch_size=2, device="cpu", dtype="float32")
    assert_stats_close(q.layers, {k: v.to_json() for k, v in d.layers.items()})


def test_nvfp4_layers_dequantised_with_their_global_scale(compressed, checkpoints):
    """nvfp4-pack-quantized: weight_packed U8 [out, in/2], weight_scale F8 [out, in/16],
    weight_global_scale F32 [1]; calibration reads each expert back close to the original weights.
    (transformers 5.24's CompressedTensorsDequantize drops weight_global_scale for fused experts,
    so its dequantised experts are off by that factor; dense layers are right.)"""
    from reapsurgery.calibration.dequant import read_layer_tensors

    src = compressed[("qwen3_moe", "NVFP4A16")]
    t = output_tensors(src)
    p = "model.layers.1.mlp.experts.3.up_proj."
    assert {k.removeprefix(p): (v[1].dtype, v[1].shape) for k, v in t.items() if k.startswith(p)} == {
        "weight_packed": ("U8", (16, 16)), "weight_scale": ("F8_E4M3", (16, 2)), "weight_global_scale": ("F32", (1,))}
    keys = [p + "weight", "model.layers.1.self_attn.q_proj.weight"]
    mine = read_layer_tensors(Checkpoint.open(src), keys)
    orig = read_layer_tensors(Checkpoint.open(checkpoints["qwen3_moe"]), keys)
    for k in keys:
        assert (mine[k] - orig[k]).abs().max() <= 0.2 * orig[k].abs().max(), k


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_dequantisation_on_the_compute_device_equals_safe_open_and_cpu_decode(fp8, mxfp4, compressed, device):
    """Every quantized format: bytes read with pread and decoded on `device` equal what safe_open
    reads and the same decoder computes on the CPU, bit for bit, for every quantized tensor."""
    from reapsurgery.calibration.dequant import _dequantizer, read_layer_tensors

    cases = {"fp8": fp8["qwen3_moe"], "mxfp4": mxfp4, "int4": compressed[("qwen3_moe", "W4A16")],
             "nvfp4": compressed[("qwen3_moe", "NVFP4A16")], "ct-fp8": compressed[("mixtral", "FP8_DYNAMIC")]}
    for fmt, src in cases.items():
        ckpt = Checkpoint.open(src)
        d = _dequantizer(ckpt)
        keys = [k for k, names in d.sources.items() if len(names) > 1]
        assert len(keys) >= 4, fmt
        got = read_layer_tensors(ckpt, keys, device)
        for k in keys:
            raw = {}
            for n in d.sources[k]:
                with safe_open(src / ckpt.weight_map[n], framework="pt", device="cpu") as f:
                    raw[n] = f.get_tensor(n)
            want = d.make(k, raw)
            assert got[k].device.type == device and got[k].dtype == want.dtype, (fmt, k)
            assert torch.equal(got[k].cpu(), want), (fmt, k)
