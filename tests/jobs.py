"""Job functions that the suite's real `rq worker` processes import.

Workers are started with `--path tests/`, so jobs are enqueued by the dotted name
`jobs.<function>` and the module must stay free of imports from the test suite.
"""

from __future__ import annotations

import time
from pathlib import Path


def sleep_for(seconds: float) -> str:
    """Sleep for `seconds`, then return a short text saying how long it slept.

    The long-running stand-in for a real job: tests kill, stop or wait for it.
    """
    time.sleep(seconds)
    return f"slept {seconds}s"


def quick() -> str:
    """Return at once; the job that a healthy worker finishes normally."""
    return "done"


def boom() -> None:
    """Raise RuntimeError, so the worker records the job as failed."""
    raise RuntimeError("boom: this job always fails")


def sleep_first_time(marker: str, seconds: float) -> str:
    """Sleep for `seconds` on the first run only (that run creates the file `marker`).

    A job that is killed mid-run and then run again by another worker ends quickly the
    second time.
    """
    path = Path(marker)
    if not path.exists():
        path.touch()
        time.sleep(seconds)
        return "slept"
    return "ran again"


def exit_at_once() -> None:
    """End the work horse's process at once, as a library calling ``os._exit(0)`` does.

    RQ's cleanup of the run never happens: the job stays started, and the worker,
    idle again, still lists the job among its executions.
    """
    import os

    os._exit(0)
