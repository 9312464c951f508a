"""Where calibrate keeps its resume state (OUTPUT.resume/), and the proof that a directory there is one.

The directory holds a marker, `.reapsurgery-resume`, written when the first state is saved. A path
there without it (a user's directory, a checkpoint, a file) is never used, emptied or removed: the
run is refused before anything is loaded. An empty directory holds nothing to lose and is taken.
A state of an earlier run is not replaced silently either: `--resume` continues it, `--overwrite`
discards it. Torch-free, so the command line checks all this before importing torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ReapError

MARKER = ".reapsurgery-resume"
STATE, PARTIAL = "state.pt", "state.pt.partial"


def marker_bytes(root: Path) -> bytes:
    return json.dumps({"format": "reapsurgery.resume", "directory": root.name}).encode()


def is_ours(root: Path) -> bool:
    """A real directory carrying our marker (for this name)."""
    marker = root / MARKER
    try:
        return (root.is_dir() and not root.is_symlink() and marker.is_file() and not marker.is_symlink()
                and marker.read_bytes() == marker_bytes(root))
    except OSError:
        return False


def _empty(root: Path) -> bool:
    try:
        return root.is_dir() and not root.is_symlink() and not any(root.iterdir())
    except OSError:
        return False


def has_state(root: Path) -> bool:
    """A saved state in it (one process's, or any rank's under torchrun)."""
    if not is_ours(root):
        return False
    return (root / STATE).is_file() or any((d / STATE).is_file() for d in root.glob("rank*of*") if d.is_dir())


def check_state_dir(root: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a path that is not ours, and a state of an earlier run that neither --resume nor --overwrite settles."""
    if not os.path.lexists(root) or _empty(root):
        return
    if not is_ours(root):
        raise ReapError(root, "exists and is not a resume state of reapsurgery (calibrate keeps its state in "
                              "OUTPUT.resume/ and never removes what it did not make): move it away or choose "
                              "another -o")
    if has_state(root) and not resume and not overwrite:
        raise ReapError(root, "holds the resume state of an earlier run for this output: pass --resume to continue "
                              "it, or --overwrite to discard it and start again")


def adopt(root: Path) -> bool:
    """Make `root` ours (create it, or mark an empty one); True when it was created here."""
    created = False
    try:
        root.mkdir()
        created = True
    except FileExistsError:
        if not (is_ours(root) or _empty(root)):
            raise ReapError(root, "exists and is not a resume state of reapsurgery; it was left as it is") from None
    try:
        fd = os.open(root / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return created  # ours already (checked above), or another rank's at this instant
    except OSError:
        if created:
            root.rmdir()
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(marker_bytes(root))
    except OSError:
        (root / MARKER).unlink(missing_ok=True)
        if created:
            root.rmdir()
        raise
    return created


def remove(root: Path, sub: Path | None = None) -> None:
    """Remove one process's state files (in `sub`, a rank's directory, when given), then the
    directory itself once nothing but the marker is left in it: nothing that is not ours."""
    where = sub or root
    for name in (STATE, PARTIAL):
        (where / name).unlink(missing_ok=True)
    try:
        if sub is not None:
            sub.rmdir()
        if {p.name for p in root.iterdir()} == {MARKER}:
            (root / MARKER).unlink()
            root.rmdir()
    except OSError:
        pass  # another rank's files are still there (it removes the directory), or it is gone already
