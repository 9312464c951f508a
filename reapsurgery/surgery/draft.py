"""`apply --mtp keep-full`: the multi-token-prediction block, unpruned, as a draft model directory.

A separate directory with the source's own config.json (original expert count, MTP count) and
only the MTP tensors, plus the trunk tensors the block shares (embeddings, LM head), every tensor
copied byte for byte under its own name: the unpruned block kept beside the pruned model.
No server is known to draft with it beside the pruned trunk: vLLM 0.32 (`method: mtp` with this
`model`) refuses a trunk whose MTP count is 0 and builds the head with the trunk's pruned expert
count otherwise (README, "Multi-token-prediction blocks"); a block kept pruned
(`calibrate --mtp calibrate`) is what vLLM serves.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..common.checkpoint import INDEX, Checkpoint
from ..errors import ReapError
from .shards import OutShard, OutTensor
from .writer import write_files

DRAFT_DIR = "mtp-draft"


def draft_tensor_names(ckpt: Checkpoint) -> list[str]:
    """The MTP tensors (past the stack or under an MTP prefix) and the trunk tensors they share."""
    layout, n = ckpt.layout, ckpt.num_hidden_layers
    if layout.derived is not None:
        raise ReapError(ckpt.path, f"--mtp keep-full: the {layout.name} layout is derived from the model, and a draft "
                                   "directory holding only the MTP block gives nothing to derive it from again; "
                                   "keep the block pruned instead (calibrate --mtp calibrate)")
    mtp = [name for name in ckpt.weight_map if layout.is_mtp(layout.canonical(name, n), n)]
    if not mtp:
        raise ReapError(ckpt.path, "--mtp keep-full: the checkpoint stores no multi-token-prediction block "
                                   f"(config {layout.mtp_key}={layout.mtp_count(ckpt.cfg)})")
    shared = [name for name in (layout.mtp_block or {}).get("shared", []) if name in ckpt.weight_map]
    return sorted(set(mtp) | set(shared))


def plan_draft(ckpt: Checkpoint) -> list[OutShard]:
    """The draft's shards (one per source shard holding its tensors), as apply's OutShard plan."""
    tensors = ckpt.tensors()
    per_source: dict[str, list] = {}
    for name in draft_tensor_names(ckpt):
        shard, info = tensors[name]
        start = ckpt.header(shard).data_offset + info.start
        per_source.setdefault(shard, []).append(OutTensor(name, info.dtype, info.shape, [(start, info.nbytes)]))
    shards = []
    for i, (source, out) in enumerate(sorted(per_source.items()), 1):
        shards.append(OutShard.build(source, out, {"format": "pt"},
                                     f"model-{i:05d}-of-{len(per_source):05d}.safetensors"))
    return shards


def write_draft(ckpt: Checkpoint, dst: Path) -> int:
    """Write the draft directory into `dst` (inside apply's staged output); returns its bytes."""
    shards = plan_draft(ckpt)
    dst.mkdir()
    write_files(shards, ckpt.path, dst)
    total = sum(s.nbytes for s in shards)
    with open(dst / INDEX, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": {t.name: s.name for s in shards for t in s.tensors}},
                  f, indent=2, sort_keys=True)
        f.write("\n")
    with open(dst / "config.json", "w") as f:  # the source's: original expert count and MTP count
        json.dump(ckpt.config, f, indent=2)
        f.write("\n")
    return total
