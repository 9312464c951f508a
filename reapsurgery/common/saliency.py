"""saliency.json: per-expert sufficient statistics (format in docs/DESIGN.md, "Files").

Sums, not ratios, are stored so that runs merge exactly: several datasets, ranks or a
resumed run add up to what one run over all the data would have measured.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import FINGERPRINT_FIELDS, read_json
from ..errors import ReapError
from .mask import check_fingerprint

SALIENCY_FORMAT = "reapsurgery.saliency"
SUM_KEYS = ("count", "gate_sum", "norm_sum", "reap_sum")
MAX_KEYS = ("max_activation",)
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

    def save(self, path: str | Path) -> None:
        """Write atomically, so an interrupted run never leaves a truncated file."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)


def is_saliency_file(path: str | Path) -> bool:
    try:
        with open(path) as f:
            head = f.read(4096)
    except OSError:
        return False
    return SALIENCY_FORMAT in head


def load_saliency(path: str | Path) -> Saliency:
    path = Path(path)
    data = read_json(path, "saliency file")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return parse_saliency(data, path, sha)


def parse_saliency(data: Any, path: Path, sha256: str | None = None) -> Saliency:
    def bad(msg: str) -> ReapError:
        return ReapError(path, msg)

    if not isinstance(data, dict) or data.get("format") != SALIENCY_FORMAT:
        raise bad(f"not a saliency file ('format' should be {SALIENCY_FORMAT!r})")
    if data.get("version") != 1:
        raise bad(f"unsupported saliency version {data.get('version')!r} (this reapsurgery reads version 1)")
    model = data.get("model")
    if not isinstance(model, dict) or any(f not in model for f in FINGERPRINT_FIELDS):
        raise bad("'model' fingerprint missing or incomplete")
    layers_raw = data.get("layers")
    if not isinstance(layers_raw, dict) or not layers_raw:
        raise bad("'layers' missing or empty")
    E = model["num_experts"]
    layers: dict[int, LayerStats] = {}
    for key, entry in layers_raw.items():
        if not (isinstance(key, str) and key.isdigit()) or not isinstance(entry, dict):
            raise bad(f"layer {key!r}: expected a decimal layer index mapping to an object")
        try:
            tokens = int(entry["tokens"])
            lists = {}
            for k in STAT_KEYS:
                values = entry[k]
                if not isinstance(values, list) or len(values) != E:
                    raise bad(f"layer {key}: '{k}' must list {E} values, one per expert")
                lists[k] = [None if v is None else float(v) for v in values]
                if k in SUM_KEYS and any(v is None or not math.isfinite(v) for v in lists[k]):
                    raise bad(f"layer {key}: '{k}' has a missing or non-finite value")
        except KeyError as e:
            raise bad(f"layer {key}: missing statistic {e}") from None
        except (TypeError, ValueError):
            raise bad(f"layer {key}: statistics must be numbers") from None
        layers[int(key)] = LayerStats(tokens, **lists)
    return Saliency(model, data.get("calibration") or {}, layers, list(data.get("dense_layers") or []), sha256)


def merge_saliency(files: list[Saliency], paths: list[Path]) -> Saliency:
    """Sum the statistics of runs on the same model; refuse mismatched fingerprints."""
    first = files[0]
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
