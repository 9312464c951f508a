"""What a layout entry's fields may hold: checked before a Layout is built, so a malformed
layout file is one message naming the field, not a traceback later."""

from __future__ import annotations

from typing import Any

from ..errors import ReapError


MTP_BLOCK_FIELDS = {"embed_norm", "hidden_norm", "proj", "embed", "head"}
MTP_BLOCK_REQUIRED = {"embed_norm", "hidden_norm", "proj"}
MTP_LOCATION_FIELDS = {"layers", "prefix", "shared"}


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def check_fields(name: str, d: Any) -> None:
    """Types the code relies on, so a malformed layout file is one message, not a traceback later."""
    if not isinstance(d, dict):
        raise ReapError(None, f"a layout is a JSON object, found a {type(d).__name__}")
    prefix = d.get("layer_prefix")
    prefixes = [prefix] if isinstance(prefix, str) else prefix
    if not _strings(prefixes) or not prefixes or not all("{layer}" in p for p in prefixes):
        raise ReapError(None, f"layout {name!r}: layer_prefix must be a string (or list of strings) "
                              "containing {layer}, e.g. \"model.layers.{layer}.\"")
    for key in ("num_experts", "top_k"):
        if not _strings(d.get(key)) or not d.get(key):
            raise ReapError(None, f"layout {name!r}: {key} must be a non-empty list of config key names")
    for key in ("architectures", "experts", "mtp_prefixes"):
        if key in d and not _strings(d[key]):
            raise ReapError(None, f"layout {name!r}: {key} must be a list of strings")
    if any("{expert}" not in p for p in d.get("experts", [])):
        raise ReapError(None, f"layout {name!r}: every experts pattern must contain {{expert}}")
    for key in ("routers", "stacked_experts"):
        v = d.get(key, {})
        if not (isinstance(v, dict) and all(isinstance(a, int) and not isinstance(a, bool) and a >= 0
                                            for a in v.values())):
            raise ReapError(None, f"layout {name!r}: {key} must map tensor patterns to an expert axis (integer)")
    kept = d.get("kept_router_rows", {})
    if not (isinstance(kept, dict) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 and p in d.get("routers", {})
                                           for p, n in kept.items())):
        raise ReapError(None, f"layout {name!r}: kept_router_rows must map router patterns (of routers) to a "
                              "number of rows (a positive integer)")
    for key in ("moe_layers", "groups", "defaults"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ReapError(None, f"layout {name!r}: {key} must be an object")
    if d.get("layer_count") is not None and not isinstance(d["layer_count"], str):
        raise ReapError(None, f"layout {name!r}: layer_count must be a config key name")
    mtp = d.get("mtp_layers")
    if mtp is not None and not (isinstance(mtp, str) or (_strings(mtp) and mtp)):
        raise ReapError(None, f"layout {name!r}: mtp_layers must be a config key name (or a list of them)")


def mtp_block_field(name: str, d: Any) -> dict[str, Any] | None:
    if d is None:
        return None
    if (not isinstance(d, dict) or not MTP_BLOCK_REQUIRED <= set(d)
            or not set(d) <= MTP_BLOCK_FIELDS | MTP_LOCATION_FIELDS
            or ("layers" in d) != ("prefix" in d)
            or ("layers" in d and "{layer}" not in str(d["layers"]))):
        raise ReapError(None, f"layout {name!r}: mtp_block needs {', '.join(sorted(MTP_BLOCK_REQUIRED))} "
                              f"(and may name {', '.join(sorted(MTP_BLOCK_FIELDS - MTP_BLOCK_REQUIRED))}; "
                              "a block outside the layer stack names both layers, with {layer}, and prefix)")
    return dict(d)
