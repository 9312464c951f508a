"""What `apply` and `verify` report, whatever the format."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
    format: str = "safetensors"  # or "gguf": config_changes are then metadata keys, shards are files


@dataclass
class VerifyReport:
    path: Path
    shards: int = 0
    tensors: int = 0
    total_size: int = 0
    num_experts: int = 0
    moe_layers: int = 0
    problems: list[str] = field(default_factory=list)
    format: str = "safetensors"  # or "gguf"

    @property
    def ok(self) -> bool:
        return not self.problems
