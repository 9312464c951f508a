"""A transformers model on the meta device, filled one decoder layer at a time from the shards.

Everything model-specific comes from transformers: the skeleton (`from_config` on meta),
the checkpoint-to-module conversion (the model's own conversion mapping, applied with the
primitives of `transformers.core_model_loading`), and each layer's inputs (the decoder's own
forward, run with the layers replaced by recording stubs).
"""

from __future__ import annotations

import ctypes
from copy import deepcopy
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key

from ..common.checkpoint import Checkpoint
from ..common.model_map import ConversionMap, find_decoder, model_class
from .dequant import logical_keys, read_layer_tensors, strip_quantization
from ..errors import ReapError
from .fused import FusedTarget, read_fused, readable, stacks_only
from .observe import IMPL_NAME


def build_skeleton(path: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model class the checkpoint names (as layout derivation builds it; a multimodal wrapper
    with its vision tower, of which only the text model runs), every tensor on the meta device."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    strip_quantization(config)  # built unquantized; quantized layers are dequantised as they are read
    config._experts_implementation = IMPL_NAME  # recurses into sub-configs
    cls = model_class(getattr(config, "architectures", None), trust_remote_code)
    with torch.device("meta"):
        if cls is not None:
            model = cls._from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


class LayoutConverter(ConversionMap):
    """Converts any subset of checkpoint tensors to the model's parameter layout.

    Mirrors the rename/collect/convert steps of transformers' own loading
    (`convert_and_load_state_dict_in_model`) but returns tensors instead of setting them.
    Keys are sorted with transformers' `dot_natural_key` before stacking, as it does, so an
    expert's slot in a fused tensor is the same as when transformers loads the checkpoint.
    """

    def split_fused(self, keys: list[str]) -> tuple[dict[str, FusedTarget], list[str]]:
        """Targets that only stack (and concatenate) per-expert tensors, for `fused.read_fused`,
        with their keys in transformers' order; and the other keys."""
        fused: dict[str, FusedTarget] = {}
        rest = []
        for key in sorted(keys, key=dot_natural_key):
            target, pattern = self.target(key)
            converter = self.by_pattern.get(pattern) if pattern is not None else None
            if converter is None or target not in self.meta or not stacks_only(converter):
                rest.append(key)
                continue
            fused.setdefault(target, FusedTarget(target, converter)).keys.setdefault(pattern, []).append(key)
        return fused, rest

    def convert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        groups: dict[str, WeightRenaming | WeightConverter] = {}
        for key in sorted(tensors, key=dot_natural_key):
            target, pattern = self.target(key)
            if target not in self.meta:
                raise KeyError(key)
            if pattern is None:
                transform = groups.setdefault(target, WeightRenaming(key, target))
                pattern = key
            else:
                transform = groups.setdefault(target, deepcopy(self.by_pattern[pattern]))
            transform.add_tensor(target, key, pattern, (lambda t=tensors[key]: t))
        out = {}
        for first, transform in groups.items():
            for name, value in transform.convert(first, model=self.model, config=self.model.config).items():
                value = value[0] if isinstance(value, list) else value
                out[name] = value.to(self.meta[name].dtype)
        return out


def read_tensors(ckpt: Checkpoint, keys: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Only the named tensors, shard by shard."""
    by_shard: dict[str, list[str]] = {}
    for k in keys:
        by_shard.setdefault(ckpt.weight_map[k], []).append(k)
    out = {}
    for shard, names in by_shard.items():
        with safe_open(ckpt.path / shard, framework="pt", device=str(device)) as f:
            for k in names:
                out[k] = f.get_tensor(k)
    return out


class StreamedModel:
    """The skeleton plus the knowledge of which checkpoint keys belong to which decoder layer."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
        self.ckpt, self.dtype, self.device = ckpt, dtype, device
        self.model = build_skeleton(ckpt.path, dtype, trust_remote_code)
        self.converter = LayoutConverter(self.model)
        self.decoder = find_decoder(self.model)
        self.layers = self.decoder.layers
        names = {id(m): n for n, m in self.model.named_modules()}
        decoder_prefix = names[id(self.decoder)] + "." if names[id(self.decoder)] else ""
        self.layers_prefix = names[id(self.layers)] + "."
        self.layer_keys: dict[int, list[str]] = {i: [] for i in range(len(self.layers))}
        self.outer_keys: list[str] = []
        self.mtp_keys: dict[int, list[str]] = {}  # layers past the stack: multi-token-prediction blocks
        for key in logical_keys(ckpt):  # a quantized weight's scales are read with it
            target, _ = self.converter.target(key)
            if target.startswith(self.layers_prefix):
                i = int(target[len(self.layers_prefix):].split(".")[0])
                if i in self.layer_keys:
                    self.layer_keys[i].append(key)
                else:  # layers past the stack (MTP) are not run by transformers
                    self.mtp_keys.setdefault(i, []).append(key)
            elif target.startswith(decoder_prefix) and target in self.converter.meta:
                self.outer_keys.append(key)

    def load_outer(self) -> None:
        """Embeddings, final norm and rotary buffers: everything of the decoder but its layers."""
        converted = self._convert(self.outer_keys, "embeddings")
        for name, t in converted.items():
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(t, requires_grad=False)
            else:
                module._buffers[attr] = t
        for child in self.decoder.children():
            if child is not self.layers:
                self._init_nonpersistent_buffers(child)

    def load_layer(self, i: int) -> nn.Module:
        return self.fill_layer(self.layers[i], self.layer_keys[i], i, f"decoder layer {i}")

    def fill_layer(self, layer: nn.Module, keys: list[str], as_layer: int, what: str, rename=None) -> nn.Module:
        """Load `keys` into `layer`, converted as the tensors of decoder layer `as_layer`."""
        converted = self._convert(keys, what, rename)
        prefix = f"{self.layers_prefix}{as_layer}."
        local = {k[len(prefix):]: v for k, v in converted.items()}
        try:
            layer.load_state_dict(local, strict=True, assign=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise ReapError(self.ckpt.path, f"{what} does not match the model class: {first}") from None
        self._init_nonpersistent_buffers(layer)
        return layer

    def final_norm(self) -> nn.Module:
        """The decoder's last norm (loaded with the embeddings, kept for the whole run)."""
        norm = getattr(self.decoder, "norm", None)
        if not isinstance(norm, nn.Module):
            raise ReapError(self.ckpt.path, f"{type(self.decoder).__name__} has no final norm")
        return norm

    def release_layer(self, i: int) -> None:
        self.layers[i].to_empty(device="meta")
        _return_freed_memory()

    def release_embeddings(self) -> None:
        """Once every batch's layer-0 inputs are recorded, the embeddings are not needed."""
        self.model.get_input_embeddings().to_empty(device="meta")
        _return_freed_memory()

    def resident_layers(self) -> list[int]:
        return [i for i, l in enumerate(self.layers) if any(not t.is_meta for t in [*l.parameters(), *l.buffers()])]

    def _convert(self, keys: list[str], what: str, rename=None) -> dict[str, torch.Tensor]:
        """Read, dequantise and convert `keys`; `rename` maps a key to the name it converts as."""
        source_of = {(rename(k) if rename else k): k for k in keys}  # name as converted -> checkpoint key
        fused, _ = self.converter.split_fused([n for n, k in source_of.items() if readable(self.ckpt, k)])
        direct = {n for t in fused.values() for names in t.keys.values() for n in names}
        keys = [k for n, k in source_of.items() if n not in direct]
        try:
            tensors = read_layer_tensors(self.ckpt, keys)
            converted = self.converter.convert({(rename(k) if rename else k): v for k, v in tensors.items()})
        except KeyError as e:
            raise ReapError(self.ckpt.path, f"{what}: checkpoint tensor {e} has no place in the model") from None
        del tensors
        for name, target in fused.items():
            converted[name] = read_fused(self.ckpt, target, source_of, self.converter.meta[name].dtype,
                                         self.converter.meta[name].shape)
        # Tensors that were only renamed still view the shard's memory map; copy them so the
        # mapping (and every page the layer touched) goes away once the layer is converted.
        return {k: (v.clone() if _is_file_backed(v) and v.device == self.device else v.to(self.device))
                for k, v in converted.items()}

    def _init_nonpersistent_buffers(self, root: nn.Module) -> None:
        """Buffers absent from checkpoints (rotary inv_freq) are recomputed as from_pretrained does."""
        for module in root.modules():
            meta = [n for n, b in module.named_buffers(recurse=False)
                    if n in module._non_persistent_buffers_set and b.is_meta]
            if not meta:
                continue
            for n in meta:
                module._buffers[n] = torch.empty_like(module._buffers[n], device=self.device)
            # _init_weights also re-initialises the module's loaded tensors (Gemma-4's scaled embedding
            # holds embed_scale beside its weight): they sit on meta meanwhile, where init does nothing
            loaded = {}
            for store in (module._parameters, module._buffers):
                for n, t in store.items():
                    if t is not None and n not in meta and not t.is_meta:
                        loaded[n] = (store, t)
                        store[n] = torch.empty_like(t, device="meta") if store is module._buffers else \
                            nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
            self.model._init_weights(module)
            for n, (store, t) in loaded.items():
                store[n] = t

    @torch.no_grad()
    def layer_calls(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Layer-0 hidden states and the extra (args, kwargs) the decoder passes to each layer.

        Records the model's own embeddings, position embeddings and per-layer masks (some
        families pass a different mask per layer type).
        """
        sink: list = []
        n = len(self.layers)
        real = self.decoder.layers
        self.decoder.layers = nn.ModuleList(_Recorder(sink, i == n - 1) for i in range(n))
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        try:
            self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        except _Stop:
            pass
        finally:
            self.decoder.layers = real
        if len(sink) != n:
            raise RuntimeError(f"decoder called {len(sink)} of {n} layers")
        args0, kwargs0 = sink[0]
        hidden = args0[0] if args0 else kwargs0["hidden_states"]
        calls = [(args[1:], {k: v for k, v in kw.items() if k != "hidden_states"}) for args, kw in sink]
        return hidden, calls


def _is_file_backed(t: torch.Tensor) -> bool:
    """True for tensors whose storage is a safetensors memory map (not allocated by torch)."""
    return not t.untyped_storage().resizable()


def _return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps mid-sized frees otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    def __init__(self, sink: list, last: bool):
        super().__init__()
        self.sink, self.last = sink, last

    def forward(self, *args, **kwargs):
        self.sink.append((args, kwargs))
        if self.last:
            raise _Stop
        return args[0] if args else kwargs["hidden_states"]
