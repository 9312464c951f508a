"""`verify` on a GGUF model: the file reads as llama.cpp reads it, and its metadata agrees with its tensors."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..common.gguf_file import constants
from ..common.gguf_model import GGUFModel, role_of
from ..errors import ReapError
from .gguf_plan import MASK_KEY, size_label
from .result import VerifyReport

CONVERTER_LABEL = re.compile(r"^\d+x\d+(\.\d+)?[KMBT]$")  # what convert_hf_to_gguf.py writes for a MoE model


def verify_gguf(path: str | Path) -> VerifyReport:
    """Every defect found: the header and split set (as apply reads them, refusing what llama.cpp refuses),
    a router in every MoE block, the expert count of every expert tensor, the NextN count against the
    blocks stored, the converter's size label against the tensors, a recorded mask against the count."""
    path = Path(path)
    report = VerifyReport(path, format="gguf")
    try:
        model = GGUFModel.open(path)
    except ReapError as e:
        report.problems.append(str(e))
        return report
    first, keys = model.first, constants().Keys
    report.shards, report.num_experts, report.moe_layers = len(model.parts), model.num_experts, len(model.moe_layers)
    routers: set[int] = set()
    for _, t in model.tensors():
        report.tensors += 1
        report.total_size += t.nbytes
        role = role_of(t.name)
        if role is not None and role.kind == "router" and t.name.endswith("ffn_gate_inp.weight"):
            routers.add(role.layer)
    with_experts = {r.layer for _, t in model.tensors() if (r := role_of(t.name)) is not None}
    for layer in sorted(with_experts - routers):
        report.problems.append(f"{path}: MoE block {layer} has no router tensor blk.{layer}.ffn_gate_inp.weight")
    nextn_key = model.key(keys.LLM.NEXTN_PREDICT_LAYERS)
    stored = model.stored_mtp_layers
    if model.nextn and len(stored) != model.nextn:
        report.problems.append(f"{path}: {nextn_key}={model.nextn} announces {model.nextn} NextN block(s) but the file "
                               f"stores {len(stored)}" + (f" ({stored})" if stored else ""))
    label = first.value(keys.General.SIZE_LABEL)
    if isinstance(label, str) and CONVERTER_LABEL.match(label):
        counted = size_label((t.name, t.ne) for _, t in model.tensors())
        if counted != label:
            report.problems.append(f"{path}: {keys.General.SIZE_LABEL} is {label!r} but the tensors make {counted!r} "
                                   "(counted as convert_hf_to_gguf.py counts them)")
    recorded = first.value(MASK_KEY)
    if isinstance(recorded, str):
        try:
            kept = {len(v) for v in json.loads(recorded)["layers"].values()}
        except (ValueError, KeyError, TypeError, AttributeError):
            kept = None
        if kept != {model.num_experts}:
            report.problems.append(f"{path}: {MASK_KEY} does not record a mask keeping the "
                                   f"{model.key(keys.LLM.EXPERT_COUNT)}={model.num_experts} experts the file has")
    return report
