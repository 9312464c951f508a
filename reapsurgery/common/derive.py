"""A family's layout derived from the model transformers builds for it, not written by hand.

transformers already knows, for every model type it builds, which parameters are indexed by
routed expert and how checkpoint names map onto parameters. `derive_layout` reads both:

1. The skeleton is built on the meta device from config.json (the class ``architectures[0]``
   names, else ``model_map.auto_class``). Its experts modules carry ``num_experts`` (E).
2. Every int config key of the text config whose value is E is a candidate; the skeleton is
   built again with that key at E+1. A key counts routed experts when the experts modules then
   count E+1 and tensor shapes change: a value counts experts only if changing it changes them,
   so a list that merely holds E among other values (layer indices) is no expert count. The
   parameters and buffers whose shape changed are the expert-indexed tensors, and the axis that
   grew by one is their expert axis. An axis that grows by more (experts fused 2-D,
   ``[E*ffn, H]``) is refused; one whose size is E + n (a router that also scores zero-computation,
   skip or shared experts) only where router_rows.json says the family's code puts those n rows
   after the routed ones (they are kept).
3. MoE layers are the decoder layers holding expert-indexed tensors.
4. Each checkpoint name is mapped to its parameter with the model's own conversion mapping
   (as calibration loads it). A name stacked into a parameter by ``MergeModulelist`` is one
   expert's tensor (an ``experts`` prefix with ``{expert}``); any other is a stacked tensor or
   a router, whose on-disk expert axis is the parameter's traced back through the converter's
   operations (a transpose moves it; an operation that cannot be followed is refused).
   Parameters under a module that holds the experts' weights are stacked experts; the other
   expert-indexed ones (gate weights, score-correction biases, per-expert scales) are routers.

What shapes cannot tell comes from short lists of names: the top-k keys, the group-limited
router's keys, the MTP layer count and MTP prefixes, and the MTP block's modules
(mtp_blocks.json, by model type). Where derivation cannot decide, it raises
ReapError saying why; it never guesses.

torch and transformers are imported inside the functions: importing this module stays light.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import ReapError
from .derive_names import (add_role, expert_axis_on_disk, expert_prefix, find_mtp_prefixes, logical_names,
                           mtp_block_facts, router_rows_facts, split_layer, stacked_patterns)

# Config keys that count experts per token, groups and MTP layers: none of them changes a shape.
TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "num_experts_per_token", "moe_k", "moe_topk",
              "moe_top_k", "top_k_experts", "router_top_k")
GROUP_KEYS = ("n_group", "topk_group")
MTP_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers")
# A group-limited router scores a group by the sum of its best two experts (DeepSeek-V3 and its
# descendants) or by its best one (DeepSeek-V2's greedy variant); the code decides, not shapes,
# so a derived layout asks for the stricter two.
MIN_PER_GROUP = 2
# Hash routing: the expert of a token is a table lookup, not a router's choice (DeepSeek-V4).
HASH_ROUTING_TENSORS = ("tid2eid",)


@dataclass
class _Diff:
    """The expert-indexed tensors of a skeleton: name -> (expert axis, shape with E experts); and
    name -> rows after the routed experts' for a tensor whose axis also scores other experts."""

    axes: dict[str, tuple[int, tuple[int, ...]]]
    kept_after: dict[str, int]


def derive_layout(config: dict, tensor_names: Iterable[str]) -> dict[str, Any]:
    """The layout entry (the format of layouts.json) for a checkpoint with this config.json and
    these tensor names (the index's weight_map keys). Raises ReapError where it cannot decide.

    Only families transformers implements itself are derived (no remote code): the skeleton is
    the native class, also for a config whose model_type is its own (Kimi-K2's kimi_k2)."""
    config = _unquantized(config)
    text = config.get("text_config") or config
    model_type = config.get("model_type")
    arch = (config.get("architectures") or [None])[0]
    where = f"{arch or model_type}"

    try:
        model = _skeleton(config)
    except ReapError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers' own failure to build its class (Qwen3-Omni-MoE in 5.24)
        from .model_map import cannot_build

        raise ReapError(None, f"{where}: {cannot_build(e)}") from None
    E = _expert_count(model, where)
    keys, diff = _expert_keys(config, model, E, where, router_rows_facts(config))

    from .model_map import ConversionMap, find_decoder

    decoder = find_decoder(model)
    module_names = {id(m): n for n, m in model.named_modules()}
    layers_prefix = module_names[id(decoder.layers)] + "."
    moe_layers = set()
    for name in diff.axes:
        if not name.startswith(layers_prefix):
            raise ReapError(None, f"{where}: expert-indexed tensor {name!r} is outside the decoder layers; "
                                  "derivation cannot place it (write a layout file)")
        moe_layers.add(int(name[len(layers_prefix):].split(".")[0]))
    _refuse_hash_routing(model, where)
    stacked_params, blocks = _stacked_params(model, diff)
    for layer in sorted(moe_layers):
        mine = sorted(b for b in blocks if b.startswith(f"{layers_prefix}{layer}."))
        if len(mine) > 1:
            raise ReapError(None, f"{where}: decoder layer {layer} has {len(mine)} separately routed expert sets "
                                  f"({', '.join(m.rstrip('.') for m in mine)}); one mask cannot prune both")

    converter = ConversionMap(model)
    logical = logical_names(tensor_names)
    prefixes: dict[str, int] = {}  # on-disk layer prefix pattern -> tensors under it
    roles: dict[str, tuple[str, int | None]] = {}  # pattern relative to the layer prefix -> (kind, axis)
    covered: set[str] = set()
    unmapped: list[str] = []
    kept_rows: dict[str, int] = {}  # router pattern -> rows after the routed experts', kept
    for name in logical:
        target, pattern = converter.target(name)
        if target not in converter.meta:
            unmapped.append(name)
            continue
        if not target.startswith(layers_prefix):
            continue
        layer = int(target[len(layers_prefix):].split(".")[0])
        split = split_layer(name, layer)
        if split is None:
            raise ReapError(None, f"{where}: tensor {name!r} loads into decoder layer {layer} but its name "
                                  "has no such layer number")
        prefix, rest = split
        prefixes[prefix] = prefixes.get(prefix, 0) + 1
        if target not in diff.axes:
            continue
        covered.add(target)
        axis = diff.axes[target][0]
        op = converter.by_pattern.get(pattern) if pattern is not None else None
        disk_axis = expert_axis_on_disk(op, axis, name, target, where)
        if disk_axis is None:  # one expert's tensor
            rel = expert_prefix(rest, op, pattern, name, where)
            expert = int(rel[1])
            if expert >= E:
                raise ReapError(None, f"{where}: tensor {name!r} is expert {expert} of a layer with {E} routed experts")
            add_role(roles, rel[0], ("expert", None), where)
        elif target in stacked_params:  # its quantization companions are stacked alike (MXFP4 blocks, FP8 scales)
            for physical in logical[name]:
                add_role(roles, physical[len(prefix.replace("{layer}", str(layer))):], ("stacked", disk_axis), where)
        else:  # a quantized router's companions are judged by quant.router_companion, by shape
            add_role(roles, rest, ("router", disk_axis), where)
            if target in diff.kept_after:
                kept_rows[rest] = diff.kept_after[target]
        if target in diff.kept_after and target in stacked_params:
            raise ReapError(None, f"{where}: expert weights {target!r} have {diff.kept_after[target]} entries more "
                                  "than the routed experts on their expert axis; not derived")
    missing = sorted(n for n in diff.axes if n in converter.meta and n not in covered)
    if missing:
        raise ReapError(None, f"{where}: no checkpoint tensor loads into the expert-indexed parameter {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if not prefixes:
        raise ReapError(None, f"{where}: no checkpoint tensor belongs to a decoder layer")

    entry: dict[str, Any] = {
        "architectures": [arch] if arch else [],
        "num_experts": keys,
        "top_k": _present_keys(text, TOP_K_KEYS, where, "experts per token"),
        "moe_layers": {"indices": sorted(moe_layers)},
        "layer_prefix": _one_or_list(sorted(prefixes, key=lambda p: -prefixes[p])),
        "routers": {p: a for p, (k, a) in sorted(roles.items()) if k == "router"},
        "experts": sorted(p for p, (k, _) in roles.items() if k == "expert"),
        "stacked_experts": stacked_patterns(roles, logical, prefixes),
    }
    if kept_rows:
        entry["kept_router_rows"] = dict(sorted(kept_rows.items()))
    # config.json may spell a key by the config class's attribute_map (Ling's num_expert_group is n_group)
    attribute_map = dict(getattr(type(model.config.get_text_config()), "attribute_map", {}) or {})
    group_keys = {k: next((n for n in (k, attribute_map.get(k)) if n and text.get(n) is not None), None)
                  for k in GROUP_KEYS}
    if all(group_keys.values()):
        entry["groups"] = {**group_keys, "min_per_group": MIN_PER_GROUP}
    if text.get("num_hidden_layers") != len(decoder.layers):
        layer_count = _layer_count_key(config, len(decoder.layers))
        if layer_count:
            entry["layer_count"] = layer_count
    mtp_key = next((k for k in MTP_KEYS if text.get(k) is not None), None)
    if mtp_key:
        entry["mtp_layers"] = mtp_key
    mtp_prefixes = find_mtp_prefixes(unmapped)
    if mtp_prefixes:
        entry["mtp_prefixes"] = mtp_prefixes
    # the MTP block facts, only where the checkpoint stores the block where the table says: under its
    # prefix (Qwen3.5: mtp.*), or as the layers after the stack (DeepSeek-V3.2, GLM-5: model.layers.{n})
    facts = mtp_block_facts(config)
    where_stored = facts.get("mtp_block", {}).get("prefix")
    if facts and (where_stored in mtp_prefixes if where_stored else
                  _stores_layers_past(unmapped, sorted(prefixes), len(decoder.layers))):
        entry.update(facts)
    import transformers

    entry["derived"] = {"transformers": transformers.__version__, "model_class": type(model).__name__}
    return entry


def derived_layout(config: dict, tensor_names: Iterable[str], name: str | None = None):
    """`derive_layout` parsed as a Layout."""
    from .layouts import Layout

    entry = derive_layout(config, tensor_names)
    return Layout.from_dict(name or config.get("model_type") or "derived", entry)


# -- the skeleton ------------------------------------------------------------------------------


def _unquantized(config: dict) -> dict:
    """config.json without quantization_config: the skeleton is built unquantized."""
    config = copy.deepcopy(config)
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].pop("quantization_config", None)
    return config


def _skeleton(config: dict):
    """The model class for this config, every tensor on the meta device."""
    import torch

    from .model_map import auto_class, model_class

    cls = model_class(config.get("architectures"))
    cfg = _config_object(config, cls)
    with torch.device("meta"):
        if cls is not None:
            return cls._from_config(cfg)
        return auto_class(cfg).from_config(cfg)


def _config_object(config: dict, cls):
    """The transformers config for config.json. Older configs give some counts per layer (Hunyuan's
    num_experts, moe_topk) where transformers now wants one int: equal entries are that int."""
    from transformers import AutoConfig, PreTrainedConfig

    # config.json as transformers writes it: infinities as {"__float__": "Infinity"} (Nemotron-H's time_step_limit)
    d = PreTrainedConfig._decode_special_floats(dict(config))
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ReapError(None, "config.json has no model_type")

    def make(d):
        try:
            return AutoConfig.for_model(model_type, **copy.deepcopy(d))
        except ValueError as e:
            # a model_type of its own on a native class (Kimi-K2: kimi_k2 on DeepseekV3ForCausalLM)
            config_class = getattr(cls, "config_class", None)
            if config_class is None or "Unrecognized model" not in str(e):
                raise
            return config_class(**copy.deepcopy(d))

    try:
        return make(d)
    except Exception as e:  # noqa: BLE001 - reported in one line below
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        nested = isinstance(d.get("text_config"), dict)
        text = dict(d["text_config"]) if nested else d
        lists = {k: v for k, v in text.items() if isinstance(v, list) and v
                 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)}
        for k, v in lists.items():
            if len(set(v)) > 1 and k in str(e):
                raise ReapError(None, f"config {k} differs per layer ({v}); reapsurgery needs the same count in "
                                      "every layer") from None
        if not any(k in str(e) for k in lists):
            raise ReapError(None, f"transformers cannot build model_type {model_type!r} from this config: {first}") from None
        text.update({k: v[0] for k, v in lists.items() if len(set(v)) == 1})
        if nested:
            d["text_config"] = text
        try:
            return make(d)
        except Exception as e2:  # noqa: BLE001
            raise ReapError(None, f"transformers cannot build model_type {model_type!r} from this config: "
                                  f"{str(e2).strip().splitlines()[0]}") from None


def _tensors(model) -> dict[str, tuple[int, ...]]:
    out = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out.update({n: tuple(b.shape) for n, b in model.named_buffers()})
    return out


def _expert_counts(model) -> dict[str, int]:
    """num_experts of every module that says it (transformers' experts modules all do)."""
    return {n: m.num_experts for n, m in model.named_modules()
            if isinstance(getattr(m, "num_experts", None), int) and not isinstance(m.num_experts, bool)}


def _expert_count(model, where: str) -> int:
    counts = set(_expert_counts(model).values())
    if not counts:
        raise ReapError(None, f"{where}: no module of {type(model).__name__} counts experts (num_experts); "
                              "not an MoE model that derivation understands")
    if len(counts) > 1:
        raise ReapError(None, f"{where}: modules count different numbers of experts {sorted(counts)}; "
                              "reapsurgery needs the same routed-expert count in every MoE layer")
    return counts.pop()


def _expert_keys(config: dict, model, E: int, where: str, other_rows: str | None = None):
    """Config keys that count routed experts, and the expert-indexed tensors with their axes.

    Candidates are the text config's int keys equal to E (and per-layer lists of E); aliases of
    one attribute (the config class's attribute_map) are built once. A key counts experts when
    the skeleton built with it at E+1 has experts modules of E+1 and tensors of other shapes.
    """
    nested = "text_config" in config and isinstance(config["text_config"], dict)
    text = config["text_config"] if nested else config
    text_cfg = model.config.get_text_config()
    attribute_map = dict(getattr(type(text_cfg), "attribute_map", {}) or {})
    canonical = lambda k: attribute_map.get(k, k)  # noqa: E731
    candidates: dict[str, list[str]] = {}
    for key, value in text.items():
        if isinstance(value, bool):
            continue
        if (isinstance(value, int) and value == E) or (isinstance(value, list) and value and all(v == E for v in value)):
            candidates.setdefault(canonical(key), []).append(key)
        elif (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
              and E in value and _counts_experts(config, nested, key, E)):
            raise ReapError(None, f"{where}: config {key} gives per-layer expert counts {value}; reapsurgery needs the "
                                  "same routed-expert count in every MoE layer")
    base = _tensors(model)
    keys: list[str] = []
    diff: _Diff | None = None
    for attr, names in candidates.items():
        bumped = copy.deepcopy(config)
        t = bumped["text_config"] if nested else bumped
        for k in names:
            t[k] = [v + 1 for v in t[k]] if isinstance(t[k], list) else t[k] + 1
        try:
            other = _skeleton(bumped)
        except Exception:  # noqa: BLE001 - a key the model cannot be built with at E+1 does not count experts
            continue
        counts = set(_expert_counts(other).values())
        if counts != {E + 1}:
            continue
        d = _shape_diff(base, _tensors(other), E, where, other_rows)
        if not d.axes:
            continue
        if diff is not None and {n: a for n, (a, _) in d.axes.items()} != {n: a for n, (a, _) in diff.axes.items()}:
            raise ReapError(None, f"{where}: config keys {keys} and {names} count experts of different tensors; "
                                  "derivation cannot tell which is the routed-expert count")
        diff = d
        keys += names + [k for k in (attr, *[a for a, c in attribute_map.items() if c == attr]) if k not in names]
    if diff is None:
        for outer, sub in text.items():  # a count inside a nested dict (DBRX's ffn_config.moe_num_experts)
            for key, value in (sub.items() if isinstance(sub, dict) else ()):
                if isinstance(value, int) and not isinstance(value, bool) and value == E:
                    bumped = copy.deepcopy(config)
                    (bumped["text_config"] if nested else bumped)[outer][key] = E + 1
                    try:
                        other = _skeleton(bumped)
                    except Exception:  # noqa: BLE001
                        continue
                    if set(_expert_counts(other).values()) == {E + 1} and _shape_diff(base, _tensors(other), E, where, other_rows).axes:
                        raise ReapError(None, f"{where}: the routed-expert count is {outer}.{key}, inside a nested "
                                              "config dict that a layout cannot name")
        raise ReapError(None, f"{where}: no config key of the text config counts the {E} routed experts "
                              "(none changes the experts' shapes when raised by one)")
    present = [k for k in keys if k in text]
    return present + [k for k in dict.fromkeys(keys) if k not in present], diff


def _counts_experts(config: dict, nested: bool, key: str, E: int) -> bool:
    """Whether a list of ints that holds E among other values counts experts per layer: its entries
    equal to E raised by one change the experts modules' count. A list that merely contains E
    (Kolibri-1.1's kv_source_layers, layer indices 0..4 beside 4 experts) does not."""
    bumped = copy.deepcopy(config)
    t = bumped["text_config"] if nested else bumped
    t[key] = [v + 1 if v == E else v for v in t[key]]
    try:
        other = _skeleton(bumped)
    except Exception:  # noqa: BLE001 - a list the model cannot be built with changed is no count of experts
        return False
    return set(_expert_counts(other).values()) != {E}


def _stores_layers_past(names: list[str], layer_prefixes: list[str], n_layers: int) -> bool:
    """Whether some of `names` (tensors that load into no parameter) sit in layers numbered past the
    stack's `n_layers`, under one of the stack's on-disk layer prefixes (``model.layers.{layer}.``)."""
    import re

    from .derive_names import layer_rx

    rxs = [re.compile(layer_rx(p).replace(r"\d+", r"(\d+)", 1)) for p in layer_prefixes]
    return any(int(m.group(1)) >= n_layers for name in names for rx in rxs if (m := rx.match(name)))


def _layer_count_key(config: dict, n_layers: int) -> str | None:
    """The config key that counts the decoder layers where config.json has no num_hidden_layers of
    that value (LongCat-Flash's num_layers; its config's num_hidden_layers property counts the two
    attention sublayers of each): the int key equal to the layer count whose increase by one builds
    one more decoder layer."""
    from .model_map import find_decoder

    nested = isinstance(config.get("text_config"), dict)
    text = config["text_config"] if nested else config
    for key, value in text.items():
        if value != n_layers or isinstance(value, bool) or not isinstance(value, int):
            continue
        bumped = copy.deepcopy(config)
        (bumped["text_config"] if nested else bumped)[key] = n_layers + 1
        try:
            if len(find_decoder(_skeleton(bumped)).layers) == n_layers + 1:
                return key
        except Exception:  # noqa: BLE001 - a key the model cannot be built with changed is no layer count
            continue
    return None


def _shape_diff(base: dict, other: dict, E: int, where: str, other_rows: str | None = None) -> _Diff:
    """The tensors that grow by one along one axis with one more expert. `other_rows`: router_rows.json's
    word that the family's routers score other experts after the routed ones (rows then kept)."""
    if set(base) != set(other):
        extra = sorted(set(base) ^ set(other))
        raise ReapError(None, f"{where}: one more expert adds or removes tensors ({extra[0]!r}): experts held "
                              "as separate modules are not derived (write a layout file)")
    axes, kept_after = {}, {}
    for name, shape in base.items():
        new = other[name]
        if new == shape:
            continue
        changed = [i for i, (a, b) in enumerate(zip(shape, new)) if a != b] if len(new) == len(shape) else None
        if not changed or len(changed) != 1:
            raise ReapError(None, f"{where}: tensor {name!r} changes from {list(shape)} to {list(new)} with one more "
                                  "expert, not along one axis")
        axis = changed[0]
        grow = new[axis] - shape[axis]
        if grow != 1:
            raise ReapError(None, f"{where}: axis {axis} of tensor {name!r} grows by {grow} per expert "
                                  f"({list(shape)} -> {list(new)}): experts fused into another axis are not derived")
        if shape[axis] != E:
            if shape[axis] < E or other_rows is None:
                raise ReapError(None, f"{where}: tensor {name!r} has {shape[axis]} entries on its expert axis for {E} "
                                      "routed experts (it also counts other experts, e.g. zero-computation or shared "
                                      "experts, and router_rows.json does not say where their rows are); slicing it "
                                      "by routed expert is not derived")
            kept_after[name] = shape[axis] - E
        axes[name] = (axis, shape)
    return _Diff(axes, kept_after)


def _stacked_params(model, diff: _Diff) -> tuple[set[str], set[str]]:
    """Expert-indexed parameters that are expert weights: under a module that owns [E, ...]
    weights of rank 3 or more, or that transformers runs through its experts interface. The
    others are the router's (gate weights, score-correction biases, per-expert scales).
    Also the MoE blocks holding them (one per MoE layer, unless a layer routes two expert sets)."""
    from .model_map import is_interface_experts

    holders = set()
    for mod_name, module in model.named_modules():
        prefix = mod_name + "." if mod_name else ""
        own = [prefix + n for n, _ in module.named_parameters(recurse=False)]
        if is_interface_experts(module) or any(n in diff.axes and len(diff.axes[n][1]) >= 3 for n in own):
            holders.add(prefix)
    # the MoE block of a holder: its parent module; a block inside another one is that one
    parents = {h.rstrip(".").rpartition(".")[0] + "." for h in holders}
    blocks = {p for p in parents if not any(p != q and p.startswith(q) for q in parents)}
    return {n for n in diff.axes if any(n.startswith(h) for h in holders)}, blocks


def _refuse_hash_routing(model, where: str) -> None:
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        if name.rpartition(".")[2] in HASH_ROUTING_TENSORS:
            raise ReapError(None, f"{where}: {name!r} routes tokens to experts by a token-id table (hash routing); "
                                  "pruning experts out of such layers is not derived")


# -- checkpoint names --------------------------------------------------------------------------


def _present_keys(text: dict, names: tuple[str, ...], where: str, what: str) -> list[str]:
    present = [k for k in names if isinstance(text.get(k), (int, list)) and not isinstance(text.get(k), bool)]
    if not present:
        raise ReapError(None, f"{where}: config has no key for {what} (looked for {', '.join(names)})")
    return present


def _one_or_list(items: list[str]) -> str | list[str]:
    return items[0] if len(items) == 1 else items
