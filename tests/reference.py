"""Independent references that tests compare reapsurgery's output against."""

from __future__ import annotations

from pathlib import Path

import torch


def model_class(path: Path):
    """The class config.json names (architectures[0]): the multimodal class for Llama-4, so that
    every tensor of the checkpoint has a place and none is missing."""
    import json

    import transformers

    arch = (json.loads((Path(path) / "config.json").read_text()).get("architectures") or [None])[0]
    return getattr(transformers, arch, None) or transformers.AutoModelForCausalLM


def load(path: Path, quantization_config=None):
    """fp32 model; a quantized checkpoint is loaded with `quantization_config` (e.g. dequantize=True)."""
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    model, info = model_class(path).from_pretrained(path, dtype=torch.float32, output_loading_info=True, **extra)
    # Parameters memory-mapped from a shard sit wherever the file puts them; some CPU kernels
    # (grouped_mm for Granite's experts) round differently by address alignment. Fresh copies
    # make the comparison one of values, as between two models built in memory.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    return model.eval(), info


def decoder_layers(model):
    """The decoder layer list (Llama4ForCausalLM.get_decoder() answers the wrapper itself)."""
    for _, module in model.get_decoder().named_modules():
        if isinstance(getattr(module, "layers", None), torch.nn.ModuleList):
            return module.layers
    raise AssertionError(f"{type(model).__name__} has no layer list")


def pruned_in_memory(src: Path, keep: dict[int, list[int]], n_kept: int, quantization_config=None):
    """The source model loaded normally, with dropped experts removed from its parameters.

    A quantized source is loaded with `quantization_config` (which must dequantise: the
    pruned model is built from the config without quantization and gets the loaded values).

    Independent of reapsurgery's layouts: the expert axis of every parameter is found by
    comparing the shapes of the full model with those of a model built for n_kept experts.
    """
    from transformers import AutoConfig

    full, _ = load(src, quantization_config)
    config = AutoConfig.from_pretrained(src)
    if quantization_config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    text = getattr(config, "text_config", None) or config
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hasattr(text, attr):
            setattr(text, attr, n_kept)
    if hasattr(text, "num_nextn_predict_layers"):
        text.num_nextn_predict_layers = 0
    small = model_class(src)._from_config(config, dtype=torch.float32)
    target = small.state_dict()
    state = {}
    for name, tensor in full.state_dict().items():
        want = target[name].shape
        if tensor.shape != want:
            (axis,) = [i for i, (a, b) in enumerate(zip(tensor.shape, want)) if a != b]
            layer = int(name.split("layers.")[1].split(".")[0])
            tensor = tensor.index_select(axis, torch.tensor(keep[layer]))
        state[name] = tensor
    small.load_state_dict(state, strict=True)
    return small.eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (2, 12), generator=g)
    with torch.no_grad():
        return text_model(model)(input_ids=ids).logits


def text_model(model):
    """What runs text: the model, or a multimodal model's language model. Llama4ForConditionalGeneration's
    text-only forward fails in transformers 5.24 (its output object asks the language model's output
    for 'image_outputs'); without images it only runs that language model, so run it directly."""
    lm = getattr(model, "language_model", None)
    return lm if lm is not None and hasattr(lm, "lm_head") else model
