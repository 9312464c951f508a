"""Planning GGUF surgery: from the model's headers and the mask, every output file's header and the
source byte ranges of its data; writes nothing.

In GGUF ne[0] is the fastest axis and the expert axis the slowest, so one expert of a stacked tensor
is one contiguous run of whole quant blocks in every ggml type, and a router keeps one row per
expert: slicing is byte arithmetic, nothing is decoded. Tensors keep their order and their file
(a split set gives as many files, each with its source's tensors); each starts at the next
multiple of general.alignment, as llama.cpp requires, the padding after a sliced one left as
zeros. Metadata is copied record by record as bytes, except the keys that must change: the expert
count, the size label the converter derives from the tensors, the block and NextN counts when
NextN blocks are dropped, the split tensor count; the mask is recorded under reapsurgery.*, its
JSON padded with spaces so that the data starts at the source data's offset within a page (a
copied range then moves whole pages, as safetensors headers are padded for).
"""

from __future__ import annotations

import json
import math
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..common.gguf_file import GGUFFile, GGUFTensor, constants, pad, read_gguf_header
from ..common.gguf_model import BLOCK, GGUFModel, router_bases, role_of
from ..common.mask import Mask, check_routable, kept_mtp_layers
from ..common.safetensors_io import PAGE
from ..errors import ReapError
from .copier import HOLE
from .gguf_header import encode_header, encode_kv, encode_tensor_info, unpadded_size
from .shards import index_runs

RECORD_PREFIX = "reapsurgery."  # keys this tool writes; any from an earlier run are replaced
MASK_KEY, SHA_KEY = "reapsurgery.mask", "reapsurgery.mask_sha256"


@dataclass
class GGUFOutFile:
    """One output file, compact: what writer.write_files needs (its header, its coalesced source ranges),
    not a record per tensor."""

    name: str
    source: str
    header: bytes
    ranges: array
    nbytes: int
    n_tensors: int

    @property
    def tensors(self) -> list[GGUFTensor]:
        """The file's tensor infos, read back from its header."""
        return read_gguf_header(self.header, self.name).tensors


@dataclass
class GGUFPlan:
    files: list[GGUFOutFile]
    kept: int
    experts_before: int
    moe_layers: list[int]
    dropped_layers: list[int]  # NextN blocks dropped
    kept_mtp_layers: list[int]  # NextN blocks pruned with the mask, like the stack
    metadata_changes: dict[str, tuple]
    notes: list[str]
    bytes_before: int  # the source's data sections (tensors and their padding), as total_size counts the output's
    mtp_dropped: str | None = None

    @property
    def total_size(self) -> int:
        return sum(f.nbytes for f in self.files)

    def change_facts(self) -> dict:
        """The same facts as SurgeryPlan.change_facts, for apply --dry-run and inspect."""
        return {"config_changes": {k: list(v) for k, v in self.metadata_changes.items()},
                "dropped_layers": self.dropped_layers, "dropped_prefixes": [],
                "kept_mtp_layers": self.kept_mtp_layers, "notes": self.notes, "mtp_dropped": self.mtp_dropped}


class ParamCount:
    """GGUFWriter.get_total_parameter_count (convert_hf_to_gguf.py's count for the size label), one
    tensor at a time, over GGUF shapes (numpy's shape is ne reversed)."""

    def __init__(self) -> None:
        self.total = self.shared = self.expert = self.expert_sum = self.expert_tensors = 0

    def add(self, name: str, ne: tuple[int, ...]) -> None:
        size = math.prod(ne)
        if "_exps." in name and len(ne) >= 3:
            count = ne[1] if ".bias" in name else ne[2]  # numpy shape[-2] / shape[-3]
            self.expert += size // count
            self.expert_sum += count
            self.expert_tensors += 1
        else:
            self.shared += size
        self.total += size

    def label(self) -> str:
        """gguf.size_label: "8x35K" (expert count x parameters per expert plus shared), "7.2B" without experts."""
        count = self.expert_sum // self.expert_tensors if self.expert_tensors else 0
        return f"{count}x{_rounded(self.shared + self.expert)}" if count > 0 else _rounded(self.total)


def size_label(tensors: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """general.size_label as convert_hf_to_gguf.py computes it from the tensors it writes: the gguf
    package's GGUFWriter.get_total_parameter_count and size_label(), restated because the package
    imports numpy on import (0.2 s and 17 MiB, most of a warm 1 GiB run); tests/test_gguf_plan.py
    holds it equal to the package's functions."""
    count = ParamCount()
    for name, ne in tensors:
        count.add(name, ne)
    return count.label()


def _rounded(n: int, min_digits: int = 2) -> str:
    """gguf.utility.model_weight_count_rounded_notation."""
    scaled, suffix = next(((n * f, s) for limit, f, s in ((1e12, 1e-12, "T"), (1e9, 1e-9, "B"), (1e6, 1e-6, "M"))
                           if n > limit), (n * 1e-3, "K"))
    fix = max(min_digits - len(str(round(scaled)).lstrip("0")), 0)
    return f"{scaled:.{fix}f}{suffix}"


def _append(ranges: array, offset: int, n: int) -> None:
    """Add (offset, n) to flat ranges, merged into the last one where contiguous in the source."""
    if ranges and offset != HOLE and ranges[-2] + ranges[-1] == offset:
        ranges[-1] += n
    else:
        ranges.extend((offset, n))


def plan_gguf(model: GGUFModel, mask: Mask, mask_path: Path, names: list[str] | None = None) -> GGUFPlan:
    """Check the mask against the model and compute every output file; writes nothing.
    `names`: the output file names, one per part (default: the source's)."""
    model.check_model(mask.model, mask_path)
    n, E = model.num_hidden_layers, model.num_experts
    missing = sorted(set(model.moe_layers) - set(mask.layers))
    extra = sorted(l for l in set(mask.layers) - set(model.moe_layers) if l < n)
    if missing or extra:
        detail = f"lacks MoE layers {missing}" if missing else f"names layers {extra} that are not MoE layers"
        raise ReapError(mask_path, f"mask {detail} of {model.path}")
    check_routable(mask, mask_path, model.router())
    kept_mtp, drop_mtp, notes = _nextn(model, mask, mask_path)

    # tensors first (infos and data ranges), then the headers, which record the size label of them all
    before, after = ParamCount(), ParamCount()
    per_part = [_part_tensors(part, model, mask, drop_mtp, before, after) for part in model.parts]
    rewrites = _rewrites(model, mask.kept, drop_mtp, before, after, sum(c for _, c, _ in per_part), notes)
    recorded = {SHA_KEY: mask.sha256 or "", MASK_KEY: json.dumps(mask.to_json(), separators=(",", ":"))}
    files = []
    changes: dict[str, tuple] = {}
    names = names or [p.path.name for p in model.parts]
    for i, (part, (infos, count, ranges)) in enumerate(zip(model.parts, per_part)):
        records = _records(part, rewrites, recorded if i == 0 else {}, changes)
        if i == 0 and count:  # the data at the source's offset within a page: copies then move whole pages
            spaces = (part.data_offset - unpadded_size(records, infos)) % PAGE
            records[-1] = encode_kv(MASK_KEY, constants().GGUFValueType.STRING, recorded[MASK_KEY] + " " * spaces)
        header = encode_header(part.version, records, len(records), count, infos, part.alignment)
        files.append(GGUFOutFile(names[i], part.path.name, header, ranges, sum(ranges[1::2]), count))

    dropped = sorted(set(range(n, model.block_count)) | set(model.stored_mtp_layers)) if drop_mtp else []
    plan = GGUFPlan(files, mask.kept, E, model.moe_layers, dropped, sorted(kept_mtp), changes, notes,
                    sum(t.nbytes + pad(t.nbytes, part.alignment) for part, t in model.tensors()))
    if dropped:
        keys = constants().Keys.LLM
        counts = [f"{k} {old} -> {new}" for k, (old, new) in changes.items()
                  if k in (model.key(keys.BLOCK_COUNT), model.key(keys.NEXTN_PREDICT_LAYERS))]
        plan.mtp_dropped = (f"NextN (multi-token-prediction) blocks {dropped} dropped"
                            + (f", {', '.join(counts)}" if counts else "")
                            + ": no MTP speculative decoding from the output; to keep them, pruned like the stack, "
                              "apply a mask that covers them (calibrate --mtp calibrate on the safetensors model)")
    return plan


def _nextn(model: GGUFModel, mask: Mask, mask_path: Path) -> tuple[set[int], bool, list[str]]:
    """NextN blocks as MTP layers are for safetensors: (the ones kept and pruned, whether the others are
    dropped, notes). Kept where the mask covers every stored one with experts; else all dropped."""
    n, keys = model.num_hidden_layers, constants().Keys.LLM
    routers = router_bases()
    with_experts = {r.layer for _, t in model.tensors() if (r := role_of(t.name, routers)) and r.layer >= n}
    kept = kept_mtp_layers(with_experts, mask, mask_path)
    notes = []
    unmatched = sorted(l for l in mask.layers if l >= n and l not in kept)
    if unmatched:
        notes.append(f"the mask has experts for multi-token-prediction layers {unmatched}, which this file does not "
                     "store: nothing to keep there")
    if model.nextn and not model.stored_mtp_layers:
        notes.append(f"{model.key(keys.NEXTN_PREDICT_LAYERS)} announces {model.nextn} NextN block(s) that the file "
                     "does not store; the output says 0")
    return kept, not kept and (bool(model.stored_mtp_layers) or model.nextn > 0), notes


def _part_tensors(part: GGUFFile, model: GGUFModel, mask: Mask, drop_mtp: bool, before: ParamCount,
                  after: ParamCount) -> tuple[bytes, int, array]:
    """One part's output: its tensor infos encoded, how many, and the source ranges of its data (expert
    runs of the slowest axis for expert-indexed tensors, whole tensors with their padding for the
    others, a HOLE for the padding after a sliced one)."""
    n, E, kept = model.num_hidden_layers, model.num_experts, mask.kept
    routers = router_bases()
    infos = bytearray()
    ranges = array("Q")
    offset = count = 0
    for t in part.tensors:
        before.add(t.name, t.ne)
        m = BLOCK.match(t.name)
        layer = int(m["layer"]) if m else None
        if drop_mtp and layer is not None and layer >= n:
            continue
        base = part.data_offset + t.offset
        keep = mask.layers.get(layer) if role_of(t.name, routers) is not None else None
        if keep is None:  # copied whole
            ne, nbytes = t.ne, t.nbytes
            _append(ranges, base, nbytes)
        else:
            inner = t.nbytes // E
            ne, nbytes = t.ne[:-1] + (kept,), inner * kept
            for start, run in index_runs(keep):
                _append(ranges, base + start * inner, run * inner)
        tail = pad(nbytes, part.alignment)
        if nbytes == t.nbytes and base + nbytes + tail <= part.size:
            ranges[-1] += tail  # the source's own padding, in the same copy
        elif tail:
            _append(ranges, HOLE, tail)
        infos += encode_tensor_info(GGUFTensor(t.name, ne, t.type, offset, nbytes))
        after.add(t.name, ne)
        offset += nbytes + tail
        count += 1
    return bytes(infos), count, ranges


def _rewrites(model: GGUFModel, kept: int, drop_mtp: bool, before: ParamCount, after: ParamCount, total: int,
              notes: list[str]) -> dict[str, object]:
    """The metadata values that change: the expert count, the block and NextN counts when NextN blocks
    are dropped, the converter's size label, the split set's tensor count."""
    first, keys = model.first, constants().Keys
    rewrites: dict[str, object] = {model.key(keys.LLM.EXPERT_COUNT): kept}
    if drop_mtp:
        rewrites[model.key(keys.LLM.BLOCK_COUNT)] = model.num_hidden_layers
        if first.value(model.key(keys.LLM.NEXTN_PREDICT_LAYERS)) is not None:
            rewrites[model.key(keys.LLM.NEXTN_PREDICT_LAYERS)] = 0
    label_key = keys.General.SIZE_LABEL
    if isinstance(first.value(label_key), str):
        if first.value(label_key) != before.label():
            notes.append(f"{label_key} was {first.value(label_key)!r}, not the converter's count of this file's tensors "
                         f"({before.label()!r}); it is now the count of the output's")
        rewrites[label_key] = after.label()
    if len(model.parts) > 1:
        rewrites[keys.Split.LLM_KV_SPLIT_TENSORS_COUNT] = total
    return rewrites


def _records(part: GGUFFile, rewrites: dict[str, object], added: dict[str, str],
             changes: dict[str, tuple]) -> list[bytes]:
    """The part's key-value records: each copied as bytes unless rewritten (same value type), earlier
    reapsurgery.* records dropped, `added` string records appended."""
    with open(part.path, "rb") as f:
        head = f.read(part.kv_end)
    STRING = constants().GGUFValueType.STRING
    records = []
    for key, kv in part.kv.items():
        if key.startswith(RECORD_PREFIX):
            continue
        if key in rewrites and kv.value != rewrites[key]:
            if kv.type == constants().GGUFValueType.ARRAY:
                raise ReapError(part.path, f"{key} is an array (a value per layer); reapsurgery rewrites it only "
                                           "as one value")
            changes[key] = (kv.value, rewrites[key])
            records.append(encode_kv(key, kv.type, rewrites[key]))
        else:
            records.append(head[kv.start:kv.end])
    records.extend(encode_kv(key, STRING, value) for key, value in added.items())
    return records
