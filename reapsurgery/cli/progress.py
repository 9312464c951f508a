"""Progress bars for every command: tqdm on a terminal, plain lines in a log, closed before any message.

On a terminal a bar redraws itself in place (tqdm). Where stderr is not a terminal (a log file,
a pipe, a batch system) redrawing would write carriage returns and cursor-up escapes into the
log, so there a bar is a plain line now and then: at most one per PERIOD seconds while it moves,
and one when it ends (bars that vanish when done, leave=False, print no final line). Every bar
is registered while open: an error or an interrupt closes them all before its message, so the
message starts a line of its own, and a note is written above the bars, not through them.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import click

from ..common.units import human

PERIOD = 30.0  # seconds between two lines of one bar in a log
BarFactory = Callable[..., Any]  # bar(total=..., desc=..., unit=..., leave=..., initial=...) -> update(), close()
_open: list = []  # bars not closed yet, oldest first
_held: list[str] | None = None  # notes waiting for the command to go on; None: printed at once


def progress_bars(quiet: bool) -> BarFactory | None:
    """The bar factory a command hands the library: None with --quiet, else bars suited to stderr."""
    if quiet:
        return None
    if sys.stderr.isatty():
        return _tqdm_bar
    return LineBar


def close_bars() -> None:
    """Close every open bar, newest first, so that what is printed next starts on a fresh line."""
    while _open:
        _open[-1].close()


def echo_above_bars(text: str) -> None:
    """One line on stderr, written above the bars of a terminal instead of through them."""
    if any(not isinstance(b, LineBar) for b in _open):
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stderr):
            click.echo(text, err=True)
    else:
        click.echo(text, err=True)


def hold_notes() -> None:
    """From now on `note` holds its lines: the command is checking its inputs."""
    global _held
    _held = []


def release_notes() -> None:
    """Print the notes held so far, and every later one at once: the command goes on."""
    global _held
    held, _held = _held or [], None
    for line in held:
        echo_above_bars(line)


def note(line: str) -> None:
    """A line for the user that is not the command's result: held while the command checks its
    inputs (so that a refusal is its one line), else written above the bars."""
    if _held is None:
        echo_above_bars(line)
    else:
        _held.append(line)


def _forget(bar) -> None:
    if bar in _open:
        _open.remove(bar)


def _tqdm_bar(**kwargs):
    """A tqdm bar that leaves the registry when closed (tqdm is imported only when a bar is drawn)."""
    from tqdm import tqdm

    class Bar(tqdm):
        def update(self, n=1):
            release_notes()  # a bar moved: the command is past its checks
            return super().update(n)

        def close(self) -> None:
            try:
                super().close()
            finally:
                _forget(self)

    bar = Bar(file=sys.stderr, **kwargs)
    _open.append(bar)
    return bar


class LineBar:
    """tqdm's interface as occasional plain lines: `layers: 3/16 (19%) after 0:42`."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", unit_scale: bool = False,
                 leave: bool = True, initial: int = 0, **_ignored: Any):
        self.total, self.desc, self.leave = total, desc, leave
        self.bytes = unit == "B" and unit_scale
        self.n = self.shown = initial
        self.start = self.last = time.monotonic()
        self.closed = False
        _open.append(self)

    def update(self, n: int = 1) -> None:
        release_notes()  # a bar moved: the command is past its checks
        self.n += n
        if time.monotonic() - self.last >= PERIOD:
            self._line()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        _forget(self)
        if self.leave and self.n != self.shown:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        amount = human if self.bytes else str
        done = f"{amount(self.n)}/{amount(self.total)}" if self.total else amount(self.n)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        minutes, seconds = divmod(int(now - self.start), 60)
        hours, minutes = divmod(minutes, 60)
        elapsed = f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
        click.echo(f"{self.desc}: {done}{share} after {elapsed}", err=True)
        self.shown, self.last = self.n, now
