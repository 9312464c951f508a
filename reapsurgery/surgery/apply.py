"""Streaming expert surgery: plan every output byte range from headers, then copy ranges.

Nothing is decoded, so every dtype (quantized ones included) is handled the same way,
and memory stays bounded by the copy buffer whatever the checkpoint size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
from array import array
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from ..common.checkpoint import INDEX, SINGLE, Checkpoint
from ..errors import ReapError
from ..common.layouts import Layout
from ..common.mask import Mask, check_fingerprint
from .modelcard import write_card
from .copier import MAX_JOBS, coalesce, default_jobs, free_memory, pieces, run_pieces
from .outdir import check_output, staged_output
from ..common.quant import rewrite_hf_quant_config
from ..common.safetensors_io import DTYPE_BITS, PAGE, TensorInfo, encode_header, write_order
from .draft import DRAFT_DIR, plan_draft, write_draft
from .verify import ExpertCheck, tensor_role
from .outconfig import rewrite_config, write_index

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
MASK_COPY = "reapsurgery.mask.json"


@dataclass(slots=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    ranges: list[tuple[int, int]]  # (absolute offset in the source shard, length)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.ranges)


class Entry(NamedTuple):
    """One tensor of an output shard, as its header states it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(slots=True)
class OutShard:
    """An output shard, compact: its encoded header and its coalesced source ranges, not one
    record per tensor (a plan of Kimi-K2's 139k tensors then holds a few MB)."""

    source: str
    header: bytes  # length prefix included, as written
    ranges: array  # offset, length, offset, length... of the source shard, output order, coalesced
    nbytes: int
    elements: int
    name: str = ""

    @classmethod
    def build(cls, source: str, tensors: list[OutTensor], metadata: dict | None, name: str = "") -> "OutShard":
        """The shard holding `tensors` in write order (dtype size descending, then name)."""
        order = write_order([(t.name, t.dtype) for t in tensors])
        tensors = [tensors[i] for i in order]
        ranges = array("Q", chain.from_iterable(coalesce(r for t in tensors for r in t.ranges)))
        header = encode_header([(t.name, t.dtype, t.shape, t.nbytes) for t in tensors], metadata,
                               _phase(ranges))
        return cls(source, header, ranges,
                   sum(t.nbytes for t in tensors), sum(math.prod(t.shape) for t in tensors), name)

    def split(self, parts: int) -> list["OutShard"]:
        """This shard as up to `parts` shards of about equal bytes, cut between tensors (each
        part still in write order), its source ranges cut at the same output offsets."""
        if parts <= 1:
            return [self]
        metadata, tensors = self._read_back()
        groups: list[list[Entry]] = [[]]
        done = 0
        for t in tensors:
            if groups[-1] and done >= len(groups) * self.nbytes / parts:
                groups.append([])
            groups[-1].append(t)
            done += t.nbytes
        if len(groups) == 1:
            return [self]
        ranges = zip(self.ranges[::2], self.ranges[1::2])
        off = left = 0
        out = []
        for group in groups:
            nbytes = need = sum(t.nbytes for t in group)
            cut = array("Q")
            while need:
                if not left:
                    off, left = next(ranges)
                take = min(need, left)
                cut.extend((off, take))
                off, left, need = off + take, left - take, need - take
            out.append(OutShard(self.source, encode_header(group, metadata, _phase(cut)), cut, nbytes,
                                sum(math.prod(t.shape) for t in group)))
        return out

    @property
    def tensors(self) -> list[Entry]:
        """The shard's tensors in output order, read back from its header."""
        return self._read_back()[1]

    def _read_back(self) -> tuple[dict | None, list[Entry]]:
        """The header's metadata and its tensors in output order."""
        entries = json.loads(self.header[8:])
        metadata = entries.pop("__metadata__", None)
        return metadata, [Entry(k, v["dtype"], tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0])
                          for k, v in entries.items()]


def _phase(ranges: array) -> int | None:
    """Where in its page the shard's first source range starts: the output's data starts there too."""
    return ranges[0] % PAGE if ranges else None


PART_MIN = 256 << 20  # no shard is split below this size: smaller files gain nothing


def for_writers(shards: list[OutShard]) -> list[OutShard]:
    """The shards, those larger than the output's share per worker (of MAX_JOBS) split, so that
    every worker can write a file of its own (see copier). Depends only on the plan, never on
    --jobs, so a mask gives the same files on every machine; a real checkpoint, with more
    shards than workers, is left as it is."""
    share = max(PART_MIN, -(-sum(s.nbytes for s in shards) // MAX_JOBS))
    return [part for s in shards for part in s.split(-(-s.nbytes // share))]


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


@dataclass
class ApplyResult:
    out: Path
    shards: int
    bytes_written: int
    bytes_before: int
    experts_before: int
    experts_after: int
    moe_layers: int
    dropped_layers: list[int]
    config_changes: dict[str, tuple]
    skipped: list[str]
    dropped_prefixes: list[str] = field(default_factory=list)
    kept_mtp_layers: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mtp_dropped: str | None = None
    draft_bytes: int | None = None


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of ascending indices as (start, count)."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def slice_ranges(info: TensorInfo, base: int, axis: int, kept: list[int], n_experts: int) -> list[tuple[int, int]]:
    """Byte ranges that hold the retained experts of a tensor whose `axis` is the expert axis."""
    outer = math.prod(info.shape[:axis])
    inner_bits = math.prod(info.shape[axis + 1 :]) * DTYPE_BITS[info.dtype]
    if inner_bits % 8:
        raise ReapError(None, f"tensor {info.name!r}: an expert's slice is not a whole number of bytes")
    inner = inner_bits // 8
    if inner == 0:  # no bytes (a zero dimension): nothing to copy, however many rows a header claims
        return []
    ranges: list[tuple[int, int]] = []
    for o in range(outer):
        row = base + info.start + o * n_experts * inner
        for start, count in _runs(kept):
            off, n = row + start * inner, count * inner
            if ranges and ranges[-1][0] + ranges[-1][1] == off:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
            else:
                ranges.append((off, n))
    return ranges


def plan_surgery(ckpt: Checkpoint, mask: Mask, mask_path: Path, draft: bool = False) -> SurgeryPlan:
    """Check the mask against the checkpoint and compute every output tensor; writes nothing.
    `draft` (apply --mtp keep-full) also plans the unpruned MTP block as a draft directory."""
    check_fingerprint(mask.model, ckpt.fingerprint(), mask_path, ckpt.path)
    E, top_k, moe_layers, n = ckpt.num_experts, ckpt.top_k, ckpt.moe_layers, ckpt.num_hidden_layers
    missing = sorted(set(moe_layers) - set(mask.layers))
    extra = sorted(l for l in set(mask.layers) - set(moe_layers) if l < n)  # past the stack: MTP layers
    if missing or extra:
        detail = f"lacks MoE layers {missing}" if missing else f"names layers {extra} that are not MoE layers"
        raise ReapError(mask_path, f"mask {detail} of checkpoint {ckpt.path}")
    kept = mask.kept
    if kept < top_k:
        raise ReapError(mask_path, f"keeps {kept} experts per layer but the model routes each token to num_experts_per_tok={top_k}")
    _check_groups(ckpt, mask, mask_path)

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
    kept_mtp = _kept_mtp_layers(role_layers_past_stack, mask, mask_path)
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


def _kept_mtp_layers(on_disk: set[int], mask: Mask, mask_path: Path) -> set[int]:
    """MTP layers (past the stack) with routed experts that the mask covers: all of them or none."""
    covered = on_disk & set(mask.layers)
    if covered and covered != on_disk:
        raise ReapError(mask_path, f"the mask covers multi-token-prediction layers {sorted(covered)} but not "
                                   f"{sorted(on_disk - covered)}; they are kept or dropped together")
    return covered


def _check_groups(ckpt: Checkpoint, mask: Mask, mask_path: Path) -> None:
    groups = ckpt.layout.groups
    n_group = ckpt.layout.n_group(ckpt.cfg) if groups else None
    if not n_group or n_group <= 1:
        return
    E = ckpt.num_experts
    size = E // n_group
    per_group = mask.kept // n_group
    for layer, keep in mask.layers.items():
        counts = [sum(1 for e in keep if e // size == g) for g in range(n_group)]
        if len(set(counts)) != 1:
            raise ReapError(mask_path, f"layer {layer}: the router groups experts into n_group={n_group} groups and every group must keep the same number; kept per group: {counts}")
    minimum = groups.get("min_per_group", 1)
    if per_group < minimum:
        raise ReapError(mask_path, f"keeps {per_group} experts per group; this router needs at least {minimum} per group")
    topk_group = ckpt.layout.topk_group(ckpt.cfg) or n_group
    if topk_group * per_group < ckpt.top_k:
        raise ReapError(mask_path, f"only {topk_group * per_group} experts are reachable through topk_group={topk_group} groups, fewer than num_experts_per_tok={ckpt.top_k}")


def write_shards(shards: list[OutShard], src: Path, dst: Path, progress: Callable[[int], None] | None = None,
                 jobs: int = 1, name_of: Callable[[Path], Path] = lambda p: p) -> None:
    """Every output shard, complete: headers first (files created at their final size), then the
    tensor bytes, copied by `jobs` workers in pieces; adjacent source ranges become one copy.
    Source pages are dropped from the page cache once copied only when the run, read and
    written, would not fit in free memory: a smaller one evicts nothing, and keeping its
    pages makes the next run over the same checkpoint (another sparsity) read no disk."""
    work = []
    for shard in shards:
        header = shard.header
        fd = os.open(dst / shard.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, header)
            os.ftruncate(fd, len(header) + shard.nbytes)
        finally:
            os.close(fd)
        work.append((shard, len(header)))

    files = (pieces(src / shard.source, dst / shard.name, start, shard_ranges(shard)) for shard, start in work)
    run_pieces(files, jobs, progress, name_of, drop_source=2 * sum(s.nbytes for s in shards) > free_memory())


def shard_ranges(shard: OutShard) -> list[tuple[int, int]]:
    """The source ranges of an output shard's data, in output order, each contiguous run merged."""
    return list(zip(shard.ranges[::2], shard.ranges[1::2]))


def other_files(src: Path, handled: set[str]) -> tuple[list[str], list[str]]:
    """The files besides config, index and shards that the output gets (tokenizer, templates, code,
    licence...), and the weight files it does not (we cannot prune them), as relative paths.

    Everything that cannot be listed or copied is an error naming it, never a file quietly missing
    from the output: a directory that cannot be read (os.walk skips those by default), a dangling
    link, a FIFO, socket or device (reading a FIFO waits forever, /dev/zero never ends), a link to a
    directory that holds it (copied forever). Other linked directories are followed."""
    copied, skipped = [], []

    def refuse(e: OSError) -> None:
        raise ReapError(e.filename or src, f"cannot read it ({e.strerror or e}), so the output would lack "
                                           "what it holds; nothing was written") from None

    for root, dirs, files in os.walk(src, onerror=refuse, followlinks=True):
        rel_root = Path(root).relative_to(src)
        real = os.path.realpath(root)
        if any(os.path.realpath(up) == real for up in [src, *(src / p for p in rel_root.parents)][: len(rel_root.parts)]):
            raise ReapError(root, "is a link to a directory that holds it: copying it would never end; "
                                  "nothing was written")
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for fname in sorted(files):
            rel = str(rel_root / fname)
            if rel in handled or fname.startswith("."):
                continue
            path = Path(root) / fname
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError as e:
                refuse(e)
            if not regular:
                raise ReapError(path, "is not a regular file (a FIFO, socket or device), so it cannot be copied "
                                      "into the output; nothing was written")
            (skipped if fname.endswith(WEIGHT_SUFFIXES) else copied).append(rel)
    return copied, skipped


def copy_other_files(src: Path, dst: Path, files: list[str]) -> None:
    """Copy `files` (relative paths, from `other_files`) from src into dst."""
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(src / rel, dst / rel)
        except OSError as e:
            raise ReapError(src / rel, f"cannot copy it ({e.strerror or e}); nothing was written") from None


def source_card(ckpt_path: Path) -> str | None:
    """The source's model card (README.md), which the output's extends; None when there is none."""
    path = ckpt_path / "README.md"
    if not path.is_file():
        return None
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ReapError(path, f"cannot read the model card: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ReapError(path, f"model card is not UTF-8 text (invalid byte at offset {e.start}); the pruned "
                              "model's card extends it, so save it as UTF-8") from None


def apply_mask(
    mask: Mask,
    mask_path: str | Path,
    ckpt_path: str | Path,
    out_path: str | Path,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[SurgeryPlan], None] | None = None,
    layout: Layout | None = None,
    jobs: int | None = None,
    note: Callable[[str], None] | None = None,
    mtp: str = "mask",
    inputs: Iterable[str | Path] = (),
) -> ApplyResult:
    """Write the pruned checkpoint to out_path; the output appears only once complete.

    `layout` overrides the built-in layout chosen from config.json (a user's layout file);
    `jobs` copy workers run at once (default: from the CPU count). mtp="keep-full" also writes
    the MTP block unpruned into out_path/mtp-draft (a draft model directory with the source's
    config); "mask" keeps and prunes it only where the mask covers it. `inputs`: other files the
    run reads (a layout file), which OUT may not hold, like the mask and the checkpoint."""
    if mtp not in ("mask", "keep-full"):
        raise ReapError(None, f"--mtp {mtp}: choose mask or keep-full")
    mask_path, out_path = Path(mask_path), Path(out_path)
    ckpt = Checkpoint.open(ckpt_path, layout)
    check_output(out_path, overwrite, [mask_path, *map(Path, inputs)], [ckpt.path])
    plan = plan_surgery(ckpt, mask, mask_path, draft=mtp == "keep-full")
    # what else the output gets is known, and readable, before a byte is written
    card = source_card(ckpt.path)
    copied, skipped = other_files(ckpt.path, {"config.json", "README.md", INDEX, *ckpt.shards})
    if on_plan:
        on_plan(plan)
    with staged_output(out_path, overwrite, note) as tmp:
        write_shards(plan.shards, ckpt.path, tmp, progress, jobs or default_jobs(), lambda p: out_path / p.name)
        with open(tmp / "config.json", "w") as f:
            json.dump(plan.config, f, indent=2)
            f.write("\n")
        write_card(tmp / "README.md", card, ckpt, mask, plan.experts_before, len(plan.moe_layers), plan.dropped_layers,
                   note)
        (tmp / MASK_COPY).write_bytes(mask.encode())  # inside the staged directory: no file of its own to stage
        handled = rewrite_hf_quant_config(ckpt.path, tmp, ckpt.layout, mask.layers)
        copy_other_files(ckpt.path, tmp, [rel for rel in copied if rel not in handled])
        write_index(plan, ckpt, tmp)
        if plan.draft_bytes is not None:
            write_draft(ckpt, tmp / DRAFT_DIR)
    return ApplyResult(
        out=Path(out_path),
        shards=len(plan.shards),
        bytes_written=plan.total_size,
        bytes_before=plan.bytes_before,
        experts_before=plan.experts_before,
        experts_after=plan.kept,
        moe_layers=len(plan.moe_layers),
        dropped_layers=plan.dropped_layers,
        config_changes=plan.config_changes,
        skipped=skipped,
        dropped_prefixes=plan.dropped_prefixes,
        kept_mtp_layers=plan.kept_mtp_layers,
        notes=plan.notes,
        mtp_dropped=plan.mtp_dropped,
        draft_bytes=plan.draft_bytes,
    )
