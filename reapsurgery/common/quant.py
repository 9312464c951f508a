"""Quantization settings that name modules, kept valid through surgery.

Quantized checkpoints list modules that are left unquantized or excluded: `ignore`
(compressed-tensors), `modules_to_not_convert` (transformers' own configs: FP8, MXFP4, ...),
`ignored_layers` (an alias some FP8 exports use), `exclude_modules` (ModelOpt's
`hf_quant_config.json`), and compressed-tensors' `targets`. A name of one specific routed
expert must follow that expert: removed with it when it is dropped, renumbered when it is
kept. Patterns (`re:...`, globs) and names of anything else are left as they are.

Also reports what a checkpoint's quantization is, for `inspect`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..errors import ReapError
from .layouts import Layout, TensorRole

NAME_LIST_KEYS = ("ignore", "modules_to_not_convert", "ignored_layers", "exclude_modules", "targets",
                  "modules_to_convert")
HF_QUANT_CONFIG = "hf_quant_config.json"  # ModelOpt exports
GLOB_CHARS = set("*?[")


def rename_module(name: str, layout: Layout, keep: dict[int, list[int]]) -> str | None:
    """The module name after surgery; None when it names a dropped expert (or something in it)."""
    if not isinstance(name, str) or name.startswith("re:") or GLOB_CHARS & set(name):
        return name
    role = layout.classify(name + ".")
    if role is None or role.kind != "expert" or role.layer not in keep:
        return name
    kept = keep[role.layer]
    if role.expert not in kept:
        return None
    return role.renamed(name + ".", kept.index(role.expert))[:-1]


def rewrite_names(obj: Any, layout: Layout, keep: dict[int, list[int]], path: str = "") -> dict[str, tuple]:
    """Rewrite, in place, every module-name list found under `obj`; returns changes by key path."""
    changes: dict[str, tuple] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            where = f"{path}.{key}" if path else key
            if key in NAME_LIST_KEYS and isinstance(value, list):
                pairs = [(v, rename_module(v, layout, keep)) for v in value]
                new = [n for v, n in pairs if n is not None or v is None]  # a null entry is not a dropped expert
                if new != value:
                    removed = len(value) - len(new)
                    renamed = sum(1 for v, n in pairs if n is not None and n != v)
                    changes[where] = (f"{len(value)} names", f"{len(new)} ({removed} removed, {renamed} renumbered)")
                    obj[key] = new
            else:
                changes.update(rewrite_names(value, layout, keep, where))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            changes.update(rewrite_names(value, layout, keep, f"{path}[{i}]"))
    return changes


def rewrite_quantization_config(config: dict, layout: Layout, keep: dict[int, list[int]]) -> dict[str, tuple]:
    """Rewrite `quantization_config` (top level and in a nested text_config) of config.json in place."""
    changes: dict[str, tuple] = {}
    for prefix, d in (("", config), ("text_config.", config.get("text_config"))):
        if isinstance(d, dict) and isinstance(d.get("quantization_config"), dict):
            changes.update(rewrite_names(d["quantization_config"], layout, keep, prefix + "quantization_config"))
    return changes


def rewrite_hf_quant_config(src: Path, dst: Path, layout: Layout, keep: dict[int, list[int]]) -> set[str]:
    """Write ModelOpt's hf_quant_config.json with its module names rewritten; returns files handled."""
    path = src / HF_QUANT_CONFIG
    if not path.is_file():
        return set()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()  # not ours to judge: copied as it is
    data = copy.deepcopy(data)
    rewrite_names(data, layout, keep)
    (dst / HF_QUANT_CONFIG).write_text(json.dumps(data, indent=2) + "\n")
    return {HF_QUANT_CONFIG}


def router_companion(layout: Layout, name: str, shape: tuple[int, ...], num_experts: int) -> TensorRole | None:
    """The role of a quantized router's companion (`mlp.gate.weight_scale`, `.input_scale`, ...).

    A router is sliced by rows; so is each companion with one row per expert (per-row or
    per-group scales, as NVFP4 exports store them). Per-tensor scalars are copied. A scale
    grid whose rows span several experts (block FP8) cannot follow a row slice: refused.
    """
    module, dot, _ = name.rpartition(".")
    if not dot:
        return None
    for suffix in ("weight",):
        role = layout.classify(f"{module}.{suffix}")
        if role is None or role.kind != "router" or name == f"{module}.{suffix}":
            continue
        if len(shape) >= 1 and shape[0] == role.rows(num_experts) and role.axis == 0:
            return TensorRole(role.layer, "router", axis=0, kept_after=role.kept_after)
        if all(d == 1 for d in shape):
            return None  # per-tensor: the same for every remaining row
        raise ReapError(None, f"tensor {name!r} (shape {list(shape)}) is a quantization companion of the router "
                              f"{module}.{suffix} whose rows do not map one to one onto the {num_experts} experts; "
                              "pruning would need re-quantizing the router")
    return None


def quantization_info(config: dict, src: Path | None = None) -> dict[str, Any] | None:
    """The checkpoint's quantization method and format, from config.json or hf_quant_config.json."""
    for d in (config, config.get("text_config") or {}):
        qc = d.get("quantization_config") if isinstance(d, dict) else None
        if isinstance(qc, dict):
            info: dict[str, Any] = {"method": qc.get("quant_method")}
            for key in ("fmt", "format", "weight_block_size", "quant_algo"):
                if qc.get(key) is not None:
                    info[key] = qc[key]
            return info
    if src is not None and (src / HF_QUANT_CONFIG).is_file():
        try:
            q = json.loads((src / HF_QUANT_CONFIG).read_text()).get("quantization") or {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            q = {}
        return {"method": "modelopt", "quant_algo": q.get("quant_algo")}
    return None
