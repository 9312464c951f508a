"""Multi-token-prediction (MTP) blocks: calibrating experts that transformers never runs.

DeepSeek-V3 and GLM-4.x store `num_nextn_predict_layers` MTP blocks as layers
num_hidden_layers.. of the checkpoint; Qwen3-Next and Qwen3.5 store theirs under `mtp.*`
(`mtp.layers.{d}` and one `fc` and pair of input norms), read here as if stored as those layers
(`Layout.canonical`). Inference engines (vLLM, SGLang, llama.cpp) run them for speculative
decoding. The block of depth k reads, at position t, the previous depth's hidden
state h (the main model's final-normed output for k = 1, the previous block's output after
that) and the embedding of token t + k:

    x = proj([embed_norm(embed(token[t + k])); hidden_norm(h)])
    out = decoder_layer(x)        # attention and MoE, like a layer of the stack

transformers has no class for it, so its decoder layer is a copy of the stack's last MoE layer
module (same class, same config) filled from the MTP layer's tensors by the model's own
conversion, and its norms are copies of the model's final norm (same class and epsilon).
Positions whose token t + k lies past the sample's end have no input: they run (causal
attention keeps them out of earlier positions) but are not counted.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .dequant import read_layer_tensors
from ..errors import ReapError
from ..common.layout_fields import MTP_BLOCK_REQUIRED
from .preflight import mtp_layers_on_disk
from .streaming import StreamedModel


def mtp_layers(streamed: StreamedModel) -> list[int]:
    """The MTP layers to calibrate, checked: consecutive after the stack, each with routed experts
    and the block modules the layout names."""
    ckpt, layout = streamed.ckpt, streamed.ckpt.layout
    layers = mtp_layers_on_disk(ckpt)
    n = ckpt.num_hidden_layers
    if layers != list(range(n, n + len(layers))):
        raise ReapError(ckpt.path, f"--mtp calibrate: multi-token-prediction layers {layers} do not follow the "
                                   f"{n} decoder layers")
    if len(layers) > 1 and layout.mtp_block.get("prefix"):
        raise ReapError(ckpt.path, f"--mtp calibrate: {len(layers)} multi-token-prediction layers under "
                                   f"{layout.mtp_block['prefix']}*: only one is calibrated yet (no released checkpoint "
                                   "has more, and engines chain such depths through the block's output norm)")
    for i in layers:
        if not any((role := layout.classify(layout.canonical(k, n))) is not None and role.kind == "router"
                   for k in streamed.mtp_keys.get(i, [])):
            raise ReapError(ckpt.path, f"--mtp calibrate: multi-token-prediction layer {i} has no router "
                                       f"matching the {layout.name} layout, so no routed experts to measure")
        found = set(_parts(streamed, i)[1])
        missing = sorted(MTP_BLOCK_REQUIRED - found)
        if missing:
            names = ", ".join(f"{layout.mtp_modules[m]}.weight" for m in missing)
            raise ReapError(ckpt.path, f"--mtp calibrate: multi-token-prediction layer {i} lacks {names}")
    return layers


def _parts(streamed: StreamedModel, i: int) -> tuple[list[str], dict[str, str]]:
    """The MTP layer's decoder-layer keys, and its block modules' weights by role."""
    layout, n = streamed.ckpt.layout, streamed.ckpt.num_hidden_layers
    block, extras = [], {}
    for key in streamed.mtp_keys[i]:
        _, rel = layout.split_layer(layout.canonical(key, n))
        role = next((r for r, m in layout.mtp_modules.items() if rel.startswith(m + ".")), None)
        if role is None:
            block.append(key)
        elif rel == f"{layout.mtp_modules[role]}.weight":
            extras[role] = key
    if i != n and layout.mtp_block.get("prefix"):  # a block outside the stack shares its modules across depths
        extras = {**_parts(streamed, n)[1], **extras}
    return block, extras


class MtpBlock(nn.Module):
    """forward(h, input_ids, *layer_args): h is the previous depth's output (the stack's last
    layer's output, before the final norm, for depth 1)."""

    def __init__(self, layer: nn.Module, embed_norm: nn.Module, hidden_norm: nn.Module, final_norm: nn.Module,
                 proj: torch.Tensor, embed: torch.Tensor, depth: int):
        super().__init__()
        self.layer, self.embed_norm, self.hidden_norm, self.final_norm = layer, embed_norm, hidden_norm, final_norm
        self.proj, self.embed, self.depth = proj, embed, depth

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ahead = torch.zeros_like(input_ids)
        ahead[:, : -self.depth] = input_ids[:, self.depth :]
        e = self.embed_norm(F.embedding(ahead, self.embed))
        x = F.linear(torch.cat([e, self.hidden_norm(self.final_norm(hidden))], dim=-1), self.proj)
        out = self.layer(x, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def counted_positions(attention_mask: torch.Tensor, depth: int) -> torch.Tensor:
    """bool [B*T]: positions of real tokens whose token `depth` ahead is real too."""
    ok = torch.zeros_like(attention_mask, dtype=torch.bool)
    ok[:, : -depth] = attention_mask[:, : -depth].bool() & attention_mask[:, depth:].bool()
    return ok.reshape(-1)


def load_mtp_block(streamed: StreamedModel, i: int, template: int) -> MtpBlock:
    """MTP layer `i` in memory; its decoder layer is built like stack layer `template`."""
    ckpt, layout = streamed.ckpt, streamed.ckpt.layout
    block_keys, extras = _parts(streamed, i)
    layer = copy.deepcopy(streamed.layers[template])  # on meta: structure only
    for m in layer.modules():  # hooks a caller put on the template layer are not the MTP layer's
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    streamed.fill_layer(layer, block_keys, template, f"multi-token-prediction layer {i}",
                        rename=lambda k: layout.with_layer(layout.canonical(k, ckpt.num_hidden_layers), template))
    embed_key = extras.get("embed") or _embedding_key(streamed)
    keys = [extras["embed_norm"], extras["hidden_norm"], extras["proj"], embed_key]
    w = {k: t.to(device=streamed.device, dtype=streamed.dtype) for k, t in read_layer_tensors(ckpt, keys, streamed.device, streamed.files).items()}
    norms = []
    for key in keys[:2]:
        norm = copy.deepcopy(streamed.final_norm())
        norm.weight = nn.Parameter(w[key], requires_grad=False)
        norms.append(norm)
    depth = i - ckpt.num_hidden_layers + 1
    final_norm = copy.deepcopy(streamed.final_norm()) if depth == 1 else nn.Identity()
    return MtpBlock(layer, *norms, final_norm, w[extras["proj"]], w[embed_key], depth)


def _embedding_key(streamed: StreamedModel) -> str:
    """The checkpoint key of the main model's input embeddings."""
    names = {id(m): n for n, m in streamed.model.named_modules()}
    want = names[id(streamed.model.get_input_embeddings())] + ".weight"
    for key in streamed.outer_keys:
        if streamed.converter.target(key)[0] == want:
            return key
    raise ReapError(streamed.ckpt.path, "no input embeddings found for the multi-token-prediction block")
