"""The ``opsctl`` command, and ``python -m opsctl``."""

import sys


def run() -> None:
    """Load the CLI and run it. Loading takes a few tenths of a second, before
    opsctl handles signals itself: a Ctrl-C then ends it with exit code 130
    (128 + SIGINT) and no traceback."""
    try:
        from opsctl.cli import main
    except KeyboardInterrupt:
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
