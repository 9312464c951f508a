"""Shared fixtures: tiny checkpoints built once per test session from transformers' own classes."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
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
# Under pytest-xdist (pyproject's addopts) the workers share the CPUs: one thread each, in-process
# and in the commands they start, so a test and its subprocess also compute with the same thread
# count (float sums round by it).
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


class _Checkpoints(dict):
    """Builds each fixture on first use, so a targeted test run builds only what it touches. The
    xdist workers of one run share them: the first to need one builds it under a lock, the others
    wait for it and read the same files."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, key: str) -> Path:
        if key != "single_file" and key not in FAMILIES:
            raise KeyError(key)
        path, built = self.root / key, self.root / f".{key}.built"  # the marker outside the checkpoint
        with open(self.root / f".{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not built.exists():
                shutil.rmtree(path, ignore_errors=True)  # a build interrupted in another worker
                if key == "single_file":
                    build("qwen3_moe", path, seed=1, single_file=True)
                else:
                    build(key, path)
                built.touch()
        self[key] = path
        return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """family -> checkpoint dir (every family of fixtures.build.FAMILIES); plus 'single_file'
    (one model.safetensors, no index). Built lazily, once per session."""
    if WORKER:  # the run's base directory, above each worker's own
        root = tmp_path_factory.getbasetemp().parent / "ckpts"
        root.mkdir(exist_ok=True)
        return _Checkpoints(root)
    return _Checkpoints(tmp_path_factory.mktemp("ckpts"))


def tree_hash(path: Path) -> dict[str, str]:
    """sha256 of every file under path, to prove a directory was not touched."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file()
    }


# GGUF fixtures (fixtures/gguf_files.py): name -> write_gguf options
GGUF_FIXTURES = {
    "single": {},
    "split": {"split_max_tensors": 10},
    "nextn": {"nextn": 1, "dense_lead": 1, "probs_bias": True, "groups": (2, 1)},
    "nextn_split": {"nextn": 1, "dense_lead": 1, "split_max_tensors": 9},
    "bias": {"arch": "gpt-oss", "n_layer": 2, "expert_bias": True},
    "fused": {"arch": "qwen35moe", "n_layer": 2, "fused_gate_up": True, "alignment": 64},
    "scales": {"arch": "gemma4", "n_layer": 2, "scales": True, "split_max_tensors": 7},
}


class _GGUFFiles(dict):
    """Builds each GGUF fixture on first use; the value is the path of its (first) file."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, key: str) -> Path:
        from fixtures.gguf_files import write_gguf

        path = write_gguf(self.root / key / f"tiny-{key}.gguf", seed=len(self), **GGUF_FIXTURES[key])
        self[key] = path
        return path


@pytest.fixture(scope="session")
def gguf_files(tmp_path_factory) -> dict[str, Path]:
    """name (GGUF_FIXTURES) -> path of a tiny MoE GGUF written with the gguf package; built lazily."""
    return _GGUFFiles(tmp_path_factory.mktemp("gguf"))
