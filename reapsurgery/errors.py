"""The one error type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

import os


class ReapError(Exception):
    """A user-facing problem with an input file: names the file and what is wrong."""

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)
