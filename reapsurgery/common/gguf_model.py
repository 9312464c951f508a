"""A GGUF model's MoE facts, derived from the file itself: no table per architecture.

What is expert-indexed follows llama.cpp's tensor naming (the gguf package's MODEL_TENSOR names):
every stacked routed-expert tensor of a block is named `blk.N.<name>_exps.<suffix>` (ffn_gate_exps,
ffn_up_exps, ffn_down_exps, ffn_gate_up_exps, ffn_norm_exps; weights, biases, scales), the router
is `blk.N.ffn_gate_inp` (weight and bias; Gemma-4's `.scale` is per hidden unit) and DeepSeek-V3's
selection bias `blk.N.exp_probs_b`.
Shared experts (`_shexp`) and GroveMoE's chunk experts (`_chexps`) are other words. In every one
of them the expert axis is the slowest (the last ne), and `{arch}.expert_count` says its length:
a shape that disagrees is refused, never guessed around.

Layers: `{arch}.block_count` counts the decoder blocks and, after them, the
`{arch}.nextn_predict_layers` NextN (multi-token-prediction) blocks (llama.cpp's n_layer_all and
n_layer_nextn), so block L is layer L of a safetensors mask, NextN blocks included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..errors import ReapError
from .gguf_file import GGUFFile, constants, read_gguf_set
from .mask import Router

BLOCK = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<base>[^.]+)\.(?P<suffix>.*)$")
ROUTER_SUFFIXES = ("weight", "bias")  # the router's rows; Gemma-4's ffn_gate_inp.scale is [n_embd]
OLD_PER_EXPERT = re.compile(r"^blk\.\d+\.ffn_(?:gate|up|down)\.\d+\.")  # llama.cpp before stacked experts (2024)
# llama.cpp picks a group by the sum of its two best experts (llama-graph.cpp build_moe_ffn: argsort_top_k(.., 2))
MIN_PER_GROUP = 2


class Role(NamedTuple):
    layer: int
    kind: str  # "router" (ffn_gate_inp, exp_probs_b) or "expert" (*_exps)


def router_bases() -> set[str]:
    """The router tensors' names within a block (ffn_gate_inp, exp_probs_b), from the gguf package."""
    c = constants()
    return {c.TENSOR_NAMES[t].removeprefix("blk.{bid}.") for t in (c.MODEL_TENSOR.FFN_GATE_INP,
                                                                     c.MODEL_TENSOR.FFN_EXP_PROBS_B)}


def role_of(name: str, routers: set[str] | None = None) -> Role | None:
    """The expert role of a tensor name (router or stacked experts) with its block; None for any other."""
    m = BLOCK.match(name)
    if not m:
        return None
    base = m["base"]
    if base.endswith("_exps"):  # weight, bias, scale, input_scale: all [..., E]
        return Role(int(m["layer"]), "expert")
    if base in (routers if routers is not None else router_bases()) and m["suffix"] in ROUTER_SUFFIXES:
        return Role(int(m["layer"]), "router")
    return None


@dataclass
class GGUFModel:
    path: Path  # the (first) file given
    parts: list[GGUFFile]
    arch: str
    num_experts: int
    top_k: int
    block_count: int
    nextn: int  # NextN blocks announced (after the decoder blocks)
    hidden_size: int | None
    n_group: int | None
    group_used: int | None
    moe_layers: list[int]  # decoder blocks with routed experts
    stored_mtp_layers: list[int]  # NextN blocks with tensors stored

    @property
    def first(self) -> GGUFFile:
        return self.parts[0]

    @property
    def num_hidden_layers(self) -> int:
        return self.block_count - self.nextn

    def key(self, template: str) -> str:
        return template.format(arch=self.arch)

    def tensors(self):
        """(part, tensor) for every tensor, parts in order."""
        for part in self.parts:
            for t in part.tensors:
                yield part, t

    @classmethod
    def open(cls, path: str | Path) -> "GGUFModel":
        """Read a GGUF file (or split set, by its first part) and derive its MoE facts; refuses a file
        that is not a MoE model reapsurgery can prune, or whose shapes disagree with its metadata."""
        path = Path(path)
        parts = read_gguf_set(path)
        first = parts[0]
        keys = constants().Keys.LLM
        arch = first.arch
        if not isinstance(arch, str) or not arch:
            raise ReapError(path, "GGUF metadata has no general.architecture")
        if first.value(constants().Keys.General.TYPE) == "adapter":
            raise ReapError(path, "is a LoRA adapter (general.type adapter), not a model")

        def key(template: str) -> str:
            return template.format(arch=arch)

        def count(template: str, required: bool = False) -> int | None:
            value = first.value(key(template))
            if value is None and required:
                raise ReapError(path, f"GGUF metadata has no {key(template)}")
            if isinstance(value, list):  # per-layer values (llama.cpp's get_key_or_arr): the largest
                value = max(value, default=0)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ReapError(path, f"{key(template)} is {value!r}, not a count")
            return value

        block_count = count(keys.BLOCK_COUNT, required=True)
        nextn = count(keys.NEXTN_PREDICT_LAYERS) or 0
        if nextn > block_count:
            raise ReapError(path, f"{key(keys.NEXTN_PREDICT_LAYERS)}={nextn} is more than "
                                  f"{key(keys.BLOCK_COUNT)}={block_count}")
        E = count(keys.EXPERT_COUNT) or 0
        routers = router_bases()
        moe: set[int] = set()
        stored_mtp: set[int] = set()
        n = block_count - nextn
        for part in parts:
            for t in part.tensors:
                if OLD_PER_EXPERT.match(t.name):
                    raise ReapError(part.path, f"tensor {t.name!r}: experts stored one tensor each, as llama.cpp wrote "
                                               "them before 2024; convert the model again (stacked *_exps tensors)")
                m = BLOCK.match(t.name)
                if m is None:
                    continue
                layer = int(m["layer"])
                if layer >= block_count:
                    raise ReapError(part.path, f"tensor {t.name!r} is in block {layer}, past "
                                               f"{key(keys.BLOCK_COUNT)}={block_count}")
                if layer >= n:
                    stored_mtp.add(layer)
                role = role_of(t.name, routers)
                if role is None:
                    continue
                if not E:
                    raise ReapError(part.path, f"tensor {t.name!r} is indexed by expert but the metadata has no "
                                               f"{key(keys.EXPERT_COUNT)}")
                if t.ne[-1] != E:
                    raise ReapError(part.path, f"tensor {t.name!r} has shape {list(t.ne)} (ne[0] first): "
                                               f"{key(keys.EXPERT_COUNT)}={E} experts are expected on its last axis")
                if layer < n:
                    moe.add(layer)
        if not E or not moe:
            raise ReapError(path, f"is not a Mixture-of-Experts model: no routed experts "
                                  f"({key(keys.EXPERT_COUNT)} is {first.value(key(keys.EXPERT_COUNT))!r})")
        if first.value(key(keys.EXPERTS_PER_GROUP)) is not None or any(
                (m := BLOCK.match(t.name)) and m["base"].endswith("_chexps") for p in parts for t in p.tensors):
            raise ReapError(path, f"groups of routed experts share chunk experts ({key(keys.EXPERTS_PER_GROUP)}, "
                                  "*_chexps: GroveMoE), so an expert cannot be pruned alone; not supported")
        top_k = count(keys.EXPERT_USED_COUNT, required=True)
        if not 1 <= top_k <= E:
            raise ReapError(path, f"{key(keys.EXPERT_USED_COUNT)}={top_k} is not between 1 and the {E} experts")
        n_group = count(keys.EXPERT_GROUP_COUNT)
        if n_group and E % n_group:
            raise ReapError(path, f"{key(keys.EXPERT_GROUP_COUNT)}={n_group} does not divide the {E} experts")
        return cls(path, parts, arch, E, top_k, block_count, nextn, count(keys.EMBEDDING_LENGTH), n_group,
                   count(keys.EXPERT_GROUP_USED_COUNT), sorted(moe), sorted(stored_mtp))

    def router(self) -> Router:
        keys = constants().Keys.LLM
        return Router(self.num_experts, self.top_k, self.n_group, self.group_used,
                      MIN_PER_GROUP if self.n_group and self.n_group > 1 else 1,
                      (self.key(keys.EXPERT_USED_COUNT), self.key(keys.EXPERT_GROUP_COUNT),
                       self.key(keys.EXPERT_GROUP_USED_COUNT)))

    def fingerprint(self) -> dict:
        """The mask fingerprint's fields this file can tell (architecture and model_type are GGUF's)."""
        return {"architecture": self.arch, "model_type": self.arch, "num_hidden_layers": self.num_hidden_layers,
                "moe_layers": self.moe_layers, "num_experts": self.num_experts, "num_experts_per_tok": self.top_k,
                "n_group": self.n_group, "hidden_size": self.hidden_size}

    def check_model(self, model: dict, path: Path) -> None:
        """Refuse a mask or saliency file of another model, naming the first field that differs. The
        model's name differs between formats (Qwen3MoeForCausalLM / qwen3moe) and top-k and groups are
        checked as feasibility (check_routable), so these must agree: the layer count, the expert count,
        the hidden size (when the file records it: masks made before it was recorded do not), the MoE layers."""
        mine = self.fingerprint()
        for f in ("num_hidden_layers", "num_experts", "hidden_size", "moe_layers"):
            if f == "hidden_size" and (model.get(f) is None or mine[f] is None):
                continue
            if model.get(f) != mine[f]:
                raise ReapError(path, f"does not match {self.path}: {f} is {model.get(f)!r} in this file but "
                                      f"{mine[f]!r} there")


class TensorKinds:
    """What size accounting asks of a layout (common.layouts.Layout), for GGUF names: a tensor's expert
    role, and whether it belongs to a NextN block (block num_hidden_layers and after)."""

    def classify(self, name: str) -> Role | None:
        return role_of(name)

    def is_mtp(self, name: str, num_hidden_layers: int) -> bool:
        m = BLOCK.match(name)
        return m is not None and int(m["layer"]) >= num_hidden_layers
