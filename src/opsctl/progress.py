"""A progress bar on stderr for long scans, shown only to a person at a terminal."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from opsctl.terminal import console

#: Seconds a scan runs before a bar appears; quick runs never show one.
SHOW_AFTER_S = 1.0

#: What a run is doing, as the bar names it.
WALKING = "walking the keyspace"
SCANNING = "scanning started jobs"
APPLYING = "acting on stuck jobs"

#: Called with how many were done, out of how many (None: not known
#: beforehand), and what is being done.
OnProgress = Callable[[int, int | None, str], None]


class ScanProgress:
    """Counts scanned entries; draws a bar once a scan has taken over a second.

    A run walks the keyspace (how many keys there are is not known, so the bar
    counts up) and then scans the started registries (counted against their
    total); an apply then acts on the stuck jobs. The bar names the stage.

    Never drawn when stderr is not a terminal or the report is JSON, so logs,
    pipes and programs never see it. The walk and the scan run on threads of
    their own and may both report at once.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._started = time.monotonic()
        self._bar: Progress | None = None
        self._task = TaskID(0)
        self._stage = ""
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int | None, what: str = SCANNING) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._draw(done, total, what)

    def _draw(self, done: int, total: int | None, what: str) -> None:
        if self._bar is None:
            if time.monotonic() - self._started < SHOW_AFTER_S:
                return
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console(stderr=True, live=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(what, total=total)
            self._stage = what
        elif what != self._stage:
            # A new stage gets a task of its own: one whose total is not known
            # never shows the last stage's total.
            self._bar.remove_task(self._task)
            self._task = self._bar.add_task(what, total=total)
            self._stage = what
        self._bar.update(self._task, completed=done, total=total, description=what)

    def __enter__(self) -> ScanProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
