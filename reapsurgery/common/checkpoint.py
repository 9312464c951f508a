"""Reading a checkpoint directory: config, index, shard headers, and the model fingerprint."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import ReapError
from .config_check import check_layer_bound, check_layout_values, check_names, check_stored_layers
from .files import read_json_object
from .layouts import Layout, builtin_layout_for, text_config
from .safetensors_io import ShardHeader, TensorInfo, read_header
from .weight_map import WeightMap, read_index

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
log = logging.getLogger("reapsurgery")
FINGERPRINT_FIELDS = (
    "architecture", "model_type", "num_hidden_layers", "moe_layers",
    "num_experts", "num_experts_per_tok", "n_group",
)
OPTIONAL_FINGERPRINT_FIELDS = ("hidden_size",)  # recorded since GGUF support; compared where both files have it
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def resolve_checkpoint(spec: str | Path) -> Path:
    """A checkpoint directory, or a hub id `org/name[@revision]` found in the local Hugging Face
    cache (offline: never downloads). Anything else is returned as given, to be refused by open()."""
    path = Path(spec)
    text = str(spec)
    if path.exists() or not HUB_ID.match(text) or text.startswith(".") or text.endswith((".json", ".safetensors")):
        return path
    repo_id, _, revision = text.partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        rev = f" at revision {revision!r}" if revision else ""
        raise ReapError(text, f"is not a directory, and the local Hugging Face cache has no snapshot of "
                              f"{repo_id}{rev}; download it first (`hf download {repo_id}`) "
                              "or pass the checkpoint directory") from None


def hub_source(path: str | Path) -> tuple[str, str] | None:
    """(hub id, revision) of a snapshot in the local Hugging Face cache
    (`.../models--org--name/snapshots/REVISION`, what resolve_checkpoint returns for a hub id);
    None for any other directory. The hub forbids `--` in ids, so the folder name maps back to one id."""
    snapshot = Path(path).resolve()
    folder = snapshot.parent.parent.name
    parts = folder.removeprefix("models--").split("--")
    if (snapshot.parent.name != "snapshots" or not folder.startswith("models--") or len(parts) > 2
            or not all(re.fullmatch(r"[A-Za-z0-9][\w.-]*", part) for part in parts)):
        return None
    return "/".join(parts), snapshot.name


@dataclass
class Checkpoint:
    path: Path
    config: dict
    layout: Layout
    weight_map: WeightMap  # tensor name -> shard file name
    index_metadata: dict | None  # None for a single-file checkpoint
    _headers: dict[str, ShardHeader] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path, layout: Layout | None = None) -> "Checkpoint":
        path = resolve_checkpoint(path)
        config, weight_map, metadata = read_files(path)
        layout = layout or builtin_layout_for(config) or derived_layout_for(path, config, weight_map)
        ckpt = cls(path, config, layout, weight_map, metadata)
        try:
            check_layout_values(ckpt.cfg, layout)
            check_stored_layers(ckpt.cfg, layout, weight_map)
            num_experts, top_k = ckpt.num_experts, ckpt.top_k
            ckpt.moe_layers
        except ReapError as e:
            raise ReapError(path / "config.json", e.message) from None
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ReapError(path / "config.json", f"config has no routed-expert count (looked for {', '.join(layout.num_experts_keys)})")
        if not isinstance(top_k, int) or isinstance(top_k, bool):
            raise ReapError(path / "config.json", f"config has no experts-per-token count (looked for {', '.join(layout.top_k_keys)})")
        if not 1 <= top_k <= num_experts:
            raise ReapError(path / "config.json", f"experts per token ({top_k}) must be between 1 and the "
                                                  f"{num_experts} routed experts")
        return ckpt

    # -- config-derived facts -------------------------------------------------
    @property
    def cfg(self) -> dict:
        """The text config, with num_hidden_layers where config.json spells the layer count another way."""
        cfg = text_config(self.config)
        key = self.layout.layer_count
        if key and not isinstance(cfg.get("num_hidden_layers"), int) and isinstance(cfg.get(key), int):
            cfg = {**cfg, "num_hidden_layers": cfg[key]}
        return cfg

    @property
    def num_experts(self) -> int:
        return self.layout.num_experts(self.cfg)

    @property
    def top_k(self) -> int:
        return self.layout.top_k(self.cfg)

    @property
    def num_hidden_layers(self) -> int:
        return self.cfg["num_hidden_layers"]

    def stored_mtp_layers(self) -> list[int]:
        """MTP layers (numbered past the stack; mtp.layers.{d} as num_hidden_layers + d) with tensors stored."""
        layout, n = self.layout, self.num_hidden_layers
        return sorted({l for name in self.weight_map
                       if (l := layout.layer_of(layout.canonical(name, n))) is not None and l >= n})

    @property
    def moe_layers(self) -> list[int]:
        return self.layout.moe_layers(self.cfg)

    def fingerprint(self) -> dict:
        """What must match for a mask measured on one checkpoint to apply to another."""
        cfg = self.cfg
        n_group = None
        if self.layout.groups and self.layout.groups.get("n_group") in cfg:
            n_group = cfg[self.layout.groups["n_group"]]
        return {
            "architecture": (self.config.get("architectures") or [None])[0],
            "model_type": cfg.get("model_type", self.config.get("model_type")),
            "num_hidden_layers": self.num_hidden_layers,
            "moe_layers": self.moe_layers,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "n_group": n_group,
            **({"hidden_size": cfg["hidden_size"]} if isinstance(cfg.get("hidden_size"), int) else {}),
        }

    # -- shards ---------------------------------------------------------------
    @property
    def shards(self) -> list[str]:
        return self.weight_map.shards

    def header(self, shard: str) -> ShardHeader:
        if shard not in self._headers:
            self._headers[shard] = read_header(self.path / shard)
        return self._headers[shard]

    def tensors(self) -> dict[str, tuple[str, TensorInfo]]:
        """Every tensor with its shard, after checking that index and headers agree."""
        out: dict[str, tuple[str, TensorInfo]] = {}
        for shard, header in self.shard_headers(cache=True):
            out.update((name, (shard, info)) for name, info in header.tensors.items())
        return out

    def shard_headers(self, cache: bool = False) -> Iterator[tuple[str, ShardHeader]]:
        """Each shard's header in turn, checked against the index; after the last, that the index
        lists no tensor the shards lack. Without `cache`, one header is in memory at a time, so
        a pass over 139k tensors holds a shard's worth (plan shard by shard)."""
        seen = 0
        for shard in self.shards:
            header = self.header(shard) if cache else self._headers.get(shard) or read_header(self.path / shard)
            for name in header.tensors:
                mapped = self.weight_map.get(name)
                if mapped != shard:
                    raise ReapError(
                        self.path / shard,
                        f"tensor {name!r} is in this shard but the index maps it to {mapped!r}",
                    )
            seen += len(header.tensors)
            yield shard, header
        if seen != len(self.weight_map):  # every name seen was mapped to its own shard: some are missing
            for shard in self.shards:
                names = self.header(shard).tensors if cache else read_header(self.path / shard).tensors
                for name, mapped in self.weight_map.items():
                    if mapped == shard and name not in names:
                        raise ReapError(self.path / shard, f"index lists tensor {name!r} but the shard has no such tensor")


def read_files(path: Path) -> tuple[dict, WeightMap, dict | None]:
    """config.json, the tensor -> shard map and the index metadata (None for a single file)."""
    if not path.is_dir():
        raise ReapError(path, "does not exist" if not path.exists() else "is a file, not a checkpoint directory")
    config = read_json_object(path / "config.json", "config.json")
    try:
        check_names(config)
    except ReapError as e:
        raise ReapError(path / "config.json", e.message) from None
    index_path = path / INDEX
    if index_path.exists():
        weight_map, metadata = read_index(index_path)
        for shard in weight_map.shards:
            if not (path / shard).is_file():
                raise ReapError(index_path, f"index names missing shard {shard!r}")
    elif (path / SINGLE).is_file():
        header = read_header(path / SINGLE)
        weight_map = WeightMap.from_pairs(((name, SINGLE) for name in header.tensors), path / SINGLE)
        metadata = None
    else:
        raise ReapError(path, f"no {INDEX} and no {SINGLE}: not a safetensors checkpoint")
    try:
        if text_config(config).get("num_hidden_layers") is not None:
            check_layer_bound(text_config(config)["num_hidden_layers"], weight_map)
    except ReapError as e:
        raise ReapError(path / "config.json", e.message) from None
    return config, weight_map, metadata


def derive_entry(path: str | Path) -> dict:
    """The layout entry transformers' model implies for this checkpoint (built-in entry or not),
    in the format `--layout` reads."""
    from .derive import derive_layout

    path = resolve_checkpoint(path)
    config, weight_map, _ = read_files(path)
    try:
        return derive_layout(config, weight_map)
    except ReapError as e:
        raise ReapError(path / "config.json", e.message) from None


_DERIVED: dict[str, Layout] = {}  # one derivation per checkpoint and process (commands open it twice)


def derived_layout_for(path: Path, config: dict, weight_map: WeightMap) -> Layout:
    """The layout transformers' own model implies, for a family without a built-in entry.

    Derivation builds the model on the meta device (torch and transformers, seconds); its result
    is kept in the user's cache, keyed by config, tensor names, transformers version and the derivation
    itself (its code and data files), so the next command on the same checkpoint (or on what apply
    wrote from it: share_derived_layout) neither derives nor imports torch, and a cache derived by
    another version is not reused."""
    key = _derivation_key(config, weight_map)
    if key not in _DERIVED:
        cached = _cache_dir() / f"{key}.json"
        try:
            layout = Layout.from_dict(config.get("model_type") or "derived", json.loads(cached.read_text()))
        except (OSError, ValueError, ReapError):
            from .derive import derive_layout

            try:
                entry = derive_layout(config, weight_map)
            except ReapError as e:
                raise ReapError(path / "config.json", f"no built-in layout, and {e.message}") from None
            layout = Layout.from_dict(config.get("model_type") or "derived", entry)
            _save_quietly(cached, entry)
        arch = (config.get("architectures") or [None])[0]
        log.info("%s: no built-in layout for %s; using the one derived from transformers' %s "
                 "(`reapsurgery architectures --derive %s` prints it)", path, arch or config.get("model_type"),
                 layout.derived.get("model_class", "model"), path)
        _DERIVED[key] = layout
    return _DERIVED[key]


def _derivation_key(config: dict, weight_map: WeightMap) -> str:
    import hashlib
    from importlib.metadata import version

    return hashlib.sha256(json.dumps([config, sorted(weight_map), version("transformers"), _derivation_digest()],
                                     sort_keys=True, default=str).encode()).hexdigest()


def share_derived_layout(source: "Checkpoint", out: Path) -> None:
    """Record the source's derived layout as that of the checkpoint apply wrote from it at `out`, so
    that `verify OUT` does not derive again (seconds, and torch imported). A pruned model has its
    source's family and tensor names with fewer experts, and derivation reads neither the expert
    count (it compares E with E + 1) nor the counts apply rewrites; what it does read is the MTP
    tensors stored, so call this only when the output keeps every tensor kind the source has."""
    if not source.layout.derived:
        return
    try:
        entry = json.loads((_cache_dir() / f"{_derivation_key(source.config, source.weight_map)}.json").read_text())
        config, weight_map, _ = read_files(out)
    except (OSError, ValueError, ReapError):
        return  # no cache to share (read-only home): verify derives, as without this
    _save_quietly(_cache_dir() / f"{_derivation_key(config, weight_map)}.json", entry)


DERIVATION_FILES = ("derive.py", "derive_names.py", "model_map.py", "mtp_blocks.json", "router_rows.json")


def _derivation_digest() -> str:
    """sha256 of the derivation's own code and data: what it derives changes with them."""
    import hashlib
    from importlib import resources

    h = hashlib.sha256()
    for name in DERIVATION_FILES:
        h.update(resources.files(__package__).joinpath(name).read_bytes())
    return h.hexdigest()


def _cache_dir() -> Path:
    """$REAPSURGERY_CACHE, else $XDG_CACHE_HOME/reapsurgery/layouts, else ~/.cache/reapsurgery/layouts."""
    import os

    if os.environ.get("REAPSURGERY_CACHE"):
        return Path(os.environ["REAPSURGERY_CACHE"]) / "layouts"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "reapsurgery" / "layouts"


def _save_quietly(path: Path, entry: dict) -> None:
    """A cache that cannot be written (read-only home) only costs the next command a derivation."""
    from .files import write_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(entry, indent=1, sort_keys=True) + "\n").encode(), overwrite=True)
    except (OSError, ReapError):
        pass
