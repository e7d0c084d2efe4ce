"""``opsctl requeue --run``: put back on their queues the jobs one run failed or canceled.

The audit trail says which jobs a run failed or canceled and what their
``ended_at`` became. Each job is requeued by one atomic script that first
checks it is still exactly as the run left it: the job exists, has the same
queue, the status the run gave it, is still in that registry, and has the same
``ended_at`` (a job that ran again since, or was retried, has another). Any
difference and the job is skipped, with the reason, and left as it is.

The requeue writes what RQ's own ``FailedJobRegistry.requeue`` writes, but in
one step instead of several: out of the registry; ``status`` queued, a new
``enqueued_at``, ``started_at``, ``ended_at`` and the legacy ``exc_info``
cleared; pushed at the end of its queue; and an audit entry of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from rich.console import Console
from rich.table import Table
from rich.text import Text

from opsctl import audit
from opsctl.actions import CHECK_WRITES_LUA, KEEP_WHILE_QUEUED_LUA
from opsctl.audit import AUDIT_MAXLEN, AUDIT_STREAM, AuditContext
from opsctl.errors import UsageError
from opsctl.keys import DEFAULT_PREFIX, Keys
from opsctl.lock import run_lock
from opsctl.model import format_timestamp
from opsctl.report import safe
from opsctl.run import DONE, ERROR, PLANNED, SKIPPED, new_run_id
from opsctl.state import CONNECTION_LOST, replies_of, server_time, text, unanswered

log = logging.getLogger(__name__)

#: Actions a run can have taken that requeue undoes: the status the job was
#: left in, the registry it was filed in (key builder), and that registry's name.
UNDOABLE: dict[str, tuple[str, str, str]] = {
    "fail": ("failed", "failed", "FailedJobRegistry"),
    "cancel": ("canceled", "canceled", "CanceledJobRegistry"),
}

#: Jobs requeued per pipelined round trip (each is still its own atomic script).
BATCH = 200

_REQUEUE_SCRIPT = (
    KEEP_WHILE_QUEUED_LUA
    + """
local job_id, status_was, ended_was, origin = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now_iso, write, maxlen, registry = ARGV[5], ARGV[6] == '1', ARGV[7], ARGV[8]

if write and redis.acl_check_cmd then
  local writes = {
    {'ZREM', 2, 'm'}, {'HSET', 1, 'f', 'v'}, {'PERSIST', 1},
    {'EXPIRE', 1, '1'}, {'RPUSH', 3, 'v'}, {'SADD', 4, 'm'}, {'XADD', 5, '*', 'f', 'v'},
    {'PERSIST', 6},
  }
"""
    + CHECK_WRITES_LUA
    + """end

-- A key of another type would make a write fail halfway: check them all first.
local kinds = {'hash', 'zset', 'list', 'set', 'stream', 'set'}
for i, kind in ipairs(kinds) do
  local found = redis.call('TYPE', KEYS[i])
  if type(found) == 'table' then found = found['ok'] end
  if found ~= 'none' and found ~= kind then
    return redis.error_reply(KEYS[i] .. ' holds a ' .. found .. ', not a ' .. kind)
  end
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 'the job no longer exists (deleted, or expired)'}
end
local function field(name)
  local v = redis.call('HGET', KEYS[1], name)
  if v == false then return '' end
  return v
end
if field('origin') ~= origin then
  return {0, 'its queue is now ' .. field('origin')}
end
local status = field('status')
if status ~= status_was then
  if status == '' then status = 'missing' end
  return {0, 'status is now ' .. status}
end
if redis.call('ZSCORE', KEYS[2], job_id) == false then
  return {0, 'no longer in ' .. registry}
end
if field('ended_at') ~= ended_was then
  return {0, 'it ended again since (it ran again)'}
end
if not write then
  return {1, 'would be requeued'}
end

redis.call('ZREM', KEYS[2], job_id)
redis.call('HSET', KEYS[1], 'status', 'queued', 'enqueued_at', now_iso,
  'started_at', '', 'ended_at', '')
-- The legacy failure text, emptied as RQ does (which needs no HDEL right).
if redis.call('HEXISTS', KEYS[1], 'exc_info') == 1 then
  redis.call('HSET', KEYS[1], 'exc_info', '')
end
-- Its hash and the set of its dependents (which wait for its new run) carry
-- its failure_ttl.
keep_while_queued(field('ttl'), KEYS[1], {KEYS[6]})
redis.call('RPUSH', KEYS[3], job_id)
redis.call('SADD', KEYS[4], KEYS[3])

local entry = {}
for i = 9, #ARGV do table.insert(entry, ARGV[i]) end
for _, v in ipairs({'outcome', 'done', 'detail', 'requeued'}) do table.insert(entry, v) end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', maxlen, '*', unpack(entry))
return {1, 'requeued'}
"""
)


class UnknownRun(UsageError):
    """Raised when the audit trail holds no entry of the run to undo."""


#: Actions that change a job itself (a removed registry entry leaves the job as it is).
JOB_CHANGES = frozenset({"fail", "requeue", "cancel", "delete"})


@dataclass
class Undo:
    """One job the run failed or canceled, and what requeueing it came to."""

    job_id: str
    queue: str
    action: str  # what the run did: fail or cancel
    ended_at: str  # what the run left in the job's ended_at ("" if not recorded)
    outcome: str = PLANNED
    reason: str = ""


@dataclass
class Left:
    """The jobs a run changed that an undo of it leaves as they are, counted."""

    #: Jobs the run deleted: their hashes are gone, so they cannot be put back.
    deleted: int = 0
    #: Jobs a fail of the run retried: queued or scheduled already, nothing to undo.
    retried: int = 0
    #: Jobs a worker stopped at the run's request, with no action after (the policy
    #: said fail): RQ filed them as stopped, which `rq requeue` puts back.
    stopped: int = 0


@dataclass
class UndoRun:
    """One ``opsctl requeue --run``: its own run id, the run undone, every job."""

    run_id: str
    undo_of: str
    dry_run: bool
    jobs: list[Undo] = field(default_factory=list)
    #: Set when the connection to Redis was lost midway: the report shows what was done.
    redis_lost: bool = False
    #: Set when a stop signal came before every job was reached: those are skipped.
    cut_short: bool = False
    left: Left = field(default_factory=Left)
    #: The first change the Redis user was refused (an ACL): the undo exits as refused.
    refused: str | None = None

    @property
    def failed(self) -> bool:
        return any(j.outcome == ERROR for j in self.jobs)

    def summary(self) -> dict[str, int]:
        counts = {"requeued": 0, "planned": 0, "skipped": 0, "errors": 0}
        names = {DONE: "requeued", PLANNED: "planned", SKIPPED: "skipped", ERROR: "errors"}
        for job in self.jobs:
            counts[names[job.outcome]] += 1
        return counts

    def to_json(self, redis_url: str) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "undo_of": self.undo_of,
            "dry_run": self.dry_run,
            "redis": redis_url,
            "summary": self.summary(),
            "deleted_not_undoable": self.left.deleted,
            "retried_already": self.left.retried,
            "stopped_not_undone": self.left.stopped,
            "refused": self.refused,
            "jobs": [
                {
                    "id": j.job_id,
                    "queue": j.queue,
                    "undone_action": j.action,
                    "outcome": j.outcome,
                    "reason": j.reason,
                }
                for j in self.jobs
            ],
        }


@dataclass
class RunChanges:
    """What the audit trail says a run did that bears on undoing it."""

    jobs: list[Undo]  # the jobs it failed or canceled, in the order it did
    key_prefix: str | None  # RQ's key prefix it used (None: not recorded then)
    left: Left  # the jobs it changed that an undo leaves


def jobs_of_run(conn: redis.Redis, run_id: str) -> RunChanges:
    """What ``run_id`` did, from the audit trail (see :class:`RunChanges`)."""
    entries = audit.history(conn, run_id=run_id, limit=None)
    if not entries:
        raise UnknownRun(
            f"--run: no audit entries for run {run_id!r}: a dry run, or a run that changed "
            "nothing, writes none, or the id is mistyped (see `opsctl history` for run ids; "
            f"the trail keeps about {AUDIT_MAXLEN:,} entries)"
        )
    prefix = entries[-1].get("key_prefix") or None
    found: dict[str, Undo] = {}
    deleted: set[str] = set()
    retried: set[str] = set()
    stopped: set[str] = set()
    acted: set[str] = set()
    for entry in entries:
        if entry.get("outcome") != DONE:
            continue
        action, job_id = entry.get("action", ""), entry.get("job", "")
        if action == "stop":
            stopped.add(job_id)
        elif action in JOB_CHANGES:
            acted.add(job_id)
        if action == "delete":
            deleted.add(job_id)
        if action not in UNDOABLE:
            continue
        if entry.get("detail") != UNDOABLE[action][0]:
            # A fail that retried the job put it back on a queue already: nothing to undo.
            retried.add(job_id)
            continue
        found.pop(job_id, None)
        found[job_id] = Undo(job_id, entry.get("queue", ""), action, entry.get("ended_at", ""))
    left = Left(len(deleted), len(retried - set(found)), len(stopped - acted))
    return RunChanges(list(found.values()), prefix, left)


def requeue_run(
    conn: redis.Redis,
    key_prefix: str | None,
    run_id: str,
    dry_run: bool,
    lock_timeout_s: float,
    should_stop: Callable[[], bool] | None = None,
) -> UndoRun:
    """Requeue (or, dry, check) every job ``run_id`` failed or canceled, under
    ``key_prefix``, or else the prefix the run itself used. Once ``should_stop``
    says so, the jobs not reached yet are skipped (and the lock is not waited for)."""
    changes = jobs_of_run(conn, run_id)
    used = changes.key_prefix
    if key_prefix and used and key_prefix != used:
        # Under another prefix its jobs are not found, and would all be reported gone.
        raise UsageError(
            f"--key-prefix {key_prefix!r}: run {run_id} acted on jobs under the key prefix "
            f"{used!r}; leave --key-prefix out to undo it there"
        )
    keys = Keys(key_prefix or used or DEFAULT_PREFIX)
    undo = UndoRun(new_run_id(), run_id, dry_run, changes.jobs, left=changes.left)
    if dry_run:
        _requeue(conn, keys, undo, should_stop)
        return undo
    with run_lock(conn, undo.run_id, lock_timeout_s, should_stop):
        _requeue(conn, keys, undo, should_stop)
    return undo


def _requeue(
    conn: redis.Redis, keys: Keys, undo: UndoRun, should_stop: Callable[[], bool] | None
) -> None:
    script = conn.register_script(_REQUEUE_SCRIPT)
    context = AuditContext(undo.run_id, "", keys.prefix)
    for start in range(0, len(undo.jobs), BATCH):
        batch = undo.jobs[start : start + BATCH]
        if should_stop is not None and should_stop():
            for job in undo.jobs[start:]:
                job.outcome, job.reason = SKIPPED, "not acted on: opsctl was asked to stop"
            undo.cut_short = True
            return
        try:
            _requeue_batch(conn, keys, undo, context, script, batch)
        except CONNECTION_LOST as exc:
            # What was done is known for every batch before; this one's replies are lost.
            log.error("connection_lost error=%s", exc)
            unanswered(exc)
            undo.redis_lost = True
            for job in batch:
                if job.outcome == PLANNED:
                    job.outcome = ERROR
                    job.reason = "not known to be done: lost the connection to Redis; run again"
            for job in undo.jobs[start + BATCH :]:
                job.outcome, job.reason = ERROR, "not acted on: lost the connection to Redis"
            return


def _requeue_batch(
    conn: redis.Redis,
    keys: Keys,
    undo: UndoRun,
    context: AuditContext,
    script: Any,
    batch: list[Undo],
) -> None:
    """Requeue one batch of jobs, each with its own atomic script."""
    origins = _origins(conn, keys, batch)
    now_iso = format_timestamp(server_time(conn))
    pipe = conn.pipeline(transaction=False)
    sent = []
    for job, origin in zip(batch, origins, strict=True):
        if isinstance(origin, Exception):
            _record(undo, job, origin)
            continue
        if origin is None:
            job.outcome, job.reason = SKIPPED, "the job no longer exists (deleted, or expired)"
            continue
        if not origin:
            job.outcome = SKIPPED
            job.reason = "its hash names no origin queue to requeue it to"
            continue
        if not _can_check(job):
            continue
        # The run found it in the registry of another queue than its origin, whose
        # registries and queue the run used, and so does this requeue.
        job.queue = origin
        keys_, args = _call(keys, undo, context, job, origin, now_iso)
        script(keys=keys_, args=args, client=pipe)
        sent.append(job)
    for job, reply in zip(sent, pipe.execute(raise_on_error=False), strict=True):
        _record(undo, job, reply)


def _origins(conn: redis.Redis, keys: Keys, jobs: list[Undo]) -> list[str | Exception | None]:
    """Each job's queue; "" when its hash names none, None when its hash is gone,
    the error when it is not a hash."""
    pipe = conn.pipeline(transaction=False)
    for job in jobs:
        pipe.hget(keys.job(job.job_id), "origin")
        pipe.exists(keys.job(job.job_id))
    replies = replies_of(pipe)
    found: list[str | Exception | None] = []
    for job, reply, exists in zip(jobs, replies[::2], replies[1::2], strict=True):
        if isinstance(reply, redis.ResponseError) and "WRONGTYPE" in str(reply):
            key = keys.job(job.job_id)
            reply = redis.ResponseError(f"{key} holds a {text(conn.type(key))}, not a hash")
        elif reply is None and exists:
            reply = b""
        found.append(text(reply) if isinstance(reply, bytes) else reply)
    return found


def _can_check(job: Undo) -> bool:
    """Whether the script can tell if ``job`` changed; if not, skip it with the reason."""
    if not job.ended_at:
        job.outcome = SKIPPED
        job.reason = (
            "its audit entry predates opsctl recording ended_at, so a later run of the job "
            "cannot be ruled out; requeue it with RQ's own tools if it is safe"
        )
        return False
    return True


def _call(
    keys: Keys, undo: UndoRun, context: AuditContext, job: Undo, origin: str, now_iso: str
) -> tuple[list[str], list[str]]:
    status, registry, registry_name = UNDOABLE[job.action]
    reason = f"undo of run {undo.undo_of}, which did {job.action} it"
    fields = audit.entry_fields(
        context, format_timestamp(time.time()), job.job_id, job.queue, "undo", "requeue", reason
    )
    args = [job.job_id, status, job.ended_at, origin, now_iso]
    args += ["0" if undo.dry_run else "1", str(AUDIT_MAXLEN), registry_name]
    for name, value in (*fields, ("undo_of", undo.undo_of)):
        args += [name, value]
    registry_key = getattr(keys, registry)(origin)
    dependents = keys.dependents(job.job_id)
    return [
        keys.job(job.job_id),
        registry_key,
        keys.queue(origin),
        keys.queues,
        AUDIT_STREAM,
        dependents,
    ], args


def _record(undo: UndoRun, job: Undo, reply: Any) -> None:
    if isinstance(reply, Exception):
        # A dry run sends the same checks, so it can tell what the real run would meet.
        if isinstance(reply, redis.exceptions.NoPermissionError) and undo.refused is None:
            undo.refused = str(reply)
        job.outcome = ERROR
        job.reason = f"{'would fail: ' if undo.dry_run else ''}Redis error: {reply}"
    elif int(reply[0]) != 1:
        detail = text(reply[1])
        job.outcome, job.reason = SKIPPED, f"changed since run {undo.undo_of}: {detail}"
    elif undo.dry_run:
        job.outcome, job.reason = PLANNED, f"would go back on its queue ({job.action}ed by the run)"
    else:
        job.outcome, job.reason = DONE, "back on its queue"
    log.info(
        "job=%s queue=%s action=requeue undo_of=%s outcome=%s",
        job.job_id,
        job.queue,
        undo.undo_of,
        job.outcome,
    )


def print_text(undo: UndoRun, console: Console) -> None:
    """One row per job, then a summary line naming both runs."""
    mode = "dry run: nothing will be changed" if undo.dry_run else "requeueing"
    console.print(f"opsctl requeue {undo.run_id}: undo of run {undo.undo_of} ({mode})")
    if undo.jobs:
        table = Table(title_justify="left")
        for column in ("queue", "job", "undone", "outcome", "reason"):
            table.add_column(column, overflow="fold")
        for j in undo.jobs:
            cells = (j.queue, j.job_id, j.action, j.outcome, j.reason)
            table.add_row(*(Text(safe(c)) for c in cells))
        console.print(table)
    else:
        console.print("the run failed (for good) or canceled no job")
    left = undo.left
    if left.retried:
        console.print(
            f"{left.retried} job(s) the run failed were retried: they are queued or "
            "scheduled again already"
        )
    if left.stopped:
        console.print(
            f"{left.stopped} job(s) a worker stopped at the run's request were filed as "
            "stopped in FailedJobRegistry, which this undo leaves: `rq requeue` puts them back"
        )
    if left.deleted:
        console.print(
            f"{left.deleted} job(s) the run deleted cannot be put back: their hashes are gone"
        )
    counts = ", ".join(f"{n} {k}" for k, n in undo.summary().items())
    console.print(f"requeue {undo.run_id} (undo of {undo.undo_of}): {counts}")
