"""Check that a (pruned) checkpoint is self-consistent: index, headers, expert counts, config."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from ..common.checkpoint import INDEX, Checkpoint
from ..common.gguf_file import gguf_model_path
from ..errors import ReapError
from ..common.layouts import Layout, TensorRole
from ..common.quant import router_companion
from ..common.safetensors_io import TensorInfo
from .result import VerifyReport


def verify(path: str | Path, layout: Layout | None = None) -> VerifyReport:
    """Every defect found, not just the first; raises ReapError only when nothing can be read.
    A GGUF file (or a directory holding one GGUF model) is checked by gguf_verify."""
    gguf = gguf_model_path(path)
    if gguf is not None:
        if layout is not None:
            raise ReapError(path, "--layout describes a safetensors checkpoint's tensors; a GGUF file needs none")
        from .gguf_verify import verify_gguf

        return verify_gguf(gguf)
    ckpt = Checkpoint.open(path, layout)
    report = VerifyReport(ckpt.path, shards=len(ckpt.shards), num_experts=ckpt.num_experts,
                          moe_layers=len(ckpt.moe_layers))
    check = ExpertCheck(ckpt)
    try:
        for shard, header in ckpt.shard_headers():  # one header in memory at a time
            for name, info in header.tensors.items():
                report.tensors += 1
                report.total_size += info.nbytes
                role = tensor_role(ckpt, name, info)
                if role is not None:
                    check.add(name, shard, info, role)
    except ReapError as e:
        report.problems.append(str(e))
        return report
    declared = (ckpt.index_metadata or {}).get("total_size")
    if ckpt.index_metadata is not None and declared != report.total_size:
        report.problems.append(f"{ckpt.path / INDEX}: index metadata.total_size is {declared}, "
                               f"tensors hold {report.total_size} bytes")

    report.problems += [f"{where}: {msg}" for where, msg in check.result()]
    report.problems += [f"{ckpt.path / 'config.json'}: {msg}" for msg in mtp_count_problems(ckpt)]
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
            problems.append(f"{key}={count} {said}; set it to {len(stored)}")
    return problems


def tensor_role(ckpt: Checkpoint, name: str, info: TensorInfo) -> TensorRole | None:
    """The role of an expert, router or quantized-router companion tensor; None for any other.
    An MTP block stored outside the stack gets the role it would have as layer num_hidden_layers + d
    (its expert's `span` then lies in `ckpt.layout.canonical(name, ...)`)."""
    name = ckpt.layout.canonical(name, ckpt.num_hidden_layers)
    return ckpt.layout.classify(name) or router_companion(ckpt.layout, name, info.shape, ckpt.num_experts)


class ExpertCheck:
    """Where expert and router tensors disagree with config.json, gathered tensor by tensor.

    Fed one tensor at a time (with its role, classified once by the caller), so a pass over
    the shards can check while it plans. Layers stored past the decoder stack
    (multi-token prediction) are checked like MoE layers: whether kept or dropped, none may be
    left with another expert count, including MTP blocks under mtp.* where the layout places
    their layers (tensor_role reads them as layers num_hidden_layers + d). A draft directory
    (apply --mtp keep-full) stores the MTP block and no decoder layer: only its layers are checked.
    """

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.E = ckpt, ckpt.num_experts
        self.moe = set(ckpt.moe_layers)
        self.experts: dict[int, set[int]] = {}
        self.routers: dict[int, int] = {}
        self.problems: list[tuple[str, Path, str]] = []  # (tensor name, file, problem): sorted by name at the end
        self.in_stack = False  # any expert or router tensor of the decoder stack seen

    def add(self, name: str, shard: str, info: TensorInfo, role: TensorRole) -> None:
        ckpt = self.ckpt
        self.in_stack |= role.layer < ckpt.num_hidden_layers
        if role.layer not in self.moe and role.layer < ckpt.num_hidden_layers:
            self.problems.append((name, ckpt.path / shard, f"tensor {name!r} is an expert or router tensor but "
                                  f"config.json says layer {role.layer} is not an MoE layer"))
        elif role.kind == "expert":
            self.experts.setdefault(role.layer, set()).add(role.expert)
        elif role.axis >= len(info.shape) or info.shape[role.axis] != role.rows(self.E):
            after = f" and {role.kept_after} rows after them" if role.kept_after else ""
            self.problems.append((name, ckpt.path / shard, f"tensor {name!r} has shape {list(info.shape)}; config "
                                  f"says {self.E} experts{after}, expected on axis {role.axis}"))
        elif role.kind == "router":
            self.routers[role.layer] = self.routers.get(role.layer, 0) + 1
        if role.layer >= ckpt.num_hidden_layers:
            self.experts.setdefault(role.layer, set())

    def result(self) -> list[tuple[Path, str]]:
        """Every problem as (file, problem): tensors by name, then layers in order."""
        E, ckpt = self.E, self.ckpt
        problems = [(where, msg) for _, where, msg in sorted(self.problems, key=lambda p: p[0])]
        mtp = {l for l in self.experts if l >= ckpt.num_hidden_layers}
        for layer in sorted((self.moe if self.in_stack or not mtp else set()) | mtp):
            experts = self.experts.get(layer, set())
            if not self.routers.get(layer):
                problems.append((ckpt.path, f"MoE layer {layer} has no router tensor matching the {ckpt.layout.name} layout"))
            extra = sorted(e for e in experts if e >= E)
            if experts and (extra or len(experts) != E):  # sized by what is stored, not by config.json's E
                absent = list(islice((e for e in range(E) if e not in experts), 8))
                detail = f"lacks tensors of experts {absent}" if absent else f"has tensors of experts {extra[:8]}"
                problems.append((ckpt.path, f"MoE layer {layer} {detail}; config says {E} experts"))
        return problems
