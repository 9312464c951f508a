"""Pruned GGUF files load and run in llama.cpp's own runtime (examples/simple: load, tokenize, decode).

Needs a llama.cpp build: $REAPSURGERY_LLAMA_SIMPLE names its llama-simple binary (build it from the
llama-cpp-python sdist: `python fixtures/gguf_convert.py fetch --whole`, then cmake in
vendor/llama.cpp, target llama-simple), and the converter; skipped where either is absent."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures.gguf_convert import convert, converter_dir
from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.common.mask import load_mask
from reapsurgery.surgery.apply import apply_mask
from tests.helpers import write_mask

SIMPLE = os.environ.get("REAPSURGERY_LLAMA_SIMPLE") or shutil.which("llama-simple")
pytestmark = pytest.mark.skipif(SIMPLE is None or converter_dir() is None,
                                reason="needs llama.cpp's llama-simple ($REAPSURGERY_LLAMA_SIMPLE) and its converter")

KEEP = [1, 2, 5, 6]
# (qwen3_5_moe is not here: llama.cpp's M-RoPE asserts on the fixture's 8-wide heads, unpruned or not)
FAMILIES = {"qwen3_moe": [], "mixtral": [], "deepseek_v3": [], "glm4_moe": [], "gpt_oss": [],
            "cohere2_moe": ["--fuse-gate-up-exps"]}


def with_a_merge(path: Path) -> Path:
    """The converted file with one BPE merge added: the fixtures' byte-level tokenizer has none, and
    llama.cpp's BPE vocabulary loader refuses a model without merges (the unpruned file as much)."""
    from reapsurgery.common.gguf_file import constants, read_gguf
    from reapsurgery.surgery.gguf_header import encode_kv
    from tests.gguf_helpers import raw_records, rebuild

    VT = constants().GGUFValueType
    records = raw_records(read_gguf(path))
    records["tokenizer.ggml.merges"] = encode_kv("tokenizer.ggml.merges", VT.ARRAY, ["\u0120 \u0120"], VT.STRING)
    return rebuild(path, path.with_suffix(".tmp"), records=records).replace(path)


@pytest.fixture(scope="module")
def pruned_ggufs(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """family -> apply(mask, convert_hf_to_gguf(ckpt)) at 50%, the NextN / MTP block kept and pruned."""
    root = tmp_path_factory.mktemp("runtime")
    jobs = [[str(checkpoints[f]), "--outfile", str(root / f"{f}.gguf"), *opts] for f, opts in FAMILIES.items()]
    convert(jobs)
    out = {}
    for family in FAMILIES:
        with_a_merge(root / f"{family}.gguf")
        ckpt = Checkpoint.open(checkpoints[family])
        mask = write_mask(checkpoints[family], {l: KEEP for l in ckpt.moe_layers + ckpt.stored_mtp_layers()},
                          root / f"{family}.json")
        out[family] = root / f"{family}-pruned.gguf"
        apply_mask(load_mask(mask), mask, root / f"{family}.gguf", out[family])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_gguf_loads_and_generates_in_llama_cpp(pruned_ggufs, family):
    for path, experts in ((pruned_ggufs[family].with_name(f"{family}.gguf"), 8), (pruned_ggufs[family], 4)):
        r = subprocess.run([SIMPLE, "-m", str(path), "-n", "4", "-ngl", "0", "hello"], capture_output=True,
                           text=True, errors="replace", timeout=300, env=dict(os.environ, GGML_NO_BACKTRACE="1"))
        assert r.returncode == 0, r.stderr[-3000:]
        assert re.search(rf"n_expert\s+= {experts}\n", r.stderr), r.stderr[-3000:]  # llama.cpp's own reading
        assert re.search(r"decoded [1-4] tokens", r.stderr), r.stderr[-3000:]
