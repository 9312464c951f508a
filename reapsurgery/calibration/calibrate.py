"""Layer-streamed REAP calibration: one decoder layer of weights in memory at a time.

Inputs of layer 0 are captured once; each layer is loaded from the shards, run over all
calibration batches while its experts are observed, and released; its outputs become the
next layer's inputs. Every `checkpoint_every` seconds (and when interrupted) the run's state
is saved (resume.py) so `--resume` continues from the last finished layer with identical results.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..common.checkpoint import Checkpoint
from ..errors import ReapError
from ..common.layouts import Layout
from .distributed import Ranks
from .mtp import counted_positions, load_mtp_block, mtp_layers
from .observe import ExpertStats, Observer, observe_experts, is_experts_module, observing
from ..common.saliency import STAT_KEYS, LayerStats, Saliency
from ..common.staging import deferred_signals
from .finite import check_computed
from ..common.units import human
from . import statedir
from .resume import ResumeState, state_key
from .streaming import StreamedModel, fill_carried, moved
from .timing import TIMINGS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("reapsurgery")
BarFactory = Callable[..., Any]  # tqdm-like: bar(total=..., desc=...) with update() and close()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ReapError(None, f"--device {device}: no CUDA device is available")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ReapError(None, f"--device {device}: this machine has {n} CUDA device{'s' if n > 1 else ''} "
                              f"({', '.join(f'cuda:{i}' for i in range(n))})")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ReapError(None, f"--dtype {dtype}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_mtp(ckpt: Checkpoint, mtp: str) -> str:
    """"auto": calibrate the MTP block where a loader needs it (layout `mtp_keep`) and it is stored."""
    if mtp != "auto":
        return mtp
    layout = ckpt.layout
    return "calibrate" if layout.mtp_keep and layout.mtp_block and ckpt.stored_mtp_layers() else "drop"


def make_batches(samples: list[list[int]], batch_size: int, pad_id: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded batches; padding is masked out of attention and statistics."""
    batches = []
    for s in range(0, len(samples), batch_size):
        chunk = samples[s : s + batch_size]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, x in enumerate(chunk):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        batches.append((ids, mask))
    return batches


def _layer_stats(s: ExpertStats, where: Path, layer: int, dtype: torch.dtype) -> LayerStats:
    """A layer's statistics as numbers, once summed (and all-reduced): a NaN or infinity among them
    is refused here, naming the layer, not written into a saliency file that plan would refuse."""
    mx = [None if v == float("-inf") else v for v in s.max_activation.cpu().tolist()]
    stats = LayerStats(int(s.tokens.item()), s.count.cpu().tolist(), s.gate_sum.cpu().tolist(),
                       s.norm_sum.cpu().tolist(), s.reap_sum.cpu().tolist(), mx)
    for key in STAT_KEYS:
        bad = next(((e, v) for e, v in enumerate(getattr(stats, key)) if v is not None and not math.isfinite(v)), None)
        if bad is not None:
            check_computed(where, f"layer {layer}: the {key} statistic of expert {bad[0]} ({bad[1]})",
                           torch.tensor(bad[1]), dtype)
    return stats


def plan_chunks(batches: list[tuple[torch.Tensor, torch.Tensor]], hidden_size: int, dtype: torch.dtype,
                budget: int | None) -> list[list[int]]:
    """Consecutive batch indices per chunk, so that a chunk's hidden states (a layer's inputs
    and outputs: 2 x tokens x hidden_size) fit in `budget` bytes; one chunk when budget is None.
    A batch larger than the budget is a chunk of its own (refused by the caller)."""
    if budget is None:
        return [list(range(len(batches)))]
    size = torch.empty((), dtype=dtype).element_size()
    chunks: list[list[int]] = [[]]
    used = 0
    for b, (ids, _) in enumerate(batches):
        need = 2 * ids.numel() * hidden_size * size
        if chunks[-1] and used + need > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(b)
        used += need
    return chunks


MEMINFO = "/proc/meminfo"
MARGIN = 1 / 8  # of the free memory, left for the forward's scratch (attention, routed experts) and allocator slack


def free_memory(dev: torch.device) -> int:
    """Bytes free on `dev` now: CUDA's own count of free device memory, else the host's MemAvailable."""
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    return host_available()


def host_available() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), shared by the ranks
    of this node under torchrun (LOCAL_WORLD_SIZE); free physical pages where there is no /proc."""
    share = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // share
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // share


def default_budget(free: int, layer_bytes: int) -> int:
    """What the hidden states may take of `free` bytes beside two layers' weights (the one running and
    the one prefetched) and a margin for the forward: the default of --hidden-memory."""
    return max(int(free * (1 - MARGIN)) - 2 * layer_bytes, 0)


@dataclass
class Placement:
    """Where the hidden states live between layers, and the sample chunks that each stream the layers."""

    where: str  # "device": on the compute device; "host": in host memory, each batch moved for its forward
    chunks: list[list[int]]
    need: int  # bytes of all samples' hidden states (a layer's inputs and outputs)
    budget: int  # bytes allowed where they live
    budget_of: str  # what set the budget, for the note

    def store(self) -> torch.device | None:
        """Where layer_inputs puts them: None keeps them on the compute device."""
        return torch.device("cpu") if self.where == "host" else None

    def note(self, dev: torch.device) -> str:
        where = f"on the device ({dev})" if self.where == "device" else "in host memory, each batch moved to the device for its forward"
        chunks = (f", in {len(self.chunks)} chunks that each stream the layers again" if len(self.chunks) > 1 else "")
        return f"hidden states ({human(self.need)}) {where}{chunks}; budget {human(self.budget)} ({self.budget_of})"


def place_hidden(batches: list[tuple[torch.Tensor, torch.Tensor]], hidden_size: int, dtype: torch.dtype,
                 dev: torch.device, layer_bytes: int, hidden_memory: int | None = None,
                 host_memory: int | None = None, chunks: list[list[int]] | None = None) -> Placement:
    """On the device when all samples' hidden states fit in `hidden_memory` (None: the free device
    memory beside two layers, `default_budget`), else in host memory (`host_memory`, None: MemAvailable
    beside two layers), else in host memory in sample chunks that each fit. On the CPU the device is
    host memory: the budget is `hidden_memory` unless `host_memory` is given (then "host" places them
    apart, moved per batch as on a GPU). `chunks` (from a resume state) are kept as they were."""
    size = torch.empty((), dtype=dtype).element_size()
    per_batch = [2 * ids.numel() * hidden_size * size for ids, _ in batches]
    need = sum(per_batch)
    device_budget = default_budget(free_memory(dev), layer_bytes) if hidden_memory is None else hidden_memory
    option = ("--hidden-memory" if hidden_memory is not None else
              f"{'MemAvailable' if dev.type == 'cpu' else 'free memory'} less two layers and 1/8")
    largest = max(per_batch) if chunks is None else max(sum(per_batch[b] for b in c) for c in chunks)
    if (largest if chunks else need) <= device_budget:
        return Placement("device", chunks or [list(range(len(batches)))], need, device_budget, option)
    if dev.type == "cpu" and host_memory is None:
        where, budget = "device", device_budget
    else:
        where = "host"
        budget = default_budget(host_available(), layer_bytes) if host_memory is None else host_memory
        if dev.type != "cpu" and max(per_batch) > device_budget:
            raise ReapError(None, f"one batch's hidden states ({human(max(per_batch))}) do not fit on {dev} "
                                  f"({human(device_budget)} by {option}); lower --batch-size or raise --hidden-memory")
        option = "host MemAvailable less two layers and 1/8" if host_memory is None else "host_memory"
    if max(per_batch) > budget:
        hint = "" if option.startswith("host MemAvailable") else " or raise --hidden-memory"
        raise ReapError(None, f"one batch's hidden states ({human(max(per_batch))}) do not fit in "
                              f"{human(budget)} ({option}); lower --batch-size{hint}")
    return Placement(where, chunks or plan_chunks(batches, hidden_size, dtype, None if need <= budget else budget),
                     need, budget, option)


def _merge(total: dict[int, LayerStats], part: dict[int, LayerStats]) -> dict[int, LayerStats]:
    """Statistics are sums (and maxima): chunks of samples add up to the whole."""
    return {k: total[k].merged(part[k]) if k in total else part[k] for k in sorted({*total, *part})}


@dataclass
class _Run:
    """What every chunk of one calibration run shares."""

    streamed: StreamedModel
    observer: Observer
    experts_layer: dict[str, int]
    moe_layers: list[int]
    extra_layers: list[int]
    dev: torch.device
    dt: torch.dtype
    state: ResumeState
    prefetch: bool
    bar: BarFactory | None
    on_layer: Callable[[int, StreamedModel], None] | None
    ranks: Ranks | None
    placement: Placement

    @property
    def total(self) -> int:
        return len(self.streamed.layers) + len(self.extra_layers)


@torch.no_grad()
def calibrate(
    ckpt_path: str | Path,
    samples: list[list[int]],
    *,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    state_dir: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: float = 600.0,
    output: str | Path | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    provenance: dict | None = None,
    bar: BarFactory | None = None,
    on_layer: Callable[[int, StreamedModel], None] | None = None,
    layout: Layout | None = None,
    mtp: str = "auto",
    prefetch: bool = True,
    hidden_memory: int | None = None,
    host_memory: int | None = None,
) -> Saliency:
    """Per-expert REAP statistics of every MoE layer, measured on `samples` (token id lists).

    `layout` (a user's layout file) replaces the built-in one chosen from config.json.
    mtp="calibrate" also measures the multi-token-prediction block (their statistics then make
    plan and apply keep and prune it); "drop" leaves it out; "auto" calibrates it where the
    family's layout says a loader needs it present (`mtp_keep`) and the checkpoint stores it.
    The resume state in `state_dir` is saved at most every `checkpoint_every` seconds (0: after
    every layer); when `output` is given the result is written there before the state is removed
    (`overwrite`: over an existing file; also discards an earlier state that `resume` does not
    continue). When the result cannot be written, every layer's statistics are kept as the state.
    `prefetch` reads (and dequantises, converts) layer i+1 on a background thread while layer i
    runs; the arithmetic is the same either way, so are the statistics.
    `hidden_memory` (bytes) bounds the hidden states on the compute device (None: what is free there
    beside two layers). When all samples' do not fit, they are kept in host memory (`host_memory`,
    None: MemAvailable beside two layers) and each batch is moved to the device for its forward;
    when even that is exceeded (on the CPU, at once: it is the same memory), the samples are split
    into chunks and each chunk streams the layers again. Statistics are sums, so the result is the
    same (up to float64 summation order); the placement and chunk count go into the provenance."""
    if mtp not in ("auto", "drop", "calibrate"):
        raise ReapError(None, f"--mtp {mtp}: choose auto, drop or calibrate")
    if not samples:
        raise ReapError(None, "no calibration samples")
    if state_dir is not None:  # refused before anything is loaded: a path not ours, an earlier state
        statedir.check_state_dir(Path(state_dir), resume, overwrite)
    ckpt = Checkpoint.open(ckpt_path, layout)
    ckpt.tensors()  # index and shard headers agree, before any layer is read
    mtp = resolve_mtp(ckpt, mtp)
    ranks = Ranks.from_env()  # under torchrun: this rank's share of the batches, statistics all-reduced
    dev = resolve_device(ranks.device(device) if ranks else device)
    if ranks:
        ranks.start(dev)
    dt = resolve_dtype(dtype, dev)
    streamed = StreamedModel(ckpt, dt, dev, trust_remote_code)
    observe_experts(streamed.model)
    names = {id(m): n for n, m in streamed.model.named_modules() if is_experts_module(m)}
    experts_layer = {n: i for i, layer in enumerate(streamed.layers) for m in layer.modules()
                     if is_experts_module(m) for n in [names[id(m)]]}
    moe_layers = sorted(experts_layer.values())
    if moe_layers != ckpt.moe_layers:
        raise ReapError(ckpt.path / "config.json",
                        f"transformers builds MoE layers {moe_layers} but the {ckpt.layout.name} layout says {ckpt.moe_layers}")
    dense_layers = [i for i in range(len(streamed.layers)) if i not in moe_layers]
    extra_layers = mtp_layers(streamed) if mtp == "calibrate" else []

    text_config = streamed.model.config.get_text_config()
    batches = make_batches(samples, batch_size, text_config.pad_token_id or 0)
    if ranks:
        batches = ranks.share(batches)
    # the chunks are not part of the key: a resumed run keeps the saved ones, whatever is free now
    key = state_key(ckpt, samples, {"batch_size": batch_size, "dtype": str(dt), "mtp_layers": extra_layers,
                                    "device": dev.type, "ranks": [ranks.rank, ranks.world] if ranks else None})
    state = ResumeState(Path(state_dir) if state_dir else None, key, checkpoint_every,
                        f"rank{ranks.rank}of{ranks.world}" if ranks else None)
    state.prepare(resume, overwrite)
    loaded = state.load() if resume else None
    layer_bytes = max(sum(p.numel() for p in layer.parameters()) for layer in streamed.layers) * \
        torch.empty((), dtype=dt).element_size()
    placement = place_hidden(batches, text_config.hidden_size, dt, dev, layer_bytes, hidden_memory, host_memory,
                             loaded[3].get("chunks") if loaded else None)
    if ranks:  # a collective: every rank calls it (their free memory may differ)
        placement.chunks = ranks.same_count(placement.chunks)
    if ranks is None or ranks.rank == 0:
        log.info(placement.note(dev))
    chunks = placement.chunks
    run = _Run(streamed, Observer(names=names), experts_layer, moe_layers, extra_layers, dev, dt, state,
               prefetch, bar, on_layer, ranks, placement)

    first_chunk, resumed, stats = 0, None, {}
    if loaded:
        start, layers, saved, extra = loaded
        first_chunk = int(extra.get("chunk", 0))
        stats = {int(k): LayerStats(**v) for k, v in (extra.get("previous") or {}).items()}
        store = placement.store() or dev
        resumed = (start, layers, [h.to(device=store, dtype=dt) for h in saved],
                   [moved(tuple(c), store) for c in extra.get("carried") or []] or [() for _ in saved])
    outer = bar(total=len(chunks) * run.total, initial=first_chunk * run.total + (resumed[0] if resumed else 0),
                desc="layers", unit="layer") if bar else None
    for c in range(first_chunk, len(chunks)):
        part = _stream_chunk(run, [batches[b] for b in chunks[c]], c, stats, resumed, outer)
        stats, resumed = _merge(stats, part), None
        if c + 1 < len(chunks) and state.due():  # the next chunk starts from its embeddings
            state.save(0, {}, [], {"chunk": c + 1, "chunks": chunks,
                                   "previous": {str(k): v.to_json() for k, v in stats.items()}})
    if outer:
        outer.close()

    calibration = {
        **(provenance or {}),
        "samples": len(samples),
        "tokens": sum(len(s) for s in samples),
        "batch_size": batch_size,
        "dtype": str(dt).removeprefix("torch."),
        "mtp": mtp,
        "device": dev.type,
        "chunks": len(chunks),
        "hidden_states": placement.where,
        **({"ranks": ranks.world} if ranks else {}),
        "reapsurgery": __version__,
    }
    result = Saliency(ckpt.fingerprint(), calibration, {k: stats[k] for k in sorted(stats)}, dense_layers)
    state.wait()
    if output is not None and (ranks is None or ranks.rank == 0):
        with deferred_signals():  # the result, and the state it makes useless removed, as one step
            try:
                result.save(output, overwrite)
            except ReapError as e:
                kept = state.keep(stats, chunks) if ranks is None else "the resume state saved earlier is kept"
                raise ReapError(e.path, f"{e.message}; {kept}") from None
            if ranks is None:
                state.clear()
    if ranks:
        ranks.barrier()  # every rank keeps its state until rank 0 has written the result
    state.clear()  # only once the result is safely written
    return result


def _cpu(carried: list[tuple]) -> list[tuple]:
    return [tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in c) for c in carried]


def _stream_chunk(run: _Run, batches: list[tuple[torch.Tensor, torch.Tensor]], chunk: int,
                  previous: dict[int, LayerStats], resumed: tuple | None, outer) -> dict[int, LayerStats]:
    """Every layer over one chunk of batches: its statistics. `resumed`: (next layer, statistics
    so far, hidden states) from a saved state of this chunk."""
    streamed, observer, state, dev = run.streamed, run.observer, run.state, run.dev
    store = run.placement.store()  # None: on the device; the CPU: in host memory, moved per batch
    pin = dev.type == "cuda"
    hidden, calls, masks = streamed.layer_inputs(batches, store)
    start, stats = 0, {}
    carried: list[tuple] = [() for _ in batches]  # per batch, the last layer's outputs past its hidden states
    if resumed and resumed[0] > 0:
        start, stats, hidden, carried = resumed
    extra = {"chunk": chunk, "chunks": run.placement.chunks,
             "previous": {str(k): v.to_json() for k, v in previous.items()}}
    n_layers, total = len(streamed.layers), run.total
    done, pending = start, None
    reader = ThreadPoolExecutor(1, thread_name_prefix="layer-read") if run.prefetch else None
    try:
        with observing(observer):
            for i in range(start, total):
                in_mtp = i >= n_layers  # a multi-token-prediction block, run with the stack's last MoE layer's inputs
                calls_of = run.moe_layers[-1] if in_mtp else i
                if in_mtp:
                    module = load_mtp_block(streamed, i, calls_of)
                    observer.names.update({id(m): f"mtp.{i}" for m in module.modules() if is_experts_module(m)})
                    run.experts_layer[f"mtp.{i}"] = i
                else:
                    if pending is None:
                        converted = streamed.read_layer(i)
                    else:
                        with TIMINGS.phase("idle"):  # the read that the last layer's compute did not hide
                            converted = pending.result()
                        pending = None
                    module = streamed.install_layer(i, converted)
                    del converted
                    if reader is not None and i + 1 < n_layers:
                        pending = reader.submit(streamed.read_layer, i + 1)
                if run.on_layer:
                    run.on_layer(i, streamed)
                inner = run.bar(total=len(batches), desc=f"layer {i}", unit="batch", leave=False) if run.bar else None
                outputs, passed = [], []
                forward_start = time.perf_counter()
                for b, (h, layer_calls) in enumerate(zip(hidden, calls)):
                    call, carried_b = layer_calls[calls_of], carried[b]
                    if store is not None:  # this batch's inputs to the device for its forward
                        h, call, carried_b = moved((h, call, carried_b), dev)
                    # an MTP block takes what the stack's last layer passed on (GLM-5: its indexer's top-k)
                    args, kwargs = fill_carried(*call, None if in_mtp else calls_of - 1, carried_b)
                    if in_mtp:
                        ids, am = batches[b]
                        observer.token_mask = counted_positions(am, module.depth).to(dev)
                        out = module(h, ids.to(dev), *args, **kwargs)
                    else:
                        observer.token_mask = masks[b]
                        out = module(h, *args, **kwargs)
                    out_h = out[0] if isinstance(out, tuple) else out
                    out_passed = carried[b] if in_mtp else tuple(out[1:]) if isinstance(out, tuple) else ()
                    if store is not None:  # and its outputs back (asynchronous into pinned memory on CUDA)
                        out_h, out_passed = moved((out_h, out_passed), store, pin=pin)
                    outputs.append(out_h)
                    passed.append(out_passed)
                    if inner:
                        inner.update(1)
                if dev.type == "cuda":  # also completes the copies into pinned host memory before any host read
                    torch.cuda.synchronize(dev)
                TIMINGS.add("forward/observe", time.perf_counter() - forward_start)
                if inner:
                    inner.close()
                observer.token_mask = None
                if in_mtp:
                    module.to_empty(device="meta")
                else:
                    if pending is not None:  # the next read takes its buffers from what this release pools
                        with TIMINGS.phase("idle"):
                            futures.wait([pending])
                    streamed.release_layer(i)
                del module
                for name, s in sorted(observer.stats.items()):
                    if run.ranks:
                        run.ranks.reduce(s)
                    layer = run.experts_layer[name]
                    stats[layer] = _layer_stats(s, streamed.ckpt.path, layer, run.dt)
                    del observer.stats[name]
                hidden, carried, done = outputs, passed, i + 1  # new lists: a background save keeps the old
                if i + 1 < total and state.due():  # after the last layer the next chunk or the result follows
                    state.save(i + 1, stats, hidden, {**extra, "carried": _cpu(carried)})
                if outer:
                    outer.update(1)
    except BaseException as e:  # Ctrl-C, an error in a layer: keep what is finished (a SIGKILL keeps the last save)
        state.wait()  # the last background save is on disk before the caller can resume from it
        # but not for a refused input (a damaged tensor, a layer the model does not take): a resumed run
        # would read the same input and stop at the same layer
        if done > start and state.saved_next != (chunk, done) and not isinstance(e, ReapError):
            state.save(done, stats, hidden, {**extra, "carried": _cpu(carried)}, background=False)
        raise
    finally:
        if reader is not None:
            reader.shutdown(wait=True, cancel_futures=True)
    return stats
