"""``opsctl status``: counts per queue, read-only."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import redis
from rich.console import Console
from rich.table import Table
from rich.text import Text

from opsctl import engine
from opsctl.keys import DEFAULT_PREFIX, Keys, nothing_under
from opsctl.model import format_timestamp
from opsctl.report import column_widths, duration, fits_as_table, print_lines, safe
from opsctl.state import Snapshot, known_queues, note_problem, read_snapshot, replies_of, text

#: Registries counted, in column order: (column, key builder name).
REGISTRIES = (
    ("started", "started"),
    ("failed", "failed"),
    ("finished", "finished"),
    ("deferred", "deferred"),
    ("scheduled", "scheduled"),
    ("canceled", "canceled"),
)


@dataclass
class QueueStatus:
    """Counts of one queue's jobs by where they are, and its workers."""

    name: str
    queued: int | None = 0  # None: the key exists but is not of RQ's type
    started: int | None = 0
    failed: int | None = 0
    finished: int | None = 0
    deferred: int | None = 0
    scheduled: int | None = 0
    canceled: int | None = 0
    oldest_started_age_seconds: float | None = None
    workers_alive: int = 0
    workers_dead: int = 0


def collect(conn: redis.Redis, keys: Keys) -> tuple[float, list[QueueStatus]]:
    """Server time and the status of every queue RQ knows."""
    now, statuses, _ = collect_with_snapshot(conn, keys)
    return now, statuses


def collect_with_snapshot(
    conn: redis.Redis, keys: Keys
) -> tuple[float, list[QueueStatus], Snapshot]:
    """Like :func:`collect`, with the snapshot the counts came from (for metrics)."""
    unread: list[str] = []
    names = known_queues(conn, keys, problems=unread)
    snapshot = read_snapshot(conn, keys, names)
    for problem in snapshot.problems:
        note_problem(unread, problem)
    snapshot.problems = unread
    pipe = conn.pipeline(transaction=False)
    for name in names:
        pipe.llen(keys.queue(name))
        for _, builder in REGISTRIES:
            pipe.zcard(getattr(keys, builder)(name))
        pipe.smembers(keys.queue_workers(name))
    replies = replies_of(pipe)
    width = 2 + len(REGISTRIES)
    statuses = []
    for i, name in enumerate(names):
        counts = replies[i * width : (i + 1) * width]
        status = QueueStatus(name, queued=_count(counts[0]))
        _unreadable(snapshot, keys.queue(name), counts[0])
        for (column, builder), count in zip(REGISTRIES, counts[1:-1], strict=True):
            setattr(status, column, _count(count))
            if column != "started":  # the snapshot's reading of it says so already
                _unreadable(snapshot, getattr(keys, builder)(name), count)
        _unreadable(snapshot, keys.queue_workers(name), counts[-1])
        members = [] if isinstance(counts[-1], Exception) else counts[-1]
        for member in members:
            worker = snapshot.workers.get(keys.worker_name_from_key(text(member)))
            if engine.worker_liveness(worker).alive:
                status.workers_alive += 1
            else:
                status.workers_dead += 1
        statuses.append(status)
    _oldest_started(snapshot.entries, snapshot.now, statuses)
    return snapshot.now, statuses, snapshot


def _unreadable(snapshot: Snapshot, key: str, reply: Any) -> None:
    """Note ``key`` among the snapshot's problems when it could not be read."""
    if isinstance(reply, Exception):
        note_problem(snapshot.problems, f"{key} could not be read ({reply})")


def _count(reply: Any) -> int | None:
    """A count, or None when the key holds something else (shown as '?')."""
    return int(reply) if isinstance(reply, int) else None


def _oldest_started(entries: list[Any], now: float, statuses: list[QueueStatus]) -> None:
    by_name = {s.name: s for s in statuses}
    for entry in entries:
        started = engine.started_moment(entry.job or {}, entry.execution or {})
        if started is None:
            continue
        status = by_name[entry.queue]
        age = max(0.0, now - started)
        if status.oldest_started_age_seconds is None or age > status.oldest_started_age_seconds:
            status.oldest_started_age_seconds = age


def to_json(
    now: float, redis_url: str, statuses: list[QueueStatus], problems: list[str]
) -> dict[str, Any]:
    return {
        "now": format_timestamp(now),
        "redis": redis_url,
        "queues": [asdict(s) for s in statuses],
        "problems": problems,
    }


def _shown(count: int | None) -> str:
    return "?" if count is None else str(count)


def print_text(
    statuses: list[QueueStatus],
    console: Console,
    prefix: str = DEFAULT_PREFIX,
    problems: list[str] | None = None,
) -> None:
    """The counts as a table, or as aligned lines on a terminal too narrow for a
    table with every queue name whole; then the records that could not be read."""
    if not statuses:
        console.print(Text(f"no RQ queues found; {nothing_under(prefix, '--key-prefix')}"))
    else:
        _print_counts(statuses, console)
    for problem in problems or ():
        console.print(Text(f"problem: {safe(problem)}"))


def _print_counts(statuses: list[QueueStatus], console: Console) -> None:
    columns = ("queue", "queued", *[c for c, _ in REGISTRIES], "oldest started", "workers")
    rows = [
        (
            safe(s.name),
            _shown(s.queued),
            *[_shown(getattr(s, c)) for c, _ in REGISTRIES],
            duration(s.oldest_started_age_seconds),
            f"{s.workers_alive} alive, {s.workers_dead} dead",
        )
        for s in statuses
    ]
    widths = column_widths(columns, rows)
    if not fits_as_table(widths[:-1], console.width, last=widths[-1]):
        # Nothing is cut: aligned lines, which the terminal wraps.
        lines = ((row[:-1], row[-1]) for row in rows)
        print_lines(console, columns[:-1], widths[:-1], lines, last=columns[-1])
        return
    table = Table(title="queues", title_justify="left")
    for column in columns:
        table.add_column(column, justify="left" if column == "queue" else "right")
    for row in rows:
        table.add_row(Text(row[0]), *row[1:])
    console.print(table)
