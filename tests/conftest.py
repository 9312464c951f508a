"""Shared fixtures: tiny checkpoints built once per test session from transformers' own classes."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures.build import FAMILIES, build  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# derived layouts cached per test session (subprocesses inherit it), not in the user's home
os.environ["REAPSURGERY_CACHE"] = tempfile.mkdtemp(prefix="reapsurgery-cache-")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class _Checkpoints(dict):
    """Builds each fixture on first use, so a targeted test run builds only what it touches."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, key: str) -> Path:
        if key == "single_file":
            path = build("qwen3_moe", self.root / key, seed=1, single_file=True)
        elif key in FAMILIES:
            path = build(key, self.root / key)
        else:
            raise KeyError(key)
        self[key] = path
        return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """family -> checkpoint dir (every family of fixtures.build.FAMILIES); plus 'single_file'
    (one model.safetensors, no index). Built lazily, once per session."""
    return _Checkpoints(tmp_path_factory.mktemp("ckpts"))


def tree_hash(path: Path) -> dict[str, str]:
    """sha256 of every file under path, to prove a directory was not touched."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file()
    }
