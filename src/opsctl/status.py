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
from opsctl.report import duration, safe
from opsctl.state import Snapshot, known_queues, read_snapshot, replies_of, text

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
    names = known_queues(conn, keys)
    snapshot = read_snapshot(conn, keys, names)
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
        for (column, _), count in zip(REGISTRIES, counts[1:-1], strict=True):
            setattr(status, column, _count(count))
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


def to_json(now: float, redis_url: str, statuses: list[QueueStatus]) -> dict[str, Any]:
    return {
        "now": format_timestamp(now),
        "redis": redis_url,
        "queues": [asdict(s) for s in statuses],
    }


def _shown(count: int | None) -> str:
    return "?" if count is None else str(count)


def print_text(statuses: list[QueueStatus], console: Console, prefix: str = DEFAULT_PREFIX) -> None:
    if not statuses:
        console.print(Text(f"no RQ queues found; {nothing_under(prefix, '--key-prefix')}"))
        return
    table = Table(title="queues", title_justify="left")
    columns = ["queue", "queued", *[c for c, _ in REGISTRIES], "oldest started", "workers"]
    for column in columns:
        table.add_column(column, justify="left" if column == "queue" else "right")
    for s in statuses:
        counts = [_shown(getattr(s, c)) for c, _ in REGISTRIES]
        workers = f"{s.workers_alive} alive, {s.workers_dead} dead"
        age = duration(s.oldest_started_age_seconds)
        table.add_row(Text(safe(s.name)), _shown(s.queued), *counts, age, workers)
    console.print(table)
