"""`calibrate --resume` never returns other statistics than a clean run: kills at every write and
rename of the state (strace fault injection), other weights of the same config, corrupt state."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures.build import build
from reapsurgery.calibration.calibrate import calibrate
from reapsurgery.cli import main as cli
from reapsurgery.errors import ReapError
from tests.test_calibrate import texts

ROOT = Path(__file__).resolve().parents[1]
STRACE = shutil.which("strace")
OPTS = ["--num-samples", "5", "--batch-size", "2", "--device", "cpu", "--dtype", "float32", "-q",
        "--checkpoint-every", "0"]


def _tokens(path: Path) -> Path:
    path.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in texts()))
    return path


def _killed_run(ckpt: Path, data: Path, out: Path, paths: list[Path], n: int) -> int:
    """The CLI under strace, SIGKILLed at the n-th write/rename that touches one of `paths`
    (strace counts per thread; every state write happens on the one writer thread)."""
    filters = [a for p in paths for a in ("-P", str(p), "-P", os.path.relpath(p, out.parent))]
    cmd = [STRACE, "-f", "-qq", "-o", "/dev/null", *filters, "-e", "trace=write,rename",
           "-e", f"inject=write,rename:signal=SIGKILL:when={n}",
           sys.executable, "-m", "reapsurgery", "calibrate", str(ckpt), "-o", out.name,
           "--dataset", str(data), *OPTS]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True).returncode


@pytest.mark.skipif(STRACE is None, reason="needs strace (apt-get install strace)")
def test_resume_after_a_kill_at_every_write_and_rename_equals_a_clean_run(checkpoints, tmp_path):
    ckpt = checkpoints["qwen3_moe"]
    data = _tokens(tmp_path / "tokens.jsonl")
    clean = tmp_path / "clean.json"
    assert CliRunner().invoke(cli, ["calibrate", str(ckpt), "-o", str(clean), "--dataset", str(data), *OPTS]).exit_code == 0
    want = json.loads(clean.read_text())["layers"]

    in_process = threading.Lock()

    def attempt(point: tuple[str, int]) -> tuple[int, bool, dict | None]:
        what, n = point
        work = tmp_path / f"{what}{n}"
        work.mkdir()
        out = work / "sal.json"
        state = work / "sal.json.resume"
        paths = [state / "state.pt.partial", state / "state.pt"] if what == "state" else [out]
        rc = _killed_run(ckpt, data, out, paths, n)
        had_state = (state / "state.pt").is_file()
        if rc == 0:
            return rc, had_state, None
        with in_process:  # one in-process calibration at a time: the experts observer is process-wide
            result = CliRunner().invoke(cli, ["calibrate", str(ckpt), "-o", str(out), "--dataset", str(data), *OPTS,
                                              "--resume"])
        assert result.exit_code == 0, result.output
        assert not state.exists()
        return rc, had_state, json.loads(out.read_text())["layers"]

    # 3 layers: states after layers 0 and 1 (a few writes and one rename each), then the output
    points = [("state", n) for n in range(1, 11)]
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(points, pool.map(attempt, points)))
    killed = [p for p, (rc, _, _) in results.items() if rc != 0]
    assert all(results[p][0] == -9 for p in killed)
    states = [n for what, n in killed if what == "state"]
    assert states == list(range(1, len(states) + 1))  # every state write and rename up to the end was a kill point
    assert 6 <= len(states) < 10  # two saves of >= 2 writes and a rename each; the sweep went past the last
    for point in killed:
        assert results[point][2] == want, point


@pytest.mark.skipif(STRACE is None, reason="needs strace (apt-get install strace)")
def test_the_state_is_removed_only_after_the_result_is_in_place(checkpoints, tmp_path):
    """A kill between the two can only leave both: the result and a state --resume may use."""
    out, log = tmp_path / "sal.json", tmp_path / "trace.txt"
    cmd = [STRACE, "-f", "-qq", "--seccomp-bpf", "-o", str(log), "-e", "trace=rename,renameat2,unlink,unlinkat,rmdir",
           sys.executable, "-m", "reapsurgery", "calibrate", str(checkpoints["qwen3_moe"]), "-o", str(out),
           "--dataset", str(_tokens(tmp_path / "tokens.jsonl")), *OPTS]
    assert subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True).returncode == 0
    calls = [line for line in log.read_text().splitlines() if "= 0" in line]
    placed = next(i for i, line in enumerate(calls) if "rename" in line.split("(")[0] and f', "{out}"' in line)
    removed = [i for i, line in enumerate(calls) if "state.pt" in line and "unlink" in line]
    assert removed and placed < min(removed)


def test_resume_refuses_state_of_another_checkpoint_with_the_same_config(checkpoints, tmp_path):
    a = checkpoints["qwen3_moe"]
    b = build("qwen3_moe", tmp_path / "b", seed=7)  # same config, other weights
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    state = tmp_path / "s.resume"

    class Crash(Exception):
        pass

    def crash(i, streamed):
        if i == 2:
            raise Crash

    run = dict(batch_size=2, device="cpu", dtype="float32", state_dir=state)
    with pytest.raises(Crash):
        calibrate(a, texts(), on_layer=crash, **run)
    assert (state / "state.pt").is_file()
    with pytest.raises(ReapError, match="other data, options or checkpoint weights"):
        calibrate(b, texts(), resume=True, **run)
    with pytest.raises(ReapError, match="other data"):
        calibrate(a, texts(seed=2), resume=True, **run)
    (state / "state.pt").write_bytes((state / "state.pt").read_bytes()[:100])  # torn by hand
    with pytest.raises(ReapError, match="unreadable resume state"):
        calibrate(a, texts(), resume=True, **run)


def test_state_is_saved_at_most_every_checkpoint_every(checkpoints, tmp_path):
    saves = []
    from reapsurgery.calibration import resume

    real = resume.ResumeState._write
    resume.ResumeState._write = lambda self, state: (saves.append(state["next_layer"]), real(self, state))[1]
    try:
        calibrate(checkpoints["qwen3_moe"], texts(), batch_size=2, device="cpu", dtype="float32",
                  state_dir=tmp_path / "a", checkpoint_every=0)
        assert saves == [1, 2]  # after every layer but the last (the result follows)
        saves.clear()
        calibrate(checkpoints["qwen3_moe"], texts(), batch_size=2, device="cpu", dtype="float32",
                  state_dir=tmp_path / "b", checkpoint_every=3600)
        assert saves == []
    finally:
        resume.ResumeState._write = real
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_output_that_cannot_be_written_is_refused_before_loading(checkpoints, tmp_path):
    result = CliRunner().invoke(cli, ["calibrate", str(checkpoints["qwen3_moe"]), "-o", str(tmp_path),
                                      "--dataset", str(_tokens(tmp_path / "t.jsonl")), *OPTS])
    assert result.exit_code == 2 and "is a directory" in result.output
    assert not list(tmp_path.glob("*.resume"))


def _cli_calibrate(out: Path, data: Path, *extra, inject: str | None = None, threads: bool = True,
                   paths: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """`calibrate` in a subprocess, under strace when `inject` is given (-P: only calls on those paths;
    without `threads` only the main thread is traced)."""
    cmd = [sys.executable, "-m", "reapsurgery", "calibrate", str(out.with_suffix(".ckpt").resolve()), "-o", str(out),
           "--dataset", str(data), *OPTS, *extra]
    if inject:
        syscall = inject.split(":")[0]
        cmd = [STRACE, *(["-f"] if threads else []), "-qq", "-o", "/dev/null", *[a for p in paths for a in ("-P", str(p))],
               "-e", f"trace={syscall}", "-e", f"inject={inject}", *cmd]
    return subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)


@pytest.fixture
def work(checkpoints, tmp_path):
    """A directory with the checkpoint (as s.ckpt, beside s.json) and the calibration data."""
    os.symlink(checkpoints["qwen3_moe"], tmp_path / "s.ckpt")
    return tmp_path, _tokens(tmp_path / "tokens.jsonl")


@pytest.mark.skipif(STRACE is None, reason="needs strace (apt-get install strace)")
@pytest.mark.parametrize("inject, where", [("write:error=ENOSPC:when=1", "state.pt.partial"),
                                           ("mkdir:error=EACCES:when=1", "")])
def test_a_state_that_cannot_be_saved_leaves_nothing_and_the_run_goes_on(work, inject, where):
    """A full disk, EIO or a permission error while saving the resume state: a note (no traceback),
    no partial file, no empty state directory, and the result is written all the same."""
    tmp_path, data = work
    out, state = tmp_path / "s.json", tmp_path / "s.json.resume"
    r = _cli_calibrate(out, data, inject=inject, paths=(state / where if where else state,))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    notes = [line for line in r.stderr.splitlines() if "cannot save the resume state" in line]
    assert len(notes) == 1 and notes[0].startswith(f"note: {state}") and "the run goes on" in notes[0]
    assert json.loads(out.read_text())["format"] == "reapsurgery.saliency"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ckpt", "s.json", "tokens.jsonl"]


@pytest.mark.skipif(STRACE is None, reason="needs strace (apt-get install strace)")
def test_a_result_that_cannot_be_written_keeps_every_layer_for_resume(work, monkeypatch):
    """The result's rename fails (ENOSPC): exit 2, one error line naming the file and saying the
    statistics are kept and how to resume; --resume then writes the result without measuring again."""
    tmp_path, data = work
    out, state = tmp_path / "s.json", tmp_path / "s.json.resume"
    r = _cli_calibrate(out, data, inject="renameat2:error=ENOSPC:when=1", threads=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [last]
    assert last.startswith(f"error: {out}: cannot write: No space left on device; every layer's statistics are "
                           f"kept in {state}") and "--resume" in last
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s.ckpt", "s.json.resume", "tokens.jsonl"]

    from reapsurgery.calibration import calibrate as calibration

    args = ["calibrate", str(tmp_path / "s.ckpt"), "--dataset", str(data), *OPTS]
    clean = tmp_path / "clean.json"
    assert CliRunner().invoke(cli, [*args, "-o", str(clean)]).exit_code == 0
    streamed = []
    real = calibration._stream_chunk
    monkeypatch.setattr(calibration, "_stream_chunk", lambda *a: (streamed.append(a[2]), real(*a))[1])
    r = CliRunner().invoke(cli, [*args, "-o", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert streamed == []  # no layer measured again
    assert not state.exists() and json.loads(out.read_text())["layers"] == json.loads(clean.read_text())["layers"]


@pytest.mark.skipif(STRACE is None, reason="needs strace (apt-get install strace)")
def test_a_signal_at_the_result_rename_is_reported_as_written(work):
    """SIGTERM on entering the result's rename: the result and the removal of the state are one
    step; the message says the result was written, and no state is left."""
    tmp_path, data = work
    out = tmp_path / "s.json"
    r = _cli_calibrate(out, data, inject="renameat2:signal=SIGTERM:when=1", threads=False)
    assert r.returncode == 143 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"interrupted after {out} was written (it is complete)")
    assert json.loads(out.read_text())["format"] == "reapsurgery.saliency"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ckpt", "s.json", "tokens.jsonl"]


def test_overwrite_discards_an_earlier_state_and_resume_continues_it(checkpoints, tmp_path):
    """Without --resume an earlier state is refused (the refusal table); --overwrite discards it
    and starts again; the state directory is calibrate's own and removed with the state."""
    from reapsurgery.calibration import statedir

    state = tmp_path / "s.json.resume"
    statedir.adopt(state)
    (state / statedir.STATE).write_bytes(b"an earlier state")
    args = ["calibrate", str(checkpoints["qwen3_moe"]), "-o", str(tmp_path / "s.json"),
            "--dataset", str(_tokens(tmp_path / "t.jsonl")), *OPTS]
    r = CliRunner().invoke(cli, args + ["--resume"])
    assert r.exit_code == 2 and "unreadable resume state" in r.stderr and (state / statedir.STATE).exists()
    r = CliRunner().invoke(cli, args + ["--overwrite"])
    assert r.exit_code == 0, r.output
    assert not state.exists() and (tmp_path / "s.json").exists()
