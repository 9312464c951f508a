"""What config.json may hold, checked before anything is computed or allocated from it.

Every value reapsurgery reads from a config has a JSON type it must have (a layer count is a
positive integer, not `true`, `"3"` or 1e9); and a count the config announces is compared with
what the checkpoint stores before a list, a model or a table is sized by it. A defect is one
ReapError (the caller names config.json), never a traceback, an allocation that the kernel ends,
or a checkpoint read as something it is not (3 stored decoder layers taken for 2 and an MTP layer).
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ReapError


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ints(v: Any, minimum: int = 0) -> bool:
    return isinstance(v, list) and all(_int(x) and x >= minimum for x in v)


def _kind(v: Any) -> str:
    return "null" if v is None else "a boolean" if isinstance(v, bool) else f"{v!r}" if _int(v) else \
        f"a {type(v).__name__}" if not isinstance(v, str) else repr(v)


def check_names(config: dict) -> None:
    """The values that choose the layout (architectures, model_type, the nested text config) and
    the decoder's layer count, before a layout is looked up or derived from them."""
    from .layouts import text_config

    for where, cfg in (("", config), ("text_config.", config.get("text_config"))):
        if cfg is None and where:
            continue
        if not isinstance(cfg, dict):
            raise ReapError(None, f"{where.rstrip('.')} must be an object, found {_kind(cfg)}")
        arch = cfg.get("architectures")
        if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
            raise ReapError(None, f"{where}architectures must be a list of class names, found {_kind(arch)}")
        model_type = cfg.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise ReapError(None, f"{where}model_type must be a string, found {_kind(model_type)}")
    n = text_config(config).get("num_hidden_layers")
    if n is not None:  # absent: a family that names it otherwise (dbrx's n_layers) is derived, or refused
        check_layer_count(n)


def check_layer_count(n: Any) -> None:
    if not _int(n) or n < 1:
        raise ReapError(None, f"num_hidden_layers must be a positive integer, found {_kind(n)}")


def check_layer_bound(n: int, weight_map) -> None:
    """A layer count no stored tensor name reaches is refused before anything is sized by it
    (a skeleton of 10^9 layers on the meta device, a list of every layer). Coarse and layout-free:
    the last layer's number must appear in some name; the layout's exact check comes later."""
    if not weight_map.mentions(rb"(?<![0-9])" + str(n - 1).encode() + rb"(?![0-9])"):
        raise ReapError(None, f"num_hidden_layers is {n}, but none of the checkpoint's {len(weight_map)} tensor "
                              f"names has a layer {n - 1}")


def check_layout_values(cfg: dict, layout) -> None:
    """The values of the config keys `layout` reads (expert and top-k counts, the MoE layer rule,
    router groups, MTP counts) have the types the rules compute with."""
    n = cfg.get("num_hidden_layers")
    check_layer_count(n)

    def bad(key: str, want: str) -> ReapError:
        return ReapError(None, f"{key} must be {want}, found {_kind(cfg.get(key))}")

    for key in (*layout.num_experts_keys, *layout.top_k_keys):
        v = cfg.get(key)
        if v is not None and not ((_int(v) and v >= 0) or (_ints(v) and v)):
            raise bad(key, "a non-negative integer (or a list of them, one per layer)")
    rule, defaults = layout.moe_layer_rule, layout.defaults or {}
    wants = {"list": ("a list of layer indices below num_hidden_layers", lambda v: _ints(v) and all(x < n for x in v)),
             "type_list": (f"a list with one entry per layer ({n})", lambda v: isinstance(v, list) and len(v) == n),
             "first_dense": ("a non-negative integer", lambda v: _int(v) and v >= 0),
             "last_moe": ("a layer index (or -1: the last layer)", lambda v: _int(v) and v >= -1),
             "sparse_step": ("a positive integer", lambda v: _int(v) and v >= 1),
             "dense_list": ("a list of layer indices", lambda v: _ints(v))}
    for field, (want, ok) in wants.items():
        key = rule.get(field)
        value = cfg.get(key) if cfg.get(key) is not None else defaults.get(key)  # as Layout._get reads it
        if value is not None and not ok(value):
            raise bad(key, want)
    groups = layout.groups or {}
    for key in (groups.get("n_group"), groups.get("topk_group")):
        if isinstance(key, str) and cfg.get(key) is not None and not (_int(cfg[key]) and cfg[key] >= 1):
            raise bad(key, "a positive integer")
    for key in layout.mtp_keys:
        if cfg.get(key) is not None and not (_int(cfg[key]) and cfg[key] >= 0):
            raise bad(key, "a non-negative integer")


def at_least(k: int) -> bytes:
    """A regex of the decimal numbers >= k (no leading zeros), to find names past a layer count in
    one scan of the names' bytes."""
    digits = str(k)
    alternatives = [digits] + [digits[:i] + f"[{int(d) + 1}-9]" + r"[0-9]" * (len(digits) - i - 1)
                               for i, d in enumerate(digits) if d != "9"]
    alternatives.append(rf"[1-9][0-9]{{{len(digits)},}}")
    return ("(?:" + "|".join(alternatives) + ")").encode()


def check_stored_layers(cfg: dict, layout, weight_map) -> None:
    """The decoder layers stored are those config.json counts: the last one is stored (unless no
    decoder layer is: an MTP draft directory), and a layer stored past them is one of the family's
    multi-token-prediction layers, never a decoder layer the config leaves out (which apply would
    drop as an MTP block, verify pass and calibrate skip)."""
    n = cfg["num_hidden_layers"]

    def stored(layer: bytes, then: bytes = b"") -> set[int]:
        return {int(next(v for v in m.groups() if v is not None))
                for m in weight_map.starting(layout.prefix_pattern(layer) + then)}

    def any_stored(layer: bytes) -> bool:
        return next(weight_map.starting(layout.prefix_pattern(layer)), None) is not None

    if any_stored(b"0") and not any_stored(str(n - 1).encode()):
        raise ReapError(None, f"num_hidden_layers is {n}, but the checkpoint stores no tensor of decoder layer {n - 1}")
    block = layout.mtp_block or {}
    proj = re.escape(block["proj"].encode()) + rb"\." if block and "layers" not in block else None
    inside = sorted(l for l in stored(rb"[0-9]+", proj) if l < n) if proj else []
    if inside:
        raise ReapError(None, f"num_hidden_layers is {n}, but layer {inside[0]} holds a multi-token-prediction block "
                              f"({block['proj']}): num_hidden_layers must count the decoder layers only")
    past = sorted(stored(at_least(n)))
    if not past:
        return
    count = layout.mtp_count(cfg)
    if not (layout.mtp_keys or block):
        why = f"the {layout.name} family has no multi-token-prediction layers"
    elif "layers" in block:
        why = f"the {layout.name} family stores its multi-token-prediction layers as {block['layers']}*"
    elif block:
        past = [l for l in past if not stored(str(l).encode(), proj)]
        why = f"{'it does' if len(past) == 1 else 'they do'} not hold a multi-token-prediction block ({block['proj']})"
    else:
        past = [l for l in past if l >= n + (count or 0)]
        why = f"{' / '.join(layout.mtp_keys)} counts {count or 0} multi-token-prediction layer(s)"
    if past:
        shown = ", ".join(map(str, past[:8])) + (", ..." if len(past) > 8 else "")
        raise ReapError(None, f"num_hidden_layers is {n}, but the checkpoint also stores layer{'s' if len(past) > 1 else ''} "
                              f"{shown} past them, and {why}: num_hidden_layers must count every decoder layer")
