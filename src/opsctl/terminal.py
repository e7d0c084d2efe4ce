"""The one way opsctl makes a rich Console, so that every one treats colour alike.

Colour is used only on a terminal. NO_COLOR (set to anything) turns it off everywhere;
FORCE_COLOR (set and not empty) turns it on even in a pipe, unless NO_COLOR is set too.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, TextIO

from rich.console import Console


def colour_wanted(stream: TextIO) -> bool:
    """Whether text written to ``stream`` may carry colour."""
    if "NO_COLOR" in os.environ:
        return False
    return bool(os.environ.get("FORCE_COLOR")) or stream.isatty()


class _Console(Console):
    """A Console that leaves a reader who went away (``| head``) to its caller.

    rich would exit with 1 at once, as if the command had failed.
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def streams_ready() -> None:
    """Give a standard stream the caller closed (``>&-``) somewhere to write, nowhere,
    so that the command does what it was asked rather than fail on its first word; and
    let the reader of stderr go away (``2>&1 | head``) without a word written there
    changing the exit code, whoever writes it (the option parser exits 1 on a broken
    pipe, where its own error exits 2)."""
    closed = sys.stdout is None
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
    if not isinstance(sys.stderr, _ReaderMayLeave):
        sys.stderr = _ReaderMayLeave(sys.stderr)
    if closed:
        say_on_stderr("opsctl: stdout is closed: the output goes nowhere")


class _ReaderMayLeave:
    """A text stream whose writes go nowhere once its reader has gone away."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            discard(self._stream)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            discard(self._stream)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def say_on_stderr(line: str) -> None:
    """Write ``line`` to stderr; a reader of stderr that went away (``2>&1 | head``)
    is no failure of the command: it and later lines go nowhere."""
    try:
        print(line, file=sys.stderr, flush=True)
    except BrokenPipeError:
        discard(sys.stderr)


def discard(stream: TextIO) -> None:
    """Send what ``stream`` still holds, and all it is given later, nowhere: its
    reader went away, and a failed write at exit would change the exit code."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def console(stderr: bool = False, live: bool = False) -> Console:
    """A Console on stdout (or stderr) that colours only when colour_wanted() says so.

    Without colour it writes no escape sequence at all (rich would still write bold and
    italic on a terminal, or in a pipe under FORCE_COLOR). A ``live`` console (the progress
    bar) keeps the cursor control a terminal needs to redraw it, but never colour.
    """
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    colour = colour_wanted(stream)
    return _Console(
        file=stream,
        width=shutil.get_terminal_size().columns if terminal else 200,
        no_color=not colour,
        force_terminal=colour or (live and terminal),
        highlight=False,
        soft_wrap=not terminal,
    )
