"""Plain records of what opsctl observed in Redis, shared by the reader and the engine."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, make_dataclass
from datetime import datetime, timezone
from typing import ClassVar, TypeVar, cast, overload

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
    #: Connections of the whole server (every database) listening on its command
    #: channel when read; ``subscribers`` counts those of this database only.
    heard_on_server: int | None = None
    connected: bool | None = None
    executions: frozenset[str] = frozenset()
    registered_in: frozenset[str] = frozenset()
    #: Set when a worker first found without a connection was read again this
    #: many seconds later (see opsctl.run): its verdict then rests on both looks.
    looked_again_after_s: float | None = None
    #: When the Redis server last started (server time), read only for RQ 1 workers:
    #: one born before then lost its subscription with the restart for good.
    server_started: float | None = None
    #: ``last_heartbeat`` in epoch seconds (None when missing or unreadable),
    #: read once: a large run asks for it for every entry naming the worker.
    heartbeat_at: float | None = field(init=False, default=None, compare=False, repr=False)
    #: What the engine has concluded from this record, kept so that it is
    #: concluded once, not once per entry (a record never changes once made;
    #: ``dataclasses.replace`` makes a new one, with nothing concluded yet).
    concluded: dict[str, object] = field(
        init=False, default_factory=dict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        beat = parse_timestamp(self.fields.get("last_heartbeat"))
        object.__setattr__(self, "heartbeat_at", beat)

    @property
    def current_job(self) -> str:
        return self.fields.get("current_job", "")

    @property
    def queues(self) -> tuple[str, ...]:
        raw = self.fields.get("queues", "")
        return tuple(q for q in raw.split(",") if q)


class Fields(Mapping[str, str]):
    """The fields read from one hash, one slot per field name; None means absent.

    A large run holds hundreds of thousands of these: slots cost a quarter of a
    dict holding the same fields. Make a class per kind of hash with
    :func:`fields_class`; absent fields behave as missing keys.
    """

    __slots__ = ()
    _field_names: ClassVar[tuple[str, ...]] = ()
    _field_set: ClassVar[frozenset[str]] = frozenset()

    @overload
    def get(self, key: str, /) -> str | None: ...
    @overload
    def get(self, key: str, default: str | _T, /) -> str | _T: ...

    def get(self, key: str, default: object = None, /) -> object:
        if key not in self._field_set:
            return default
        value = getattr(self, key)
        return default if value is None else value

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._field_names if getattr(self, name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:
        return any(getattr(self, name) is not None for name in self._field_names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"


def fields_class(name: str, field_names: tuple[str, ...]) -> Callable[..., Fields]:
    """A :class:`Fields` class whose constructor takes one value per name, in order."""
    made = make_dataclass(
        name,
        field_names,
        bases=(Fields,),
        slots=True,
        eq=False,
        repr=False,
        namespace={
            "_field_names": field_names,
            "_field_set": frozenset(field_names),
        },
    )
    return cast("Callable[..., Fields]", made)


# Not frozen: one is made per started entry, and a frozen dataclass's
# __init__ costs several times as much. Nothing changes one once made.
@dataclass(slots=True)
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
    job_id: str
    execution_id: str | None
    score: float
    job: Mapping[str, str] | None
    execution: Mapping[str, str] | None
    lost: bool = False
    stranded: bool = False
    #: The function the job calls, when it was read along with the job (see
    #: :func:`opsctl.state.read_snapshot`); None when not read yet.
    function: str | None = None
    #: For a lost queued job: when an earlier run first found it lost (server
    #: time), from opsctl's note; None when no run has noted it yet.
    first_lost: float | None = None

    @property
    def member_text(self) -> str:
        """The registry member as text: ``job_id`` (RQ 1.x) or ``job_id:execution_id``;
        empty for a lost job, which no registry holds."""
        if self.lost:
            return ""
        if self.execution_id is None:
            return self.job_id
        return f"{self.job_id}:{self.execution_id}"

    @property
    def member(self) -> bytes:
        """The registry member exactly as stored (built again rather than kept: it
        is the ids joined, and a large run holds a great many entries)."""
        return self.member_text.encode("utf-8", "surrogateescape")

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
    if len(text) == 27 and text[26] == "Z" and text[10] == "T":
        # The form RQ writes (UTC, microseconds, Z): read with the fewest steps.
        try:
            if _READS_Z:
                return datetime.fromisoformat(text).timestamp()
            return _naive_utc(text[:26])
        except ValueError:
            pass  # something else of the same length: the general rules decide
    text = text.strip()
    if "-" in text[1:] or "T" in text:
        return _parse_iso(text)
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


_EPOCH = datetime(1970, 1, 1)


#: Whether datetime.fromisoformat reads a trailing Z (Python 3.11 on).
_READS_Z = sys.version_info >= (3, 11)


def _naive_utc(text: str) -> float:
    """Epoch seconds of an ISO moment without a zone, taken as UTC; ValueError otherwise."""
    naive = datetime.fromisoformat(text)
    if naive.tzinfo is not None:
        raise ValueError(text)
    return (naive - _EPOCH).total_seconds()


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
    if text is None:
        return None
    known = _PARSED_INTS.get(text)
    if known is not None:
        return known
    if not _INTEGER.fullmatch(text):
        return None
    value = int(text)
    if len(_PARSED_INTS) < _PARSED_INTS_MAX:
        # Timeouts and TTLs repeat across jobs: one shared int each keeps large runs small.
        _PARSED_INTS[text] = value
    return value


_PARSED_INTS: dict[str, int] = {}
_PARSED_INTS_MAX = 10_000


def format_timestamp(epoch_s: float) -> str:
    """The form RQ writes timestamps in: ISO 8601, UTC, microseconds, ``Z``."""
    moment = datetime.fromtimestamp(epoch_s, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


#: Longest TTL or delay opsctl passes to Redis (a century); longer means forever.
MAX_TTL_S = 100 * 365 * 86400


def retry_interval(job: Mapping[str, str], retries_left: int | None) -> int | None:
    """Seconds until RQ would retry the job, or None when it has no retries left.

    RQ walks its list of intervals from the end as retries run out, and reuses
    the first one when there are more retries than intervals.
    """
    if not retries_left or retries_left <= 0:
        return None
    try:
        intervals = json.loads(job.get("retry_intervals") or "null")
    except ValueError:
        intervals = None
    if not isinstance(intervals, list) or not intervals:
        return 0
    value = intervals[max(len(intervals) - retries_left, 0)]
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return 0  # RQ could not schedule it either: retry at once
    return min(int(value), MAX_TTL_S)
