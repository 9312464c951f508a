"""Pruning commutes with llama.cpp's converter: convert_hf_to_gguf(apply(mask, ckpt)) and
apply(mask, convert_hf_to_gguf(ckpt)) hold the same tensors, byte for byte, and the same metadata
apart from the keys naming this run (reapsurgery.*). This is what makes a mask measured on the
safetensors release correct for every GGUF of the model.

Runs the real converter (fixtures/gguf_convert.py: from the llama-cpp-python sdist, fetched by CI's
install step); skipped where it is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.gguf_convert import converter_dir, convert
from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.common.mask import load_mask
from reapsurgery.surgery.apply import apply_mask
from tests.gguf_helpers import reader_fields, reader_tensors
from tests.helpers import write_mask

pytestmark = pytest.mark.skipif(converter_dir() is None, reason="llama.cpp's convert_hf_to_gguf.py is not installed "
                                                                "(python fixtures/gguf_convert.py fetch)")

KEEP = [1, 2, 5, 6]  # two per group of four: DeepSeek-V3's group-limited router (n_group 2) runs it
# case -> (family, converter options, mask covers the MTP / NextN layer)
CASES = {
    "qwen3_moe": ("qwen3_moe", [], False),
    "qwen3_moe-q8_0": ("qwen3_moe", ["--outtype", "q8_0"], False),  # quantized by the converter itself
    "mixtral": ("mixtral", [], False),
    "deepseek_v3": ("deepseek_v3", [], False),  # exp_probs_b, group-limited router
    "glm4_moe": ("glm4_moe", [], False),  # NextN block dropped by both
    "glm4_moe-nextn": ("glm4_moe", [], True),  # NextN block kept, pruned by both
    "glm4_moe_lite-nextn": ("glm4_moe_lite", [], True),  # deepseek2 in llama.cpp: exp_probs_b and NextN
    "gpt_oss": ("gpt_oss", [], False),  # expert biases, router bias
    "gpt_oss-mxfp4": ("gpt_oss-mxfp4", [], False),  # MXFP4 experts, written by the converter as ggml MXFP4
    "qwen3_5_moe-fused": ("qwen3_5_moe", ["--fuse-gate-up-exps"], True),  # fused ffn_gate_up_exps, MTP kept
}


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """case -> (mask, convert(ckpt), convert(apply(mask, ckpt))), every conversion in one converter process."""
    root = tmp_path_factory.mktemp("convert")
    jobs, out = [], {}
    sources: dict[tuple, Path] = {}
    for case, (family, options, with_mtp) in CASES.items():
        if family == "gpt_oss-mxfp4":
            from fixtures.quantize import build_gpt_oss_for_mxfp4, to_mxfp4

            src = to_mxfp4(build_gpt_oss_for_mxfp4(root / "mxfp4-src"), root / "mxfp4" / "gpt_oss")
        else:
            src = checkpoints[family]
        ckpt = Checkpoint.open(src)
        layers = ckpt.moe_layers + (ckpt.stored_mtp_layers() if with_mtp else [])
        mask = write_mask(src, {l: KEEP for l in layers}, root / f"{case}.json")
        pruned = root / "pruned" / case / src.name  # the same directory name: the converter names the model after it
        apply_mask(load_mask(mask), mask, src, pruned)
        key = (family, tuple(options))
        if key not in sources:
            sources[key] = root / f"{family}{''.join(options)}.gguf"
            jobs.append([str(src), "--outfile", str(sources[key]), *options])
        jobs.append([str(pruned), "--outfile", str(root / f"{case}-pruned.gguf"), *options])
        out[case] = (mask, sources[key], root / f"{case}-pruned.gguf")
    convert(jobs)
    return out


@pytest.mark.parametrize("case", CASES)
def test_pruning_commutes_with_the_converter(converted, tmp_path, case):
    mask, whole, converted_pruned = converted[case]
    pruned_gguf = tmp_path / "pruned.gguf"
    apply_mask(load_mask(mask), mask, whole, pruned_gguf)
    theirs, ours = reader_tensors(converted_pruned), reader_tensors(pruned_gguf)
    assert list(ours) == list(theirs)  # the same tensors in the same order
    for name in theirs:
        assert ours[name] == theirs[name], name
    theirs_kv = reader_fields(converted_pruned)
    ours_kv = {k: v for k, v in reader_fields(pruned_gguf).items() if not k.startswith("reapsurgery.")}
    assert list(ours_kv) == list(theirs_kv)
    assert ours_kv == theirs_kv
    before = reader_fields(whole)
    arch = before["general.architecture"]
    assert ours_kv[f"{arch}.expert_count"] == len(KEEP) and before[f"{arch}.expert_count"] == 8
