"""Planning safetensors surgery: from the checkpoint's headers and the mask, every output shard's
header and source byte ranges, the rewritten config and what happens to MTP blocks; writes nothing."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..common.checkpoint import SINGLE, Checkpoint
from ..common.mask import Mask, Router, check_fingerprint, check_routable, kept_mtp_layers
from ..errors import ReapError
from .draft import DRAFT_DIR, plan_draft
from .outconfig import index_metadata, rewrite_config
from .shards import OutShard, OutTensor, for_writers, slice_ranges
from .verify import ExpertCheck, tensor_role


@dataclass
class SurgeryPlan:
    shards: list[OutShard]
    config: dict
    kept: int
    experts_before: int
    moe_layers: list[int]
    dropped_layers: list[int] = field(default_factory=list)
    config_changes: dict[str, tuple] = field(default_factory=dict)
    dropped_prefixes: list[str] = field(default_factory=list)  # MTP tensors outside the layer stack
    kept_mtp_layers: list[int] = field(default_factory=list)  # pruned with the mask, like the stack
    notes: list[str] = field(default_factory=list)
    bytes_before: int = 0  # tensor bytes of the input
    elements_before: int = 0  # tensor elements of the input, for the index's total_parameters
    mtp_dropped: str | None = None  # one line: what dropping the MTP block means, and how to keep it
    draft_bytes: int | None = None  # --mtp keep-full: the unpruned MTP block written to mtp-draft/
    index: dict | None = None  # the output index's metadata; None for a single model.safetensors without index

    @property
    def elements(self) -> int:
        return sum(s.elements for s in self.shards)

    def change_facts(self) -> dict:
        """What the output changes besides experts (config keys, MTP blocks, notes), as plain JSON
        values: `inspect --ckpt` and `apply --dry-run` report the same facts."""
        return {
            "config_changes": {k: list(v) for k, v in self.config_changes.items()},
            "dropped_layers": self.dropped_layers,
            "dropped_prefixes": self.dropped_prefixes,
            "kept_mtp_layers": self.kept_mtp_layers,
            "notes": self.notes,
            "mtp_dropped": self.mtp_dropped,
        }

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)


def plan_surgery(ckpt: Checkpoint, mask: Mask, mask_path: Path, draft: bool = False) -> SurgeryPlan:
    """Check the mask against the checkpoint and compute every output tensor; writes nothing.
    `draft` (apply --mtp keep-full) also plans the unpruned MTP block as a draft directory."""
    check_fingerprint(mask.model, ckpt.fingerprint(), mask_path, ckpt.path)
    E, moe_layers, n = ckpt.num_experts, ckpt.moe_layers, ckpt.num_hidden_layers
    missing = sorted(set(moe_layers) - set(mask.layers))
    extra = sorted(l for l in set(mask.layers) - set(moe_layers) if l < n)  # past the stack: MTP layers
    if missing or extra:
        detail = f"lacks MoE layers {missing}" if missing else f"names layers {extra} that are not MoE layers"
        raise ReapError(mask_path, f"mask {detail} of checkpoint {ckpt.path}")
    kept = mask.kept
    check_routable(mask, mask_path, router_of(ckpt))

    layout = ckpt.layout
    mtp_count = layout.mtp_count(ckpt.cfg)
    check = ExpertCheck(ckpt)
    dropped_layers: set[int] = set()
    dropped_prefixes: set[str] = set()
    role_layers_past_stack: set[int] = set()
    # Shard by shard, each tensor classified once: one header in memory at a time.
    # Non-expert tensors of MTP blocks the mask names wait until we know whether those
    # blocks hold experts (then they are kept with them), which only the last shard tells.
    # A shard is encoded (header bytes, coalesced ranges) as soon as its pass ends, unless some of
    # its tensors wait: then after the pass.
    pending: list[tuple[int | None, str | None, str, OutTensor]] = []
    per_shard: dict[str, OutShard | list[OutTensor]] = {}
    metadata: dict[str, dict] = {}
    bytes_before = elements_before = 0
    for shard, header in ckpt.shard_headers():
        if per_shard:
            _encode_if_complete(per_shard, metadata, pending)
        base = header.data_offset
        out = per_shard[shard] = []
        metadata[shard] = {"format": "pt", **(header.metadata or {})}
        for name, info in header.tensors.items():
            bytes_before += info.nbytes
            elements_before += math.prod(info.shape)
            role = tensor_role(ckpt, name, info)
            if role is not None:
                check.add(name, shard, info, role)
            canonical = layout.canonical(name, n)  # mtp.layers.{d}.* as layer n + d
            layer = layout.layer_of(canonical)
            mtp_prefix = layout.mtp_prefix_of(name)
            whole = [(base + info.start, info.nbytes)]
            if layer is not None and layer >= n:
                # Layers past the decoder stack are multi-token-prediction blocks that transformers
                # does not run; kept unpruned they would have the old expert count. A mask measured
                # with `calibrate --mtp calibrate` covers them, and they are pruned like the others.
                if role is not None:
                    role_layers_past_stack.add(layer)
                if layer not in mask.layers:
                    if mtp_count or role is not None or mtp_prefix is not None:
                        (dropped_prefixes.add(mtp_prefix) if mtp_prefix is not None else dropped_layers.add(layer))
                        continue
                elif role is None and (mtp_count or mtp_prefix is not None):
                    pending.append((layer, mtp_prefix, shard, OutTensor(name, info.dtype, info.shape, whole)))
                    continue
            elif mtp_prefix is not None:
                # MTP tensors outside its layers (Qwen3-Next's mtp.fc, mtp.norm) go with the block
                pending.append((None, mtp_prefix, shard, OutTensor(name, info.dtype, info.shape, whole)))
                continue
            if role is None:
                out.append(OutTensor(name, info.dtype, info.shape, whole))
                continue
            keep = mask.layers.get(role.layer)
            if keep is None:
                continue  # an expert tensor in a layer config.json calls dense: reported by the check below
            if role.kind == "expert":
                if role.expert in keep:
                    renamed = layout.source_name(name, n, role.renamed(canonical, keep.index(role.expert)))
                    out.append(OutTensor(renamed, info.dtype, info.shape, whole))
                continue
            axis, rows = role.axis, role.rows(E)
            if axis >= len(info.shape) or info.shape[axis] != rows:
                continue  # reported by the check below
            shape = info.shape[:axis] + (kept + role.kept_after,) + info.shape[axis + 1 :]
            out.append(OutTensor(name, info.dtype, shape, slice_ranges(info, base, axis, role.kept_rows(keep, E), rows)))
    problems = check.result()
    if problems:
        raise ReapError(*problems[0])
    kept_mtp = kept_mtp_layers(role_layers_past_stack, mask, mask_path)
    _encode_if_complete(per_shard, metadata, pending)
    for layer, prefix, shard, t in pending:
        if layer in kept_mtp or (layer is None and kept_mtp):
            per_shard[shard].append(t)
        elif prefix is not None:
            dropped_prefixes.add(prefix)
        else:
            dropped_layers.add(layer)
    notes = []
    unmatched = sorted(l for l in mask.layers if l >= n and l not in kept_mtp)
    if unmatched and not (layout.mtp_key or layout.mtp_block):
        raise ReapError(mask_path, f"names layers {unmatched} past the {n} decoder layers of {ckpt.path}, "
                                   f"and the {layout.name} family has no multi-token-prediction layers")
    if unmatched:
        notes.append(f"the mask has experts for multi-token-prediction layers {unmatched}, which this checkpoint "
                     "does not store: nothing to keep there")
    # a config announcing MTP layers that are not stored (transformers' save_pretrained leaves them
    # out): the output says there are none, so that loaders do not look for them
    announced_absent = bool(mtp_count) and not (kept_mtp or dropped_layers or dropped_prefixes)
    if announced_absent:
        notes.append(f"config.json announces {mtp_count} multi-token-prediction layer(s) that the checkpoint does not "
                     "store; the output's config says 0")

    shards = []
    for source in ckpt.shards:
        out = per_shard[source]
        if isinstance(out, list):
            out = OutShard.build(source, out, metadata[source]) if out else None
        if out is not None:
            shards.append(out)
    shards = for_writers(shards)
    n = len(shards)
    for i, shard in enumerate(shards, 1):
        shard.name = SINGLE if (n == 1 and ckpt.index_metadata is None) else f"model-{i:05d}-of-{n:05d}.safetensors"

    config, changes = rewrite_config(ckpt, kept, bool(dropped_layers or dropped_prefixes or announced_absent),
                                     mask.layers)
    draft_bytes = sum(s.nbytes for s in plan_draft(ckpt)) if draft else None
    plan = SurgeryPlan(shards, config, kept, E, moe_layers, sorted(dropped_layers), changes, sorted(dropped_prefixes),
                       sorted(kept_mtp), notes, bytes_before, elements_before, draft_bytes=draft_bytes)
    plan.mtp_dropped = mtp_drop_line(ckpt, plan)
    if not (len(shards) == 1 and ckpt.index_metadata is None):
        plan.index = index_metadata(ckpt.index_metadata, config, plan.total_size, elements_before, plan.elements)
    return plan


def _encode_if_complete(per_shard: dict, metadata: dict[str, dict], pending: list) -> None:
    """Encode the last shard planned unless a pending tensor belongs to it; an empty one becomes None."""
    shard = next(reversed(per_shard))
    out = per_shard[shard]
    if not isinstance(out, list) or any(p[2] == shard for p in pending):
        return
    per_shard[shard] = OutShard.build(shard, out, metadata.pop(shard)) if out else None


def mtp_drop_line(ckpt: Checkpoint, plan: SurgeryPlan) -> str | None:
    """What dropping the MTP block means for the output's users, and how to keep it; None when kept."""
    if not (plan.dropped_layers or plan.dropped_prefixes):
        return None
    layout = ckpt.layout
    what = ", ".join(([f"layers {plan.dropped_layers}"] if plan.dropped_layers else [])
                     + [f"tensors {p}*" for p in plan.dropped_prefixes])
    zeroed = [k for k in plan.config_changes if k.rsplit(".", 1)[-1] in layout.mtp_keys]
    line = f"multi-token-prediction {what} dropped" + (f", {' and '.join(zeroed)} set to 0" if zeroed else "")
    line += ": no MTP speculative decoding from the output (vLLM's --speculative-config method mtp fails on it)"
    if layout.mtp_keep:
        line += f"; {layout.mtp_keep}"
    if plan.draft_bytes is not None:
        return line + f"; the unpruned block is in {DRAFT_DIR}/, a separate draft model"
    return line + ("; to keep it pruned like the stack, calibrate with --mtp calibrate"
                   + (" (the layout's mtp_block is needed)" if not layout.mtp_block else "")
                   + ", or at full width as a separate draft, apply --mtp keep-full")


def router_of(ckpt: Checkpoint) -> Router:
    """The checkpoint's router facts from its config and layout."""
    groups = ckpt.layout.groups or {}
    return Router(ckpt.num_experts, ckpt.top_k, ckpt.layout.n_group(ckpt.cfg) if groups else None,
                  ckpt.layout.topk_group(ckpt.cfg), groups.get("min_per_group", 1))
