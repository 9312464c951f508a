"""A transformers model on the meta device, filled one decoder layer at a time from the shards.

Everything model-specific comes from transformers: the skeleton (`from_config` on meta),
the checkpoint-to-module conversion (the model's own conversion mapping, applied with the
primitives of `transformers.core_model_loading`), and each layer's inputs (the decoder's own
forward, run with the layers replaced by recording stubs).
"""

from __future__ import annotations

import ctypes
import typing
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key

from ..common.checkpoint import Checkpoint
from ..common.model_map import ConversionMap, auto_class, cannot_build, find_decoder, model_class
from .dequant import logical_keys, read_layer_tensors, strip_quantization
from ..errors import ReapError
from .fused import FusedTarget, check_fused, read_fused, readable, stacks_only
from .dequant import is_quantized
from .shardread import ShardFiles
from .timing import TIMINGS


def build_skeleton(path: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model class the checkpoint names (as layout derivation builds it; a multimodal wrapper
    with its vision tower, of which only the text model runs), every tensor on the meta device.
    Its experts run through transformers' default implementation, as from_pretrained runs them."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        strip_quantization(config)  # built unquantized; quantized layers are dequantised as they are read
        cls = model_class(getattr(config, "architectures", None), trust_remote_code)
        with torch.device("meta"):
            if cls is not None:
                model = cls._from_config(config, dtype=dtype)
            else:
                model = auto_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except ReapError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers' own refusal of the config (no model_type, a bad value)
        raise ReapError(Path(path) / "config.json", cannot_build(e)) from None
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


class StreamedModel:
    """The skeleton plus the knowledge of which checkpoint keys belong to which decoder layer.

    A layer is loaded in two steps: `read_layer(i)` (read, dequantise, convert: touches no
    module, so it runs on a background thread while the previous layer computes) and
    `install_layer(i, tensors)`. A released layer's large tensors are kept in `pool` and
    refilled by the next read of the same shapes, so the memory is neither returned to the OS
    nor faulted in again; at most two layers' weights are alive (the one running, the one read).
    On CUDA, unquantized tensors are read into reused pinned host buffers and copied on a
    side stream; quantized bytes are decoded on the device.
    """

    POOL_MIN_BYTES = 1 << 20

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
        self.ckpt, self.dtype, self.device = ckpt, dtype, device
        self.pool: dict[tuple, list[torch.Tensor]] = {}  # (shape, dtype, device) -> released tensors
        self.staging: dict[tuple, torch.Tensor] = {}  # CUDA: pinned host buffers, reused layer after layer
        self.files = ShardFiles(ckpt)
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
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
        n, layout = ckpt.num_hidden_layers, ckpt.layout
        for key in logical_keys(ckpt):  # a quantized weight's scales are read with it
            # an MTP block stored outside the stack (mtp.*) is placed as the layers past it
            target, _ = self.converter.target(layout.canonical(key, n))
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
        return self.install_layer(i, self.read_layer(i))

    def read_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Decoder layer i's tensors, converted, on the device; safe on a background thread."""
        return self._convert(self.layer_keys[i], f"decoder layer {i}")

    def install_layer(self, i: int, converted: dict[str, torch.Tensor]) -> nn.Module:
        return self.fill_layer(self.layers[i], self.layer_keys[i], i, f"decoder layer {i}", converted=converted)

    def fill_layer(self, layer: nn.Module, keys: list[str], as_layer: int, what: str, rename=None,
                   converted: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Load `keys` (or their `converted` tensors) into `layer`, converted as the tensors of decoder layer `as_layer`."""
        if converted is None:
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
        """Layer i back to meta; its large tensors go to the pool (replacing what the last read left)."""
        pool: dict[tuple, list[torch.Tensor]] = {}
        for t in self.layers[i].parameters():
            t = t.data
            if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes \
                    and t.nbytes >= self.POOL_MIN_BYTES:
                pool.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)
        self.layers[i].to_empty(device="meta")
        self.pool = pool
        _return_freed_memory()

    def _take(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        free = self.pool.get((tuple(shape), dtype, torch.device(device)))
        return free.pop() if free else None

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
            tensors = read_layer_tensors(self.ckpt, keys, self.device, self.files)
            with TIMINGS.phase("convert"):
                converted = self.converter.convert({(rename(k) if rename else k): v for k, v in tensors.items()})
        except KeyError as e:
            raise ReapError(self.ckpt.path, f"{what}: checkpoint tensor {e} has no place in the model") from None
        del tensors
        for name, target in fused.items():
            shape, dt = self.converter.meta[name].shape, self.converter.meta[name].dtype
            if self.device.type == "cpu" or is_quantized(self.ckpt):  # read or decoded where it will live
                converted[name] = read_fused(self.ckpt, target, source_of, dt, shape, device=self.device,
                                             out=self._take(shape, dt, self.device), files=self.files)
            else:  # into a pinned host buffer, then to the device on the side stream
                host = self.staging.get((tuple(shape), dt))
                if host is None:
                    host = self.staging[(tuple(shape), dt)] = torch.empty(shape, dtype=dt, pin_memory=True)
                read_fused(self.ckpt, target, source_of, dt, shape, out=host, files=self.files)
                dev = self._take(shape, dt, self.device)
                dev = torch.empty(shape, dtype=dt, device=self.device) if dev is None else dev
                with TIMINGS.phase("host-to-device"), torch.cuda.stream(self._copy_stream):
                    dev.copy_(host, non_blocking=True)
                    self._copy_stream.synchronize()  # the host buffer is reused by the next tensor of its shape
                converted[name] = dev
            check_fused(self.ckpt, target, source_of, converted[name], self.files)
        self.pool = {}  # what the read did not reuse is freed now, not kept beside two layers
        return {k: v.to(self.device) for k, v in converted.items()}

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

    def layer_inputs(self, batches: list[tuple[torch.Tensor, torch.Tensor]], store: torch.device | None = None
                     ) -> tuple[list[torch.Tensor], list[list], list[torch.Tensor]]:
        """Per batch: layer-0 hidden states, every layer's extra call arguments (`layer_calls`),
        and the flattened mask of real (non-padding) tokens. The embeddings are held only meanwhile.
        `store` (the CPU, for hidden states kept in host memory): where each batch's hidden states and
        call arguments are moved as soon as they are computed, so the device holds one batch's."""
        self.load_outer()
        hidden, calls, masks = [], [], []
        pin = self.device.type == "cuda"
        for ids, am in batches:
            h, c = self.layer_calls(ids.to(self.device), am.to(self.device))
            if store is not None:  # one memo per batch: the layers share their masks and position embeddings
                h, c = moved((h, c), store, pin=pin)
            hidden.append(h)
            calls.append(c)
            masks.append(am.reshape(-1).bool().to(self.device))
        self.release_embeddings()
        return hidden, calls, masks

    @torch.no_grad()
    def layer_calls(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Layer-0 hidden states and the extra (args, kwargs) the decoder passes to each layer.

        Records the model's own embeddings, position embeddings and per-layer masks (some
        families pass a different mask per layer type).
        """
        n = len(self.layers)
        real = self.decoder.layers
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # A layer returns its hidden states; a few also return values that the decoder hands to the
        # next layer's call (GLM-5's shared indexer: top-k indices as prev_topk_indices). Those
        # layers are recorded with their annotated tuple, whose extra outputs become _Carried
        # placeholders in the next call, filled in by `fill_carried` when the layers run.
        arities = list(dict.fromkeys([1, _annotated_arity(real[0])]))
        for attempt, arity in enumerate(arities):
            sink: list = []
            self.decoder.layers = nn.ModuleList(_Recorder(sink, i == n - 1, layer, i, arity) for i, layer in enumerate(real))
            try:
                self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False)
            except _Stop:
                break
            except (TypeError, ValueError):
                if attempt == len(arities) - 1:
                    raise
            finally:
                self.decoder.layers = real
        if len(sink) != n:
            raise RuntimeError(f"decoder called {len(sink)} of {n} layers")
        args0, kwargs0 = sink[0]
        hidden = args0[0] if args0 else kwargs0["hidden_states"]
        calls = [(args[1:], {k: v for k, v in kw.items() if k != "hidden_states"}) for args, kw in sink]
        return hidden, calls


def _return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps mid-sized frees otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for decoder layer `index`: records its call and passes the hidden states on
    (with placeholders for the extra outputs a layer annotated to return `arity` values hands on).

    Attributes the decoder reads off a layer to prepare its call (Nemotron-H picks each block's
    mask by `block_type`) are the real layer's; the real one is not registered as a submodule."""

    def __init__(self, sink: list, last: bool, real: nn.Module, index: int = 0, arity: int = 1):
        super().__init__()
        self.sink, self.last, self.index, self.arity = sink, last, index, arity
        object.__setattr__(self, "_real", real)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)

    def forward(self, *args, **kwargs):
        self.sink.append((args, kwargs))
        if self.last:
            raise _Stop
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.arity == 1:
            return hidden
        return (hidden, *(_Carried(self.index, j) for j in range(1, self.arity)))


@dataclass(frozen=True)
class _Carried:
    """Output `index` of decoder layer `layer`, passed by the decoder into a later layer's call."""

    layer: int
    index: int


def _annotated_arity(layer: nn.Module) -> int:
    """How many values the layer's forward says it returns (a fixed-length tuple), else 1."""
    try:
        hint = typing.get_type_hints(type(layer).forward).get("return")
    except Exception:  # noqa: BLE001 - unresolvable annotations: a plain tensor
        return 1
    args = typing.get_args(hint) if typing.get_origin(hint) is tuple else ()
    return len(args) if len(args) > 1 and Ellipsis not in args else 1


def moved(obj, device: torch.device, pin: bool = False, memo: dict | None = None):
    """`obj` with every tensor inside its tuples, lists and dicts on `device` (other values as they
    are), for hidden states kept in host memory and brought to the device per batch. A tensor met
    twice is moved once. Into host memory with `pin` (the device is CUDA): a pinned copy written
    asynchronously, so a reader on the host must synchronize the device first (the layer loop does);
    to a device: non_blocking, which is safe from pinned and from pageable memory."""
    memo = {} if memo is None else memo

    def go(o):
        if isinstance(o, torch.Tensor):
            if id(o) not in memo:
                if device.type == "cpu" and o.device.type == "cpu":
                    memo[id(o)] = o
                elif device.type == "cpu" and pin:
                    memo[id(o)] = torch.empty(o.shape, dtype=o.dtype, pin_memory=True).copy_(o, non_blocking=True)
                else:
                    memo[id(o)] = o.to(device, non_blocking=True)
            return memo[id(o)]
        if isinstance(o, tuple):
            items = [go(x) for x in o]
            return type(o)(*items) if hasattr(o, "_fields") else tuple(items)
        if isinstance(o, list):
            return [go(x) for x in o]
        if type(o) is dict:
            return {k: go(v) for k, v in o.items()}
        return o

    return go(obj)


def fill_carried(args: tuple, kwargs: dict, previous: int | None, outputs: tuple) -> tuple[tuple, dict]:
    """The recorded call of a layer with the previous layer's extra `outputs` (its tuple past the
    hidden states) in place of their placeholders; `previous` None takes them from whichever
    layer ran last."""

    def fill(v):
        if not isinstance(v, _Carried):
            return v
        if (previous is not None and v.layer != previous) or not 1 <= v.index <= len(outputs):
            raise RuntimeError(f"a layer's call takes output {v.index} of layer {v.layer}, not of the layer before it")
        return outputs[v.index - 1]

    return tuple(fill(a) for a in args), {k: fill(v) for k, v in kwargs.items()}
