"""Check that a (pruned) checkpoint is self-consistent: index, headers, expert counts, config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import Checkpoint
from .errors import ReapError
from .layouts import Layout


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

    E, layout = ckpt.num_experts, ckpt.layout
    moe = set(ckpt.moe_layers)
    experts: dict[int, set[int]] = {l: set() for l in moe}
    routers = {l: 0 for l in moe}
    for name, (shard, info) in sorted(tensors.items()):
        role = layout.classify(name)
        if role is None:
            continue
        if role.layer not in moe:
            report.problems.append(f"{shard}: {name} is an expert or router tensor in non-MoE layer {role.layer}")
        elif role.kind == "expert":
            experts[role.layer].add(role.expert)
        elif role.axis >= len(info.shape) or info.shape[role.axis] != E:
            report.problems.append(f"{shard}: {name} has shape {list(info.shape)}, config says {E} experts (axis {role.axis})")
        elif role.kind == "router":
            routers[role.layer] += 1
    for layer in sorted(moe):
        if not routers[layer]:
            report.problems.append(f"MoE layer {layer} has no router tensor")
        if experts[layer] and experts[layer] != set(range(E)):
            report.problems.append(
                f"MoE layer {layer} has per-expert tensors for experts {sorted(experts[layer])[:5]}... "
                f"({len(experts[layer])} experts), config says {E}")
    return report
