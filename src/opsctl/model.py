"""Plain records of what opsctl observed in Redis, shared by the reader and the engine."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """One RQ worker as seen in Redis at snapshot time.

    ``subscribers`` and ``connected`` are None when the server would not say
    (an ACL that forbids PUBSUB or CLIENT LIST, or a server without them).
    """

    name: str
    exists: bool
    fields: dict[str, str] = field(default_factory=dict)
    ttl_s: int | None = None
    subscribers: int | None = None
    connected: bool | None = None
    executions: frozenset[str] = frozenset()
    registered_in: frozenset[str] = frozenset()

    @property
    def current_job(self) -> str:
        return self.fields.get("current_job", "")

    @property
    def queues(self) -> tuple[str, ...]:
        raw = self.fields.get("queues", "")
        return tuple(q for q in raw.split(",") if q)


@dataclass(frozen=True, slots=True)
class StartedEntry:
    """One member of a queue's started registry, with the job and execution it names.

    ``job`` is None when the job hash does not exist; ``execution`` is None when
    the member names no execution (RQ 1.x) or its hash is gone.

    ``lost`` marks a job found by the keyspace scan rather than in a registry:
    its status says started or queued, but no registry or list holds it.
    ``member`` is then empty and ``queue`` is the job's origin.

    ``stranded`` marks an id left in a queue's intermediate list (taken by a
    worker that died before starting it); ``member`` is then the bare id.
    """

    queue: str
    member: bytes
    job_id: str
    execution_id: str | None
    score: float
    job: dict[str, str] | None
    execution: dict[str, str] | None
    lost: bool = False
    stranded: bool = False

    @property
    def worker_name(self) -> str:
        """The worker that owns this execution, from the freshest record that names one."""
        if self.execution and self.execution.get("worker_name"):
            return self.execution["worker_name"]
        if self.job:
            return self.job.get("worker_name", "")
        return ""


def parse_timestamp(text: str | None) -> float | None:
    """Epoch seconds from any timestamp form RQ has written, or None if unknown.

    Accepts ISO 8601 with or without fractions, with ``Z`` or a numeric offset
    (naive values are UTC, as RQ writes them), and float epoch seconds.
    """
    if not text:
        return None
    text = text.strip()
    if "-" in text[1:] or "T" in text:
        return _parse_iso(text)
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _parse_iso(text: str) -> float | None:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


_INTEGER = re.compile(r"-?[0-9]{1,18}")


def parse_int(text: str | None) -> int | None:
    """An integer field of a job hash, or None when absent or unparsable."""
    if text is None or not _INTEGER.fullmatch(text):
        return None
    return int(text)


def format_timestamp(epoch_s: float) -> str:
    """The form RQ writes timestamps in: ISO 8601, UTC, microseconds, ``Z``."""
    moment = datetime.fromtimestamp(epoch_s, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
