"""Facts a user relies on that were wrong or missing: stale index counts, file kinds by 'format',
a plan that prunes nothing, hub ids from the local cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from tests.helpers import apply_leaving_source_untouched, cli, write_mask


def test_index_total_parameters_is_what_transformers_counts(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    src = checkpoints["qwen3_moe"]
    assert "total_parameters" in json.loads((src / "model.safetensors.index.json").read_text())["metadata"]
    out = tmp_path / "out"
    apply_leaving_source_untouched(write_mask(src, [0, 2, 5, 7], tmp_path / "m.json"), src, out)
    declared = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_parameters"]
    assert declared == AutoModelForCausalLM.from_pretrained(out).num_parameters()


def test_kind_comes_from_format_not_a_substring(checkpoints, tmp_path):
    src = checkpoints["qwen3_moe"]
    mask = tmp_path / "m.json"
    data = json.loads(write_mask(src, [0, 2, 5, 7], mask).read_text())
    data["provenance"]["note"] = "planned from a reapsurgery.saliency file"
    mask.write_text(json.dumps(data))
    r = cli("apply", mask, src, tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr


def test_sparsity_that_drops_nothing_says_so(tmp_path):
    from reapsurgery.common.saliency import LayerStats, Saliency
    from reapsurgery.plan import plan_mask

    model = {"architecture": "X", "model_type": "x", "num_hidden_layers": 1, "moe_layers": [0],
             "num_experts": 8, "num_experts_per_tok": 2, "n_group": None}
    stats = {0: LayerStats(10, [1.0] * 8, [1.0] * 8, [1.0] * 8, [1.0] * 8, [1.0] * 8)}
    plan = plan_mask(Saliency(model, {}, stats), sparsity=0.05)
    assert plan.mask.layers[0] == list(range(8))
    assert any("drops 0 of 8" in n and "nothing is pruned" in n for n in plan.notes)


def test_sparsity_that_rounds_to_another_says_so():
    """0.3 of 8 experts is 2.4: 2 are dropped, sparsity 0.25, and a note says so; exact ones get no note."""
    from reapsurgery.common.saliency import LayerStats, Saliency
    from reapsurgery.plan import plan_mask

    model = {"architecture": "X", "model_type": "x", "num_hidden_layers": 1, "moe_layers": [0],
             "num_experts": 8, "num_experts_per_tok": 2, "n_group": None}
    saliency = Saliency(model, {}, {0: LayerStats(10, [1.0] * 8, [1.0] * 8, [1.0] * 8, [1.0] * 8, [1.0] * 8)})
    plan = plan_mask(saliency, sparsity=0.3)
    assert plan.drop == 2
    assert [n for n in plan.notes if "rounded" in n] == [
        "--sparsity 0.3 of 8 experts is 2.4 experts per layer, rounded to 2: sparsity 0.25 "
        "(6 kept; --keep N sets the count exactly)"]
    for exact in ({"sparsity": 0.5}, {"sparsity": 0.125}, {"keep": 5}):
        assert not [n for n in plan_mask(saliency, **exact).notes if "rounded" in n], exact


def test_no_command_prints_the_help():
    r, help_ = cli(), cli("--help")
    assert (r.returncode, r.stdout, r.stderr) == (0, help_.stdout, "")
    assert "Every command that reports a result takes --json" in r.stdout


def test_hub_id_from_the_local_cache_offline(checkpoints, tmp_path):
    """org/name[@revision] is found in the Hugging Face cache; an uncached id is named in the error."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-moe"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(checkpoints["qwen3_moe"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "reapsurgery", *a], capture_output=True,  # noqa: E731
                                    text=True, env=env)
    r = run("inspect", "acme/tiny-moe")
    assert r.returncode == 0 and str(snap) in r.stdout, r.stderr
    assert run("verify", "acme/tiny-moe@main").returncode == 0
    r = run("inspect", "acme/other")
    assert r.returncode == 2 and r.stderr.startswith("error: acme/other: ") and "hf download acme/other" in r.stderr


def _cached(checkpoints, cache, repo_id: str, card: str | None):
    """A copy of the qwen3_moe fixture as a snapshot of repo_id in a Hugging Face cache, with this README."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / ("b" * 40)
    shutil.copytree(checkpoints["qwen3_moe"], snap)
    (snap / "README.md").unlink()
    if card is not None:
        (snap / "README.md").write_text(card)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    return snap


def test_model_card_names_the_hub_source_as_base_model(checkpoints, tmp_path):
    """From the cache (by hub id or by path), the card's front matter gets base_model: the hub id, read back
    by the hub client; the source card's own keys and text are kept; a plain directory gets no base_model."""
    from huggingface_hub import ModelCard

    cache = tmp_path / "hub"
    card = ("---\nlicense: mit\nbase_model: upstream/base\nbase_model_relation: finetune\ntags:\n- chat\n---\n\n"
            "# Tiny\n\nThe source's own words.\n")
    snap = _cached(checkpoints, cache, "acme/tiny-moe", card)
    bare = _cached(checkpoints, cache, "acme/no-card", None)
    mask = write_mask(snap, [0, 2, 5, 7], tmp_path / "m.json")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "reapsurgery", *map(str, a)], capture_output=True,  # noqa: E731
                                    text=True, env=env)
    for source, out in (("acme/tiny-moe", tmp_path / "by-id"), (snap, tmp_path / "by-path")):
        r = run("apply", mask, source, out, "-q")
        assert r.returncode == 0, r.stderr
        got = ModelCard.load(out / "README.md")
        assert got.data.base_model == "acme/tiny-moe"
        assert got.data.license == "mit" and got.data.tags == ["chat"]
        assert "base_model_relation" not in got.data.to_dict()
        assert "The source's own words." in got.text and "## Expert pruning (reapsurgery)" in got.text
        assert "https://huggingface.co/acme/tiny-moe" in got.text and "b" * 40 in got.text
    r = run("apply", mask, "acme/no-card", tmp_path / "no-card", "-q")
    assert r.returncode == 0, r.stderr
    got = ModelCard.load(tmp_path / "no-card" / "README.md")
    assert got.data.base_model == "acme/no-card" and "pruned" in got.data.tags
    plain = tmp_path / "plain"
    shutil.copytree(bare, plain)
    r = run("apply", mask, plain, tmp_path / "from-plain", "-q")
    assert r.returncode == 0, r.stderr
    got = ModelCard.load(tmp_path / "from-plain" / "README.md")
    assert "base_model" not in got.data.to_dict() and "huggingface.co" not in got.text


# -- progress bars: tqdm on a terminal, plain lines in a log, closed before a message --------------


def _on_a_terminal(*args) -> tuple[int, bytes]:
    """`reapsurgery ARGS` with stderr on a pseudo-terminal of 100 columns: (exit code, what it drew)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "reapsurgery", *map(str, args)], stdout=subprocess.DEVNULL,
                         stderr=slave)
    os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    return p.wait(), drawn


def test_progress_is_plain_lines_in_a_log_and_a_bar_on_a_terminal(checkpoints, tmp_path):
    src = checkpoints["qwen3_moe"]
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    r = subprocess.run([sys.executable, "-m", "reapsurgery", "apply", str(mask), str(src), str(tmp_path / "logged")],
                       capture_output=True)  # bytes: text mode would turn a carriage return into a newline
    assert r.returncode == 0, r.stderr
    assert b"\r" not in r.stderr and b"\x1b" not in r.stderr
    assert re.fullmatch(rb"writing shards: (\S+ \S+)/\1 \(100%\) after 0:0\d\n", r.stderr), r.stderr
    code, drawn = _on_a_terminal("apply", mask, src, tmp_path / "drawn")
    assert code == 0
    assert b"\rwriting shards: 100%|" in drawn and drawn.endswith(b"\n")


def test_calibrate_progress_in_a_log_has_no_escapes(checkpoints, tmp_path):
    from click.testing import CliRunner

    from reapsurgery.cli import main

    r = CliRunner().invoke(main, ["calibrate", str(checkpoints["qwen3_moe"]), "-o", str(tmp_path / "s.json"),
                                  "--num-samples", "4", "--max-length", "16", "--batch-size", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "\r" not in r.stderr and "\x1b" not in r.stderr
    assert re.search(r"^layers: 3/3 \(100%\) after 0:\d\d$", r.stderr, re.M), r.stderr


def test_interrupt_closes_the_bars_before_its_message(checkpoints, tmp_path, monkeypatch):
    """On a terminal, Ctrl-C after a layer: the bar ends its line (at 1 of 3 layers), then the message."""
    import click.testing
    from click.testing import CliRunner

    from reapsurgery.calibration.streaming import StreamedModel
    from reapsurgery.cli import main
    from reapsurgery.cli.common import Interrupted

    monkeypatch.setattr(click.testing._NamedTextIOWrapper, "isatty", lambda self: True, raising=False)
    release = StreamedModel.release_layer

    def interrupted_in_layer_1(self, i):
        release(self, i)
        if i == 1:
            raise Interrupted()

    monkeypatch.setattr(StreamedModel, "release_layer", interrupted_in_layer_1)
    r = CliRunner().invoke(main, ["calibrate", str(checkpoints["qwen3_moe"]), "-o", str(tmp_path / "s.json"),
                                  "--num-samples", "4", "--max-length", "16", "--batch-size", "2", "--device", "cpu"])
    assert r.exit_code == 130, r.output
    drawn, message = r.stderr.rsplit("interrupted", 1)
    assert drawn.endswith("\n"), repr(r.stderr[-300:])
    assert "layers:  33%|" in drawn.rsplit("\n", 2)[-2]  # the bar's last state, on the line it ended
    assert message.startswith("; the finished layers are kept") and message.count("\n") == 1


# -- refusals that need no torch cost no torch ----------------------------------------------------

WITHOUT_TORCH = ("import sys; sys.modules.update(torch=None, transformers=None)  # any import of them fails\n"
                 "from reapsurgery.cli import main; main(prog_name='reapsurgery')")


def test_calibrate_and_evaluate_refuse_before_importing_torch(checkpoints, tmp_path):
    """A missing checkpoint or dataset, an option error, --device cuda where there is certainly no CUDA:
    refused in a process where importing torch or transformers fails (a traceback, exit 1)."""
    from reapsurgery.calibration.preflight import why_no_cuda

    src = checkpoints["qwen3_moe"]
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    out = ["-o", tmp_path / "s.json"]
    cases = [
        (["calibrate", tmp_path / "nockpt", *out], f"{tmp_path / 'nockpt'}: does not exist"),
        (["calibrate", src, *out, "--dataset", tmp_path / "no.jsonl"], f"{tmp_path / 'no.jsonl'}: no such file"),
        (["evaluate", tmp_path / "nockpt", "--mask", mask], f"{tmp_path / 'nockpt'}: does not exist"),
        (["evaluate", src, "--mask", mask, "--dataset", tmp_path / "no.jsonl"], f"{tmp_path / 'no.jsonl'}: no such file"),
        (["evaluate", src, "--mask", mask, "--keep", "4"], "--keep: planning options need a SALIENCY file"),
        (["evaluate", src, "--mask", tmp_path / "nomask.json"], f"{tmp_path / 'nomask.json'}: does not exist"),
    ]
    if why_no_cuda():
        cases += [(["calibrate", src, *out, "--device", "cuda"], "--device cuda: no CUDA device is available"),
                  (["evaluate", src, "--mask", mask, "--device", "cuda:1"], "--device cuda:1: no CUDA device is available")]
    for args, error in cases:
        r = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *map(str, args)], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith(f"error: {error}") and r.stderr.count("\n") == 1, (args, r.stderr)
    assert not (tmp_path / "s.json").exists()


def test_no_cuda_is_said_only_where_torch_agrees():
    import torch

    from reapsurgery.calibration.preflight import why_no_cuda

    assert not why_no_cuda() or not torch.cuda.is_available()
