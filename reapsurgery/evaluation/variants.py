"""Pruned variants as the checkpoint `apply` would write them, built one layer at a time.

A variant is a mask plus what apply would make of it: its size (inspect's exact accounting
from surgery's byte plan) and its config changes. Its decoder layers are modules of a model
built on the meta device from the checkpoint's config with apply's rewrite of the routed-
expert count, so every module is the one transformers builds for the pruned checkpoint
(router width, expert count, experts per group). A layer is filled from the original
layer's converted tensors sliced along the expert axis by retained index: retained experts
renumbered 0..E'-1 in their original order, which is what apply's byte slicing gives.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..calibration.streaming import StreamedModel, find_decoder
from ..errors import ReapError
from .masks import Variant


def pruned_skeleton(streamed: StreamedModel, variant: Variant, trust_remote_code: bool = False) -> nn.ModuleList:
    """The decoder layers transformers builds for the pruned checkpoint, on the meta device.

    The config is the streamed model's with the routed-expert counts apply rewrites in
    config.json (the same keys, from surgery's plan); the rest of apply's changes (MTP layer
    count, quantization settings) do not shape a decoder layer."""
    config = copy.deepcopy(streamed.model.config)
    keys = set(streamed.ckpt.layout.num_experts_keys)
    for dotted, (_, new) in variant.size["config_changes"].items():
        *path, key = dotted.split(".")
        if key not in keys:
            continue
        target = config
        for part in path:  # a model built from a nested text config holds that config itself
            target = target.get_text_config() if part == "text_config" else getattr(target, part)
        setattr(target, key, new)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=streamed.dtype,
                                                 trust_remote_code=trust_remote_code)
    layers = find_decoder(model.eval()).layers
    if len(layers) != len(streamed.layers):
        raise ReapError(streamed.ckpt.path, f"the pruned config builds {len(layers)} decoder layers, not {len(streamed.layers)}")
    return layers


def fill_pruned(pruned: nn.Module, original: nn.Module, kept: list[int], num_experts: int, what: str) -> nn.Module:
    """Load `pruned` (a meta layer built for len(kept) experts) from the loaded `original` layer.

    A tensor whose shape differs from the original's in exactly one axis, of size E there and
    E' in the pruned module, is sliced there by retained index; every other tensor is shared
    as is. An axis of E + n entries and E' + n (a router that also scores zero-computation, skip or
    shared experts, whose n rows follow the routed experts', as the layout's kept_router_rows says)
    keeps those n rows. Non-persistent buffers (rotary frequencies) are taken from the original layer."""
    source = original.state_dict()
    state = {}
    for name, meta in pruned.state_dict().items():
        t = source.get(name)
        if t is None:
            raise ReapError(None, f"{what}: the pruned module has {name}, the original layer does not")
        if tuple(t.shape) != tuple(meta.shape):
            axes = [a for a, (x, y) in enumerate(zip(t.shape, meta.shape)) if x != y]
            after = t.shape[axes[0]] - num_experts if len(axes) == 1 else -1
            if len(t.shape) != len(meta.shape) or len(axes) != 1 or after < 0 \
                    or meta.shape[axes[0]] != len(kept) + after:
                raise ReapError(None, f"{what}: {name} is {tuple(t.shape)} in the original layer and {tuple(meta.shape)} "
                                      f"for {len(kept)} experts; only an expert axis ({num_experts} -> {len(kept)}) may differ")
            rows = [*kept, *range(num_experts, num_experts + after)]
            t = t.index_select(axes[0], torch.tensor(rows, dtype=torch.long, device=t.device))
        state[name] = t
    pruned.load_state_dict(state, strict=True, assign=True)
    buffers = dict(original.named_buffers())
    for module_name, module in pruned.named_modules():
        for b, value in list(module._buffers.items()):
            if value is not None and value.is_meta:
                full = f"{module_name}.{b}" if module_name else b
                module._buffers[b] = buffers[full]
    return pruned


def release(layer: nn.Module) -> None:
    layer.to_empty(device="meta")


def resident(layers: nn.ModuleList) -> list[int]:
    """Indices of layers holding real (non-meta) tensors."""
    return [i for i, l in enumerate(layers) if any(not t.is_meta for t in [*l.parameters(), *l.buffers()])]
