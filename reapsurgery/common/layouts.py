"""Per-family MoE layouts, kept as data in layouts.json, and what they say about a config.

A layout names the config keys that count routed experts and experts per token,
which decoder layers are MoE, and the tensor-name patterns of routers, per-expert
tensors and stacked expert tensors with their expert axis. Adding a family means
adding an entry, not code.

Fields of an entry (all config keys are read from the text config where one is nested):

- ``architectures``: ``architectures[0]`` values it covers (the entry's name is a model_type).
- ``num_experts`` / ``top_k``: config keys, first present wins; every one present is rewritten.
  A key may hold a per-layer list (older Hunyuan configs): when every entry is equal it is
  that number, otherwise the checkpoint is refused (one mask keeps one count everywhere).
- ``groups``: ``n_group`` / ``topk_group`` keys of a group-limited router and
  ``min_per_group``, the fewest experts a group may keep (2 where a group's score is the
  sum of its top two).
- ``moe_layers``: which decoder layers have routed experts. ``indices`` is the list itself
  (a derived layout's, read from the model transformers builds; it wins over every other field).
  Each other field names a config key; the conditions combine (a layer is MoE when all hold):
  ``list`` (explicit indices; wins when present), ``type_list`` + ``moe_type`` (a per-layer
  list of names, MoE where the entry equals ``moe_type``; wins when present),
  ``first_dense`` (layers below it are dense), ``last_moe`` (layers above it are dense;
  -1 means the last layer), ``sparse_step`` (MoE where (i + 1) % step == 0),
  ``dense_list`` (indices of dense layers).
- ``defaults``: values of config keys that transformers assumes when config.json lacks them
  (e.g. GLM-4.5's ``first_k_dense_replace`` is 1 unless said otherwise).
- ``layer_prefix``: where decoder layer tensors live (``{layer}``), a string or a list.
- ``routers`` / ``stacked_experts``: name pattern -> expert axis; ``experts``: per-expert
  name prefixes with ``{expert}``. Patterns are relative to the layer prefix; ``*`` is one
  name component.
- ``layer_count``: the config key that counts decoder layers where config.json does not spell it
  ``num_hidden_layers`` (LongCat-Flash's ``num_layers``, transformers' attribute_map alias).
- ``kept_router_rows``: router pattern -> how many rows follow the routed experts' on its expert
  axis, scoring experts that are not pruned (LongCat-Flash's zero-computation experts, ZAYA's skip
  expert, Inkling's shared experts). Those rows are kept as they are; the routed rows before them
  are sliced by the mask like every router's.
- ``mtp_layers``: config key(s) counting multi-token-prediction layers, a string or a list (every
  one present is rewritten: set to 0 when apply drops the MTP block, kept when it keeps it).
  ``mtp_prefixes``: name prefixes of MTP tensors stored outside the layer stack (Qwen3-Next's
  ``mtp.``); dropped unless ``mtp_block`` says where its layers are.
- ``mtp_block``: the modules an MTP layer holds besides a decoder layer: ``embed_norm``,
  ``hidden_norm`` (RMSNorms), ``proj`` (the [H, 2H] linear over the concatenated normed
  embedding and hidden state), ``embed`` (its own copy of the embeddings, when stored) and
  ``head``. They are relative to the MTP layer's prefix (DeepSeek-V3, GLM: the block is stored
  as layer ``num_hidden_layers + d``), or, for blocks stored outside the stack, relative to
  ``prefix`` (Qwen3-Next: ``mtp.``, one set shared by every depth), with the block's decoder
  layers under ``layers`` (``mtp.layers.{layer}.``, ``{layer}`` the depth from 0). Such a block is
  read as if it were stored as layers ``num_hidden_layers..`` (``Layout.canonical``), so
  calibration, apply and verify treat both styles alike. ``shared``: trunk tensors a separate MTP
  draft directory needs too (``apply --mtp keep-full``). With ``mtp_block``, ``calibrate --mtp
  calibrate`` measures the MTP layers' experts and apply keeps them; without it they can only be
  dropped.
- ``mtp_keep``: why a loader needs the MTP block present (a sentence). With it, ``calibrate``
  measures the MTP block by default, so that ``apply`` keeps and prunes it.
- ``derived``: where an entry made by ``reapsurgery.common.derive`` came from (transformers version,
  model class); not read.
"""

from __future__ import annotations

import json
from pathlib import Path
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..errors import ReapError
from .layout_fields import MTP_BLOCK_FIELDS, check_fields, mtp_block_field


@dataclass(frozen=True)
class TensorRole:
    """What a tensor of an MoE layer is to surgery."""

    layer: int
    kind: str  # "expert" (one expert's tensor), "stacked" ([.., E, ..] expert tensor), "router"
    expert: int | None = None  # for "expert"
    axis: int = 0  # expert axis, for "stacked" and "router"
    span: tuple[int, int] | None = None  # where the expert number sits in the name, for "expert"
    kept_after: int = 0  # rows after the routed experts' on a router's axis, kept whatever the mask

    def rows(self, num_experts: int) -> int:
        """Entries on the expert axis of a checkpoint with `num_experts` routed experts."""
        return num_experts + self.kept_after

    def kept_rows(self, keep: list[int], num_experts: int) -> list[int]:
        """The entries of the expert axis that a mask keeping `keep` keeps, in order."""
        return [*keep, *range(num_experts, self.rows(num_experts))]

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
    moe_layer_rule: dict[str, Any]  # config key names; "indices" holds the layer list itself
    layer_prefixes: tuple[str, ...]
    routers: dict[str, int]
    experts: tuple[str, ...]
    stacked: dict[str, int]
    groups: dict[str, Any] | None
    mtp_keys: tuple[str, ...]
    mtp_prefixes: tuple[str, ...] = ()
    defaults: dict[str, Any] | None = None
    mtp_block: dict[str, str] | None = None
    derived: dict[str, Any] | None = None  # where a derived entry came from; None for written ones
    mtp_keep: str | None = None  # why a loader needs the MTP block: calibrate measures it by default
    kept_router_rows: dict[str, int] | None = None  # router pattern -> rows after the routed experts', kept
    layer_count: str | None = None  # config key of the decoder layer count where it is not num_hidden_layers

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> "Layout":
        check_fields(name, d)
        try:
            prefix = d["layer_prefix"]
            rule = dict(d.get("moe_layers", {}))
            unknown = set(rule) - MOE_RULE_FIELDS
            if unknown:
                raise ReapError(None, f"layout {name!r}: unknown moe_layers fields {sorted(unknown)}; "
                                      f"known: {', '.join(sorted(MOE_RULE_FIELDS))}")
            keys = [f for f in rule if f not in ("indices", "moe_type")]
            if any(not isinstance(rule[f], str) for f in keys) or not isinstance(rule.get("moe_type", ""), str):
                raise ReapError(None, f"layout {name!r}: moe_layers fields ({', '.join(keys)}) name config keys, "
                                      "and moe_type is a string")
            indices = rule.get("indices")
            if indices is not None and not (isinstance(indices, list)
                                            and all(isinstance(i, int) and not isinstance(i, bool) for i in indices)):
                raise ReapError(None, f"layout {name!r}: moe_layers.indices must be a list of layer numbers")
            return cls(
                name=name,
                architectures=tuple(d.get("architectures", ())),
                num_experts_keys=tuple(d["num_experts"]),
                top_k_keys=tuple(d["top_k"]),
                moe_layer_rule=rule,
                layer_prefixes=(prefix,) if isinstance(prefix, str) else tuple(prefix),
                routers=dict(d.get("routers", {})),
                experts=tuple(d.get("experts", ())),
                stacked=dict(d.get("stacked_experts", {})),
                groups=d.get("groups"),
                mtp_keys=_keys(d.get("mtp_layers")),
                mtp_prefixes=tuple(d.get("mtp_prefixes", ())),
                defaults=dict(d.get("defaults", {})),
                mtp_block=mtp_block_field(name, d.get("mtp_block")),
                derived=dict(d["derived"]) if d.get("derived") is not None else None,
                mtp_keep=d.get("mtp_keep"),
                kept_router_rows=dict(d.get("kept_router_rows", {})),
                layer_count=d.get("layer_count"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ReapError(None, f"layout {name!r} is missing or malforms field {e}") from None

    @property
    def layer_prefix(self) -> str:
        return self.layer_prefixes[0]

    @property
    def mtp_key(self) -> str | None:
        return self.mtp_keys[0] if self.mtp_keys else None

    @property
    def mtp_modules(self) -> dict[str, str]:
        """The MTP block's modules by role (embed_norm, proj, ...), without the location fields."""
        return {r: m for r, m in (self.mtp_block or {}).items() if r in MTP_BLOCK_FIELDS}

    def mtp_count(self, cfg: dict) -> int | None:
        """The number of MTP layers the config announces (first count key present)."""
        return _first(cfg, self.mtp_keys)

    def __post_init__(self) -> None:
        regexes = []
        for text in self.layer_prefixes:
            prefix = _pattern(text)
            regexes.append((
                re.compile(prefix),
                [re.compile(prefix + _pattern(p)) for p in self.experts],
                [(re.compile(prefix + _pattern(p)), a) for p, a in self.stacked.items()],
                [(re.compile(prefix + _pattern(p)), a, (self.kept_router_rows or {}).get(p, 0))
                 for p, a in self.routers.items()],
            ))
        object.__setattr__(self, "_regexes", regexes)
        outside = (self.mtp_block or {}).get("layers")
        object.__setattr__(self, "_mtp_layers_rx", re.compile(_pattern(outside)) if outside else None)

    # -- tensor names -------------------------------------------------------

    def _layer_match(self, name: str) -> re.Match | None:
        for prefix, *_ in self._regexes:
            m = prefix.match(name)
            if m:
                return m
        return None

    def prefix_pattern(self, layer: bytes) -> bytes:
        """A bytes regex of the layer prefixes, the layer number matching `layer` (a regex) in the
        only capturing group of the prefix that matched: for `WeightMap.starting`, which finds
        names in one scan of their bytes."""
        parts = [_pattern(a).encode() + b"(" + layer + b")" + _pattern(b).encode()
                 for a, b in (p.split("{layer}", 1) for p in self.layer_prefixes)]
        return parts[0] if len(parts) == 1 else b"(?:" + b"|".join(parts) + b")"  # one: a literal the search skips to

    def layer_of(self, name: str) -> int | None:
        m = self._layer_match(name)
        return int(m.group("layer")) if m else None

    def split_layer(self, name: str) -> tuple[int, str] | None:
        """(layer, name within the layer) for a tensor under a layer prefix."""
        m = self._layer_match(name)
        return (int(m.group("layer")), name[m.end():]) if m else None

    def with_layer(self, name: str, layer: int) -> str:
        """The same tensor name in another layer."""
        m = self._layer_match(name)
        if m is None:
            raise ValueError(f"{name!r} is not a layer tensor")
        a, b = m.span("layer")
        return name[:a] + str(layer) + name[b:]

    def canonical(self, name: str, num_hidden_layers: int) -> str:
        """The name an MTP tensor stored outside the stack would have as layer num_hidden_layers + d
        (``mtp.layers.0.mlp.gate.weight`` -> ``model.layers.{n}.mlp.gate.weight``, ``mtp.fc.weight``
        -> ``model.layers.{n}.fc.weight``); any other name unchanged."""
        split = self._mtp_split(name, num_hidden_layers)
        return name if split is None else split[1] + name[split[0]:]

    def source_name(self, name: str, num_hidden_layers: int, new_canonical: str) -> str:
        """`name` with its canonical form replaced by `new_canonical` (an expert renumbered), in
        the checkpoint's own naming."""
        split = self._mtp_split(name, num_hidden_layers)
        return new_canonical if split is None else name[: split[0]] + new_canonical[len(split[1]):]

    def _mtp_split(self, name: str, n: int) -> tuple[int, str] | None:
        """(length of the source prefix, canonical prefix) for an MTP tensor stored outside the stack."""
        rx = self._mtp_layers_rx
        if rx is None:
            return None
        m = rx.match(name)
        if m:
            return m.end(), self.layer_prefix.format(layer=n + int(m.group("layer")))
        prefix = self.mtp_block.get("prefix")
        if prefix and name.startswith(prefix) and name[len(prefix):].split(".")[0] in self.mtp_modules.values():
            return len(prefix), self.layer_prefix.format(layer=n)
        return None

    def mtp_prefix_of(self, name: str) -> str | None:
        """The MTP prefix (outside the layer stack) the tensor lives under, if any."""
        return next((p for p in self.mtp_prefixes if name.startswith(p)), None)

    def is_mtp(self, name: str, num_hidden_layers: int) -> bool:
        """A multi-token-prediction tensor: a layer past the decoder stack, or under an MTP prefix."""
        layer = self.layer_of(name)
        return (layer is not None and layer >= num_hidden_layers) or self.mtp_prefix_of(name) is not None

    def classify(self, name: str) -> TensorRole | None:
        """The tensor's role if it is a router or routed-expert tensor, else None."""
        for prefix, experts, stacked, routers in self._regexes:
            m = prefix.match(name)
            if not m:
                continue
            layer = int(m.group("layer"))
            for rx in experts:
                e = rx.match(name)
                if e:
                    return TensorRole(layer, "expert", int(e.group("expert")), span=e.span("expert"))
            for rx, axis, kept_after in routers:
                if rx.fullmatch(name):
                    return TensorRole(layer, "router", axis=axis, kept_after=kept_after)
            for rx, axis in stacked:
                if rx.fullmatch(name):
                    return TensorRole(layer, "stacked", axis=axis)
            return None
        return None

    # -- config -------------------------------------------------------------
    def num_experts(self, cfg: dict) -> int | None:
        return _uniform(_first(cfg, self.num_experts_keys), self.num_experts_keys)

    def top_k(self, cfg: dict) -> int | None:
        return _uniform(_first(cfg, self.top_k_keys), self.top_k_keys)

    def _get(self, cfg: dict, field: str) -> Any:
        """The config value of the key that rule field `field` names, or the layout's default for it."""
        key = self.moe_layer_rule[field]
        value = cfg.get(key)
        return (self.defaults or {}).get(key) if value is None else value

    def n_group(self, cfg: dict) -> int | None:
        return cfg.get(self.groups["n_group"]) if self.groups else None

    def topk_group(self, cfg: dict) -> int | None:
        return cfg.get(self.groups["topk_group"]) if self.groups else None

    def moe_layers(self, cfg: dict) -> list[int]:
        """Indices of decoder layers with routed experts, by the family's config rule."""
        rule = self.moe_layer_rule
        if "indices" in rule:
            return sorted(int(i) for i in rule["indices"])
        n = int(cfg["num_hidden_layers"])
        if "list" in rule and cfg.get(rule["list"]) is not None:
            return sorted(int(i) for i in cfg[rule["list"]])
        if "type_list" in rule and cfg.get(rule["type_list"]) is not None:
            types = cfg[rule["type_list"]]
            if len(types) != n:
                raise ReapError(None, f"config {rule['type_list']} has {len(types)} entries for {n} layers")
            return [i for i, t in enumerate(types) if t == rule.get("moe_type", "sparse")]
        layers = list(range(n))
        if "first_dense" in rule:
            k = self._get(cfg, "first_dense") or 0
            layers = [i for i in layers if i >= k]
        if "last_moe" in rule:
            last = self._get(cfg, "last_moe")
            last = n - 1 if last is None or last < 0 else last
            layers = [i for i in layers if i <= last]
        if "sparse_step" in rule:
            step = self._get(cfg, "sparse_step") or 1
            layers = [i for i in layers if (i + 1) % step == 0]
        if "dense_list" in rule:
            dense = set(self._get(cfg, "dense_list") or ())
            layers = [i for i in layers if i not in dense]
        return layers

    def describe(self) -> dict[str, Any]:
        """The layout as plain facts: which checkpoints it covers and which config keys it reads."""
        return {
            "name": self.name,
            "architectures": list(self.architectures),
            "num_experts": list(self.num_experts_keys),
            "top_k": list(self.top_k_keys),
            "moe_layers": dict(self.moe_layer_rule),
            "groups": dict(self.groups) if self.groups else None,
            "mtp_layers": self.mtp_key,
            "mtp_keep": self.mtp_keep,
            "mtp_block": dict(self.mtp_block) if self.mtp_block else None,
            "layer_prefix": list(self.layer_prefixes),
        }


def _keys(value: Any) -> tuple[str, ...]:
    """A config-key field given as one key or a list of them."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


MOE_RULE_FIELDS = {"indices", "list", "type_list", "moe_type", "first_dense", "last_moe", "sparse_step", "dense_list"}


def _uniform(value: Any, keys: tuple[str, ...]) -> Any:
    """A per-layer list of equal counts is that count; unequal ones cannot be pruned to one mask."""
    if isinstance(value, list):
        if value and all(isinstance(v, int) and v == value[0] for v in value):
            return value[0]
        raise ReapError(None, f"config {'/'.join(keys)} differs per layer ({value}); reapsurgery needs "
                              "the same count in every layer")
    return value


def _first(cfg: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return None


def builtin_layouts() -> dict[str, Layout]:
    raw = json.loads(resources.files(__package__).joinpath("layouts.json").read_text())
    return {k: Layout.from_dict(k, v) for k, v in raw.items() if not k.startswith("_")}


def load_layout_file(path: str) -> Layout:
    from .files import read_json_object

    d = read_json_object(path, "layout file")
    try:
        return Layout.from_dict(str(d.get("name", Path(path).stem)), d)
    except ReapError as e:
        raise ReapError(path, e.message) from None


def describe_layouts() -> list[dict[str, Any]]:
    """Every built-in family, for `reapsurgery architectures`."""
    return [layout.describe() for _, layout in sorted(builtin_layouts().items())]


# Per-layer lists (or a pattern string, one character a layer) whose length is the decoder's layer count.
# transformers writes Nemotron-H configs without num_hidden_layers: it is len(layers_block_type) there.
LAYER_LIST_KEYS = ("layers_block_type", "layer_types", "hybrid_override_pattern")


def text_config(config: dict) -> dict:
    """The part of config.json that describes the decoder (nested for multimodal models), with
    num_hidden_layers filled in from a per-layer list where the config leaves it out."""
    cfg = config.get("text_config") or config
    if cfg.get("num_hidden_layers") is None:
        for key in LAYER_LIST_KEYS:
            if isinstance(cfg.get(key), (list, str)) and cfg[key]:
                return {**cfg, "num_hidden_layers": len(cfg[key])}
    return cfg


def builtin_layout_for(config: dict) -> Layout | None:
    """The built-in entry for this config's model_type or architecture; or for its text config's
    model_type, unless the architecture is another class (a multimodal wrapper stores its text
    model under other names: Kimi-K2.5's DeepSeek-V3 text model is language_model.model.*)."""
    layouts = builtin_layouts()
    arch = (config.get("architectures") or [None])[0]
    if config.get("model_type") in layouts:
        return layouts[config["model_type"]]
    for layout in layouts.values():
        if arch in layout.architectures:
            return layout
    text_type = text_config(config).get("model_type")
    if text_type in layouts and (arch is None or arch in layouts[text_type].architectures):
        return layouts[text_type]
    return None
