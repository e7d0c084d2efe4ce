"""Plain records of what opsctl observed in Redis, shared by the reader and the engine."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TypeVar, overload

_T = TypeVar("_T")


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


class Fields(Mapping[str, str]):
    """The fields read from one hash, stored compactly: a tuple of values in a fixed name order.

    A large run holds hundreds of thousands of these; a tuple costs a third of
    a dict with the same fields. Absent fields are stored as None and behave
    as missing keys.
    """

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict[str, int], values: tuple[str | None, ...]) -> None:
        self._index = index
        self._values = values

    @staticmethod
    def index_of(names: tuple[str, ...]) -> dict[str, int]:
        """The name → position table shared by every record read with ``names``."""
        return {name: i for i, name in enumerate(names)}

    @overload
    def get(self, key: str, /) -> str | None: ...
    @overload
    def get(self, key: str, default: str | _T, /) -> str | _T: ...

    def get(self, key: str, default: object = None, /) -> object:
        i = self._index.get(key)
        if i is None:
            return default
        value = self._values[i]
        return default if value is None else value

    def __getitem__(self, key: str) -> str:
        value = self._values[self._index[key]]
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        values = self._values
        return (name for name, i in self._index.items() if values[i] is not None)

    def __len__(self) -> int:
        return len(self._values) - self._values.count(None)

    def __bool__(self) -> bool:
        return self._values.count(None) != len(self._values)

    def __repr__(self) -> str:
        return f"Fields({dict(self)!r})"


# Not frozen: one is made per started entry, and a frozen dataclass's
# __init__ costs several times as much. Nothing changes one once made.
@dataclass(slots=True)
class StartedEntry:
    """One member of a queue's started registry, with the job and execution it names.

    ``job`` is None when the job hash does not exist; ``execution`` is None when
    the member names no execution (RQ 1.x) or its hash is gone.
    """

    queue: str
    member: bytes
    job_id: str
    execution_id: str | None
    score: float
    job: Mapping[str, str] | None
    execution: Mapping[str, str] | None

    @property
    def worker_name(self) -> str:
        """The worker that owns this execution, from the freshest record that names one."""
        if self.execution is not None:
            name = self.execution.get("worker_name")
            if name:
                return name
        return self.job.get("worker_name", "") if self.job is not None else ""


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
