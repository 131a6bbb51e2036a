"""When progress bars may be drawn: never over a line of text being streamed.

A bar on stderr redraws its terminal line with carriage returns and erases it when done; on
a terminal shared with stdout that line is the one the streamed text is on. Streaming goes
through StreamWriter, which records whether its terminal's cursor is in the middle of a
line; bars (the compile bar of ProgramCache) are drawn only when it is not, i.e. before
the first piece of a reply and between replies, never mid-stream.
"""
from __future__ import annotations

import os
import sys
from typing import TextIO

_mid_line = False


def bars_enabled() -> bool:
    """False with KTJAX_NO_PROGRESS=1, and while streamed text holds a terminal line."""
    return os.environ.get("KTJAX_NO_PROGRESS") != "1" and not _mid_line


def _same_terminal(out: TextIO, err: TextIO) -> bool:
    try:
        return out.isatty() and err.isatty() and \
            os.path.samestat(os.fstat(out.fileno()), os.fstat(err.fileno()))
    except (AttributeError, OSError, ValueError):
        return False


class StreamWriter:
    """Writes streamed text to `out`, keeping track of the line it leaves the cursor on."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None,
                 shares_terminal: bool | None = None):
        self.out = out or sys.stdout
        self.shares_terminal = _same_terminal(self.out, err or sys.stderr) \
            if shares_terminal is None else shares_terminal

    def write(self, text: str) -> None:
        global _mid_line
        if not text:
            return
        self.out.write(text)
        self.out.flush()
        _mid_line = self.shares_terminal and not text.endswith("\n")

    def at_line_start(self) -> None:
        """The cursor went to a new line by other means (the user pressed Enter)."""
        global _mid_line
        _mid_line = False
