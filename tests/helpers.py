from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.common.mask import Mask


def write_mask(ckpt: Path, keep: list[int] | dict[int, list[int]], path: Path) -> Path:
    c = Checkpoint.open(ckpt)
    layers = keep if isinstance(keep, dict) else {layer: list(keep) for layer in c.moe_layers}
    Mask(c.fingerprint(), layers, {"method": "manual"}).save(path, overwrite=True)
    return path


def write_saliency(ckpt: Path, path: Path) -> Path:
    """A saliency file of `ckpt` with made-up statistics, each expert's scores distinct."""
    from reapsurgery.common.saliency import LayerStats, Saliency

    c = Checkpoint.open(ckpt)
    E = c.fingerprint()["num_experts"]
    stats = {l: LayerStats(100, [float(10 + e) for e in range(E)], [1.0 + e for e in range(E)],
                           [2.0 + e for e in range(E)], [0.5 + e for e in range(E)], [3.0] * E) for l in c.moe_layers}
    Saliency(c.fingerprint(), {"samples": 4, "tokens": 100}, stats).save(path, overwrite=True)
    return path


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reapsurgery", *map(str, args)],
                          capture_output=True, text=True)


def apply_leaving_source_untouched(mask: Path, src: Path, out: Path) -> subprocess.CompletedProcess:
    """`reapsurgery apply -q`, asserted to succeed without changing a byte of the source."""
    from tests.conftest import tree_hash

    before = tree_hash(src)
    r = cli("apply", mask, src, out, "-q")
    assert r.returncode == 0, r.stderr
    assert tree_hash(src) == before
    return r


def tensor_bytes(path, name) -> bytes:
    with safe_open(path, "pt") as f:
        return f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def expected_output_bytes(src: Path, keep: list[int], keep_mtp: bool = False) -> dict[str, bytes]:
    """What every output tensor must hold, by name: the input's bytes or their retained slice.
    MTP layers past the stack are dropped, or with keep_mtp sliced like the others."""
    ckpt = Checkpoint.open(src)
    n = ckpt.num_hidden_layers
    layers = stack_prefix(ckpt.weight_map)
    expected = {}
    for name, (shard, _) in ckpt.tensors().items():
        path = src / shard
        source_prefix, layer_name = _as_layer(name, n, layers)
        role = ckpt.layout.classify(layer_name)
        if ckpt.layout.is_mtp(name, n) and not keep_mtp:
            continue  # MTP layer or mtp.* tensor: dropped
        if role is None:
            expected[name] = tensor_bytes(path, name)
        elif role.kind == "expert":
            if role.expert in keep:
                renamed = role.renamed(layer_name, keep.index(role.expert))
                expected[source_prefix + renamed[len(layer_name) - len(name) + len(source_prefix):]] = tensor_bytes(path, name)
        else:
            with safe_open(path, "pt") as f:
                t = f.get_tensor(name)
            t = t.view(torch.uint8) if t.element_size() == 1 else t
            rows = torch.tensor(role.kept_rows(keep, ckpt.num_experts))  # a router's rows of unpruned experts kept
            expected[name] = t.index_select(role.axis, rows).contiguous().view(torch.uint8).numpy().tobytes()
    return expected


def stack_prefix(weight_map) -> str:
    """The on-disk prefix of the decoder stack's layers, next to the input embeddings
    (model.layers., Qwen3.5's model.language_model.layers.); found here, not taken from the layout;
    model.layers. where no tensor is called embed_tokens."""
    embed = next((k for k in weight_map if k.endswith("embed_tokens.weight") and not k.startswith("mtp.")), None)
    return embed[: -len("embed_tokens.weight")] + "layers." if embed else "model.layers."


def _as_layer(name: str, n: int, layers: str = "model.layers.") -> tuple[str, str]:
    """Qwen3-Next's mtp.layers.{d}.X as stack layer n + d (model.layers.{n + d}.X, or under the
    stack prefix `layers`), with the source prefix it replaces ("" for any other name, returned as is)."""
    if not name.startswith("mtp.layers."):
        return "", name
    depth, rest = name[len("mtp.layers."):].split(".", 1)
    return f"mtp.layers.{depth}.", f"{layers}{n + int(depth)}.{rest}"


def output_tensors(path: Path) -> dict[str, tuple]:
    """name -> (shard path, TensorInfo) for every tensor of a checkpoint."""
    c = Checkpoint.open(path)
    return {name: (path / shard, info) for name, (shard, info) in c.tensors().items()}


def assert_output_is_input_slices(src: Path, out: Path, keep: list[int], keep_mtp: bool = False) -> dict[str, tuple]:
    """Every output tensor holds exactly the input's bytes or their retained slice; returns the output's tensors."""
    expected = expected_output_bytes(src, keep, keep_mtp)
    got = output_tensors(out)
    assert set(got) == set(expected)
    for name, (path, _) in got.items():
        assert hashlib.sha256(tensor_bytes(path, name)).digest() == hashlib.sha256(expected[name]).digest(), name
    return got
