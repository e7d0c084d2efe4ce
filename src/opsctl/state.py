"""Reading RQ's state from Redis: raw, pipelined, and free of side effects.

Nothing here calls RQ's own registry helpers, which clean registries (and run
user callbacks) as a side effect of counting; nothing reads the pickled
``data``, ``meta`` or ``result`` fields. A dry run therefore changes nothing.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import redis

from opsctl.keys import EXECUTION_FIELDS, JOB_FIELDS, WORKER_FIELDS, Keys
from opsctl.model import StartedEntry, WorkerRecord

log = logging.getLogger(__name__)

#: Commands sent in one pipeline round trip.
BATCH = 1000
#: Registry members read with one ZRANGE.
RANGE_CHUNK = 10_000

# Field names sent as bytes: redis-py passes bytes through instead of encoding
# every name of every command again.
_JOB_FIELDS_RAW = tuple(f.encode() for f in JOB_FIELDS)
_EXECUTION_FIELDS_RAW = tuple(f.encode() for f in EXECUTION_FIELDS)


@dataclass
class Snapshot:
    """Everything one run needs, read at (nearly) one moment."""

    now: float
    queues: list[str]
    entries: list[StartedEntry]
    workers: dict[str, WorkerRecord]
    problems: list[str] = field(default_factory=list)


#: Waits before each further attempt of a read that failed on the connection.
READ_BACKOFF_S = (0.2, 0.5, 1.0)

T = TypeVar("T")


def with_retries(read: Callable[[], T]) -> T:
    """Run a read-only step, repeating it with backoff if the connection drops.

    Only reads go through here: repeating them is always safe. Changes are
    never repeated blindly; see :mod:`opsctl.apply`.
    """
    for wait_s in READ_BACKOFF_S:
        try:
            return read()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("read_failed retry_in=%ss error=%s", wait_s, exc)
            time.sleep(wait_s)
    return read()


#: A server up for less than this may have restored its registries from a
#: snapshot taken before the latest jobs started or ended.
RECENT_RESTART_S = 600


def server_notes(conn: redis.Redis) -> tuple[str | None, list[str]]:
    """The server's version, and warnings about settings that make RQ's data unreliable.

    Servers (or ACLs) that refuse INFO give no version and no warnings.
    """
    try:
        info = conn.info()
    except redis.ResponseError:
        return None, []
    version = info.get("redis_version")
    warnings = []
    policy = info.get("maxmemory_policy", "noeviction")
    if policy != "noeviction":
        warnings.append(
            f"maxmemory-policy is {policy}: Redis may evict job hashes, and evicted jobs "
            "show up as orphaned entries"
        )
    uptime = info.get("uptime_in_seconds")
    if isinstance(uptime, int) and uptime < RECENT_RESTART_S:
        warnings.append(
            f"Redis started {uptime}s ago: its registries may have been restored from an "
            "older snapshot"
        )
    return (str(version) if version else None), warnings


def replies_of(pipe: Any) -> list[Any]:
    """A pipeline's replies, errors included, except a refused permission.

    A wrong-type key is one bad record: its error stays in the replies for the
    caller to report. A refused command (ACL) means opsctl cannot see what it
    needs, and guessing (a worker "gone" because EXISTS was refused) could act
    behind a live worker's back, so it stops the run.
    """
    replies: list[Any] = pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, redis.exceptions.NoPermissionError):
            raise reply
    return replies


def text(value: bytes | str | None) -> str:
    """Decode a Redis value for display and comparison, never failing."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    # Bytes that are not UTF-8 become lone surrogates, which the connection
    # (encoding_errors="surrogateescape") turns back into the same bytes, so
    # keys and re-checks built from the text match what is stored. Reports
    # escape them for display.
    return value.decode("utf-8", "surrogateescape")


def server_time(conn: redis.Redis) -> float:
    """The Redis server's clock, in epoch seconds."""
    seconds, micros = conn.time()
    return float(seconds) + float(micros) / 1_000_000


def known_queues(conn: redis.Redis, keys: Keys) -> list[str]:
    """Queue names RQ knows: its queue set, every queue with a started registry,
    and every queue with registered workers."""
    names = set(_queue_names_from_set(conn, keys))
    # A queue may show only as a started registry, or only through the
    # workers that serve it.
    for prefix in (keys.started(""), keys.queue_workers("")):
        for key in conn.scan_iter(match=f"{_glob_escape(prefix)}*", count=1000):
            names.add(text(key).removeprefix(prefix))
    return sorted(n for n in names if n)


def read_snapshot(
    conn: redis.Redis,
    keys: Keys,
    queues: Iterable[str],
    on_progress: Callable[[int, int], None] | None = None,
) -> Snapshot:
    """Read the started registries of ``queues`` and every worker they involve."""
    now = server_time(conn)
    queues = list(queues)
    problems: list[str] = []
    entries: list[StartedEntry] = []
    total = _count_started(conn, keys, queues) if on_progress else 0

    def tick(batch: int) -> None:
        if on_progress:
            done = len(entries) + batch
            on_progress(done, max(total, done))

    for queue in queues:
        try:
            members = list(_registry_members(conn, keys.started(queue)))
        except redis.exceptions.NoPermissionError:
            raise
        except redis.ResponseError as exc:
            # One unreadable registry (the wrong type, say) never stops the run.
            problems.append(f"queue {queue}: {keys.started(queue)} cannot be read: {exc}")
            continue
        entries.extend(_read_entries(conn, keys, queue, members, problems, tick))
    workers = read_workers(conn, keys, _worker_names(conn, keys, queues, entries))
    return Snapshot(now=now, queues=queues, entries=entries, workers=workers, problems=problems)


def _count_started(conn: redis.Redis, keys: Keys, queues: list[str]) -> int:
    pipe = conn.pipeline(transaction=False)
    for queue in queues:
        pipe.zcard(keys.started(queue))
    return sum(n for n in replies_of(pipe) if isinstance(n, int))


def _registry_members(conn: redis.Redis, key: str) -> Iterator[tuple[bytes, float]]:
    start = 0
    while True:
        chunk = cast(
            "list[tuple[bytes, float]]",
            conn.zrange(key, start, start + RANGE_CHUNK - 1, withscores=True),
        )
        yield from chunk
        if len(chunk) < RANGE_CHUNK:
            return
        start += RANGE_CHUNK


def split_member(member: bytes) -> tuple[str, str | None]:
    """Job id and execution id of a started-registry member.

    RQ 1.x stores the bare job id; RQ 2 and later store ``job_id:execution_id``.
    Job ids cannot contain a colon in RQ 2+, so the last colon splits them.
    """
    decoded = text(member)
    job_id, sep, execution_id = decoded.rpartition(":")
    if not sep or not job_id or not execution_id:
        return decoded, None
    return job_id, execution_id


def _read_entries(
    conn: redis.Redis,
    keys: Keys,
    queue: str,
    members: list[tuple[bytes, float]],
    problems: list[str],
    tick: Callable[[int], None],
) -> list[StartedEntry]:
    entries: list[StartedEntry] = []
    for batch in _batches(members, BATCH // 2):
        pipe = conn.pipeline(transaction=False)
        for member, _score in batch:
            job_id, execution_id = split_member(member)
            pipe.hmget(keys.job(job_id), _JOB_FIELDS_RAW)
            if execution_id is None:
                pipe.echo(b"")  # keeps the replies two per member
            else:
                pipe.hmget(keys.execution(job_id, execution_id), _EXECUTION_FIELDS_RAW)
        replies = replies_of(pipe)
        for i, (member, score) in enumerate(batch):
            job_reply, execution_reply = replies[2 * i], replies[2 * i + 1]
            entry = _entry(queue, member, score, job_reply, execution_reply, problems)
            entries.append(entry)
        tick(len(entries))
    _resolve_rq1_ids_with_colons(conn, keys, entries, problems)
    _confirm_missing_jobs(conn, keys, entries)
    return entries


def _entry(
    queue: str,
    member: bytes,
    score: float,
    job_reply: Any,
    execution_reply: Any,
    problems: list[str],
) -> StartedEntry:
    job_id, execution_id = split_member(member)
    job = _as_fields(JOB_FIELDS, job_reply, f"job {job_id}", problems)
    execution = None
    if execution_id is not None:
        execution = _as_fields(
            EXECUTION_FIELDS, execution_reply, f"execution {job_id}:{execution_id}", problems
        )
    if not math.isfinite(score) and not math.isinf(score):
        problems.append(f"queue {queue}: entry {text(member)} has an unreadable score")
    return StartedEntry(queue, member, job_id, execution_id, score, job, execution)


def _as_fields(
    names: tuple[str, ...], reply: Any, what: str, problems: list[str]
) -> dict[str, str] | None:
    """A hash reply as a dict of present fields; None when no field is present."""
    if isinstance(reply, Exception):
        # The key exists but cannot be read as a hash: never mistake it for a
        # missing one.
        problems.append(f"{what}: could not be read ({reply})")
        return {}
    fields = {
        name: _shared(name, value)
        for name, value in zip(names, reply, strict=True)
        if value is not None
    }
    return fields or None


#: Fields whose values repeat across jobs (status, queue and worker names,
#: settings); one shared copy of each value keeps large runs small.
_REPEATING = frozenset(
    {
        "status",
        "origin",
        "worker_name",
        "timeout",
        "retries_left",
        "retry_intervals",
        "enqueue_at_front_on_retry",
        "failure_ttl",
    }
)


def _shared(name: str, value: bytes) -> str:
    decoded = text(value)
    return sys.intern(decoded) if name in _REPEATING else decoded


def _resolve_rq1_ids_with_colons(
    conn: redis.Redis, keys: Keys, entries: list[StartedEntry], problems: list[str]
) -> None:
    """Read a member whose split names no job as the bare job id RQ 1 stored.

    RQ 1 accepts any job id and stores it bare, so ``report:42`` may be a whole
    RQ 1 id as well as job ``report``, execution ``42`` of RQ 2+. The split is
    kept when its job hash exists; otherwise, when a job hash is named by the
    whole member, that is the job. Such members are rare: one EXISTS each.
    """
    candidates = [i for i, e in enumerate(entries) if e.job is None and e.execution_id is not None]
    for batch in _batches(candidates, BATCH):
        pipe = conn.pipeline(transaction=False)
        for i in batch:
            pipe.exists(keys.job(text(entries[i].member)))
        found = [i for i, exists in zip(batch, replies_of(pipe), strict=True) if exists == 1]
        if not found:
            continue
        pipe = conn.pipeline(transaction=False)
        for i in found:
            pipe.hmget(keys.job(text(entries[i].member)), _JOB_FIELDS_RAW)
        for i, reply in zip(found, replies_of(pipe), strict=True):
            e = entries[i]
            job_id = text(e.member)
            job = _as_fields(JOB_FIELDS, reply, f"job {job_id}", problems)
            entries[i] = StartedEntry(e.queue, e.member, job_id, None, e.score, job, None)


def _confirm_missing_jobs(conn: redis.Redis, keys: Keys, entries: list[StartedEntry]) -> None:
    """Tell a missing job hash from one that exists but holds none of the fields read.

    The second kind is kept as a job with no fields, so the engine can report
    it as a hash that holds no job rather than a missing one; such records are
    rare, so this costs one EXISTS each.
    """
    unknown = [i for i, e in enumerate(entries) if e.job is None]
    for batch in _batches(unknown, BATCH):
        pipe = conn.pipeline(transaction=False)
        for i in batch:
            pipe.exists(keys.job(entries[i].job_id))
        for i, exists in zip(batch, pipe.execute(), strict=True):
            if exists:
                e = entries[i]
                entries[i] = StartedEntry(
                    e.queue, e.member, e.job_id, e.execution_id, e.score, {}, e.execution
                )


def _worker_names(
    conn: redis.Redis, keys: Keys, queues: list[str], entries: list[StartedEntry]
) -> set[str]:
    pipe = conn.pipeline(transaction=False)
    pipe.smembers(keys.workers)
    for queue in queues:
        pipe.smembers(keys.queue_workers(queue))
    names = {
        keys.worker_name_from_key(text(m))
        for reply in replies_of(pipe)
        if not isinstance(reply, Exception)
        for m in reply
        if text(m).startswith(keys.worker(""))
    }
    names.update(e.worker_name for e in entries if e.worker_name)
    return names


def read_workers(conn: redis.Redis, keys: Keys, names: Iterable[str]) -> dict[str, WorkerRecord]:
    """Worker hashes, registrations and connection signals for ``names``."""
    names = sorted(set(names))
    registrations = _registrations(conn, keys)
    subscribers = _subscribers(conn, keys, names)
    connected = _connected_names(conn)
    workers: dict[str, WorkerRecord] = {}
    for batch in _batches(names, BATCH // 4):
        pipe = conn.pipeline(transaction=False)
        for name in batch:
            pipe.exists(keys.worker(name))
            pipe.hmget(keys.worker(name), WORKER_FIELDS)
            pipe.ttl(keys.worker(name))
            pipe.smembers(keys.worker_executions(name))
        replies = replies_of(pipe)
        for i, name in enumerate(batch):
            exists, fields, ttl, executions = (
                ([] if isinstance(r, Exception) else r) for r in replies[4 * i : 4 * i + 4]
            )
            fields = fields or [None] * len(WORKER_FIELDS)
            ttl = ttl if isinstance(ttl, int) else -1
            workers[name] = WorkerRecord(
                name=name,
                exists=bool(exists),
                fields={
                    k: text(v) for k, v in zip(WORKER_FIELDS, fields, strict=True) if v is not None
                },
                ttl_s=int(ttl) if exists else None,
                subscribers=subscribers.get(name) if subscribers is not None else None,
                connected=_is_connected(keys, name, connected),
                executions=frozenset(text(m) for m in executions),
                registered_in=frozenset(registrations.get(name, ())),
            )
    return workers


def _registrations(conn: redis.Redis, keys: Keys) -> dict[str, set[str]]:
    """Worker name → the registration sets (global and per queue) that list it."""
    sets = [keys.workers]
    sets += [keys.queue_workers(q) for q in _queue_names_from_set(conn, keys)]
    pipe = conn.pipeline(transaction=False)
    for key in sets:
        pipe.smembers(key)
    found: dict[str, set[str]] = {}
    for key, members in zip(sets, replies_of(pipe), strict=True):
        if isinstance(members, Exception):
            continue
        for member in members:
            # A member that is not a worker key is someone else's data: left alone.
            if text(member).startswith(keys.worker("")):
                found.setdefault(keys.worker_name_from_key(text(member)), set()).add(key)
    return found


def _queue_names_from_set(conn: redis.Redis, keys: Keys) -> list[str]:
    prefix = keys.queue_key_prefix
    try:
        members = conn.smembers(keys.queues)
    except redis.exceptions.NoPermissionError:
        raise
    except redis.ResponseError:
        return []
    return [text(m).removeprefix(prefix) for m in members]


def _subscribers(conn: redis.Redis, keys: Keys, names: list[str]) -> dict[str, int] | None:
    """Subscriber count of each worker's command channel; None if not permitted."""
    counts: dict[str, int] = {}
    try:
        for batch in _batches(names, 500):
            channels = [keys.worker_channel(n) for n in batch]
            for channel, count in conn.pubsub_numsub(*channels):
                counts[text(channel).removeprefix(keys.worker_channel(""))] = int(count)
    except redis.ResponseError as exc:
        log.warning("pubsub_numsub_unavailable error=%s", exc)
        return None
    return counts


def _connected_names(conn: redis.Redis) -> set[str] | None:
    """Names of the open client connections; None if not permitted."""
    try:
        clients = conn.client_list()
    except redis.ResponseError as exc:
        log.warning("client_list_unavailable error=%s", exc)
        return None
    return {text(c.get("name")) for c in clients if c.get("name")}


def _is_connected(keys: Keys, name: str, connected: set[str] | None) -> bool | None:
    if connected is None:
        return None
    # RQ 3 names its connection after the worker; older releases used the key.
    return name in connected or keys.worker(name) in connected


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _glob_escape(literal: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in literal)
