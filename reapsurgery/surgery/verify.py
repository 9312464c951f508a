"""Check that a (pruned) checkpoint is self-consistent: index, headers, expert counts, config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..common.checkpoint import Checkpoint
from ..errors import ReapError
from ..common.layouts import Layout, TensorRole
from ..common.quant import router_companion
from ..common.safetensors_io import TensorInfo


@dataclass
class VerifyReport:
    path: Path
    shards: int = 0
    tensors: int = 0
    total_size: int = 0
    num_experts: int = 0
    moe_layers: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | Path, layout: Layout | None = None) -> VerifyReport:
    """Every defect found, not just the first; raises ReapError only when nothing can be read."""
    ckpt = Checkpoint.open(path, layout)
    report = VerifyReport(ckpt.path, shards=len(ckpt.shards), num_experts=ckpt.num_experts,
                          moe_layers=len(ckpt.moe_layers))
    try:
        tensors = ckpt.tensors()
    except ReapError as e:
        report.problems.append(str(e))
        return report
    report.tensors = len(tensors)
    report.total_size = sum(info.nbytes for _, info in tensors.values())
    declared = (ckpt.index_metadata or {}).get("total_size")
    if ckpt.index_metadata is not None and declared != report.total_size:
        report.problems.append(f"index metadata.total_size is {declared}, tensors hold {report.total_size} bytes")

    report.problems += [msg if where == ckpt.path else f"{where.name}: {msg}"
                        for where, msg in expert_tensor_problems(ckpt, tensors)]
    report.problems += mtp_count_problems(ckpt)
    return report


def mtp_count_problems(ckpt: Checkpoint) -> list[str]:
    """A config whose MTP count disagrees with the MTP layers stored: vLLM's MTP loading and llama.cpp's
    converter size the MTP block from the count key."""
    layout, cfg = ckpt.layout, ckpt.cfg
    stored = ckpt.stored_mtp_layers()
    if not stored and any(layout.mtp_prefix_of(name) for name in ckpt.weight_map):
        return []  # MTP tensors the layout cannot place in layers: nothing to count them against
    problems = []
    for key in layout.mtp_keys:
        count = cfg.get(key)
        if isinstance(count, int) and count != len(stored):
            said = (f"announces {count} multi-token-prediction layers but the checkpoint stores "
                    f"{len(stored)}" + (f" ({stored})" if stored else ""))
            problems.append(f"config.json {key}={count} {said}; set it to {len(stored)}")
    return problems


def tensor_role(ckpt: Checkpoint, name: str, info: TensorInfo) -> TensorRole | None:
    """The role of an expert, router or quantized-router companion tensor; None for any other.
    An MTP block stored outside the stack gets the role it would have as layer num_hidden_layers + d
    (its expert's `span` then lies in `ckpt.layout.canonical(name, ...)`)."""
    name = ckpt.layout.canonical(name, ckpt.num_hidden_layers)
    return ckpt.layout.classify(name) or router_companion(ckpt.layout, name, info.shape, ckpt.num_experts)


def tensor_roles(ckpt: Checkpoint, tensors: dict[str, tuple[str, TensorInfo]]) -> dict[str, TensorRole]:
    """The role of every expert, router or router-companion tensor, by name (one pass over the names)."""
    return {name: role for name, (_, info) in tensors.items() if (role := tensor_role(ckpt, name, info)) is not None}


def expert_tensor_problems(ckpt: Checkpoint, tensors: dict[str, tuple[str, TensorInfo]],
                           roles: dict[str, TensorRole] | None = None) -> list[tuple[Path, str]]:
    """Where expert and router tensors disagree with config.json, as (file, problem).

    Multi-token-prediction layers (past the decoder stack, or under mtp.* where the layout says
    where its layers are) are checked like MoE layers: none may be left with another expert count.
    """
    E, n = ckpt.num_experts, ckpt.num_hidden_layers
    roles = tensor_roles(ckpt, tensors) if roles is None else roles
    checked = {name: (*tensors[name], role) for name, role in sorted(roles.items())}
    mtp = {role.layer for _, _, role in checked.values() if role.layer >= n}
    in_stack = any(role.layer < n for _, _, role in checked.values())
    # a draft directory (apply --mtp keep-full) stores the MTP block and no decoder layer
    moe = (set(ckpt.moe_layers) if in_stack or not mtp else set()) | mtp
    experts: dict[int, set[int]] = {l: set() for l in moe}
    routers = {l: 0 for l in moe}
    problems: list[tuple[Path, str]] = []
    for name, (shard, info, role) in checked.items():
        if role.layer not in moe:
            problems.append((ckpt.path / shard, f"tensor {name!r} is an expert or router tensor but config.json says "
                                                f"layer {role.layer} is not an MoE layer"))
        elif role.kind == "expert":
            experts[role.layer].add(role.expert)
        elif role.axis >= len(info.shape) or info.shape[role.axis] != E:
            problems.append((ckpt.path / shard, f"tensor {name!r} has shape {list(info.shape)}; config says {E} "
                                                f"experts, expected on axis {role.axis}"))
        elif role.kind == "router":
            routers[role.layer] += 1
    for layer in sorted(moe):
        if not routers[layer]:
            problems.append((ckpt.path, f"MoE layer {layer} has no router tensor matching the {ckpt.layout.name} layout"))
        if experts[layer] and experts[layer] != set(range(E)):
            absent, extra = sorted(set(range(E)) - experts[layer]), sorted(experts[layer] - set(range(E)))
            detail = f"lacks tensors of experts {absent[:8]}" if absent else f"has tensors of experts {extra[:8]}"
            problems.append((ckpt.path, f"MoE layer {layer} {detail}; config says {E} experts"))
    return problems
