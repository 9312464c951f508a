"""Layer-streamed REAP calibration: one decoder layer of weights in memory at a time.

Inputs of layer 0 are captured once; each layer is loaded from the shards, run over all
calibration batches while its experts are observed, and released; its outputs become the
next layer's inputs. After each layer the run's state is saved so `--resume` continues
from the last finished layer with identical results.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..common.checkpoint import Checkpoint
from ..errors import ReapError
from ..common.layouts import Layout
from .mtp import counted_positions, load_mtp_block, mtp_layers
from .observe import ExpertStats, Observer, attach_router_hooks, is_experts_module, observing
from ..common.saliency import LayerStats, Saliency
from .streaming import StreamedModel, fill_carried

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BarFactory = Callable[..., Any]  # tqdm-like: bar(total=..., desc=...) with update() and close()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ReapError(None, f"--device {device}: no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ReapError(None, f"--dtype {dtype}: choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


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


def _layer_stats(s: ExpertStats) -> LayerStats:
    mx = [None if v == float("-inf") else v for v in s.max_activation.cpu().tolist()]
    return LayerStats(int(s.tokens.item()), s.count.cpu().tolist(), s.gate_sum.cpu().tolist(),
                      s.norm_sum.cpu().tolist(), s.reap_sum.cpu().tolist(), mx)


class _State:
    """Resume state beside the output: finished layers' statistics and the hidden states."""

    def __init__(self, directory: Path | None, key: str):
        self.dir, self.key = directory, key

    def load(self) -> tuple[int, dict[int, LayerStats], list[torch.Tensor], list[tuple]] | None:
        if self.dir is None or not (self.dir / "state.json").is_file():
            return None
        state = json.loads((self.dir / "state.json").read_text())
        if state.get("key") != self.key:
            raise ReapError(self.dir, "resume state was written for other data, options or checkpoint; delete it or drop --resume")
        layers = {int(k): LayerStats(**v) for k, v in state["layers"].items()}
        saved = torch.load(self.dir / "hidden.pt", weights_only=True)
        return state["next_layer"], layers, saved["hidden"], saved["carried"]

    def save(self, next_layer: int, layers: dict[int, LayerStats], hidden: list[torch.Tensor],
             carried: list[tuple]) -> None:
        """`carried`: per batch, the last layer's outputs that the next layer's call takes."""
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
        torch.save({"hidden": [h.cpu() for h in hidden], "carried": [tuple(map(cpu, c)) for c in carried]},
                   self.dir / "hidden.pt.partial")
        (self.dir / "hidden.pt.partial").replace(self.dir / "hidden.pt")
        state = {"key": self.key, "next_layer": next_layer,
                 "layers": {str(k): v.to_json() for k, v in layers.items()}}
        (self.dir / "state.json.partial").write_text(json.dumps(state))
        (self.dir / "state.json.partial").replace(self.dir / "state.json")

    def clear(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


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
    trust_remote_code: bool = False,
    provenance: dict | None = None,
    bar: BarFactory | None = None,
    on_layer: Callable[[int, StreamedModel], None] | None = None,
    layout: Layout | None = None,
    mtp: str = "drop",
) -> Saliency:
    """Per-expert REAP statistics of every MoE layer, measured on `samples` (token id lists).

    `layout` (a user's layout file) replaces the built-in one chosen from config.json.
    mtp="calibrate" also measures the multi-token-prediction layers stored past the stack
    (their statistics then make plan and apply keep them); "drop" leaves them out."""
    if mtp not in ("drop", "calibrate"):
        raise ReapError(None, f"--mtp {mtp}: choose drop or calibrate")
    if not samples:
        raise ReapError(None, "no calibration samples")
    ckpt = Checkpoint.open(ckpt_path, layout)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    streamed = StreamedModel(ckpt, dt, dev, trust_remote_code)
    attach_router_hooks(streamed.model)
    names = {id(m): n for n, m in streamed.model.named_modules() if is_experts_module(m)}
    experts_layer = {n: i for i, layer in enumerate(streamed.layers) for m in layer.modules()
                     if is_experts_module(m) for n in [names[id(m)]]}
    moe_layers = sorted(experts_layer.values())
    if moe_layers != ckpt.moe_layers:
        raise ReapError(ckpt.path / "config.json",
                        f"transformers builds MoE layers {moe_layers} but the {ckpt.layout.name} layout says {ckpt.moe_layers}")
    dense_layers = [i for i in range(len(streamed.layers)) if i not in moe_layers]
    extra_layers = mtp_layers(streamed) if mtp == "calibrate" else []

    pad_id = streamed.model.config.get_text_config().pad_token_id or 0
    batches = make_batches(samples, batch_size, pad_id)
    key = hashlib.sha256(json.dumps([ckpt.fingerprint(), samples, batch_size, str(dt), extra_layers]).encode()).hexdigest()
    state = _State(Path(state_dir) if state_dir else None, key)

    streamed.load_outer()
    hidden, calls, masks = [], [], []
    for ids, am in batches:
        h, c = streamed.layer_calls(ids.to(dev), am.to(dev))
        hidden.append(h)
        calls.append(c)
        masks.append(am.reshape(-1).bool().to(dev))
    streamed.release_embeddings()
    start, stats = 0, {}
    carried: list[tuple] = [() for _ in batches]  # the previous layer's outputs past its hidden states
    if resume:
        loaded = state.load()
        if loaded:
            start, stats, saved, carried = loaded
            hidden = [h.to(device=dev, dtype=dt) for h in saved]
            carried = [tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in c) for c in carried]

    observer = Observer(names=names)
    n_layers = len(streamed.layers)
    total = n_layers + len(extra_layers)
    outer = bar(total=total, initial=start, desc="layers", unit="layer") if bar else None
    with observing(observer):
        for i in range(start, total):
            in_mtp = i >= n_layers  # a multi-token-prediction block, run with the stack's last MoE layer's inputs
            calls_of = moe_layers[-1] if in_mtp else i
            if in_mtp:
                module = load_mtp_block(streamed, i, calls_of)
                observer.names.update({id(m): f"mtp.{i}" for m in module.modules() if is_experts_module(m)})
                experts_layer[f"mtp.{i}"] = i
            else:
                module = streamed.load_layer(i)
            if on_layer:
                on_layer(i, streamed)
            inner = bar(total=len(batches), desc=f"layer {i}", unit="batch", leave=False) if bar else None
            for b, (h, layer_calls) in enumerate(zip(hidden, calls)):
                # an MTP block takes what the stack's last layer passed on (GLM-5: its indexer's top-k)
                args, kwargs = fill_carried(*layer_calls[calls_of], None if in_mtp else calls_of - 1, carried[b])
                if in_mtp:
                    ids, am = batches[b]
                    observer.token_mask = counted_positions(am, module.depth).to(dev)
                    out = module(h, ids.to(dev), *args, **kwargs)
                else:
                    observer.token_mask = masks[b]
                    out = module(h, *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
                if not in_mtp:
                    carried[b] = tuple(out[1:]) if isinstance(out, tuple) else ()
                if inner:
                    inner.update(1)
            if inner:
                inner.close()
            observer.token_mask = None
            if in_mtp:
                module.to_empty(device="meta")
            else:
                streamed.release_layer(i)
            del module
            for name, s in list(observer.stats.items()):
                stats[experts_layer[name]] = _layer_stats(s)
                del observer.stats[name]
            state.save(i + 1, stats, hidden, carried)
            if outer:
                outer.update(1)
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
        "reapsurgery": __version__,
    }
    result = Saliency(ckpt.fingerprint(), calibration, {k: stats[k] for k in sorted(stats)}, dense_layers)
    state.clear()
    return result
