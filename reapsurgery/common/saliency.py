"""saliency.json: per-expert sufficient statistics (format in docs/DESIGN.md, "Files").

Sums, not ratios, are stored so that runs merge exactly: several datasets, ranks or a
resumed run add up to what one run over all the data would have measured.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import json_bytes, layer_key, loads_strict, read_bytes, write_atomic
from ..errors import ReapError
from .mask import check_fingerprint, check_past_stack, versioned_model

SALIENCY_FORMAT = "reapsurgery.saliency"
SUM_KEYS = ("count", "gate_sum", "norm_sum", "reap_sum")
MAX_KEYS = ("max_activation",)
SIGNED_KEYS = ("gate_sum", "reap_sum")  # sums of g (and g * ||f||): g is the router's, any sign
STAT_KEYS = SUM_KEYS + MAX_KEYS


@dataclass
class LayerStats:
    """Statistics of one MoE layer; every list has one entry per expert.

    max_activation is None for an expert never routed (no value was seen).
    """

    tokens: int
    count: list[float]
    gate_sum: list[float]
    norm_sum: list[float]
    reap_sum: list[float]
    max_activation: list[float | None]

    @classmethod
    def zeros(cls, n_experts: int) -> "LayerStats":
        return cls(0, *([0.0] * n_experts for _ in SUM_KEYS), [None] * n_experts)

    @property
    def num_experts(self) -> int:
        return len(self.count)

    def merged(self, other: "LayerStats") -> "LayerStats":
        def mx(a, b):
            return b if a is None else a if b is None else max(a, b)

        return LayerStats(
            self.tokens + other.tokens,
            *([a + b for a, b in zip(getattr(self, k), getattr(other, k))] for k in SUM_KEYS),
            [mx(a, b) for a, b in zip(self.max_activation, other.max_activation)],
        )

    def to_json(self) -> dict:
        return {"tokens": self.tokens, **{k: getattr(self, k) for k in STAT_KEYS}}


@dataclass
class Saliency:
    model: dict
    calibration: dict
    layers: dict[int, LayerStats]
    dense_layers: list[int] = field(default_factory=list)
    sha256: str | None = None

    @property
    def mtp_layers(self) -> list[int]:
        """Layers past the decoder stack: multi-token-prediction blocks (calibrate --mtp calibrate)."""
        return sorted(l for l in self.layers if l >= self.model["num_hidden_layers"])

    def to_json(self) -> dict:
        return {
            "format": SALIENCY_FORMAT,
            "version": 1,
            "model": self.model,
            "calibration": self.calibration,
            "dense_layers": self.dense_layers,
            "layers": {str(k): v.to_json() for k, v in sorted(self.layers.items())},
        }

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write atomically, so an interrupted run never leaves a truncated file."""
        write_atomic(path, json_bytes(self.to_json(), path, indent=1), overwrite)


def load_saliency(path: str | Path) -> Saliency:
    raw = read_bytes(path, "saliency file")
    return parse_saliency(loads_strict(raw, path, "saliency file"), Path(path), hashlib.sha256(raw).hexdigest())


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_saliency(data: Any, path: Path, sha256: str | None = None) -> Saliency:
    def bad(msg: str) -> ReapError:
        return ReapError(path, msg)

    if not isinstance(data, dict) or data.get("format") != SALIENCY_FORMAT:
        raise bad(f"not a saliency file ('format' should be {SALIENCY_FORMAT!r})")
    model = versioned_model(data, "saliency", bad)
    layers_raw = data.get("layers")
    if not isinstance(layers_raw, dict) or not layers_raw:
        raise bad("'layers' missing or empty")
    E = model["num_experts"]
    layers: dict[int, LayerStats] = {}
    for key, entry in layers_raw.items():
        layer = layer_key(key)
        if layer is None or not isinstance(entry, dict):
            raise bad(f"layer {key!r}: expected a decimal layer index (digits 0-9, no leading zeros) "
                      "mapping to an object")
        missing = [k for k in ("tokens", *STAT_KEYS) if k not in entry]
        if missing:
            raise bad(f"layer {key}: missing statistic {missing[0]!r}")
        tokens = entry["tokens"]
        if not (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0):
            raise bad(f"layer {key}: 'tokens' must be a non-negative integer, got {tokens!r}")
        lists = {}
        for k in STAT_KEYS:
            values = entry[k]
            if not isinstance(values, list) or len(values) != E:
                raise bad(f"layer {key}: '{k}' must list {E} values, one per expert")
            is_max = k in MAX_KEYS  # None: never routed; an output's maximum may be negative
            signed = k in SIGNED_KEYS  # a gate may be negative (Gemma-4's per-expert scale)
            for e, v in enumerate(values):
                if is_max and (v is None or _number(v)):
                    continue
                if not _number(v) or (v < 0 and not signed):
                    raise bad(f"layer {key}: '{k}' of expert {e} is {v!r}; "
                              + ("expected a finite number or null" if is_max else
                                 "sums are finite numbers" if signed else "counts and norm sums are finite, "
                                 "non-negative numbers"))
            lists[k] = [None if v is None else float(v) for v in values]
        layers[layer] = LayerStats(tokens, **lists)
    check_past_stack(layers, model, bad)
    calibration = data.get("calibration") or {}
    dense = data.get("dense_layers") or []
    if not isinstance(calibration, dict) or not isinstance(dense, list):
        raise bad("'calibration' must be an object and 'dense_layers' a list")
    for key in ("samples", "tokens"):  # summed by merge-saliency
        value = calibration.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise bad(f"calibration {key!r} must be a non-negative integer, got {value!r}")
    return Saliency(model, calibration, layers, list(dense), sha256)


def merge_saliency(files: list[Saliency], paths: list[Path]) -> Saliency:
    """Sum the statistics of runs on the same model; refuse mismatched fingerprints."""
    first = files[0]
    seen: dict[str | None, Path] = {}
    for s, p in zip(files, paths):
        if s.sha256 is not None and s.sha256 in seen:
            raise ReapError(p, f"has the same contents as {seen[s.sha256]}; merging a run twice would "
                               "count its statistics twice")
        seen[s.sha256] = p
    for s, p in zip(files[1:], paths[1:]):
        check_fingerprint(s.model, first.model, p, paths[0])
        if set(s.layers) != set(first.layers):
            raise ReapError(p, f"covers MoE layers {sorted(s.layers)}, {paths[0]} covers {sorted(first.layers)}")
    layers = {}
    for layer in first.layers:
        acc = first.layers[layer]
        for s in files[1:]:
            acc = acc.merged(s.layers[layer])
        layers[layer] = acc
    calibration = {
        "merged_from": [dict(s.calibration, sha256=s.sha256) for s in files],
        "samples": sum(int(s.calibration.get("samples") or 0) for s in files),
        "tokens": sum(int(s.calibration.get("tokens") or 0) for s in files),
    }
    return Saliency(first.model, calibration, layers, first.dense_layers)
