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
from tests.helpers import cli, write_mask, write_saliency

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


# -- what the tool says after a signal is what happened; nothing of it is left behind -----------


def main_thread_calls(*args, cwd=None) -> list[tuple[str, int, str]]:
    """Every system call of the command's main thread, in order, as (name, its number among the
    calls of that name, the strace line): strace without -f follows that thread only, and injects
    by the same count."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "log")
        subprocess.run([STRACE, "-qq", "-o", log, sys.executable, "-m", "reapsurgery", *map(str, args)],
                       capture_output=True, cwd=cwd, check=True)
        lines = open(log).read().splitlines()
    seen: dict[str, int] = {}
    calls = []
    for line in lines:
        name = line.split("(", 1)[0]
        if name.isidentifier():
            seen[name] = seen.get(name, 0) + 1
            calls.append((name, seen[name], line))
    return calls


def publish_points(calls: list[tuple[str, int, str]], out) -> list[tuple[str, int]]:
    """The calls around the rename that publishes `out`, to the removal of the scratch directory and
    the report after it: every one where few, the first and last of each name where many."""
    rename = next(i for i, (name, _, line) in enumerate(calls) if name.startswith("rename") and f'"{out}"' in line)
    last = max(i for i, (_, _, line) in enumerate(calls) if ".reapsurgery-partial-" in line)
    window = calls[rename - 3:last + 3]
    if len(window) > 16:
        by_name: dict[str, list[int]] = {}
        for name, n, _ in window:
            by_name.setdefault(name, []).append(n)
        return sorted({(name, n) for name, ns in by_name.items() for n in (ns[0], ns[-1])})
    return [(name, n) for name, n, _ in window]


def signalled(point: tuple[str, int], *args, cwd=None) -> subprocess.CompletedProcess:
    """The command with SIGTERM delivered on entering the point's call, in its main thread."""
    name, n = point
    return subprocess.run([STRACE, "-qq", "-o", "/dev/null", "-e", f"trace={name}", "-e",
                           f"inject={name}:signal=SIGTERM:when={n}", sys.executable, "-m", "reapsurgery",
                           *map(str, args)], capture_output=True, text=True, cwd=cwd)


def said_as_done(r: subprocess.CompletedProcess, out) -> bool:
    """The run's last word: True when it says `out` was written, False when it says nothing was;
    asserts that it is one of the two, on the last line, without a traceback."""
    assert "Traceback" not in r.stderr, r.stderr
    if r.returncode == 0:
        return True
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 143, r.stderr
    if last.startswith("interrupted; nothing was written"):
        return False
    assert last.startswith(f"interrupted after {out} was written (it is complete)"), last
    return True


@needs_strace
@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_a_signal_at_each_call_of_apply_publish_is_reported_as_it_happened(setup, tmp_path, overwrite):
    """SIGTERM on entering each system call around the rename that publishes OUT (and the removal
    of the old version under --overwrite): the message says OUT was written exactly when OUT is
    the new complete output, nothing was written when it is absent or the old one; nothing hidden is left."""
    src, a, b = setup
    old = tmp_path / "old"
    assert cli("apply", a, src, old / "out", "-q").returncode == 0
    extra = ["--overwrite"] if overwrite else []
    probe = tmp_path / "probe"
    if overwrite:
        shutil.copytree(old, probe)
    calls = main_thread_calls("apply", b, src, probe / "out", "-q", "-j", "1", *extra)
    points = publish_points(calls, probe / "out")
    outcomes = set()
    for i, point in enumerate(points):
        case = tmp_path / f"case{i}"
        shutil.copytree(old, case) if overwrite else case.mkdir()
        out = case / "out"
        r = signalled(point, "apply", b, src, out, "-q", "-j", "1", *extra)
        done = said_as_done(r, out)
        outcomes.add(done)
        if done:
            assert kept_mask(out) == json.loads(b.read_text())["layers"], point
            assert cli("verify", out).returncode == 0
        elif overwrite:
            assert kept_mask(out) == json.loads(a.read_text())["layers"], point
        else:
            assert not out.exists(), point
        assert hidden(case) == [], (point, hidden(case))
    assert outcomes == {True, False}  # the points reach from before the rename to after it


@needs_strace
def test_a_signal_at_each_call_of_a_file_publish_is_reported_as_it_happened(setup, tmp_path):
    """The same for a file (`plan -o`, through write_atomic like every file reapsurgery writes)."""
    sal = write_saliency(setup[0], tmp_path / "s.json")
    points = publish_points(main_thread_calls("plan", sal, "--keep", 4, "-o", tmp_path / "m.json"), tmp_path / "m.json")
    (tmp_path / "m.json").unlink()
    outcomes = set()
    for i, point in enumerate(points):
        case = tmp_path / f"case{i}"
        case.mkdir()
        r = signalled(point, "plan", sal, "--keep", 4, "-o", case / "m.json")
        done = said_as_done(r, case / "m.json")
        outcomes.add(done)
        assert (case / "m.json").exists() == done, point
        if done:
            assert json.loads((case / "m.json").read_text())["format"] == "reapsurgery.mask"
        assert sorted(p.name for p in case.iterdir()) == (["m.json"] if done else []), point
    assert outcomes == {True, False}


@needs_strace
def test_a_signal_while_making_the_partial_directory_and_parents_leaves_nothing(setup, tmp_path):
    """apply into a/b/c/out (a exists): SIGTERM at each mkdir leaves no partial directory and none
    of the parents this run made; a failure while writing (ENOSPC) removes them too."""
    src, a, _ = setup
    (tmp_path / "a").mkdir()
    out = tmp_path / "a" / "b" / "c" / "out"
    mkdirs = [n for name, n, line in main_thread_calls("apply", a, src, out, "-q", "-j", "1")
              if name == "mkdir" and str(tmp_path) in line]
    shutil.rmtree(tmp_path / "a" / "b")
    assert len(mkdirs) >= 5  # b, c, the scratch directory, the output inside it, ...
    for n in mkdirs:
        r = signalled(("mkdir", n), "apply", a, src, out, "-q", "-j", "1")
        assert r.returncode == 143 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("interrupted; nothing was written")
        assert list(tmp_path.rglob("*")) == [tmp_path / "a"], n
    r = traced("copy_file_range:error=ENOSPC:when=2", "apply", a, src, out, "-q", "-j", "1")
    assert r.returncode == 2 and "No space left on device" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.rglob("*")) == [tmp_path / "a"]


@needs_strace
def test_a_killed_file_write_is_removed_by_the_next_run_and_lookalikes_are_not(setup, tmp_path):
    """SIGKILL at plan's publish leaves one marked scratch directory, which the next run removes
    (a note says so); directories and files that only look like ours by name are never touched."""
    sal = write_saliency(setup[0], tmp_path / "s.json")
    out = tmp_path / "m.json"
    lookalikes = {".m.json.reapsurgery-partial-999999": "a user's directory",
                  ".m.json.reapsurgery-partial-999999-abcd1234": "another",
                  ".m.json.reapsurgery-lock-999999": None}
    for name, text in lookalikes.items():
        if text is None:
            (tmp_path / name).write_text("a user's file")
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / ".reapsurgery-scratch").write_text(text)  # not our marker
    before = _snapshot(tmp_path)
    r = subprocess.run([STRACE, "-qq", "-o", "/dev/null", "-e", "trace=renameat2", "-e",
                        "inject=renameat2:signal=SIGKILL:when=1", sys.executable, "-m", "reapsurgery",
                        "plan", str(sal), "--keep", "4", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL and not out.exists()
    left = sorted(set(hidden(tmp_path)) - set(lookalikes))
    assert len(left) == 1 and left[0].startswith(".m.json.reapsurgery-partial-")
    r = cli("plan", sal, "--keep", 4, "-o", out)
    assert r.returncode == 0, r.stderr
    assert f"note: removed {tmp_path / left[0]}, left by an earlier run that was killed" in r.stderr
    assert _snapshot(tmp_path) == {**before, str(out): _snapshot(tmp_path)[str(out)]}


@needs_strace
def test_apply_never_removes_lookalikes_of_its_partial_and_lock_names(setup, tmp_path):
    """A checkpoint named like a partial directory and a mask named like a lock file of OUT, whose
    process ids are gone: apply reads them and leaves them as they are."""
    src, a, _ = setup
    ckpt = tmp_path / ".out.reapsurgery-partial-999999"
    shutil.copytree(src, ckpt)
    mask = tmp_path / ".out.reapsurgery-lock-999999"
    shutil.copy(a, mask)
    before = _snapshot(tmp_path)
    r = cli("apply", mask, ckpt, tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    assert "removed" not in r.stderr
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith(str(tmp_path / "out"))} == before


def test_apply_overwrite_through_a_symlinked_out_replaces_its_target(setup, tmp_path):
    """OUT a symlink to an earlier output: --overwrite writes the target, keeps the link, leaves nothing."""
    src, a, b = setup
    real = tmp_path / "disk" / "pruned"
    assert cli("apply", a, src, real, "-q").returncode == 0
    link = tmp_path / "out"
    link.symlink_to(real)
    r = cli("apply", b, src, link, "-q", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and kept_mask(real) == json.loads(b.read_text())["layers"]
    assert hidden(tmp_path / "disk") == [] and cli("verify", link).returncode == 0


def _snapshot(root) -> dict[str, str]:
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@needs_strace
@pytest.mark.parametrize("inject, code, last", [
    ("renameat2:signal=SIGTERM:when=1", 143, "interrupted after {out} was written (it is complete)"),
    ("fsync:error=ENOSPC:when=1", 2, "error: {out}: cannot write: No space left on device"),
], ids=["SIGTERM at the rename", "ENOSPC at the flush"])
def test_evaluate_report_after_a_signal_or_a_full_disk(setup, tmp_path, inject, code, last):
    """evaluate's report is written like every file: after a signal at its rename it is complete and
    said so; after a full disk it is absent and the error names it; nothing hidden is left either way."""
    src, a, _ = setup
    out = tmp_path / "r.json"
    syscall = inject.split(":")[0]
    r = subprocess.run([STRACE, "-qq", "-o", "/dev/null", "-e", f"trace={syscall}", "-e", f"inject={inject}",
                        sys.executable, "-m", "reapsurgery", "evaluate", str(src), "--mask", str(a), "-o", str(out),
                        "--device", "cpu", "-q", "--num-samples", "2", "--max-length", "8"],
                       capture_output=True, text=True)
    assert r.returncode == code and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(last.format(out=out))
    assert sorted(p.name for p in tmp_path.iterdir()) == (["r.json"] if code == 143 else [])
    if code == 143:
        assert json.loads(out.read_text())["format"] == "reapsurgery.evaluation"


@needs_strace
@pytest.mark.parametrize("inject, message", [("fsync:error=EIO:when=1", "Input/output error"),
                                             ("renameat2:error=ENOSPC:when=1", "No space left on device")])
def test_a_file_that_cannot_be_written_leaves_nothing(setup, tmp_path, inject, message):
    """EIO at the flush or a full disk at the rename of `plan -o`: one error line naming the file, exit 2, nothing left."""
    sal = write_saliency(setup[0], tmp_path / "s.json")
    out = tmp_path / "m.json"
    r = traced(inject, "plan", sal, "--keep", 4, "-o", out)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {out}: cannot write: {message}"], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]
