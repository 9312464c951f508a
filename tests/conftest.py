"""Shared fixtures: tiny checkpoints built once per test session from transformers' own classes."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures.build import FAMILIES, build  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """family -> checkpoint dir; plus 'single_file' (one model.safetensors, no index)."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {family: build(family, root / family) for family in FAMILIES}
    out["single_file"] = build("qwen3_moe", root / "single_file", seed=1, single_file=True)
    return out


def tree_hash(path: Path) -> dict[str, str]:
    """sha256 of every file under path, to prove a directory was not touched."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file()
    }
