"""On-disk names in a derived layout (and the MTP block facts no skeleton shows): quantization companions grouped under their weight, layer
and expert numbers located in a name, the on-disk expert axis traced back through the model's
conversion operations, name patterns made from the names a checkpoint stores."""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from typing import Any, Iterable

from ..errors import ReapError


# Quantization companions of a weight (dequant.py reads them with it); the layout is derived
# from the logical names an unquantized checkpoint would have.
_COMPANION_LEAVES = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "weight_global_scale",
                     "weight_scale_2", "input_scale", "activation_scale", "input_global_scale",
                     "input_zero_point", "output_scale")


def logical_names(names: Iterable[str]) -> dict[str, list[str]]:
    """Checkpoint names grouped under the name an unquantized checkpoint would have:
    block-FP8 ``X_scale_inv`` and compressed-tensors/ModelOpt ``weight_scale``... follow their
    weight, ``weight_packed`` is ``weight``, MXFP4 ``X_blocks`` + ``X_scales`` are ``X``."""
    names = set(names)
    out: dict[str, list[str]] = {}
    for name in sorted(names):
        module, _, leaf = name.rpartition(".")
        base = name
        if name.endswith("_scale_inv") and name.removesuffix("_scale_inv") in names:
            base = name.removesuffix("_scale_inv")
        elif name.endswith("_blocks") and name.removesuffix("_blocks") + "_scales" in names:
            base = name.removesuffix("_blocks")
        elif name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" in names:
            base = name.removesuffix("_scales")
        elif leaf == "weight_packed":
            base = f"{module}.weight"
        elif leaf in _COMPANION_LEAVES and ({f"{module}.weight", f"{module}.weight_packed"} & names):
            base = f"{module}.weight"
        out.setdefault(base, []).append(name)
    return out


def split_layer(name: str, layer: int) -> tuple[str, str] | None:
    """(layer prefix pattern with {layer}, the rest) at the first name component equal to `layer`."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == str(layer):
            return ".".join(parts[:i] + ["{layer}"]) + ".", ".".join(parts[i + 1:])
    return None


def expert_axis_on_disk(op, axis: int, name: str, target: str, where: str) -> int | None:
    """The expert axis of checkpoint tensor `name`, from parameter `target`'s through the
    converter's operations (last to first); None when the tensor is one expert's (MergeModulelist)."""
    if op is None:
        return axis
    from transformers.core_model_loading import Chunk, Concatenate, Interleave, MergeModulelist, Split, Transpose

    for step in reversed(op.operations):
        if isinstance(step, MergeModulelist):
            if step.dim == axis:
                return None
        elif isinstance(step, (Concatenate, Chunk, Split, Interleave)) and step.dim != axis:
            continue
        elif isinstance(step, Transpose) and axis not in (step.dim0, step.dim1):
            continue
        elif isinstance(step, Transpose) and not step.check_dims:
            axis = step.dim1 if axis == step.dim0 else step.dim0
            continue
        # Transpose(check_dims) transposes only when the stored shape differs from the parameter's:
        # from names alone the stored axis is undecidable
        raise ReapError(None, f"{where}: checkpoint tensor {name!r} is converted to {target!r} by "
                              f"{type(step).__name__} across its expert axis {axis}; derivation cannot follow it")
    return axis


def expert_prefix(rest: str, op, pattern: str | None, name: str, where: str) -> tuple[str, str]:
    """(per-expert prefix with {expert}, the expert number) of one expert's tensor `rest`
    (its name within the layer)."""
    parts = rest.split(".")
    numeric = [i for i, p in enumerate(parts[:-1]) if p.isdigit()]
    if len(numeric) > 1 and pattern is not None:
        # the converter's source pattern marks the expert number with '*'
        rx = re.escape(pattern).replace(r"\*", r"(\d+)")
        m = re.search(rx, rest)
        if m is not None:
            start = m.start(1)
            numeric = [i for i in numeric if len(".".join(parts[:i])) + (1 if i else 0) == start]
    if len(numeric) != 1:
        raise ReapError(None, f"{where}: cannot tell which number of {name!r} is the expert's")
    i = numeric[0]
    return ".".join(parts[:i] + ["{expert}"]) + ".", parts[i]


def add_role(roles: dict, pattern: str, role: tuple, where: str) -> None:
    if roles.setdefault(pattern, role) != role:
        raise ReapError(None, f"{where}: {pattern!r} is {roles[pattern]} in one layer and {role} in another")


def stacked_patterns(roles: dict, logical: dict[str, list[str]], prefixes: dict[str, int]) -> dict[str, int]:
    """Stacked tensors by name; every tensor directly under one module stacked on the same axis
    becomes ``module.*`` (which also covers their quantization companions, e.g. MXFP4 ``_blocks``)."""
    stacked = {p: a for p, (k, a) in roles.items() if k == "stacked"}
    rx = [re.compile(layer_rx(p)) for p in prefixes]
    siblings: dict[str, set[str]] = {}
    for physical in (n for names in logical.values() for n in names):
        for r in rx:
            m = r.match(physical)
            if m:
                rel = physical[m.end():]
                parent, _, leaf = rel.rpartition(".")
                siblings.setdefault(parent, set()).add(rel)
                break
    out: dict[str, int] = {}
    for parent in sorted({p.rpartition(".")[0] for p in stacked}):
        mine = {p: a for p, a in stacked.items() if p.rpartition(".")[0] == parent}
        axes = set(mine.values())
        if parent and len(axes) == 1 and siblings.get(parent, set()) <= set(mine):
            out[parent + ".*"] = axes.pop()
        else:
            out.update(mine)
    return out


def layer_rx(prefix: str) -> str:
    return re.escape(prefix).replace(re.escape("{layer}"), r"\d+")


def find_mtp_prefixes(unmapped: list[str]) -> list[str]:
    """Prefixes of tensors that load into no parameter and live under an ``mtp`` module."""
    out = set()
    for name in unmapped:
        parts = name.split(".")
        for i, p in enumerate(parts[:-1]):
            if p == "mtp" or p.startswith("mtp_"):
                out.add(".".join(parts[: i + 1]) + ".")
                break
    return sorted(out)


def mtp_block_facts(config: dict) -> dict[str, Any]:
    """mtp_block and mtp_keep from mtp_blocks.json (data: no skeleton shows the MTP block), or {}
    where the table has none."""
    return copy.deepcopy(_family_facts("mtp_blocks.json", config) or {})


def router_rows_facts(config: dict) -> str | None:
    """Where router_rows.json says the family's routers score other experts after the routed ones
    (rows kept, not pruned): the table's reason, read from the family's code; None elsewhere."""
    return _family_facts("router_rows.json", config)


def _family_facts(table_name: str, config: dict) -> Any:
    """A data table's entry for the checkpoint's text model: keyed by its model_type, config.json's
    own (a text-only checkpoint, Qwen3_5MoeForCausalLM's qwen3_5_moe_text), else its text_config's
    (the multimodal wrapper qwen3_5_moe around the same text model)."""
    table = json.loads(resources.files(__package__).joinpath(table_name).read_text())
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for model_type in (config.get("model_type"), text.get("model_type")):
        if isinstance(model_type, str) and not model_type.startswith("_") and model_type in table:
            return table[model_type]
    return None
