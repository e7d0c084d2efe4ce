"""Reads beyond the started registries: lost jobs, scheduler references, function names.

Lost jobs are found by scanning the keyspace for job hashes, which is the only
way to find a job that no registry or list names. The scan stays cheap at scale:
``SCAN`` with ``MATCH`` and ``TYPE hash`` pages through the job hashes, and a
read-only Lua script (``EVAL_RO``) keeps only the jobs of covered queues whose
status is ``queued`` or ``started``, and the client drops the started ones it
has just read from a registry. Where ``EVAL_RO`` is unknown
(Redis before 7) or refused (an ACL without it), each page is read with
pipelined ``HMGET`` instead. Like the rest of opsctl's reads, nothing here
reads ``data`` as an object: :func:`function_names` reads its bytes and walks
the pickle opcodes without unpickling (see :mod:`opsctl.records`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from opsctl.keys import JOB_FIELDS, Keys
from opsctl.model import StartedEntry
from opsctl.records import function_name
from opsctl.state import HashReader, known_queues, replies_of, text

log = logging.getLogger(__name__)

#: Keys SCAN is asked to look at per page.
SCAN_COUNT = 1000
#: Queue list entries read with one LRANGE.
LIST_CHUNK = 10_000

#: Fields of a lost candidate's hash that opsctl reads (never data or meta).
LOST_FIELDS: tuple[str, ...] = (*JOB_FIELDS, "enqueued_at")

# KEYS: the job hashes of one SCAN page. ARGV: the queues the run covers.
# Returns key, status, origin of each job whose origin is covered and whose
# status is queued or started; the client drops the started ones it already
# read from a registry (a set lookup there is far cheaper than registry reads
# here). Read-only: runs under EVAL_RO.
_CANDIDATES_SCRIPT = """
local covered = {}
for i = 1, #ARGV do covered[ARGV[i]] = true end
local found = {}
for _, key in ipairs(KEYS) do
  local f = redis.pcall('HMGET', key, 'status', 'origin')
  if (type(f) ~= 'table' or f.err == nil) and f[2] and covered[f[2]]
      and (f[1] == 'queued' or f[1] == 'started') then
    found[#found + 1] = key
    found[#found + 1] = f[1]
    found[#found + 1] = f[2]
  end
end
return found
"""

#: Registries a queued job may legitimately sit in instead of its queue list.
_QUEUED_PLACES = ("started", "deferred", "scheduled", "failed", "finished", "canceled")


@dataclass
class LostScan:
    """What the keyspace scan found: lost jobs, and records it could not read."""

    entries: list[StartedEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    scanned: int = 0
    filtered_server_side: bool = True


def find_lost(
    conn: redis.Redis,
    keys: Keys,
    queues: Iterable[str],
    started: Iterable[StartedEntry],
) -> LostScan:
    """Jobs of ``queues`` whose status is started or queued but that nothing holds.

    ``started`` are the entries already read from the started registries: a
    started job among them is not lost. A queued job is lost when its origin's
    queue list, intermediate list and registries all lack it.
    """
    wanted = set(queues)
    result = LostScan()
    try:
        _scan(conn, keys, wanted, started, result)
    except redis.exceptions.NoPermissionError as exc:
        # Not looking is safe: a job not found is a job not acted on.
        result.entries = []
        result.problems.append(f"lost jobs were not looked for: the Redis user may not ({exc})")
    return result


def _scan(
    conn: redis.Redis,
    keys: Keys,
    wanted: set[str],
    started: Iterable[StartedEntry],
    result: LostScan,
) -> None:
    in_registries = {e.job_id for e in started}
    started_ids: list[str] = []
    queued: dict[str, list[str]] = {}
    for job_id, status, origin in _candidates(conn, keys, sorted(wanted), result):
        if status == "started" and job_id not in in_registries:
            started_ids.append(job_id)
        elif status == "queued":
            queued.setdefault(origin, []).append(job_id)
    lost = [j for j in started_ids if j not in _in_any_started(conn, keys, started_ids)]
    for origin, ids in sorted(queued.items()):
        lost += _not_held(conn, keys, origin, ids)
    for job_id, job in _read_jobs(conn, keys, lost, result).items():
        if job.get("origin") in wanted:
            result.entries.append(_lost_entry(job["origin"], job_id, job))
    result.entries.sort(key=lambda e: (e.queue, e.job_id))


def _lost_entry(origin: str, job_id: str, job: dict[str, str]) -> StartedEntry:
    return StartedEntry(origin, job_id, None, float("nan"), job, None, lost=True)


def _candidates(
    conn: redis.Redis, keys: Keys, queues: list[str], result: LostScan
) -> Iterator[tuple[str, str, str]]:
    """(job id, status, origin) of each job started or queued on ``queues``."""
    pattern = _glob_escape(keys.job_prefix) + "*"
    for page in _pages(conn, pattern):
        result.scanned += len(page)
        if result.filtered_server_side:
            try:
                found = conn.eval_ro(_CANDIDATES_SCRIPT, len(page), *page, *queues)
            except redis.ResponseError as exc:
                # Unknown before Redis 7, or refused by an ACL: read plainly instead.
                log.info("eval_ro_unavailable error=%s; reading job statuses plainly", exc)
                result.filtered_server_side = False
            else:
                for i in range(0, len(found), 3):
                    key, status, origin = found[i : i + 3]
                    if job_id := _job_id(keys, key):
                        yield job_id, text(status), text(origin)
                continue
        yield from _filter_plainly(conn, keys, page, set(queues))


def _pages(conn: redis.Redis, pattern: str) -> Iterator[list[bytes]]:
    cursor: Any = 0
    while True:
        cursor, page = conn.scan(cursor, match=pattern, count=SCAN_COUNT, _type="hash")
        # RQ's dependency sets share the prefix but are not hashes; TYPE drops them.
        if page:
            yield [k if isinstance(k, bytes) else k.encode() for k in page]
        if int(cursor) == 0:
            return


def _filter_plainly(
    conn: redis.Redis, keys: Keys, page: list[bytes], queues: set[str]
) -> Iterator[tuple[str, str, str]]:
    pipe = conn.pipeline(transaction=False)
    for key in page:
        pipe.hmget(key, ["status", "origin"])
    for key, reply in zip(page, replies_of(pipe), strict=True):
        if isinstance(reply, Exception) or not reply:
            continue
        status, origin = text(reply[0]), text(reply[1])
        if status in ("started", "queued") and origin in queues and (job_id := _job_id(keys, key)):
            yield job_id, status, origin


def _job_id(keys: Keys, key: bytes | str) -> str:
    name = text(key).removeprefix(keys.job_prefix)
    # ``<prefix>:job::<id>:dependencies`` and ``...:dependents`` are not jobs.
    if not name or name.startswith(":") or name.endswith((":dependents", ":dependencies")):
        return ""
    return name


def _in_any_started(conn: redis.Redis, keys: Keys, ids: list[str]) -> set[str]:
    """The ``ids`` that some started registry lists, whichever queue's it is.

    The run read only its own queues' registries; a job may sit in another's
    (its origin names another queue). Members are the bare id (RQ 1) or
    ``id:execution`` for an execution the job lists.
    """
    if not ids:
        return set()
    registries = [keys.started(q) for q in known_queues(conn, keys)]
    pipe = conn.pipeline(transaction=False)
    for job_id in ids:
        pipe.zrange(keys.executions(job_id), 0, -1)
    executions = replies_of(pipe)
    pipe = conn.pipeline(transaction=False)
    asked: list[str] = []
    for job_id, ids_of_job in zip(ids, executions, strict=True):
        members = [job_id]
        if not isinstance(ids_of_job, Exception):
            members += [f"{job_id}:{text(e)}" for e in ids_of_job]
        for registry in registries:
            for member in members:
                pipe.zscore(registry, member)
                asked.append(job_id)
    return {
        job_id
        for job_id, score in zip(asked, replies_of(pipe), strict=True)
        if score is not None and not isinstance(score, Exception)
    }


def _read_jobs(
    conn: redis.Redis, keys: Keys, ids: list[str], result: LostScan
) -> dict[str, dict[str, str]]:
    jobs: dict[str, dict[str, str]] = {}
    for start in range(0, len(ids), 500):
        batch = ids[start : start + 500]
        pipe = conn.pipeline(transaction=False)
        for job_id in batch:
            pipe.hmget(keys.job(job_id), LOST_FIELDS)
        for job_id, reply in zip(batch, replies_of(pipe), strict=True):
            if isinstance(reply, Exception):
                result.problems.append(f"job {job_id}: could not be read ({reply})")
                continue
            fields = {n: text(v) for n, v in zip(LOST_FIELDS, reply, strict=True) if v is not None}
            if fields.get("status") in ("started", "queued"):
                jobs[job_id] = fields
    return jobs


def _not_held(conn: redis.Redis, keys: Keys, origin: str, ids: list[str]) -> list[str]:
    """The queued ``ids`` of ``origin`` that its lists and registries all lack."""
    listed = _list_members(conn, keys.queue(origin)) | _list_members(
        conn, keys.intermediate(origin)
    )
    missing = [j for j in ids if j not in listed]
    if not missing:
        return []
    registries = [getattr(keys, place)(origin) for place in _QUEUED_PLACES]
    pipe = conn.pipeline(transaction=False)
    for job_id in missing:
        for registry in registries:
            pipe.zscore(registry, job_id)
    replies = replies_of(pipe)
    per_job = len(registries)
    held_elsewhere = {
        job_id
        for i, job_id in enumerate(missing)
        if any(r is not None and not isinstance(r, Exception) for r in _slice(replies, i, per_job))
    }
    return [j for j in missing if j not in held_elsewhere]


def _slice(replies: list[Any], index: int, width: int) -> list[Any]:
    return replies[index * width : (index + 1) * width]


def _list_members(conn: redis.Redis, key: str) -> set[str]:
    """Every entry of a list, read in chunks; empty when it is missing or no list."""
    members: set[str] = set()
    start = 0
    while True:
        try:
            chunk = conn.lrange(key, start, start + LIST_CHUNK - 1)
        except redis.exceptions.NoPermissionError:
            raise
        except redis.ResponseError:
            return members
        members.update(text(m) for m in chunk)
        if len(chunk) < LIST_CHUNK:
            return members
        start += LIST_CHUNK


def find_stranded(
    conn: redis.Redis, keys: Keys, queues: Iterable[str], started: Iterable[StartedEntry]
) -> LostScan:
    """Ids left in the intermediate lists of ``queues`` and in no started registry.

    The job's fields come with ``first_seen``: when RQ's own cleanup first saw
    the id stranded (its marker key), which is how long it has been there.
    """
    result = LostScan()
    in_registries = {e.job_id for e in started}
    try:
        for queue in sorted(set(queues)):
            ids = sorted(_list_members(conn, keys.intermediate(queue)) - in_registries)
            result.entries += _stranded_entries(conn, keys, queue, ids, result)
    except redis.exceptions.NoPermissionError as exc:
        result.entries = []
        result.problems.append(f"intermediate lists were not read: the Redis user may not ({exc})")
    return result


def _stranded_entries(
    conn: redis.Redis, keys: Keys, queue: str, ids: list[str], result: LostScan
) -> list[StartedEntry]:
    entries = []
    for start in range(0, len(ids), 500):
        batch = ids[start : start + 500]
        pipe = conn.pipeline(transaction=False)
        for job_id in batch:
            pipe.hmget(keys.job(job_id), LOST_FIELDS)
            pipe.get(keys.intermediate_first_seen(queue, job_id))
        replies = replies_of(pipe)
        for i, job_id in enumerate(batch):
            reply, first_seen = replies[2 * i], replies[2 * i + 1]
            if isinstance(reply, Exception):
                result.problems.append(f"job {job_id}: could not be read ({reply})")
                continue
            job = {n: text(v) for n, v in zip(LOST_FIELDS, reply, strict=True) if v is not None}
            if job and isinstance(first_seen, bytes):
                job["first_seen"] = text(first_seen)
            entries.append(
                StartedEntry(queue, job_id, None, float("nan"), job or None, None, stranded=True)
            )
    return entries


def scheduler_references(conn: redis.Redis, keys: Keys, jobs: list[tuple[str, str]]) -> list[str]:
    """For each (job id, origin): what schedules it again, in words; '' when nothing.

    RQ's ScheduledJobRegistry of the origin, and the separate rq-scheduler
    package's sorted set, both name jobs a scheduler will enqueue later.
    """
    if not jobs:
        return []
    pipe = conn.pipeline(transaction=False)
    for job_id, origin in jobs:
        pipe.zscore(keys.scheduled(origin), job_id)
        pipe.zscore(keys.scheduler_jobs, job_id)
    replies = replies_of(pipe)
    found = []
    for i, (_job_id, origin) in enumerate(jobs):
        registry, scheduler = replies[2 * i], replies[2 * i + 1]
        if registry is not None and not isinstance(registry, Exception):
            found.append(f"it is in {keys.scheduled(origin)}")
        elif scheduler is not None and not isinstance(scheduler, Exception):
            found.append(f"rq-scheduler lists it in {keys.scheduler_jobs}")
        else:
            found.append("")
    return found


def function_names(conn: redis.Redis, keys: Keys, job_ids: list[str]) -> list[str]:
    """The function each job calls, from its ``data`` bytes or else its ``description``.

    Both fields are read for many jobs at once with the read script (see
    :class:`opsctl.state.HashReader`). ``data`` is scanned, never unpickled;
    see :mod:`opsctl.records`.
    """
    reader = HashReader(conn, ("description", "data"), ())
    names: list[str] = []
    try:
        for start in range(0, len(job_ids), 4000):
            batch = job_ids[start : start + 4000]
            hash_keys = [keys.job(j).encode("utf-8", "surrogateescape") for j in batch]
            for reply in reader.read(hash_keys, [False] * len(batch)):
                description, data = reply if isinstance(reply, list) else (None, None)
                # Many jobs call the same function: keep one copy of each name.
                names.append(sys.intern(function_name(_as_bytes(data), text(description) or None)))
    finally:
        reader.close()
    return names


def _as_bytes(value: bytes | str | None) -> bytes | None:
    """A field value as the bytes stored (the reader may have decoded it to text)."""
    if value is None or isinstance(value, bytes):
        return value
    return value.encode("utf-8", "surrogateescape")


def _glob_escape(literal: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in literal)
