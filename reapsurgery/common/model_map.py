"""How transformers maps a checkpoint onto a model: the decoder layer list, the conversion
mapping's target parameter for each on-disk name, and which modules are routed experts.

Shared by calibration (which loads tensors through it) and layout derivation (which reads
the model's structure from it); torch and transformers are imported here, so callers that
must stay light import this module inside functions.
"""

from __future__ import annotations

from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from ..errors import ReapError


def model_class(architectures: list[str] | None, trust_remote_code: bool = False):
    """The class a checkpoint names (architectures[0]) when transformers has it, as from_pretrained
    of that class would build: a multimodal wrapper (Qwen3_5MoeForConditionalGeneration,
    Kimi_K25ForConditionalGeneration) has its own tensor names and conversion mapping. None
    otherwise (AutoModelForCausalLM decides)."""
    import transformers

    arch = (architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch and not trust_remote_code else None
    return cls if cls is not None and hasattr(cls, "_from_config") else None


def auto_class(config):
    """Where config.json names no class transformers has: AutoModelForCausalLM, or for a family it
    does not map (Mistral4ForCausalLM and Step3p7ForConditionalGeneration are only in the
    image-text-to-text map) the one that does. Calibration and layout derivation both use it."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if type(config) in AutoModelForCausalLM._model_mapping or type(config) not in AutoModelForImageTextToText._model_mapping:
        return AutoModelForCausalLM
    return AutoModelForImageTextToText


def cannot_build(e: Exception) -> str:
    """Why transformers could not build the model from a config (its own exception, on one line)."""
    import transformers

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"transformers {transformers.__version__} cannot build this model from its config ({type(e).__name__}: {first})"


def find_decoder(model: nn.Module) -> nn.Module:
    """The module holding the decoder layers: `get_decoder()`, or where that returns a wrapper
    without them (Llama4ForCausalLM answers itself), its shallowest submodule with a `layers` list."""
    decoder = model.get_decoder()
    for _, module in decoder.named_modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList):
            return module
    raise ReapError(None, f"{type(model).__name__}: no decoder layer list found")


def is_interface_experts(m: nn.Module) -> bool:
    """Modules wrapped by transformers' use_experts_implementation carry these attributes."""
    return hasattr(m, "has_gate") and hasattr(m, "is_transposed") and hasattr(m, "num_experts")


class ConversionMap:
    """The model's own conversion mapping: which parameter each on-disk tensor name becomes."""

    def __init__(self, model: nn.Module):
        self.model = model
        mapping = get_model_conversion_mapping(model)
        self.renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        self.converters = [t for t in mapping if isinstance(t, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        self.meta = model.state_dict()

    def target(self, key: str) -> tuple[str, str | None]:
        renamed, pattern = rename_source_key(key, self.renamings, self.converters, self.model.base_model_prefix, self.meta)
        if renamed not in self.meta and key in self.meta:
            return key, None
        return renamed, pattern
