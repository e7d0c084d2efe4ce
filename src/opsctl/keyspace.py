"""Reads beyond the started registries: lost jobs, scheduler references, function names.

Lost jobs are found by walking the keyspace for job hashes, which is the only
way to find a job that no registry or list names. One walk (:func:`survey`)
serves the whole run: it also finds the started registries and worker sets
that name queues. A read-only script reads each job's status on the server and
answers only for started and queued jobs; the client drops the started ones it
has read from a registry. Where scripts are unknown or refused, each page is
read with pipelined ``HMGET`` instead. Like the rest of opsctl's reads, nothing here
reads ``data`` as an object: :func:`function_names` reads its bytes and walks
the pickle opcodes without unpickling (see :mod:`opsctl.records`).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from opsctl.engine import rq_first_seen
from opsctl.keys import JOB_FIELDS, LOST_NOTE_TTL_S, Keys, lost_note_key
from opsctl.model import StartedEntry
from opsctl.progress import WALKING, OnProgress
from opsctl.records import function_name
from opsctl.state import (
    HashReader,
    ListedIds,
    batches,
    call_script,
    glob_escape,
    known_queues,
    registry_members,
    replies_of,
    split_extra,
    text,
)

log = logging.getLogger(__name__)

#: Commands per pipeline round trip in the lost-job checks.
PIPELINE_BATCH = 500

#: Keys SCAN looks at per call of the survey: a few milliseconds of the
#: server's time each, so workers are never held up for long.
SURVEY_COUNT = 2000
#: Job ids of the walk after which it judges whether passing over the listed
#: ones pays (see :class:`_Skip`).
SKIP_JUDGED_AFTER = 500
#: Most queues the survey script is told to pass over. Every call receives the
#: names again; beyond this many (one queue per tenant, say) sending them costs
#: more than the candidates they spare, and opsctl drops those itself.
SKIPPED_MAX = 1000
#: Queue list entries read with one LRANGE.
LIST_CHUNK = 10_000

#: Fields of a lost candidate's hash that opsctl reads (never data or meta).
LOST_FIELDS: tuple[str, ...] = (*JOB_FIELDS, "enqueued_at")

# Shared by the two survey scripts below: records the id of the job hash
# ``key`` (the part after ``cut`` characters), then its status's first letter
# followed by its origin, when its status is started or queued and its origin
# is not one of ``skipped``. A key that is not a hash (a dependency set) is
# passed over; a refused permission stops the script.
_CANDIDATE_LUA = """
local function candidate(key, cut, skipped, jobs)
  local f = redis.pcall('HMGET', key, 'status', 'origin')
  if f.err then
    if string.sub(tostring(f.err), 1, 6) == 'NOPERM' then error(f) end
  elseif (f[1] == 'started' or f[1] == 'queued') and not skipped[f[2] or ''] then
    jobs[#jobs + 1] = string.sub(key, cut + 1)
    jobs[#jobs + 1] = string.sub(f[1], 1, 1) .. (f[2] or '')
  end
end
"""
# One page of the keyspace survey; reads only. ARGV: the SCAN cursor, its
# MATCH pattern, its COUNT, the job key prefix, "1" to read each job's status
# here or "0" to answer the ids of the page's jobs instead, the number of key
# prefixes that follow, those prefixes (keys starting with one are listed by
# name: started registries, worker sets), then queues whose jobs are of no
# interest. Answers: the next cursor; the keys listed by name; the page's
# candidates (as above) or job ids; and the number of keys the page held.
_SURVEY_SCRIPT_BODY = (
    _CANDIDATE_LUA
    + """
local page = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local job_prefix, read_here, prefixes = ARGV[4], ARGV[5] == '1', tonumber(ARGV[6])
local cut = #job_prefix
local skipped = {}
for i = 7 + prefixes, #ARGV do skipped[ARGV[i]] = true end
local listed, jobs = {}, {}
for _, key in ipairs(page[2]) do
  if string.sub(key, 1, cut) == job_prefix then
    if read_here then
      candidate(key, cut, skipped, jobs)
    else
      jobs[#jobs + 1] = string.sub(key, cut + 1)
    end
  else
    for i = 7, 6 + prefixes do
      if string.sub(key, 1, #ARGV[i]) == ARGV[i] then
        listed[#listed + 1] = key
        break
      end
    end
  end
end
return {page[1], listed, jobs, #page[2]}
"""
)
# The candidates among the job hashes in KEYS; reads only. ARGV: the job key
# prefix, then queues whose jobs are of no interest.
_CANDIDATES_SCRIPT_BODY = (
    _CANDIDATE_LUA
    + """
local skipped = {}
for i = 2, #ARGV do skipped[ARGV[i]] = true end
local jobs = {}
for _, key in ipairs(KEYS) do candidate(key, #ARGV[1], skipped, jobs) end
return jobs
"""
)
# Redis 7 runs the flagged forms through EVAL_RO (allowed to read-only users
# and on replicas); older servers and fakeredis get the plain bodies.
_SURVEY_SCRIPTS = (
    ("EVAL_RO", "#!lua flags=no-writes\n" + _SURVEY_SCRIPT_BODY),
    ("EVAL", _SURVEY_SCRIPT_BODY),
)
_CANDIDATES_SCRIPTS = {
    "EVAL_RO": "#!lua flags=no-writes\n" + _CANDIDATES_SCRIPT_BODY,
    "EVAL": _CANDIDATES_SCRIPT_BODY,
}

#: Registries a queued job may legitimately sit in instead of its queue list.
_QUEUED_PLACES = ("started", "deferred", "scheduled", "failed", "finished", "canceled")


@dataclass
class Survey:
    """One pass over the keyspace: the keys that name queues, and the jobs
    whose own hash says they are started or queued, wherever they are held."""

    listed: list[str] = field(default_factory=list)  # started registries, worker sets
    started: dict[str, list[str]] = field(default_factory=dict)  # origin → job ids
    queued: dict[str, list[str]] = field(default_factory=dict)  # origin → job ids
    scanned: int = 0
    filtered_server_side: bool = True
    refused: str | None = None  # job hashes could not be read: why


def survey(
    conn: redis.Redis,
    keys: Keys,
    skipped: Iterable[str] = (),
    on_progress: OnProgress | None = None,
    stop: threading.Event | None = None,
    ids: dict[str, str] | None = None,
    listed: ListedIds | None = None,
) -> Survey:
    """Walk the keyspace once, for the queue names and for lost-job candidates.

    A run needs both, and each costs a walk over every key, which at scale is
    dearer than everything else it reads. The walk is limited to job hashes,
    started registries and worker sets: their names start ``<prefix>:j`` or
    ``<prefix>:w``, while execution records and queue lists, as many as the
    jobs, do not. A read-only script reads the status of each job on the
    server and answers only for started and queued ones whose origin is not
    ``skipped`` (queues the run leaves alone: a backlog waiting there never
    crosses the wire); where scripts are unknown or refused, the same is read
    with SCAN and pipelined HMGET. A set ``stop`` ends the walk after the
    current page (its result is then incomplete). ``ids`` keeps one copy of
    each job id for the whole run (see :func:`opsctl.state.split_member`).

    A job that a started registry lists is no lost job, whatever its status.
    Once ``listed`` holds the ids of the registries the run reads, the script
    answers each page's job ids instead, and only the jobs no registry lists
    have their status read (most of them, after an outage, are listed). Where
    most are not (a keyspace of finished and failed jobs), it goes back to
    reading every status on the server, which then costs less.
    """
    result = Survey()
    pattern = f"{glob_escape(keys.prefix)}:[jw]*"
    prefixes = (keys.started(""), keys.queue_workers(""))
    skipped = sorted(set(skipped))
    if len(skipped) > SKIPPED_MAX:
        skipped = []
    skip = _Skip(listed)
    forms = list(_SURVEY_SCRIPTS)
    cursor: Any = 0
    while True:
        page = None
        if forms:
            read_here = not skip.ready()
            args = (pattern, SURVEY_COUNT, keys.job_prefix, "1" if read_here else "0")
            page = call_script(conn, forms, 0, cursor, *args, len(prefixes), *prefixes, *skipped)
            if page is None:
                log.info("survey_script_unavailable: reading plainly")
        if page is not None:
            cursor = page[0]
            result.listed += [text(k) for k in page[1]]
            result.scanned += int(page[3])
            if read_here:
                _add_candidates(result, page[2], ids)
            else:
                unread = skip.unlisted(page[2])
                _read_candidates(conn, forms[0][0], keys, unread, skipped, result, ids)
        else:
            result.filtered_server_side = False
            cursor = _survey_plainly(
                conn, keys, cursor, (pattern, prefixes, set(skipped)), result, ids, skip
            )
        if on_progress:
            on_progress(result.scanned, None, WALKING)
        if int(cursor) == 0 or (stop is not None and stop.is_set()):
            return result


class _Skip:
    """Which job ids the walk need not read: those the started registries list.

    Skipping pays while most of the walk's jobs are listed (each unlisted one
    then crosses the wire twice); once ``SKIP_JUDGED_AFTER`` ids show that
    most are not, the walk stops skipping.
    """

    def __init__(self, listed: ListedIds | None) -> None:
        self.listed = listed
        self.seen = self.unread = 0

    def ready(self) -> bool:
        """Whether to skip from now on: the registries are all listed, and it pays."""
        if self.listed is None or not self.listed.done.is_set():
            return False
        if self.seen >= SKIP_JUDGED_AFTER and 2 * self.unread > self.seen:
            self.listed = None
            return False
        return True

    def unlisted(self, job_ids: list[Any]) -> list[str]:
        """The ``job_ids`` no started registry lists."""
        assert self.listed is not None
        known = self.listed.ids
        unread = [j for j in map(text, job_ids) if j not in known]
        self.seen += len(job_ids)
        self.unread += len(unread)
        return unread


def _read_candidates(
    conn: redis.Redis,
    command: str,
    keys: Keys,
    job_ids: list[str],
    skipped: list[str],
    result: Survey,
    ids: dict[str, str] | None,
) -> None:
    """Add the candidates among ``job_ids``, their statuses read by script."""
    if not job_ids or result.refused is not None:
        return
    hash_keys = [keys.job(j).encode("utf-8", "surrogateescape") for j in job_ids]
    body = _CANDIDATES_SCRIPTS[command]
    send: Callable[..., Any] = conn.execute_command
    try:
        found = send(command, body, len(hash_keys), *hash_keys, keys.job_prefix, *skipped)
    except redis.exceptions.NoPermissionError as exc:
        result.refused = str(exc)
        return
    _add_candidates(result, found, ids)


def _add_candidates(result: Survey, found: list[Any], ids: dict[str, str] | None = None) -> None:
    """Record a survey page's answers: id, then status initial and origin."""
    for i in range(0, len(found), 2):
        job_id, tag = text(found[i]), text(found[i + 1])
        if ids is not None:
            job_id = ids.setdefault(job_id, job_id)
        if job_id:
            places = result.started if tag[:1] == "s" else result.queued
            places.setdefault(sys.intern(tag[1:]), []).append(job_id)


def _survey_plainly(
    conn: redis.Redis,
    keys: Keys,
    cursor: Any,
    walk: tuple[str, tuple[str, ...], set[str]],
    result: Survey,
    ids: dict[str, str] | None,
    skip: _Skip,
) -> Any:
    """One survey page from plain commands: SCAN, then HMGET of each job hash
    that ``skip`` does not pass over.

    ``walk`` is the SCAN pattern, the key prefixes listed by name and the
    queues whose jobs are of no interest.
    """
    pattern, prefixes, skipped = walk
    cursor, page = conn.scan(cursor, match=pattern, count=SURVEY_COUNT)
    names = [text(k) for k in page]
    result.scanned += len(names)
    result.listed += [n for n in names if n.startswith(prefixes)]
    jobs = [n for n in names if n.startswith(keys.job_prefix)]
    if skip.ready():
        cut = len(keys.job_prefix)
        jobs = [keys.job(j) for j in skip.unlisted([n[cut:] for n in jobs])]
    if not jobs or result.refused is not None:
        return cursor
    pipe = conn.pipeline(transaction=False)
    for name in jobs:
        pipe.hmget(name.encode("utf-8", "surrogateescape"), ["status", "origin"])
    try:
        replies = replies_of(pipe)
    except redis.exceptions.NoPermissionError as exc:
        result.refused = str(exc)
        return cursor
    found: list[str] = []
    for name, reply in zip(jobs, replies, strict=True):
        status, origin = (text(v) for v in reply) if isinstance(reply, list) else ("", "")
        if status in ("started", "queued") and origin not in skipped:
            found += [name.removeprefix(keys.job_prefix), status[0] + origin]
    _add_candidates(result, found, ids)
    return cursor


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
    found: Survey | None = None,
) -> LostScan:
    """Jobs of ``queues`` whose status is started or queued but that nothing holds.

    ``started`` are the entries already read from the started registries: a
    started job among them is not lost. A queued job is lost when its origin's
    queue list, intermediate list and registries all lack it. ``found`` is
    the run's keyspace survey; without one, the keyspace is surveyed here.
    """
    result = LostScan()
    started = list(started)
    try:
        found = found or survey(conn, keys)
        result.scanned, result.filtered_server_side = found.scanned, found.filtered_server_side
        if found.refused is not None:
            raise redis.exceptions.NoPermissionError(found.refused)
        _scan(conn, keys, set(queues), started, found, result)
    except redis.exceptions.NoPermissionError as exc:
        # Not looking is safe: a job not found is a job not acted on.
        result.entries = []
        result.problems.append(f"lost jobs were not looked for: the Redis user may not ({exc})")
    return result


def _scan(
    conn: redis.Redis,
    keys: Keys,
    wanted: set[str],
    started: list[StartedEntry],
    found: Survey,
    result: LostScan,
) -> None:
    in_registries = {e.job_id for e in started}
    covered = sorted(wanted)
    unread = [
        (job_id, origin)
        for origin in covered
        for job_id in found.started.get(origin, ())
        if job_id not in in_registries
    ]
    del in_registries
    elsewhere = _in_other_registries(conn, keys, [j for j, _ in unread], wanted, found)
    unheld = [(j, origin) for j, origin in unread if j not in elsewhere]
    since = _entered_since(conn, keys, unheld)
    lost = [j for j, _origin in unheld if j not in since]
    candidates = _queued_candidates(found, started)
    for origin in covered:
        if ids := candidates.get(origin):
            queued = _not_held(conn, keys, origin, ids)
            # A worker that has just taken a job enters it in the started
            # registry (as job:execution) before it marks the job started.
            taken = _entered_since(conn, keys, [(j, origin) for j in queued])
            lost += [j for j in queued if j not in taken]
    jobs = {
        job_id: job
        for job_id, job in _read_jobs(conn, keys, lost, result).items()
        if job.get("origin") in wanted
    }
    noted = lost_notes(conn, keys, jobs, result.problems)
    for job_id, job in jobs.items():
        result.entries.append(lost_entry(job["origin"], job_id, job, noted.get(job_id)))
    result.entries.sort(key=lambda e: (e.queue, e.job_id))


def _queued_candidates(found: Survey, started: list[StartedEntry]) -> dict[str, list[str]]:
    """Queued jobs to look for in their origin's places, by origin: the walk's,
    and those whose hash a registry entry has already been read with.

    The walk passes over jobs a started registry lists (see :func:`survey`),
    but a queued job listed only by another queue's registry (a leftover entry,
    say) may still be lost: its origin's lists and registries decide.
    """
    queued = {origin: list(ids) for origin, ids in found.queued.items()}
    seen = {job_id for ids in queued.values() for job_id in ids}
    for entry in started:
        job = entry.job
        if job is None or job.get("status") != "queued" or entry.job_id in seen:
            continue
        seen.add(entry.job_id)
        queued.setdefault(job.get("origin", ""), []).append(entry.job_id)
    return queued


def lost_entry(
    origin: str, job_id: str, job: dict[str, str], first_lost: float | None
) -> StartedEntry:
    """A job found by the keyspace scan that no registry or list holds."""
    return StartedEntry(
        origin, job_id, None, float("nan"), job, None, lost=True, first_lost=first_lost
    )


def lost_notes(
    conn: redis.Redis, keys: Keys, jobs: dict[str, dict[str, str]], problems: list[str]
) -> dict[str, float]:
    """When an earlier run first found each of the queued ``jobs`` out of place
    (server time), for those with a note that still fits (see
    :func:`opsctl.keys.lost_note_key`). A user who may not read the notes gets
    none, and a problem line: such jobs are then never acted on."""
    queued = [j for j, job in jobs.items() if job.get("status") == "queued"]
    found: dict[str, float] = {}
    try:
        for batch in batches(queued, PIPELINE_BATCH):
            pipe = conn.pipeline(transaction=False)
            for job_id in batch:
                pipe.get(lost_note_key(keys.prefix, job_id))
            for job_id, note in zip(batch, replies_of(pipe), strict=True):
                moment = _noted_moment(note, jobs[job_id])
                if moment is not None:
                    found[job_id] = moment
    except redis.exceptions.NoPermissionError as exc:
        problems.append(
            f"opsctl's notes of lost jobs (opsctl:lost:*) cannot be read ({exc}): "
            "lost queued jobs are not acted on"
        )
        return {}
    return found


def _noted_moment(note: Any, job: dict[str, str]) -> float | None:
    """The moment a note holds, if it is a note of this very job's enqueueing."""
    if not isinstance(note, bytes):
        return None  # none, or a key of another type: not noted
    enqueued_at, _, when = text(note).rpartition(" ")
    try:
        moment = float(when)
    except ValueError:
        return None
    fits = enqueued_at == job.get("enqueued_at", "") and math.isfinite(moment)
    return moment if fits else None


def note_lost(conn: redis.Redis, keys: Keys, entries: Iterable[StartedEntry], now: float) -> int:
    """Note the moment of finding each queued job out of place that has no note that
    fits; how many were noted. A note that no longer fits (the job was enqueued
    again since) is replaced. Runs that write hold the run lock, so none races this."""
    new = [e for e in entries if _needs_note(e)]
    for batch in batches(new, PIPELINE_BATCH):
        pipe = conn.pipeline(transaction=False)
        for entry in batch:
            enqueued_at = (entry.job or {}).get("enqueued_at", "")
            value = f"{enqueued_at} {now!r}"
            pipe.set(lost_note_key(keys.prefix, entry.job_id), value, ex=LOST_NOTE_TTL_S)
        replies_of(pipe)
    return len(new)


def _needs_note(entry: StartedEntry) -> bool:
    """Whether ``entry`` is a queued job out of place whose grace has no start yet:
    lost, or stranded without RQ's own first-seen mark, and not noted."""
    if entry.first_lost is not None or not _is_queued(entry):
        return False
    return entry.lost or (entry.stranded and rq_first_seen(entry.job or {}) is None)


def _is_queued(entry: StartedEntry) -> bool:
    return entry.job is not None and entry.job.get("status") == "queued"


def _in_other_registries(
    conn: redis.Redis, keys: Keys, ids: list[str], read: set[str], found: Survey
) -> set[str]:
    """The ``ids`` that the started registry of a queue other than ``read`` lists.

    The run read only its own queues' registries; a job may sit in another's
    (its origin names another queue, or the policy leaves that queue alone).
    Those registries are read whole, members only, and only when some started
    job is in none of the run's own. A member is matched by the job id it
    starts with, not by the job's list of executions, which RQ lets expire
    minutes after a worker dies.
    """
    if not ids:
        return set()
    wanted = set(ids)
    held: set[str] = set()
    for queue in known_queues(conn, keys, found.listed):
        if queue in read:
            continue
        try:
            members = registry_members(conn, keys.started(queue))
            for member, _score in members:
                whole = text(member)  # RQ 1: the bare id, which may hold colons
                for job_id in (whole, whole.rpartition(":")[0]):
                    if job_id in wanted:
                        held.add(job_id)
        except redis.exceptions.NoPermissionError:
            raise
        except redis.ResponseError:
            continue  # not a sorted set: holds no job
    return held


def _entered_since(conn: redis.Redis, keys: Keys, jobs: list[tuple[str, str]]) -> set[str]:
    """The ``jobs`` (id, origin) that their origin's started registry lists now.

    The keyspace is walked while the registries are read, so a job that
    started meanwhile is in its registry but not among the entries read.
    Its member is the bare id (RQ 1) or ``id:execution`` for an execution the
    job's list of executions names; that list lives on while the job runs.
    """
    held: set[str] = set()
    for batch in batches(jobs, PIPELINE_BATCH):
        pipe = conn.pipeline(transaction=False)
        for job_id, origin in batch:
            pipe.zscore(keys.started(origin), job_id)
            pipe.zrange(keys.executions(job_id), 0, -1)
        replies = replies_of(pipe)
        origin_of = dict(batch)
        members: list[tuple[str, str]] = []
        for i, (job_id, _origin) in enumerate(batch):
            score, executions = replies[2 * i], replies[2 * i + 1]
            if isinstance(score, float):
                held.add(job_id)
            elif isinstance(executions, list):
                members += [(job_id, f"{job_id}:{text(e)}") for e in executions]
        if not members:
            continue
        pipe = conn.pipeline(transaction=False)
        for job_id, member in members:
            pipe.zscore(keys.started(origin_of[job_id]), member)
        for (job_id, _member), score in zip(members, replies_of(pipe), strict=True):
            if isinstance(score, float):
                held.add(job_id)
    return held


def _read_jobs(
    conn: redis.Redis, keys: Keys, ids: list[str], result: LostScan
) -> dict[str, dict[str, str]]:
    jobs: dict[str, dict[str, str]] = {}
    for batch in batches(ids, PIPELINE_BATCH):
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
    for batch in batches(ids, PIPELINE_BATCH):
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
            if job.get("origin", queue) not in ("", queue):
                # Not taken from this queue: the list is also the queue named
                # "<queue>:intermediate", whose waiting jobs these are.
                continue
            if job and isinstance(first_seen, bytes):
                job["first_seen"] = text(first_seen)
            entries.append(
                StartedEntry(queue, job_id, None, float("nan"), job or None, None, stranded=True)
            )
    unmarked = {e.job_id: dict(e.job) for e in entries if e.job and rq_first_seen(e.job) is None}
    noted = lost_notes(conn, keys, unmarked, result.problems)
    return [replace(e, first_lost=noted.get(e.job_id)) if e.job_id in noted else e for e in entries]


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

    Both fields are read for many jobs at once with the read script, only
    their first bytes (see :class:`opsctl.state.HashReader`). ``data`` is
    scanned, never unpickled; see :mod:`opsctl.records`.
    """
    reader = HashReader(conn, (), (), with_function=True)
    names: list[str] = []
    try:
        for start in range(0, len(job_ids), 4000):
            batch = job_ids[start : start + 4000]
            hash_keys = [keys.job(j).encode("utf-8", "surrogateescape") for j in batch]
            for reply in reader.read(hash_keys, [False] * len(batch)):
                function = split_extra(reply, reader)[0] if isinstance(reply, list) else None
                names.append(function or function_name(None))
    finally:
        reader.close()
    return names
