"""GGUF planning facts checked against the gguf package itself: the size label, llama.cpp's naming."""

from __future__ import annotations

import random

import pytest

from reapsurgery.common.gguf_file import read_gguf_set
from reapsurgery.common.gguf_model import role_of
from reapsurgery.surgery.gguf_plan import size_label


def package_label(tensors) -> str:
    """What convert_hf_to_gguf.py writes: GGUFWriter's parameter count of the tensors, then gguf.size_label."""
    import gguf

    w = gguf.GGUFWriter(None, "llama")
    for name, ne in tensors:
        w.tensors[0][name] = gguf.gguf_writer.TensorInfo(shape=tuple(reversed(ne)), dtype=gguf.GGMLQuantizationType.F16,
                                                         nbytes=0)
    return gguf.size_label(*w.get_total_parameter_count())


@pytest.mark.parametrize("name", ["single", "split", "bias", "fused", "nextn"])
def test_size_label_is_the_converters(gguf_files, name):
    tensors = [(t.name, t.ne) for part in read_gguf_set(gguf_files[name]) for t in part.tensors]
    assert size_label(tensors) == package_label(tensors)


def test_size_label_over_random_models():
    """Every magnitude (K, M, B, T), biases, 2-D expert tensors, dense models."""
    rnd = random.Random(0)
    for _ in range(400):
        E = rnd.choice([0, 8, 64, 384])
        tensors = []
        for b in range(rnd.randint(1, 6)):
            H, F = rnd.choice([32, 2048, 7168, 16384]), rnd.choice([16, 768, 2048])
            tensors.append((f"blk.{b}.attn_q.weight", (H, H * rnd.randint(1, 4))))
            if E:
                tensors += [(f"blk.{b}.ffn_gate_exps.weight", (H, F, E)), (f"blk.{b}.ffn_down_exps.weight", (F, H, E)),
                            (f"blk.{b}.ffn_gate_inp.weight", (H, E))]
                if rnd.random() < 0.3:
                    tensors.append((f"blk.{b}.ffn_up_exps.bias", (F, E)))
        tensors.append(("token_embd.weight", (rnd.choice([2048, 7168]), rnd.randint(1000, 300000))))
        assert size_label(tensors) == package_label(tensors), tensors


def test_expert_names_follow_llama_cpps_convention():
    """Every routed-expert tensor the gguf package names is a `_exps` name or the router; shared and chunk
    experts are not: what role_of derives from a name alone."""
    import gguf

    for tensor, template in gguf.TENSOR_NAMES.items():
        if not template.startswith("blk.{bid}."):
            continue
        role = role_of(template.format(bid=3) + ".weight")
        routed = tensor.name.endswith("_EXP") and "SHEXP" not in tensor.name and "CHEXP" not in tensor.name
        assert (role is not None and role.kind == "expert") == routed, template
        if tensor in (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_EXP_PROBS_B):
            assert role is not None and role.kind == "router" and role.layer == 3
