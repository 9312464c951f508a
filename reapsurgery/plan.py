"""Planning: turn saliency statistics into a mask (which experts each MoE layer keeps).

Pure functions: they take a Saliency and options and return a Plan; they never print and
never touch a checkpoint's weights. Everything that can be refused is refused here, before
any byte of a checkpoint is written.

Rules, in order of precedence within a layer (or within a router group):

1. pinned experts (``--preserve L:E``) and super experts (``--preserve-super-experts``)
   are always kept;
2. experts never routed during calibration (count 0) are dropped first;
3. the remaining experts are ranked by the method's score, highest kept;
4. ties are broken by index: the lower index is kept.

So the same saliency and options always give the same mask.

The number dropped per layer is ``round_half_up(sparsity * E)`` for ``--sparsity``, or
``E - keep`` for ``--keep``. Group-limited routers (``n_group`` > 1) drop the same number
from every group; a count that is not a multiple of ``n_group`` is rounded to the nearest
multiple (halves towards fewer dropped), with a note, or refused when ``strict``.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import ReapError
from .common.mask import Mask, check_fingerprint
from .common.saliency import LayerStats, Saliency

if TYPE_CHECKING:
    from .common.checkpoint import Checkpoint
    from .common.layouts import Layout

METHODS = ("reap", "frequency", "weighted-frequency", "ean-sum", "ean-mean", "weighted-ean")
METHOD_HELP = {
    "reap": "reap_sum / count: mean gate-weighted output norm over the tokens routed to the expert",
    "frequency": "count: tokens routed to the expert",
    "weighted-frequency": "gate_sum: sum of the expert's gate weights",
    "ean-sum": "norm_sum: sum of the expert's output norms",
    "ean-mean": "norm_sum / count: mean output norm",
    "weighted-ean": "reap_sum: sum of gate-weighted output norms",
}
SUPER_QUANTILE = 0.995  # the REAP reference's super-expert rule: above the 99.5th percentile...
SUPER_FRACTION = 0.1  # ...and above a tenth of the largest max activation...
SUPER_LAYER_SHARE = 0.75  # ...in the first 75% of MoE layers (all of them with preserve_outliers)


@dataclass
class LayerPlan:
    layer: int
    kept: list[int]
    dropped: list[int]  # in the order they were chosen for dropping (least salient first)
    never_routed: list[int]
    super_experts: list[int]
    pinned: list[int]
    scores: list[float | None]  # None: never routed


@dataclass
class Plan:
    mask: Mask
    method: str
    num_experts: int
    top_k: int
    drop: int  # experts dropped per layer
    requested_drop: int  # before rounding to a multiple of n_group
    n_group: int | None
    layers: dict[int, LayerPlan]
    super_threshold: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.num_experts - self.drop

    @property
    def never_routed(self) -> dict[int, int]:
        return {l: len(p.never_routed) for l, p in sorted(self.layers.items())}


# -- scores -------------------------------------------------------------------

def expert_scores(stats: LayerStats, method: str, layer: int | None = None,
                  path: str | Path | None = None) -> list[float | None]:
    """One score per expert, higher = more salient; None for an expert never routed. `layer` and
    `path` (the saliency file) name where a score that is not a finite number comes from."""
    if method not in METHODS:
        raise ReapError(None, f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    out: list[float | None] = []
    for e in range(stats.num_experts):
        n = stats.count[e]
        if not n > 0:
            out.append(None)
            continue
        value = {
            "reap": lambda: stats.reap_sum[e] / n,
            "frequency": lambda: n,
            "weighted-frequency": lambda: stats.gate_sum[e],
            "ean-sum": lambda: stats.norm_sum[e],
            "ean-mean": lambda: stats.norm_sum[e] / n,
            "weighted-ean": lambda: stats.reap_sum[e],
        }[method]()
        if not math.isfinite(value):
            where = f"layer {layer}, " if layer is not None else ""
            raise ReapError(path, f"{where}expert {e}: the {method} score is {value} (its statistics overflow "
                                  f"a float: count {n!r}, reap_sum {stats.reap_sum[e]!r})")
        out.append(float(value))
    return out


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile, the same as torch.quantile and numpy's default."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def super_experts(layers: dict[int, LayerStats], all_layers: bool = False,
                  num_hidden_layers: int | None = None) -> tuple[dict[int, list[int]], float | None]:
    """Experts whose max activation is an outlier, per layer, and the threshold used.

    The REAP reference's rule: max activation above both the 99.5th percentile of every
    expert's max activation (all MoE layers together) and a tenth of the largest one;
    only in the first 75% of MoE layers unless all_layers. An expert never routed has no
    max activation and counts as 0 (the reference's starting value). Multi-token-prediction
    layers (from num_hidden_layers on) leave the threshold and the stack's choice unchanged;
    they are searched with all_layers only.
    """
    stack = sorted(l for l in layers if num_hidden_layers is None or l < num_hidden_layers)
    values = [a if a is not None else 0.0 for l in stack for a in layers[l].max_activation]
    if not values:
        return {}, None
    threshold = max(quantile(values, SUPER_QUANTILE), max(values) * SUPER_FRACTION)
    considered = sorted(layers) if all_layers else stack[: int(len(stack) * SUPER_LAYER_SHARE)]
    found = {}
    for l in considered:
        hits = [e for e, a in enumerate(layers[l].max_activation) if a is not None and a > threshold]
        if hits:
            found[l] = hits
    return found, threshold


def never_routed_meaning(tokens: int, num_experts: int, top_k: int) -> str:
    """What an expert never routed in `tokens` calibration tokens says. Unseen in N tokens, its share of
    the tokens is below 3/N (95% confidence, the rule of three): far below an average expert's top_k/E,
    the router does not use it (a dead expert, not a lack of data); else the data is too small to tell."""
    bound = 3 / tokens if tokens > 0 else 1.0
    average = top_k / num_experts
    if bound * 10 <= average:
        return (f"in {tokens} tokens each was chosen for under {bound:.2g} of them (95% bound; an average expert "
                f"for {average:.2g}): the router does not use them, so dropping them costs nothing measurable")
    return (f"{tokens} tokens cannot tell a dead expert from a rare one (one chosen for under {bound:.2g} of the "
            f"tokens is missed by chance; an average expert is chosen for {average:.2g}): calibrate on more data")


# -- counts -------------------------------------------------------------------

def drop_count(num_experts: int, sparsity: float | None = None, keep: int | None = None) -> int:
    """Experts to drop per layer: round_half_up(sparsity * E), or E - keep."""
    if (sparsity is None) == (keep is None):
        raise ReapError(None, "give exactly one of --sparsity (fraction of routed experts to remove) or --keep (experts to keep per layer)")
    if sparsity is not None:
        if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
            percent = f" (for {sparsity}% of the experts give {sparsity / 100:g})" if 1 < sparsity <= 100 else ""
            raise ReapError(None, f"--sparsity must be a fraction in [0, 1), got {sparsity}{percent}")
        return math.floor(sparsity * num_experts + 0.5 + 1e-9)
    if not (isinstance(keep, int) and 1 <= keep <= num_experts):
        raise ReapError(None, f"--keep must be between 1 and the {num_experts} experts per layer, got {keep}")
    return num_experts - keep


def what_asked(sparsity: float | None, keep: int | None) -> str:
    return f"--keep {keep}" if keep is not None else f"--sparsity {sparsity}"


def parse_pins(text: str | None) -> dict[int, set[int]]:
    """'L:E,L:E,...' -> {layer: {experts}}."""
    pins: dict[int, set[int]] = {}
    if not text:
        return pins
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        layer, sep, expert = item.partition(":")
        if not sep or not re.fullmatch(r"[0-9]+", layer.strip()) or not re.fullmatch(r"[0-9]+", expert.strip()):
            raise ReapError(None, f"--preserve {item!r}: expected LAYER:EXPERT, e.g. 3:17")
        pins.setdefault(int(layer), set()).add(int(expert))
    return pins


def _group_layout_facts(model: dict) -> int:
    """min_per_group of the built-in layout for this model type (1 if unknown)."""
    from .common.layouts import builtin_layouts

    layout = builtin_layouts().get(model.get("model_type"))
    return int((layout.groups or {}).get("min_per_group", 1)) if layout else 1


# -- the plan -----------------------------------------------------------------

def plan_mask(
    saliency: Saliency,
    *,
    sparsity: float | None = None,
    keep: int | None = None,
    method: str = "reap",
    preserve_super_experts: bool = False,
    preserve_outliers: bool = False,
    pins: dict[int, set[int]] | None = None,
    strict: bool = False,
    topk_group: int | None = None,
    min_per_group: int | None = None,
    source: str | Path | None = None,
) -> Plan:
    """Choose the experts each MoE layer keeps; raises ReapError for any infeasible request.

    topk_group and min_per_group describe a group-limited router; they are not part of the
    fingerprint, so they come from the checkpoint when one is at hand (plan_for_checkpoint).
    Without topk_group the reachability check is skipped (a note says so).
    """
    where = source
    model = saliency.model
    E, top_k = model["num_experts"], model["num_experts_per_tok"]
    if method not in METHODS:
        raise ReapError(None, f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    moe_layers = list(model["moe_layers"])
    missing = sorted(set(moe_layers) - set(saliency.layers))
    extra = sorted(l for l in set(saliency.layers) - set(moe_layers) if l not in saliency.mtp_layers)
    if missing or extra:
        detail = f"has no statistics for MoE layers {missing}" if missing else f"has statistics for layers {extra} that are not MoE layers"
        raise ReapError(where, f"saliency {detail} (fingerprint moe_layers: {moe_layers})")
    for l, stats in saliency.layers.items():
        if stats.num_experts != E:
            raise ReapError(where, f"layer {l}: statistics for {stats.num_experts} experts, fingerprint says {E}")

    notes: list[str] = []
    requested = drop_count(E, sparsity, keep)
    drop = requested
    if sparsity is not None and requested and abs(sparsity * E - requested) > 1e-9:
        notes.append(f"--sparsity {sparsity} of {E} experts is {sparsity * E:.4g} experts per layer, rounded to "
                     f"{requested}: sparsity {requested / E:.4g} ({E - requested} kept; --keep N sets the count exactly)")
    n_group = model.get("n_group")
    groups = n_group if isinstance(n_group, int) and n_group > 1 else 1
    if groups > 1:
        if E % groups:
            raise ReapError(where, f"{E} experts do not split into n_group={groups} equal groups")
        if drop % groups:
            lower, upper = drop - drop % groups, drop - drop % groups + groups
            rounded = lower if (drop - lower) <= (upper - drop) else upper
            what = f"--keep {E - requested}" if keep is not None else f"--sparsity {sparsity}"
            msg = (f"{what} means dropping {requested} of {E} experts per layer, which is not a multiple "
                   f"of the router's n_group={groups} groups (every group must lose the same number)")
            if strict:
                raise ReapError(where, f"{msg}; nearest possible: drop {lower} or {upper}")
            drop = rounded
            notes.append(f"{msg}: dropping {drop} instead ({drop // groups} per group, "
                         f"{E - drop} experts kept per layer, sparsity {drop / E:.4g}); --strict refuses instead")

    kept_n = E - drop
    if drop == 0:
        notes.append(f"{what_asked(sparsity, keep)} drops 0 of {E} experts per layer: every expert is kept "
                     f"and nothing is pruned (the smallest sparsity that drops one is {0.5 / E:.4g})")
    what = f"--keep {E - requested}" if keep is not None else f"--sparsity {sparsity}"
    if kept_n < top_k:
        best = (E - top_k) / E
        raise ReapError(where, f"{what} would keep {kept_n} of {E} experts per layer, fewer than the "
                               f"num_experts_per_tok={top_k} each token is routed to (largest sparsity possible: {best:.4g})")
    if groups > 1:
        size = E // groups
        per_group = kept_n // groups
        minimum = min_per_group if min_per_group is not None else _group_layout_facts(model)
        if per_group < minimum:
            raise ReapError(where, f"{what} would keep {per_group} of {size} experts in each of the n_group={groups} "
                                   f"router groups; this router needs at least {minimum} per group")
        if topk_group is not None:
            if topk_group * per_group < top_k:
                raise ReapError(where, f"{what} would leave {topk_group * per_group} experts reachable through "
                                       f"topk_group={topk_group} groups of {per_group}, fewer than num_experts_per_tok={top_k}")
        else:
            notes.append("topk_group unknown without a checkpoint: not checked that enough experts stay "
                         "reachable through the selected groups (apply checks it; or pass --ckpt)")
    else:
        size = E

    pins = pins or {}
    for l, experts in sorted(pins.items()):
        if l not in saliency.layers:
            raise ReapError(None, f"--preserve {l}:{min(experts)}: layer {l} is not an MoE layer (MoE layers: {moe_layers})")
        bad = sorted(e for e in experts if e >= E)
        if bad:
            raise ReapError(None, f"--preserve {l}:{bad[0]}: expert {bad[0]} is out of range 0..{E - 1}")

    supers: dict[int, list[int]] = {}
    threshold = None
    if preserve_super_experts or preserve_outliers:
        supers, threshold = super_experts(saliency.layers, preserve_outliers, model["num_hidden_layers"])

    layers: dict[int, LayerPlan] = {}
    for l in sorted(saliency.layers):
        stats = saliency.layers[l]
        scores = expert_scores(stats, method, l, where)
        protected = set(pins.get(l, ())) | set(supers.get(l, ()))
        dropped: list[int] = []
        for g in range(groups):
            members = range(g * size, (g + 1) * size)
            n_drop = drop // groups
            guarded = sorted(protected & set(members))
            if len(guarded) > size - n_drop:
                scope = f"router group {g} (experts {members[0]}..{members[-1]})" if groups > 1 else "this layer"
                raise ReapError(where, f"layer {l}: {len(guarded)} experts of {scope} are preserved "
                                       f"({_describe_protected(guarded, pins.get(l, ()), supers.get(l, ()))}) but only "
                                       f"{size - n_drop} can be kept; lower the sparsity or preserve fewer")
            # ascending = dropped first: unprotected before protected, never routed before routed,
            # lower score first, and among equal scores the higher index first
            order = sorted(members, key=lambda e: (e in protected, scores[e] is not None,
                                                   scores[e] if scores[e] is not None else 0.0, -e))
            dropped += order[:n_drop]
        kept = sorted(set(range(E)) - set(dropped))
        never = [e for e in range(E) if scores[e] is None]
        layers[l] = LayerPlan(l, kept, dropped, never, sorted(supers.get(l, ())), sorted(pins.get(l, ())), scores)

    if any(p.never_routed for p in layers.values()):
        counts = " ".join(f"{l}:{len(p.never_routed)}" for l, p in sorted(layers.items()) if p.never_routed)
        kept_never = [l for l, p in sorted(layers.items()) if set(p.never_routed) & set(p.kept)]
        also = f"; some kept anyway in layers {kept_never}" if kept_never else ""
        tokens = min(saliency.layers[l].tokens for l, p in layers.items() if p.never_routed)
        notes.append(f"experts never routed during calibration, per layer: {counts} (dropped first{also}); "
                     + never_routed_meaning(tokens, E, top_k))

    provenance = {
        "method": method,
        "sparsity": drop / E,
        "requested": {"keep": keep} if keep is not None else {"sparsity": sparsity},
        "experts": {"before": E, "after": kept_n},
        "saliency_sha256": saliency.sha256,
        "preserved": {
            "super_experts": {str(l): v for l, v in sorted(supers.items())},
            "super_expert_rule": None if threshold is None else
            ("all layers" if preserve_outliers else f"first {SUPER_LAYER_SHARE:.0%} of MoE layers"),
            "super_expert_threshold": threshold,
            "pinned": {str(l): sorted(v) for l, v in sorted(pins.items())},
        },
        "never_routed": {str(l): len(p.never_routed) for l, p in sorted(layers.items())},
        "tie_break": "lower index kept",
        "reapsurgery": __version__,
    }
    if groups > 1:
        provenance["n_group"] = groups
    if saliency.mtp_layers:
        provenance["mtp_layers"] = saliency.mtp_layers
        notes.append(f"multi-token-prediction layers {saliency.mtp_layers} have statistics: the mask covers them, "
                     "and apply keeps and prunes them")
    mask = Mask(dict(model), {l: p.kept for l, p in layers.items()}, provenance)
    mask = replace(mask, sha256=hashlib.sha256(mask_bytes(mask)).hexdigest())
    return Plan(mask, method, E, top_k, drop, requested, n_group, layers, threshold, notes)


def _describe_protected(guarded: list[int], pinned, supers) -> str:
    parts = []
    p = [e for e in guarded if e in set(pinned)]
    s = [e for e in guarded if e in set(supers) and e not in set(pinned)]
    if p:
        parts.append(f"pinned {p}")
    if s:
        parts.append(f"super experts {s}")
    return ", ".join(parts)


def mask_bytes(mask: Mask) -> bytes:
    """The exact bytes Mask.save writes, so sha256 of the plan's mask is that of the file."""
    return mask.encode()


def save_mask(mask: Mask, path: str | Path, overwrite: bool = False) -> None:
    """Write atomically: a mask file is either complete or absent."""
    mask.save(path, overwrite)


def plan_for_checkpoint(saliency: Saliency, saliency_path: str | Path, ckpt: "Checkpoint", **options) -> Plan:
    """plan_mask, after checking the saliency is for this checkpoint, with its router's group facts."""
    check_fingerprint(saliency.model, ckpt.fingerprint(), Path(saliency_path), ckpt.path)
    unstored = sorted(set(saliency.mtp_layers) - set(ckpt.stored_mtp_layers())) if saliency.mtp_layers else []
    if unstored:
        raise ReapError(saliency_path, f"has statistics for layers {unstored} past the {ckpt.num_hidden_layers} decoder "
                                       f"layers, which {ckpt.path} does not store as multi-token-prediction layers")
    groups = ckpt.layout.groups or {}
    topk_group = ckpt.layout.topk_group(ckpt.cfg)
    if groups and topk_group is None:
        topk_group = ckpt.layout.n_group(ckpt.cfg)
    return plan_mask(saliency, topk_group=topk_group, min_per_group=int(groups.get("min_per_group", 1)),
                     source=saliency_path, **options)


def plan_from_files(saliency_path: str | Path, ckpt_path: str | Path | None = None, layout: "Layout | None" = None,
                    **options) -> Plan:
    """Load saliency.json and plan; with a checkpoint (or a GGUF file), check it matches and use its
    router's facts.

    `layout` (a user's layout file) replaces the built-in one for the checkpoint."""
    from .common.saliency import load_saliency

    return plan_from_saliency(load_saliency(saliency_path), saliency_path, ckpt_path, layout, **options)


def plan_from_saliency(saliency: Saliency, saliency_path: str | Path, ckpt_path: str | Path | None = None,
                       layout: "Layout | None" = None, **options) -> Plan:
    """plan_from_files for a saliency already loaded (`plan --from-evaluation` reads it first)."""
    from .common.checkpoint import Checkpoint
    from .common.gguf_file import gguf_model_path

    if ckpt_path is None:
        return plan_mask(saliency, source=saliency_path, **options)
    if gguf_model_path(ckpt_path) is not None:
        from .common.gguf_model import GGUFModel

        model = GGUFModel.open(gguf_model_path(ckpt_path))
        model.check_model(saliency.model, Path(saliency_path))
        router = model.router()
        return plan_mask(saliency, topk_group=router.topk_group or router.n_group, min_per_group=router.min_per_group,
                         source=saliency_path, **options)
    return plan_for_checkpoint(saliency, saliency_path, Checkpoint.open(ckpt_path, layout), **options)
