"""The ``opsctl`` command, and ``python -m opsctl``."""

import signal
import sys
from types import FrameType


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    """Ctrl-C outside the steps that handle it themselves: exit 130 (128 + SIGINT),
    unwinding as an exit does (open locks are released), with no traceback."""
    raise SystemExit(128 + signum)


def run() -> None:
    """Load the CLI and run it. Loading takes a few tenths of a second, before
    opsctl handles signals itself: a Ctrl-C then ends it with exit code 130
    (128 + SIGINT) and no traceback. Later, `apply`, `watch` and `requeue --run`
    take the signal as a request to stop between changes; every other moment
    exits 130 at once, whichever release of the CLI library is installed."""
    try:
        from opsctl.cli import main
    except KeyboardInterrupt:
        sys.exit(130)
    signal.signal(signal.SIGINT, _interrupted)
    main()


if __name__ == "__main__":
    run()
