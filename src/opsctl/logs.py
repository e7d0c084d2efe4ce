"""Log lines on stderr, as text for people or one JSON object per line for log shippers.

Every line passes through the same redaction as error messages, so a password that reached
a log call (inside an exception's text, say) is printed as ``***``.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from opsctl.connection import redact
from opsctl.shown import bytes_shown, printable
from opsctl.terminal import discard

#: The logger every opsctl module's logger sits under; the CLI configures only this one.
ROOT = "opsctl"

#: Structured fields a log call may pass with ``extra=``; JSON lines carry them as keys.
FIELDS = ("run_id", "queue", "job_id", "state", "action", "outcome", "worker")

#: The run being carried out, added to every line logged while it is set.
current_run_id: ContextVar[str | None] = ContextVar("opsctl_run_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class LogFormat(str, Enum):
    text = "text"
    json = "json"


class _Redacting(logging.Formatter):
    """A formatter whose output never holds the credentials of ``url``, nor, in its
    message, control characters (job and worker names come from Redis)."""

    def __init__(self, url: str | None, fmt: str | None = None) -> None:
        super().__init__(fmt)
        self.url = url

    def format(self, record: logging.LogRecord) -> str:
        shown = copy.copy(record)
        shown.msg, shown.args = printable(record.getMessage()), None
        return redact(super().format(shown), self.url)


class JsonFormatter(_Redacting):
    """One JSON object per record: time, level, logger, message, and the fields in FIELDS."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(bytes_shown(record.getMessage()), self.url),
        }
        run_id = getattr(record, "run_id", None) or current_run_id.get()
        if run_id:
            line["run_id"] = run_id
        for name in FIELDS[1:]:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = redact(bytes_shown(str(value)), self.url)
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info), self.url)
        return json.dumps(line, ensure_ascii=False)


def json_lines() -> bool:
    """Whether opsctl's log lines are JSON (setup() was last called with LogFormat.json)."""
    handlers = logging.getLogger(ROOT).handlers
    return any(isinstance(h.formatter, JsonFormatter) for h in handlers)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines on stderr; a reader of stderr that went away (``2>&1 | head``) is no
    failure of the command, and the lines after go nowhere."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            discard(self.stream)
            return
        super().handleError(record)


def setup(
    verbose: int = 0,
    quiet: bool = False,
    log_format: LogFormat = LogFormat.text,
    url: str | None = None,
) -> None:
    """Send opsctl's log lines to stderr at the level -v/-q ask for, in ``log_format``.

    Warnings and errors show by default; -v adds info (what was done), -vv debug, and -q
    keeps errors only. Called again (a later URL is known), it replaces its handler.
    """
    level = logging.WARNING
    if quiet:
        level = logging.ERROR
    elif verbose == 1:
        level = logging.INFO
    elif verbose > 1:
        level = logging.DEBUG

    handler = _StderrHandler(sys.stderr)
    formatter = JsonFormatter(url) if log_format is LogFormat.json else None
    handler.setFormatter(formatter or _Redacting(url, TEXT_FORMAT))
    logger = logging.getLogger(ROOT)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
