"""Kills, signals and concurrent runs: OUT is complete or absent (or the old version), never
missing under --overwrite, and no hidden partial outlives the next run. Kill points are exact:
strace injects the signal at the Nth call of a syscall."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import tree_hash
from tests.helpers import cli, write_mask

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(STRACE is None, reason="strace not installed (apt-get install strace)")


def traced(inject: str, *args) -> subprocess.CompletedProcess:
    syscall = inject.split(":")[0]
    return subprocess.run([STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}", "-e",
                           f"inject={inject}", sys.executable, "-m", "reapsurgery", *map(str, args)],
                          capture_output=True, text=True)


def hidden(d) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def setup(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    src = checkpoints["qwen3_moe"]
    return src, write_mask(src, [0, 2, 5, 7], root / "a.json"), write_mask(src, [1, 3, 4, 6], root / "b.json")


def kept_mask(out):
    return json.loads((out / "reapsurgery.mask.json").read_text())["layers"]


@needs_strace
@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_signal_mid_write_leaves_nothing(setup, tmp_path, sig, code):
    src, a, _ = setup
    before = tree_hash(src)
    # one copy worker: strace counts calls per thread, so the 3rd call must come from one thread
    r = traced(f"copy_file_range:signal={sig}:when=3", "apply", a, src, tmp_path / "out", "-q", "-j", "1")
    assert r.returncode == code, r.stderr
    assert "interrupted" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == [] and tree_hash(src) == before


@needs_strace
def test_sigkill_partial_is_removed_by_the_next_run(setup, tmp_path):
    src, a, _ = setup
    out = tmp_path / "out"
    r = traced("copy_file_range:signal=SIGKILL:when=3", "apply", a, src, out, "-q", "-j", "1")
    assert r.returncode == -signal.SIGKILL
    assert not out.exists() and len(hidden(tmp_path)) == 1  # the killed run's partial
    r = cli("apply", a, src, out, "-q")
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stderr and "killed" in r.stderr
    assert hidden(tmp_path) == [] and cli("verify", out).returncode == 0


@needs_strace
@pytest.mark.parametrize("inject", ["renameat2:signal=SIGKILL:when=1", "unlinkat:signal=SIGKILL:when=1"])
def test_kill_during_overwrite_never_leaves_out_missing(setup, tmp_path, inject):
    """Killed before the exchange: OUT is the old version; killed while removing the old one
    (after the exchange): OUT is the new one. Either way complete, and the next run cleans up."""
    src, a, b = setup
    out = tmp_path / "out"
    assert cli("apply", a, src, out, "-q").returncode == 0
    old = kept_mask(out)
    r = traced(inject, "apply", b, src, out, "-q", "--overwrite")
    assert r.returncode == -signal.SIGKILL
    assert kept_mask(out) == (old if inject.startswith("renameat2") else kept_mask(out))
    assert kept_mask(out) != old or inject.startswith("renameat2")
    assert cli("verify", out).returncode == 0
    assert len(hidden(tmp_path)) == 1
    assert cli("apply", b, src, out, "-q", "--overwrite").returncode == 0
    assert hidden(tmp_path) == [] and kept_mask(out) != old


@needs_strace
def test_two_applies_into_one_out_cannot_both_succeed(setup, tmp_path):
    """Both pass the emptiness check and write, then publish a second later: one wins."""
    src, a, b = setup
    out = tmp_path / "out"
    out.mkdir()  # empty: allowed without --overwrite
    cmd = lambda m: [STRACE, "-f", "-qq", "-o", "/dev/null", "-e", "trace=renameat2", "-e",  # noqa: E731
                     "inject=renameat2:delay_enter=1500000", sys.executable, "-m", "reapsurgery",
                     "apply", str(m), str(src), str(out), "-q"]
    procs = [subprocess.Popen(cmd(m), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in (a, b)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert f"error: {out}: another process wrote this output directory" in loser
    winner = a if results[0][0] == 0 else b
    assert kept_mask(out) == json.loads(winner.read_text())["layers"]
    assert hidden(tmp_path) == [] and cli("verify", out).returncode == 0


def test_broken_pipe_exits_quietly(checkpoints):
    p = subprocess.Popen([sys.executable, "-m", "reapsurgery", "inspect", str(checkpoints["qwen3_moe"])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before anything is written, like `| head -0`
    assert p.wait() == 0
    assert p.stderr.read() == b""


def test_interrupted_calibrate_says_where_the_resume_state_is(checkpoints, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from reapsurgery.calibration import calibrate as calibration, statedir
    from reapsurgery.cli import main
    from reapsurgery.cli.common import Interrupted

    def killed_after_a_layer(*args, state_dir, **kwargs):
        statedir.adopt(state_dir)
        (state_dir / statedir.STATE).write_bytes(b"state")
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(calibration, "calibrate", killed_after_a_layer)
    out = tmp_path / "s.json"
    r = CliRunner().invoke(main, ["calibrate", str(checkpoints["qwen3_moe"]), "-o", str(out), "-q",
                                  "--num-samples", "2", "--device", "cpu"])
    assert r.exit_code == 143
    assert f"{out}.resume" in r.stderr and "--resume" in r.stderr and "nothing" not in r.stderr
