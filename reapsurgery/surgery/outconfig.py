"""The output's config.json and index: every expert-count alias rewritten, MTP counts that match
what is stored, quantization settings that follow the kept experts, recomputed index totals."""

from __future__ import annotations

import copy
import heapq
import json
from pathlib import Path
from typing import Iterator

from ..common.checkpoint import INDEX, Checkpoint
from ..common.quant import rewrite_quantization_config
from .shards import OutShard


def rewrite_config(ckpt: Checkpoint, kept: int, dropped_mtp: bool,
                   keep: dict[int, list[int]] | None = None) -> tuple[dict, dict[str, tuple]]:
    """config.json with every routed-expert-count alias set to `kept`; returns (config, changes)."""
    config = copy.deepcopy(ckpt.config)
    targets = [("", config)]
    if isinstance(config.get("text_config"), dict):
        targets.append(("text_config.", config["text_config"]))
    changes: dict[str, tuple] = {}
    for prefix, d in targets:
        for key in ckpt.layout.num_experts_keys:
            value = d.get(key)
            if isinstance(value, list):  # per-layer counts, all equal (Checkpoint.open checked)
                new = [kept] * len(value)
                if value != new:
                    changes[prefix + key] = (value, new)
                    d[key] = new
            elif isinstance(value, int) and value != kept:
                changes[prefix + key] = (value, kept)
                d[key] = kept
        for mtp in ckpt.layout.mtp_keys if dropped_mtp else ():
            if d.get(mtp):
                changes[prefix + mtp] = (d[mtp], 0)
                d[mtp] = 0
    if keep is not None:  # quantization settings that name experts follow them
        changes.update(rewrite_quantization_config(config, ckpt.layout, keep))
    return config, changes


def write_index(shards: list[OutShard], metadata: dict, dst: Path) -> None:
    """The output's model.safetensors.index.json in `dst`, with `metadata` (index_metadata)."""
    # what json.dump(indent=2, sort_keys=True) writes, without a dict of every name: each shard's
    # names sorted into one text block, merged across shards line by line
    blocks = [(s.name, _block(sorted(t.name for t in s.tensors))) for s in shards]
    head = json.dumps({"metadata": metadata, "weight_map": {}}, indent=2, sort_keys=True)
    with open(dst / INDEX, "w") as f:
        if not any(block for _, block in blocks):
            f.write(head + "\n")
            return
        f.write(head.removesuffix("{}\n}") + "{\n")
        separator = ""
        for name, shard in heapq.merge(*(_lines(block, shard) for shard, block in blocks)):
            f.write(f"{separator}    {json.dumps(name)}: {json.dumps(shard)}")
            separator = ",\n"
        f.write("\n  }\n}\n")


def _block(names: list[str]) -> str | list[str]:
    """Sorted names as one string, a line each (a few bytes per name instead of a str object each);
    a name with a newline in it (legal, if odd) keeps the list."""
    return names if any("\n" in name for name in names) else "\n".join(names)


def _lines(block: str | list[str], shard: str) -> Iterator[tuple[str, str]]:
    """(name, shard) for each name of a block, one at a time."""
    if isinstance(block, list):
        yield from ((name, shard) for name in block)
        return
    start = 0
    while start < len(block):
        end = block.find("\n", start)
        end = len(block) if end < 0 else end
        yield block[start:end], shard
        start = end + 1


def index_metadata(source: dict | None, config: dict, total_size: int, elements_before: int,
                   elements: int) -> dict:
    """The input index's metadata (`source`) with its counts recomputed for the output.

    total_size is exact. total_parameters (transformers' num_parameters()) moves by the
    elements removed when it counted the stored tensors or the weights are not quantized
    (every removed element is then one parameter); otherwise it is dropped, as is any other
    number we cannot recompute. Strings (e.g. a format tag) are kept."""
    source = source or {}
    metadata = {k: v for k, v in source.items() if isinstance(v, str)}
    metadata["total_size"] = total_size
    declared = source.get("total_parameters")
    if isinstance(declared, int) and not isinstance(declared, bool):
        removed = elements_before - elements
        if declared == elements_before or "quantization_config" not in config:
            metadata["total_parameters"] = declared - removed
    return metadata
