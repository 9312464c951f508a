"""Facts about a checkpoint, a saliency file or a mask, and what `apply` would write.

Gathers plain JSON-serialisable values; the CLI formats them. Reads only config files and
safetensors headers, never tensor data.

Counting rules:

- bytes: from the shard headers (what is on disk for tensor data, headers excluded);
- params: tensor elements as stored (a packed quantized tensor counts its storage
  elements, e.g. U8 bytes holding two int4 values each count one);
- routed-expert params: per-expert tensors and stacked ``[.., E, ..]`` expert tensors of
  MoE layers; routers are not expert params (every token uses them);
- mtp params: layers past the decoder stack (multi-token prediction), which transformers
  does not run and `apply` drops;
- active params: approximately what one token uses, ``non-expert + top_k / E *
  routed-expert`` where non-expert excludes mtp and E is the routed-expert count of the
  checkpoint (after pruning, E'). Shared experts count as non-expert (always active).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Iterator

from .common.checkpoint import Checkpoint, resolve_checkpoint
from .common.gguf_file import gguf_model_path, type_name
from .common.files import read_json
from .errors import ReapError
from .common.layouts import Layout
from .common.mask import MASK_FORMAT, Mask, load_mask
from .plan import expert_scores, super_experts
from .common.quant import quantization_info
from .common.saliency import SALIENCY_FORMAT, Saliency, load_saliency

CATEGORIES = ("routed_experts", "routers", "mtp", "other")


# -- size accounting ------------------------------------------------------------

def account(tensors: Iterable[tuple[str, str, tuple[int, ...], int]], layout: Layout,
            num_hidden_layers: int, num_experts: int, top_k: int) -> dict[str, Any]:
    """Params and bytes by category for (name, dtype, shape, nbytes) tuples, plus active params."""
    params = {c: 0 for c in CATEGORIES}
    nbytes = {c: 0 for c in CATEGORIES}
    dtypes: dict[str, dict[str, int]] = {}
    count = 0
    for name, dtype, shape, n in tensors:
        count += 1
        elements = math.prod(shape)
        role = layout.classify(name)
        if layout.is_mtp(name, num_hidden_layers):
            cat = "mtp"
        elif role is None:
            cat = "other"
        elif role.kind == "router":
            cat = "routers"
        else:
            cat = "routed_experts"
        params[cat] += elements
        nbytes[cat] += n
        d = dtypes.setdefault(dtype, {"params": 0, "bytes": 0})
        d["params"] += elements
        d["bytes"] += n
    non_expert = params["other"] + params["routers"]
    active = non_expert + (params["routed_experts"] * top_k / num_experts if num_experts else 0)
    return {
        "tensors": count,
        "params": sum(params.values()),
        "bytes": sum(nbytes.values()),
        "active_params": round(active),
        "by_category": {c: {"params": params[c], "bytes": nbytes[c]} for c in CATEGORIES},
        "dtypes": dict(sorted(dtypes.items())),
    }


def checkpoint_tensors(ckpt: Checkpoint) -> Iterator[tuple[str, str, tuple[int, ...], int]]:
    """(name, dtype, shape, nbytes) of every tensor, one shard header in memory at a time."""
    for _, header in ckpt.shard_headers():
        yield from ((name, info.dtype, info.shape, info.nbytes) for name, info in header.tensors.items())


def checkpoint_account(ckpt: Checkpoint) -> dict[str, Any]:
    return account(checkpoint_tensors(ckpt), ckpt.layout, ckpt.num_hidden_layers, ckpt.num_experts, ckpt.top_k)


# -- per kind -----------------------------------------------------------------------

def inspect_checkpoint(path: str | Path, layout: Layout | None = None) -> dict[str, Any]:
    ckpt = Checkpoint.open(path, layout)
    fp = ckpt.fingerprint()
    return {
        "kind": "checkpoint",
        "path": str(ckpt.path),
        "model": fp,
        "layout": ckpt.layout.name,
        "topk_group": ckpt.layout.topk_group(ckpt.cfg),
        "dense_layers": [l for l in range(ckpt.num_hidden_layers) if l not in set(fp["moe_layers"])],
        "shards": len(ckpt.shards),
        "quantization": quantization_info(ckpt.config, ckpt.path),
        "size": checkpoint_account(ckpt),
    }


def inspect_mask(path: str | Path, ckpt_path: str | Path | None = None, layout: Layout | None = None) -> dict[str, Any]:
    """A mask's contents; with a checkpoint, the size before and after applying it."""
    path = Path(path)
    mask = load_mask(path)
    E = mask.model["num_experts"]
    top_k = mask.model["num_experts_per_tok"]
    facts: dict[str, Any] = {
        "kind": "mask",
        "path": str(path),
        "sha256": mask.sha256,
        "model": mask.model,
        "experts_before": E,
        "experts_after": mask.kept,
        "sparsity": (E - mask.kept) / E if isinstance(E, int) and E else None,
        "moe_layers": len(mask.layers),
        "layers": {str(l): v for l, v in sorted(mask.layers.items())},
        "provenance": mask.provenance,
        # what is computable without a checkpoint: the share of routed-expert parameters kept,
        # and the share of them a token uses before and after
        "routed_expert_share_kept": mask.kept / E if isinstance(E, int) and E else None,
        "active_expert_share": {"before": top_k / E, "after": top_k / mask.kept}
        if isinstance(E, int) and isinstance(top_k, int) and E and mask.kept else None,
        "size": None,
    }
    if ckpt_path is not None:
        facts["size"] = mask_size(mask, path, ckpt_path, layout)
    return facts


def mask_size(mask: Mask, mask_path: str | Path, ckpt_path: str | Path, layout: Layout | None = None) -> dict[str, Any]:
    """Params and bytes of the checkpoint before and after applying the mask (exact: surgery's own plan)."""
    if gguf_model_path(ckpt_path) is not None:
        return gguf_mask_size(mask, mask_path, gguf_model_path(ckpt_path))
    from .surgery.safetensors_plan import plan_surgery

    ckpt = Checkpoint.open(ckpt_path, layout)
    plan = plan_surgery(ckpt, mask, Path(mask_path))
    before = checkpoint_account(ckpt)
    after = account(((t.name, t.dtype, t.shape, t.nbytes) for s in plan.shards for t in s.tensors),
                    ckpt.layout, ckpt.num_hidden_layers, plan.kept, ckpt.top_k)
    return {
        "checkpoint": str(ckpt.path),
        "before": before,
        "after": after,
        "shards_after": len(plan.shards),
        "bytes_saved": before["bytes"] - after["bytes"],
        "quantization": quantization_info(ckpt.config, ckpt.path),
        **plan.change_facts(),
    }


def inspect_saliency(path: str | Path, method: str = "reap") -> dict[str, Any]:
    """Per layer: tokens, never-routed experts and the spread of the method's scores."""
    path = Path(path)
    return saliency_facts(load_saliency(path), path, method)


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None where that is not a finite number (b = 0, or a quotient past the float range)."""
    q = a / b if b > 0 else math.inf
    return q if math.isfinite(q) else None


def saliency_facts(sal: Saliency, path: Path | None = None, method: str = "reap") -> dict[str, Any]:
    layers = {}
    for l, stats in sorted(sal.layers.items()):
        scores = expert_scores(stats, method, l, path)
        routed = sorted(s for s in scores if s is not None)
        spread = None
        if routed:
            spread = {
                "min": routed[0],
                "median": statistics.median(routed),
                "max": routed[-1],
                "max_over_min": _ratio(routed[-1], routed[0]),
            }
        layers[str(l)] = {
            "tokens": stats.tokens,
            "routed_pairs": sum(stats.count),
            "never_routed": [e for e, s in enumerate(scores) if s is None],
            "scores": spread,
        }
    supers, threshold = super_experts(sal.layers, num_hidden_layers=sal.model["num_hidden_layers"])
    outliers, _ = super_experts(sal.layers, True, sal.model["num_hidden_layers"])
    return {
        "kind": "saliency",
        "path": None if path is None else str(path),
        "sha256": sal.sha256,
        "model": sal.model,
        "calibration": sal.calibration,
        "method": method,
        "layers": layers,
        "super_experts": {
            "threshold": threshold,
            "first_75_percent": {str(l): v for l, v in sorted(supers.items())},
            "all_layers": {str(l): v for l, v in sorted(outliers.items())},
        },
    }


def file_kind(path: str | Path) -> str:
    """'gguf' for a GGUF model, 'checkpoint' for a directory, else the JSON file's "format" ('mask' or
    'saliency')."""
    if gguf_model_path(path) is not None:
        return "gguf"
    path = resolve_checkpoint(path)
    if path.is_dir():
        return "checkpoint"
    data = read_json(path, "checkpoint directory, mask or saliency file")
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt == MASK_FORMAT:
        return "mask"
    if fmt == SALIENCY_FORMAT:
        return "saliency"
    raise ReapError(path, f"not a checkpoint directory, mask or saliency file ('format' is {fmt!r}; "
                          f"expected {MASK_FORMAT!r} or {SALIENCY_FORMAT!r})")


def inspect_path(path: str | Path, ckpt: str | Path | None = None, method: str = "reap",
                 layout: Layout | None = None) -> dict[str, Any]:
    """`layout` (a user's layout file) replaces the built-in one for the checkpoint read."""
    kind = file_kind(path)
    if kind == "gguf":
        if ckpt is not None:
            raise ReapError(ckpt, "--ckpt goes with a mask file, not a GGUF file")
        return inspect_gguf(gguf_model_path(path))
    if kind == "checkpoint":
        if ckpt is not None:
            raise ReapError(ckpt, "--ckpt goes with a mask file, not a checkpoint")
        return inspect_checkpoint(path, layout)
    if kind == "mask":
        return inspect_mask(path, ckpt, layout)
    if ckpt is not None:
        raise ReapError(ckpt, "--ckpt goes with a mask file, not a saliency file")
    return inspect_saliency(path, method)


# -- GGUF ---------------------------------------------------------------------------


def gguf_account(model, tensors: Iterable, num_experts: int | None = None) -> dict[str, Any]:
    """account() of GGUF tensor infos: params are elements (ne), dtypes ggml types; `num_experts`
    for the active share (default: the model's; after pruning, the kept count)."""
    from .common.gguf_model import TensorKinds

    return account(((t.name, type_name(t.type), t.ne, t.nbytes) for t in tensors), TensorKinds(),
                   model.num_hidden_layers, num_experts or model.num_experts, model.top_k)


def inspect_gguf(path: Path) -> dict[str, Any]:
    """A GGUF model's MoE facts and sizes, from its header only; and what reapsurgery did to it, if anything."""
    import json

    from .common.gguf_file import constants
    from .common.gguf_model import GGUFModel
    from .surgery.gguf_plan import MASK_KEY, SHA_KEY

    model = GGUFModel.open(path)
    first = model.first
    try:
        recorded = json.loads(first.value(MASK_KEY))
    except (TypeError, ValueError):
        recorded = None
    return {
        "kind": "gguf",
        "path": str(path),
        "model": model.fingerprint(),
        "files": [str(p.path) for p in model.parts],
        "topk_group": model.group_used,
        "nextn": {"announced": model.nextn, "stored": model.stored_mtp_layers},
        "size_label": first.value(constants().Keys.General.SIZE_LABEL),
        "pruned": {"mask_sha256": first.value(SHA_KEY), "experts_after": model.num_experts,
                   "experts_before": (recorded.get("model") or {}).get("num_experts")}
        if isinstance(recorded, dict) else None,
        "size": gguf_account(model, (t for _, t in model.tensors())),
    }


def gguf_mask_size(mask: Mask, mask_path: str | Path, path: Path) -> dict[str, Any]:
    """mask_size for a GGUF model: before and after from surgery's own GGUF plan."""
    from .common.gguf_model import GGUFModel
    from .surgery.gguf_plan import plan_gguf

    model = GGUFModel.open(path)
    plan = plan_gguf(model, mask, Path(mask_path))
    before = gguf_account(model, (t for _, t in model.tensors()))
    after = gguf_account(model, (t for f in plan.files for t in f.tensors), plan.kept)
    return {
        "checkpoint": str(path),
        "before": before,
        "after": after,
        "shards_after": len(plan.files),
        "bytes_saved": before["bytes"] - after["bytes"],
        "quantization": None,
        "format": "gguf",
        **plan.change_facts(),
    }
