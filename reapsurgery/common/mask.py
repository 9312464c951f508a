"""mask.json: which routed experts each MoE layer keeps (format in docs/DESIGN.md, "Files").

Users write masks by hand, so every defect gets a precise message.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .checkpoint import FINGERPRINT_FIELDS, OPTIONAL_FINGERPRINT_FIELDS
from .files import json_bytes, layer_key, read_bytes, loads_strict, write_atomic
from ..errors import ReapError

MASK_FORMAT = "reapsurgery.mask"


@dataclass(frozen=True)
class Mask:
    model: dict
    layers: dict[int, list[int]]  # layer -> ascending retained original indices
    provenance: dict
    sha256: str | None = None

    @property
    def kept(self) -> int:
        return len(next(iter(self.layers.values()))) if self.layers else 0

    def to_json(self) -> dict:
        return {
            "format": MASK_FORMAT,
            "version": 1,
            "model": self.model,
            "layers": {str(k): v for k, v in sorted(self.layers.items())},
            "provenance": self.provenance,
        }

    def encode(self, path: str | Path | None = None) -> bytes:
        """The bytes of its file (what `sha256` is of): strict JSON."""
        return json_bytes(self.to_json(), path)

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        write_atomic(path, self.encode(path), overwrite)


def load_mask(path: str | Path) -> Mask:
    raw = read_bytes(path, "mask file")
    return parse_mask(loads_strict(raw, path, "mask file"), Path(path), hashlib.sha256(raw).hexdigest())


def _count(x, minimum: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def versioned_model(data: dict, what: str, bad: Callable[[str], ReapError]) -> dict:
    """A mask's or saliency file's version (1) and its model fingerprint, checked alike."""
    if data.get("version") != 1:
        raise bad(f"unsupported {what} version {data.get('version')!r} (this reapsurgery reads version 1)")
    model = data.get("model")
    if not isinstance(model, dict):
        raise bad("'model' fingerprint missing or not an object")
    problem = fingerprint_problem(model)
    if problem:
        raise bad(problem)
    return model


def fingerprint_problem(model: dict) -> str | None:
    """Why a file's 'model' fingerprint cannot describe a MoE model, or None."""
    missing = [f for f in FINGERPRINT_FIELDS if f not in model]
    if missing:
        return f"'model' fingerprint lacks {', '.join(missing)}"
    for name in ("architecture", "model_type"):
        if model[name] is not None and not isinstance(model[name], str):
            return f"'model' {name} {model[name]!r} is not a string"
    E, k, n = model["num_experts"], model["num_experts_per_tok"], model["num_hidden_layers"]
    if not _count(n, 1):
        return f"'model' num_hidden_layers {n!r} is not a positive integer"
    if not _count(E, 1):
        return f"'model' num_experts {E!r} is not a positive integer"
    if not _count(k, 1) or k > E:
        return f"'model' num_experts_per_tok {k!r} is not an integer between 1 and num_experts={E}"
    layers = model["moe_layers"]
    if not isinstance(layers, list) or not all(_count(l) and l < n for l in layers) or layers != sorted(set(layers)):
        return f"'model' moe_layers {layers!r} is not an ascending list of layers below num_hidden_layers={n}"
    g = model["n_group"]
    if g is not None and (not _count(g, 1) or E % g):
        return f"'model' n_group {g!r} is not a positive integer dividing num_experts={E}"
    h = model.get("hidden_size")
    if h is not None and not _count(h, 1):
        return f"'model' hidden_size {h!r} is not a positive integer"
    return None


def check_past_stack(layers: Iterable[int], model: dict, bad: Callable[[str], ReapError]) -> None:
    """Layers past the decoder stack (num_hidden_layers on) are multi-token-prediction layers: numbered
    from num_hidden_layers without a gap, and only in a family that has them."""
    from .layouts import builtin_layout_for

    n = model["num_hidden_layers"]
    past = sorted(l for l in layers if l >= n)
    if not past:
        return
    if past != list(range(n, n + len(past))):
        raise bad(f"layers {past[:8]} are past the {n} decoder layers, and multi-token-prediction layers are "
                  f"numbered from {n} on, without a gap")
    layout = builtin_layout_for({"model_type": model["model_type"], "architectures": [model["architecture"]]})
    if layout is not None and not (layout.mtp_keys or layout.mtp_block):
        raise bad(f"layers {past[:8]} are past the {n} decoder layers, and the {layout.name} family has no "
                  "multi-token-prediction layers")


def parse_mask(data: Any, path: Path, sha256: str | None = None) -> Mask:
    def bad(msg: str) -> ReapError:
        return ReapError(path, msg)

    if not isinstance(data, dict):
        raise bad("mask is not a JSON object")
    if data.get("format") != MASK_FORMAT:
        raise bad(f"'format' is {data.get('format')!r}, expected {MASK_FORMAT!r}")
    model = versioned_model(data, "mask", bad)
    layers = data.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise bad("'layers' missing or empty: expected {\"<layer>\": [retained expert indices]}")
    E = model["num_experts"]
    parsed: dict[int, list[int]] = {}
    for key, kept in layers.items():
        layer = layer_key(key)
        if layer is None:
            raise bad(f"layer key {key!r} is not a decimal layer index (digits 0-9, no leading zeros)")
        where = f"layer {key}"
        if not isinstance(kept, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in kept):
            raise bad(f"{where}: expected a list of integer expert indices")
        if not kept:
            raise bad(f"{where}: keeps no experts")
        if kept != sorted(set(kept)):
            raise bad(f"{where}: indices must be ascending and unique, got {kept}")
        if kept[0] < 0 or kept[-1] >= E:
            raise bad(f"{where}: expert index {kept[-1] if kept[-1] >= E else kept[0]} is out of range 0..{E - 1}")
        parsed[layer] = kept
    check_past_stack(parsed, model, bad)
    counts = {len(v) for v in parsed.values()}
    if len(counts) != 1:
        sizes = ", ".join(f"{k}:{len(v)}" for k, v in sorted(parsed.items()))
        raise bad(f"every layer must keep the same number of experts, got {sizes}")
    provenance = data.get("provenance") or {}
    return Mask(model, parsed, provenance if isinstance(provenance, dict) else {}, sha256)


def check_fingerprint(expected: dict, actual: dict, path: Path, against: Path) -> None:
    """Refuse a file measured on a different model, naming the first field that differs (an optional
    field only where both record it: files written before it was recorded lack it)."""
    optional = [f for f in OPTIONAL_FINGERPRINT_FIELDS if expected.get(f) is not None and actual.get(f) is not None]
    for f in (*FINGERPRINT_FIELDS, *optional):
        if expected.get(f) != actual.get(f):
            raise ReapError(
                path,
                f"does not match {against}: {f} is {expected.get(f)!r} in this file "
                f"but {actual.get(f)!r} there",
            )


@dataclass(frozen=True)
class Router:
    """What a mask must leave the router to run: top-k and the groups of a group-limited router, with
    the names the file gives them (config.json keys, or GGUF metadata keys) for the messages."""

    num_experts: int
    top_k: int
    n_group: int | None = None
    topk_group: int | None = None  # groups a token may use; None: all of them
    min_per_group: int = 1  # experts the router needs in each group (it scores a group by its best few)
    names: tuple[str, str, str] = ("num_experts_per_tok", "n_group", "topk_group")


def check_routable(mask: Mask, mask_path: Path, router: Router) -> None:
    """Refuse a mask that leaves fewer experts than top-k, unequal groups, too few experts per group,
    or fewer reachable through the groups a token may use than top-k: one rule for every format."""
    top_k_name, group_name, used_name = router.names
    if mask.kept < router.top_k:
        raise ReapError(mask_path, f"keeps {mask.kept} experts per layer but the model routes each token to "
                                   f"{top_k_name}={router.top_k}")
    n_group = router.n_group
    if not n_group or n_group <= 1:
        return
    size = router.num_experts // n_group
    per_group = mask.kept // n_group
    for layer, keep in mask.layers.items():
        counts = [sum(1 for e in keep if e // size == g) for g in range(n_group)]
        if len(set(counts)) != 1:
            raise ReapError(mask_path, f"layer {layer}: the router groups experts into {group_name}={n_group} groups "
                                       f"and every group must keep the same number; kept per group: {counts}")
    if per_group < router.min_per_group:
        raise ReapError(mask_path, f"keeps {per_group} experts per group; this router needs at least "
                                   f"{router.min_per_group} per group")
    topk_group = router.topk_group or n_group
    if topk_group * per_group < router.top_k:
        raise ReapError(mask_path, f"only {topk_group * per_group} experts are reachable through {used_name}={topk_group} "
                                   f"groups, fewer than {top_k_name}={router.top_k}")


def kept_mtp_layers(on_disk: set[int], mask: Mask, mask_path: Path) -> set[int]:
    """MTP layers (past the stack) with routed experts that the mask covers: all of them or none."""
    covered = on_disk & set(mask.layers)
    if covered and covered != on_disk:
        raise ReapError(mask_path, f"the mask covers multi-token-prediction layers {sorted(covered)} but not "
                                   f"{sorted(on_disk - covered)}; they are kept or dropped together")
    return covered
