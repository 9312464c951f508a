"""Per-family MoE layouts, kept as data in layouts.json, and what they say about a config.

A layout names the config keys that count routed experts and experts per token,
which decoder layers are MoE, and the tensor-name patterns of routers, per-expert
tensors and stacked expert tensors with their expert axis. Adding a family means
adding an entry, not code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .errors import ReapError


@dataclass(frozen=True)
class TensorRole:
    """What a tensor of an MoE layer is to surgery."""

    layer: int
    kind: str  # "expert" (one expert's tensor), "stacked" ([.., E, ..] expert tensor), "router"
    expert: int | None = None  # for "expert"
    axis: int = 0  # expert axis, for "stacked" and "router"
    span: tuple[int, int] | None = None  # where the expert number sits in the name, for "expert"

    def renamed(self, name: str, new_expert: int) -> str:
        assert self.span is not None
        return name[: self.span[0]] + str(new_expert) + name[self.span[1] :]


def _pattern(text: str) -> str:
    out = re.escape(text)
    out = out.replace(re.escape("{layer}"), r"(?P<layer>\d+)")
    out = out.replace(re.escape("{expert}"), r"(?P<expert>\d+)")
    return out.replace(re.escape("*"), r"[^.]+")


@dataclass(frozen=True, eq=False)
class Layout:
    name: str
    architectures: tuple[str, ...]
    num_experts_keys: tuple[str, ...]
    top_k_keys: tuple[str, ...]
    moe_layer_rule: dict[str, str]
    layer_prefix: str
    routers: dict[str, int]
    experts: tuple[str, ...]
    stacked: dict[str, int]
    groups: dict[str, Any] | None
    mtp_key: str | None

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> "Layout":
        try:
            return cls(
                name=name,
                architectures=tuple(d.get("architectures", ())),
                num_experts_keys=tuple(d["num_experts"]),
                top_k_keys=tuple(d["top_k"]),
                moe_layer_rule=dict(d.get("moe_layers", {})),
                layer_prefix=d["layer_prefix"],
                routers=dict(d.get("routers", {})),
                experts=tuple(d.get("experts", ())),
                stacked=dict(d.get("stacked_experts", {})),
                groups=d.get("groups"),
                mtp_key=d.get("mtp_layers"),
            )
        except (KeyError, TypeError) as e:
            raise ReapError(None, f"layout {name!r} is missing or malforms field {e}") from None

    def __post_init__(self) -> None:
        prefix = _pattern(self.layer_prefix)
        object.__setattr__(self, "_regexes", (
            re.compile(prefix),
            [re.compile(prefix + _pattern(p)) for p in self.experts],
            [(re.compile(prefix + _pattern(p)), a) for p, a in self.stacked.items()],
            [(re.compile(prefix + _pattern(p)), a) for p, a in self.routers.items()],
        ))

    # -- tensor names -------------------------------------------------------

    def layer_of(self, name: str) -> int | None:
        m = self._regexes[0].match(name)
        return int(m.group("layer")) if m else None

    def classify(self, name: str) -> TensorRole | None:
        """The tensor's role if it is a router or routed-expert tensor, else None."""
        prefix, experts, stacked, routers = self._regexes
        m = prefix.match(name)
        if not m:
            return None
        layer = int(m.group("layer"))
        for rx in experts:
            e = rx.match(name)
            if e:
                return TensorRole(layer, "expert", int(e.group("expert")), span=e.span("expert"))
        for rx, axis in routers:
            if rx.fullmatch(name):
                return TensorRole(layer, "router", axis=axis)
        for rx, axis in stacked:
            if rx.fullmatch(name):
                return TensorRole(layer, "stacked", axis=axis)
        return None

    # -- config -------------------------------------------------------------
    def num_experts(self, cfg: dict) -> int | None:
        return _first(cfg, self.num_experts_keys)

    def top_k(self, cfg: dict) -> int | None:
        return _first(cfg, self.top_k_keys)

    def n_group(self, cfg: dict) -> int | None:
        return cfg.get(self.groups["n_group"]) if self.groups else None

    def topk_group(self, cfg: dict) -> int | None:
        return cfg.get(self.groups["topk_group"]) if self.groups else None

    def moe_layers(self, cfg: dict) -> list[int]:
        """Indices of decoder layers with routed experts, by the family's config rule."""
        n = int(cfg["num_hidden_layers"])
        rule = self.moe_layer_rule
        if "list" in rule and cfg.get(rule["list"]) is not None:
            return sorted(int(i) for i in cfg[rule["list"]])
        layers = range(n)
        if "first_dense" in rule:
            k = cfg.get(rule["first_dense"]) or 0
            layers = [i for i in layers if i >= k]
        if "sparse_step" in rule:
            step = cfg.get(rule["sparse_step"]) or 1
            layers = [i for i in layers if (i + 1) % step == 0]
        if "dense_list" in rule:
            dense = set(cfg.get(rule["dense_list"]) or ())
            layers = [i for i in layers if i not in dense]
        return list(layers)


def _first(cfg: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return None


def builtin_layouts() -> dict[str, Layout]:
    raw = json.loads(resources.files(__package__).joinpath("layouts.json").read_text())
    return {k: Layout.from_dict(k, v) for k, v in raw.items() if not k.startswith("_")}


def load_layout_file(path: str) -> Layout:
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as e:
        raise ReapError(path, f"cannot read layout: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ReapError(path, f"invalid JSON: {e}") from None
    try:
        return Layout.from_dict(d.get("name", path), d)
    except ReapError as e:
        raise ReapError(path, e.message) from None


def text_config(config: dict) -> dict:
    """The part of config.json that describes the decoder (nested for multimodal models)."""
    return config.get("text_config") or config


def layout_for(config: dict, config_path: str) -> Layout:
    layouts = builtin_layouts()
    cfg = text_config(config)
    for key in (config.get("model_type"), cfg.get("model_type")):
        if key in layouts:
            return layouts[key]
    arch = (config.get("architectures") or [None])[0]
    for layout in layouts.values():
        if arch in layout.architectures:
            return layout
    raise ReapError(
        config_path,
        f"unsupported architecture {arch!r} (model_type {config.get('model_type')!r}); "
        f"supported: {', '.join(sorted(layouts))}. To add one, describe its MoE tensors in a "
        "layout file (see reapsurgery/layouts.json) and pass it with --layout",
    )
