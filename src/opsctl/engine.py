"""Pure decisions: which state a started entry is in and what the policy does about it.

Nothing here touches Redis or the clock; every input is a record from
:mod:`opsctl.model` and the server time read with the snapshot.

A worker is *live* when all of these hold:

1. its hash ``<prefix>:worker:<name>`` exists (RQ lets it expire when the worker
   stops heartbeating: up to 8 minutes after a hard kill), or the worker still
   holds its connection (3. below): a stopped or starved worker's hash expires
   while its work horse may still run a job;
2. the hash carries no ``death`` field (RQ writes one on a clean shutdown);
3. the worker still holds its connection to Redis: at least one subscriber on
   its command channel ``<prefix>:pubsub:<name>``, or a client connection
   named after it. A SIGKILLed worker loses both at once, so it is seen dead
   within seconds, long before its hash expires. When the server will not say
   (an ACL without PUBSUB and CLIENT LIST), the hash alone decides, which is
   slower but never calls a live worker dead.

A live worker is *executing* a job when its records say so: RQ 3 lists
``job:execution`` members in ``<prefix>:worker:<name>:executions``; RQ 1 and 2
name the job in the hash's ``current_job`` field. A busy worker that has not
yet written either (the few milliseconds between taking a job and starting it)
counts as executing whatever names it, so a job is never taken from a worker
that is about to run it; so does a live worker whose hash has expired.

A job a live worker is executing is never acted on through another of its
entries: an entry left by an earlier execution (its worker died, and the job
was enqueued and taken again, often under the same id by a scheduler) is only
removed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import cast

from opsctl.model import StartedEntry, WorkerRecord, parse_int, parse_timestamp
from opsctl.policy import Rule
from opsctl.shown import quoted


class State(str, Enum):
    """What a started-registry entry turned out to be."""

    ORPHANED = "orphaned"  # the job hash is gone
    LEFTOVER = "leftover"  # the job ended or was queued again; only the entry remains
    ABANDONED = "abandoned"  # no live worker is executing it
    OVERDUE = "overdue"  # a live worker is executing it for longer than max_age
    RUNNING = "running"  # a live worker is executing it within max_age
    LOST = "lost"  # status started or queued, yet in no registry, queue or list
    STRANDED = "stranded"  # left in an intermediate list by a worker that never started it


#: Actions a report can name; the first four are the policy's own.
ACTION_STOP = "stop"
ACTION_REMOVE_ENTRY = "remove-entry"
ACTION_NONE = "none"


# Records below are not frozen: one of each is made per started entry, and
# a frozen dataclass's __init__ costs several times as much. Nothing changes
# one once made.
@dataclass(slots=True)
class Liveness:
    """Whether a worker is live, and the evidence in words."""

    alive: bool
    evidence: str


@dataclass(slots=True)
class Signals:
    """The measurements behind a verdict, shown on every report line."""

    age_s: float | None
    heartbeat_age_s: float | None
    worker: str
    worker_alive: bool | None
    worker_evidence: str
    timeout_s: int | None
    status: str | None
    #: The named worker's ``birth`` as read ('' when its hash held none, or was
    #: gone); a change goes ahead only if it is still that, since a worker
    #: started again under the same name may have taken the job. None: not read.
    worker_birth: str | None = None


@dataclass(slots=True)
class Verdict:
    """The state of one entry and what the policy does about it.

    For an overdue job ``action`` is ``stop`` and ``follow_up`` is the policy's
    action, applied once the worker has stopped the job (``fail`` needs no
    follow-up: RQ itself files a stopped job as failed).
    """

    state: State
    action: str
    reason: str
    signals: Signals
    follow_up: str | None = None


def worker_liveness(worker: WorkerRecord | None) -> Liveness:
    """Decide whether ``worker`` is live; see the module docstring for the rule."""
    if worker is None:
        return Liveness(False, "worker hash is gone")
    found = worker.concluded.get("liveness")
    if found is None:
        found = worker.concluded["liveness"] = _liveness(worker)
    return cast(Liveness, found)


def _liveness(worker: WorkerRecord) -> Liveness:
    if not worker.exists:
        if worker.subscribers or worker.connected:
            # Stopped (SIGSTOP, a debugger) or starved long enough for its
            # hash to expire, yet still connected: its work horse may be
            # running the job.
            return Liveness(True, "worker hash expired, but the worker still holds its connection")
        return Liveness(False, "worker hash is gone")
    death = worker.fields.get("death")
    # A death that is no moment is none RQ (or opsctl) wrote: the connections decide.
    if death and parse_timestamp(death) is not None and not _heartbeat_since_death(worker):
        if _death_noted_by_opsctl(worker):
            # Written by the run that removed its registrations, not by the worker.
            found = f"an opsctl run found it dead at {death} (no connection to Redis)"
            return Liveness(False, f"{found}, and it has not heartbeated since")
        return Liveness(False, f"worker recorded its death at {death}")
    # A death followed by a heartbeat was written while the worker was cut off
    # from Redis (by a run that took it for dead), after which it came back and
    # went on: it no longer counts, and the connections decide, as for any other.
    if not worker.subscribers and not worker.connected and _rq1_since_restart(worker):
        return Liveness(True, RQ1_SINCE_RESTART)
    if worker.subscribers is None and worker.connected is None:
        return Liveness(True, "worker hash exists (its connections cannot be checked here)")
    if worker.subscribers:
        return Liveness(True, "worker is subscribed to its command channel")
    if worker.connected:
        return Liveness(True, "worker holds a named connection")
    if worker.looked_again_after_s is not None:
        again = f"still none {worker.looked_again_after_s:g}s later"
        return Liveness(False, f"{NO_CONNECTION} ({again})")
    return Liveness(False, NO_CONNECTION)


#: Evidence of an RQ 1 worker born before Redis last started.
RQ1_SINCE_RESTART = (
    "RQ 1 worker born before Redis last started (RQ 1 never subscribes again after a "
    "restart, so its missing connections prove nothing; it counts as live while its hash "
    "lasts)"
)


def _rq1_since_restart(worker: WorkerRecord) -> bool:
    """Whether ``worker`` is an RQ 1 worker born before the server's last start,
    whose hash will expire: its command thread died with the restart and never
    subscribes again, and its reconnected connection carries no name.

    Its heartbeat since the restart is no evidence either way: a worker running
    a job heartbeats only every 30 s or so, and one that died before the
    restart has a hash that expires as RQ set it (the server keeps TTLs across
    a restart). A hash set never to expire would keep it live for ever.
    """
    started = worker.server_started
    if started is None or not worker.fields.get("version", "").startswith("1."):
        return False
    if worker.ttl_s is not None and worker.ttl_s < 0:
        return False
    birth = parse_timestamp(worker.fields.get("birth"))
    return birth is not None and birth < started


#: Evidence of a worker whose hash exists and records no death, but which holds
#: no connection to Redis.
NO_CONNECTION = "worker holds no connection to Redis"


def disconnected_only(worker: WorkerRecord | None) -> bool:
    """Whether ``worker`` was found dead by one thing alone: it held no connection
    (its hash exists and records no death). A live worker whose connections the
    server dropped looks the same until it connects again."""
    # Once looked at again, the evidence says so, and is no longer this.
    return worker is not None and worker_liveness(worker).evidence == NO_CONNECTION


def _death_noted_by_opsctl(worker: WorkerRecord) -> bool:
    """Whether the death a worker's hash records was written by an opsctl run that
    found it dead (and removed its registrations), not by the worker itself."""
    return worker.fields.get("death_noted_by") == f"opsctl {worker.fields.get('death')}"


def _heartbeat_since_death(worker: WorkerRecord) -> bool:
    """Whether a worker whose hash records a death has heartbeated after it.

    A death an opsctl run noted is in the server's time, and the heartbeat in
    the worker's: any heartbeat other than the one the run noted it after is a
    later one, whatever the two clocks say. A death the worker recorded itself
    (RQ writes one as a worker shuts down, after its last heartbeat) is on the
    same clock as its heartbeat.
    """
    noted_after = worker.fields.get("death_noted_after")
    if noted_after is not None and _death_noted_by_opsctl(worker):
        written = worker.fields.get("last_heartbeat")
        return bool(written) and written != noted_after
    died = parse_timestamp(worker.fields.get("death"))
    beat = worker.heartbeat_at
    return died is not None and beat is not None and beat > died


def runs_a_job(worker: WorkerRecord) -> bool:
    """Whether a worker's hash allows that it runs a job: its state is ``busy``, or
    it records none.

    RQ marks a worker busy in the transaction that records the run it takes, and
    idle only once it waits for work again: a worker that is idle (or starting, or
    suspended) runs no job. Records of it that still name one were left behind (a
    work horse that exited without RQ's cleanup, or data restored from an older
    copy); a stop sent for such a job finds no work horse, and RQ's worker then
    kills its own process group.
    """
    state = worker.fields.get("state")
    return not state or state == "busy"


def left_behind(worker: WorkerRecord, entry: StartedEntry) -> bool:
    """Whether ``worker`` has heartbeated since the lease of ``entry``'s run ended.

    A worker renews the lease of the run it executes (the entry's score, written
    by its own clock) with every heartbeat it writes during that run, and the
    lease ends after that heartbeat (but for the heartbeat before a work horse
    past its timeout is killed, and RQ 1's rounding). A heartbeat written more
    than :data:`LEASE_GRACE_S` after the lease ended was written while running
    something else, or nothing: the worker's records of this
    run, if any, were left behind (a work horse that ended its process without
    RQ's cleanup; data restored from an older copy), and a stop for it would find
    no work horse.
    """
    if entry.lost or entry.stranded or not worker.exists:
        return False
    beat = worker.heartbeat_at
    # With a margin: the parent's last heartbeat before it kills a work horse past its
    # timeout renews no lease, and RQ 1's last lease may end within a second of it.
    return beat is not None and beat > entry.score + LEASE_GRACE_S


def is_executing(worker: WorkerRecord, entry: StartedEntry) -> bool:
    """Whether a live ``worker``'s own records say it runs ``entry``."""
    if not worker.exists:
        # Its records expired with its hash: it may be executing any job that names it.
        return True
    if not runs_a_job(worker):
        return False
    if worker.executions:
        if entry.lost:  # no registry member to match: any execution of the job
            return any(e.startswith(f"{entry.job_id}:") for e in worker.executions)
        return entry.member_text in worker.executions
    if worker.current_job:
        return worker.current_job == entry.job_id
    return worker.fields.get("state") == "busy"


def jobs_in_hand(workers: Mapping[str, WorkerRecord]) -> dict[str, str]:
    """Each job a live worker's own records say it is executing, with that worker's
    name: the jobs of its executions set (RQ 3) and its ``current_job`` (RQ 1, 2)."""
    found: dict[str, str] = {}
    for name, worker in workers.items():
        if not (worker.executions or worker.current_job) or not runs_a_job(worker):
            continue
        if not worker_liveness(worker).alive:
            continue
        for execution in worker.executions:
            found.setdefault(execution.rpartition(":")[0] or execution, name)
        if worker.current_job:
            found.setdefault(worker.current_job, name)
    return found


def classify(
    entry: StartedEntry,
    workers: dict[str, WorkerRecord],
    rule: Rule,
    now: float,
    in_hand: Mapping[str, str] | None = None,
) -> Verdict:
    """The state of one started entry (or lost job) under ``rule`` at server time ``now``.

    ``in_hand`` is :func:`jobs_in_hand` of ``workers``, computed here when not
    given (callers that classify many entries compute it once).
    """
    name = entry.worker_name
    worker = workers.get(name) if name else None
    liveness = worker_liveness(worker) if name else _NO_WORKER
    birth = None if worker is None else worker.fields.get("birth", "")
    signals = _signals(entry, name, liveness, now, birth)
    if in_hand is None:
        in_hand = jobs_in_hand(workers)
    holds, holder = _holding(entry, worker, liveness.alive, in_hand)
    if holder is not None:
        verdict = _held_elsewhere(entry, holder, workers[holder], liveness.alive, signals)
    else:
        verdict = _decide(entry, rule, liveness, holds, signals, now, worker)
    origin = entry.job.get("origin", "") if entry.job is not None else ""
    if origin and origin != entry.queue:
        # Actions use the origin's registries and queue, as RQ does.
        note = f"; its origin is queue {quoted(origin)}, not {quoted(entry.queue)}"
        verdict = replace(verdict, reason=verdict.reason + note)
    return verdict


def holding(
    entry: StartedEntry, workers: Mapping[str, WorkerRecord], in_hand: Mapping[str, str]
) -> tuple[bool, str | None]:
    """Whether the live worker ``entry`` names executes its run; if not, the live
    worker whose records say it executes the job (another run of it), or None.
    ``in_hand`` is :func:`jobs_in_hand` of ``workers``."""
    name = entry.worker_name
    worker = workers.get(name) if name else None
    alive = worker is not None and worker_liveness(worker).alive
    return _holding(entry, worker, alive, in_hand)


def _holding(
    entry: StartedEntry, worker: WorkerRecord | None, alive: bool, in_hand: Mapping[str, str]
) -> tuple[bool, str | None]:
    left = worker is not None and left_behind(worker, entry)
    holds = alive and worker is not None and not left and is_executing(worker, entry)
    holder = None if holds else in_hand.get(entry.job_id)
    if (
        left
        and worker is not None
        and holder == worker.name
        and _names_this_run_alone(worker, entry)
    ):
        holder = None  # its records of this very run are what was left behind
    return holds, holder


def _names_this_run_alone(worker: WorkerRecord, entry: StartedEntry) -> bool:
    """Whether ``worker``'s records of ``entry``'s job name this entry's run and no
    later run of the job (which the worker may be executing now)."""
    if worker.executions:
        runs = [e for e in worker.executions if e.startswith(f"{entry.job_id}:")]
        return runs == [entry.member_text]
    # RQ 1 and 2 name the job, not the run: a job hash started or heartbeated after
    # this run's lease ended is a later run's.
    job = entry.job if entry.job is not None else _NO_FIELDS
    moments = (parse_timestamp(job.get(n)) for n in ("started_at", "last_heartbeat"))
    return not any(t is not None and t > entry.score for t in moments)


def _decide(
    entry: StartedEntry,
    rule: Rule,
    liveness: Liveness,
    holds: bool,
    signals: Signals,
    now: float,
    worker: WorkerRecord | None = None,
) -> Verdict:
    if entry.lost:
        return _lost(entry, rule, holds, signals, now)
    if entry.stranded:
        return _stranded(entry, rule, signals, now)
    job = entry.job
    status = job.get("status", "") if job is not None else ""
    if job is None or not (status or job.get("created_at")):
        return _orphaned(job, holds, signals)
    if status != "started":
        return _not_started(entry, status, rule, liveness, holds, signals, now)
    if not holds:
        return _abandoned(rule, liveness, signals, now)
    return _held(entry, rule, signals, now, worker)


_NO_WORKER = Liveness(False, "no worker named")


def _held_elsewhere(
    entry: StartedEntry, holder: str, worker: WorkerRecord, named_alive: bool, signals: Signals
) -> Verdict:
    """An entry (or a lost or stranded job) whose job a live worker says it is
    executing, though the entry's records name another worker, or none, or the
    worker they name does not hold this entry. Most often the job ran before (its
    worker died) and was enqueued and taken again, under the same id by a
    scheduler, say. The job is the holder's: at most this entry is left over.
    ``named_alive`` tells whether the worker the entry's records name is live."""
    signals = replace(
        signals,
        worker=holder,
        worker_alive=True,
        worker_evidence=worker_liveness(worker).evidence,
    )
    if entry.execution_id is not None and entry.member_text not in worker.executions:
        if worker.executions:
            reason = sys.intern(
                f"{holder} is executing this job as another execution; this entry is left"
            )
            return Verdict(State.LEFTOVER, ACTION_REMOVE_ENTRY, reason, signals)
        ran_it = _dead_creator(entry, holder, named_alive)
        if ran_it:
            reason = f"{holder} is executing this job; this entry is {ran_it}'s run, and it is dead"
            return Verdict(State.LEFTOVER, ACTION_REMOVE_ENTRY, sys.intern(reason), signals)
    # The holder's own entry, or one it may own: RQ 1 keeps one bare-id entry per
    # job, and a worker that names its job only in current_job (RQ 1, 2) does not
    # say which execution is its own. A stop would go to the worker the records
    # name, not to the holder, so none is sent.
    named = entry.worker_name or "no worker"
    if named == holder:
        reason = (
            f"{holder} is executing it, and its records do not say whether this entry is that run"
        )
    else:
        reason = f"{holder} is executing it, though its records name {named}"
    return Verdict(State.RUNNING, ACTION_NONE, reason, signals)


def runs_elsewhere(entry: StartedEntry, verdict: Verdict) -> bool:
    """Whether ``verdict`` leaves ``entry`` over because a live worker other than the
    one its records name runs its job as another run (see :func:`_held_elsewhere`,
    whose signals name that worker). The job hash's heartbeat is then that run's,
    and says nothing of this entry."""
    signals = verdict.signals
    return (
        verdict.state is State.LEFTOVER
        and signals.worker_alive is True
        and signals.worker != entry.worker_name
    )


def _creator(entry: StartedEntry) -> str | None:
    """The worker an entry's execution record names as the one that created it
    (RQ 2.11 on write it; earlier releases, none)."""
    return entry.execution.get("worker_name") if entry.execution is not None else None


def _dead_creator(entry: StartedEntry, holder: str, named_alive: bool) -> str | None:
    """The dead worker whose run an entry is, when its own execution record says so.

    An execution record names the worker that created it (RQ 2.11 on), so an
    entry whose record names a worker other than the holder is not the holder's
    run, even when the holder names only the job (RQ 2's ``current_job``). Only a
    dead creator counts: a live one may be about to run the job itself.
    """
    creator = _creator(entry)
    if creator and creator != holder and not named_alive:
        return creator
    return None


def rq_first_seen(job: Mapping[str, str]) -> float | None:
    """When RQ's cleanup first saw a job in its queue's intermediate list (its mark),
    if that mark is of the job's present stay there: None when there is none, or
    when it is older than the job's ``enqueued_at``. RQ leaves the mark for a day
    and never clears it when the job starts, so a job enqueued again under the same
    id (a retry, a periodic job of a fixed id) would otherwise take its old mark
    for how long it has been there now."""
    seen = parse_timestamp(job.get("first_seen"))
    enqueued = parse_timestamp(job.get("enqueued_at"))
    if seen is None or (enqueued is not None and seen < enqueued):
        return None
    return seen


def out_of_place_since(entry: StartedEntry) -> float | None:
    """Since when a lost or stranded job is known to be out of place.

    A lost started job counts from its start or latest heartbeat. A stranded
    one counts from RQ's own mark of when its cleanup first saw it there. Any
    other counts from when a run first found it out of place (RQ records no
    moment at which a worker takes a job off its queue, and ``enqueued_at``
    says only how long it waited there). None when no such time is known.
    """
    job = entry.job if entry.job is not None else _NO_FIELDS
    if entry.stranded:
        return rq_first_seen(job) or entry.first_lost
    if job.get("status") == "started":
        moments = [parse_timestamp(job.get(n)) for n in ("started_at", "last_heartbeat")]
        known = [t for t in moments if t is not None]
        return max(known) if known else None
    return entry.first_lost


def _lost(entry: StartedEntry, rule: Rule, holds: bool, signals: Signals, now: float) -> Verdict:
    job = entry.job if entry.job is not None else _NO_FIELDS
    status = job.get("status", "")
    place = "no started registry" if status == "started" else "no queue, list or registry"
    found = f"status is '{status}' but the job is in {place}"
    if holds:
        reason = f"{found}; {signals.worker} is executing it"
        return Verdict(State.RUNNING, ACTION_NONE, reason, signals)
    if status != "started" and entry.first_lost is None:
        reason = (
            f"{found}; found lost now (a worker may have just taken it): acted on once "
            f"it has been lost for longer than lost_after {rule.lost_after_seconds}s"
        )
        return Verdict(State.LOST, ACTION_NONE, reason, signals)
    over = (rule.action, f", over lost_after {rule.lost_after_seconds}s")
    return _after_grace(
        State.LOST, found, out_of_place_since(entry), "when it was lost", over, rule, signals, now
    )


def _after_grace(
    state: State,
    found: str,
    since: float | None,
    unknown: str,
    over: tuple[str, str],
    rule: Rule,
    signals: Signals,
    now: float,
) -> Verdict:
    """A job found out of place (``found``) since ``since``: left alone while that
    time is unknown or within lost_after; then ``over``'s action, and its words."""
    if since is None:
        reason = f"{found}; {unknown} is unknown, so it is never acted on by age"
        return Verdict(state, ACTION_NONE, reason, signals)
    out_s = max(0.0, now - since)
    if out_s <= rule.lost_after_seconds:
        reason = f"{found} for {out_s:.0f}s, within lost_after {rule.lost_after_seconds}s"
        return Verdict(state, ACTION_NONE, reason, signals)
    action, words = over
    return Verdict(state, action, f"{found} for {out_s:.0f}s{words}", signals)


#: Statuses of a stranded job that RQ's own cleanup fails; others only leave the id behind.
_STRANDED_STATUSES = ("queued", "started", "")


def _stranded(entry: StartedEntry, rule: Rule, signals: Signals, now: float) -> Verdict:
    """An id in an intermediate list, in no started registry: RQ's own cleanup fails
    such a job (retries honoured) once it has been seen there for a while; so does
    opsctl, after lost_after, whatever the policy's action."""
    if entry.job is None:
        return Verdict(State.ORPHANED, ACTION_REMOVE_ENTRY, "job hash is gone", signals)
    status = entry.job.get("status", "")
    if status not in _STRANDED_STATUSES:
        reason = f"status is '{status}'; only its id is left in the intermediate list"
        return Verdict(State.LEFTOVER, ACTION_REMOVE_ENTRY, reason, signals)
    found = "taken from its queue but never started (left in the intermediate list)"
    since = out_of_place_since(entry)
    if since is None:
        reason = (
            f"{found}; found there now (a worker may have just taken it): acted on once it "
            f"has been there for longer than lost_after {rule.lost_after_seconds}s"
        )
        return Verdict(State.STRANDED, ACTION_NONE, reason, signals)
    over = ("fail", "; failed as RQ's own cleanup would")
    return _after_grace(State.STRANDED, found, since, "for how long", over, rule, signals, now)


def _orphaned(job: Mapping[str, str] | None, holds: bool, signals: Signals) -> Verdict:
    if job is None:
        found = "job hash is gone"
    else:
        found = f"job hash holds no job ({', '.join(sorted(job)) or 'no fields opsctl reads'})"
    if holds:
        reason = f"{found} but {signals.worker} is executing it"
        return Verdict(State.RUNNING, ACTION_NONE, reason, signals)
    return Verdict(State.ORPHANED, ACTION_REMOVE_ENTRY, found, signals)


def _not_started(
    entry: StartedEntry,
    status: str,
    rule: Rule,
    liveness: Liveness,
    holds: bool,
    signals: Signals,
    now: float,
) -> Verdict:
    shown = f"'{status}'" if status else "missing"
    if holds:
        # The worker is between taking the job and marking it started, or is
        # still writing its end; the entry is its to remove.
        reason = f"status is {shown} but {signals.worker} is executing it"
        return Verdict(State.RUNNING, ACTION_NONE, reason, signals)
    taken_unnamed = entry.execution_id is not None and not _creator(entry) and status == "queued"
    if taken_unnamed and math.isfinite(entry.score) and entry.score + LEASE_GRACE_S > now:
        # RQ 2.0 to 2.10 enter a job a worker takes in the registry (as one of
        # its executions) while its status is still 'queued', and name the worker
        # nowhere the entry leads (not in the execution record; the job's
        # worker_name may still name a worker of an earlier run) until its work
        # horse marks it started. The entry's lease is the one sign of a worker
        # about to run it. RQ 1 writes its entry and the start at once.
        return Verdict(State.LEFTOVER, ACTION_NONE, _TAKEN_UNNAMED, signals)
    if liveness.alive and status == "queued":
        # A worker enters a job it takes in the registry (with its execution)
        # while the job's status is still 'queued'; its work horse marks it
        # started later. Its records were read before the entry, so they may
        # not list it yet: removing the entry then would break the job it is
        # about to run. Left alone until it has not run for longer than lost_after.
        # (A job that ended is no job a worker is about to run.)
        found = f"status is {shown} and {signals.worker} is live but not executing it"
        return _unlisted(State.LEFTOVER, found, ACTION_REMOVE_ENTRY, rule, signals, now)
    return Verdict(State.LEFTOVER, ACTION_REMOVE_ENTRY, f"status is {shown}", signals)


_TAKEN_UNNAMED = (
    "status is 'queued' and no record names the worker that took it, whose lease on it has "
    "not ended: that worker may be about to start it, so the entry stays until the lease ends"
)


def _unlisted(
    state: State, found: str, action: str, rule: Rule, signals: Signals, now: float
) -> Verdict:
    """An entry whose live worker's records do not list it (yet): ``action`` once
    the job has not run (no start, no heartbeat) for longer than lost_after."""
    ages = [a for a in (signals.age_s, signals.heartbeat_age_s) if a is not None]
    last_ran = now - min(ages) if ages else None
    over = (action, f", over lost_after {rule.lost_after_seconds}s")
    return _after_grace(state, found, last_ran, "when it last ran", over, rule, signals, now)


def _abandoned(rule: Rule, liveness: Liveness, signals: Signals, now: float) -> Verdict:
    # Reasons name the worker and the rule, not the job: many jobs share each
    # one, so a large run keeps a single copy of it.
    if not signals.worker:
        why = "no worker is named for it"
    elif liveness.alive:
        # A worker enters a job it takes in the registry a moment before its
        # own records name it (RQ 2 names it in current_job from the work
        # horse), and its records were read before the entry: the job is
        # acted on only once it has not run for longer than lost_after.
        found = sys.intern(f"{signals.worker} is live but not executing it")
        return _unlisted(State.ABANDONED, found, rule.action, rule, signals, now)
    else:
        why = sys.intern(f"{signals.worker} is dead: {liveness.evidence}")
    return Verdict(State.ABANDONED, rule.action, why, signals)


def _held(
    entry: StartedEntry, rule: Rule, signals: Signals, now: float, worker: WorkerRecord | None
) -> Verdict:
    age = signals.age_s
    if rule.force:
        why = "force is set"
    elif age is None:
        reason = "age unknown (no readable started_at); never acted on by age"
        return Verdict(State.RUNNING, ACTION_NONE, reason, signals)
    elif age > rule.max_age_seconds:
        # The age itself is in the signals (and every report's age column).
        why = sys.intern(f"running longer than max_age {rule.max_age_seconds}s")
    else:
        reason = sys.intern(f"running within max_age {rule.max_age_seconds}s")
        return Verdict(State.RUNNING, ACTION_NONE, reason, signals)
    if not entry.lost and not entry.stranded and entry.score < now - LEASE_GRACE_S:
        # A worker renews the lease (the entry's score) at every heartbeat while it
        # runs the job. One that stopped renewing it may run no such job (its records
        # were left behind): a stop that finds no work horse makes RQ's worker kill
        # its own process group. RQ's own cleanup fails such an entry in time.
        reason = sys.intern(
            f"{why}, but not stopped: {signals.worker} has stopped renewing its lease on "
            "this run, so it may not be running it, and a stop that finds no work horse "
            "makes RQ's worker kill its own process group"
        )
        return Verdict(State.OVERDUE, ACTION_NONE, reason, signals)
    if worker is not None and worker.heard_on_server == 0:
        reason = sys.intern(
            f"{why}, but not stopped: nothing listens on {signals.worker}'s command "
            "channel, so no stop can reach it (RQ 1 never subscribes again after Redis "
            "restarts)"
        )
        return Verdict(State.OVERDUE, ACTION_NONE, reason, signals)
    if worker is not None and not watched_since_start(worker, entry):
        silent = (
            "has not heartbeated since the job started"
            if worker.exists
            else "has let its hash expire (it writes no heartbeat)"
        )
        reason = sys.intern(
            f"{why}, but not stopped: {signals.worker} {silent}. A worker watching a work "
            "horse heartbeats every job monitoring interval (30 s by default), and a later "
            "run stops the job once it has; one that does not is a SimpleWorker, which "
            "cannot stop it (RQ 3's then files the job's own failure as stopped, without its "
            "retries; RQ 1.16's kills its own process group), or a frozen worker"
        )
        return Verdict(State.OVERDUE, ACTION_NONE, reason, signals)
    return Verdict(State.OVERDUE, ACTION_STOP, why, signals, rule.action)


def watched_since_start(worker: WorkerRecord, entry: StartedEntry) -> bool:
    """Whether ``worker`` has heartbeated since ``entry``'s job started (both moments
    by its own clock): a worker that forks a work horse heartbeats while it watches it
    (every job monitoring interval, 30 s by default); a ``SimpleWorker``, which runs
    the job itself, writes its last heartbeat just before the job's start and none
    until the job ends, and a frozen worker writes none. A worker whose hash has
    expired writes none either (a heartbeat renews it), whatever its connection says.
    A job of unknown start cannot tell: taken as watched."""
    if not worker.exists:
        return False
    job = entry.job if entry.job is not None else _NO_FIELDS
    started = parse_timestamp(job.get("started_at"))
    if started is None:
        return True
    return worker.heartbeat_at is not None and worker.heartbeat_at > started


#: Seconds past its lease's end (the registry score: the worker's clock) before an
#: entry's lease counts as no longer renewed.
LEASE_GRACE_S = 60


def started_moment(job: Mapping[str, str], execution: Mapping[str, str]) -> float | None:
    """When a job started, the moment its age counts from: its ``started_at``, else
    its execution's ``created_at``; None when neither can be read."""
    started = parse_timestamp(job.get("started_at"))
    if started is None:
        started = parse_timestamp(execution.get("created_at"))
    return started


def _signals(
    entry: StartedEntry, worker: str, liveness: Liveness, now: float, birth: str | None
) -> Signals:
    job = entry.job if entry.job is not None else _NO_FIELDS
    execution = entry.execution if entry.execution is not None else _NO_FIELDS
    started = started_moment(job, execution)
    job_beat_text, execution_beat_text = job.get("last_heartbeat"), execution.get("last_heartbeat")
    job_beat = parse_timestamp(job_beat_text)
    # RQ writes the same moment to both: read it once.
    same = execution_beat_text == job_beat_text
    execution_beat = job_beat if same else parse_timestamp(execution_beat_text)
    if job_beat is None or (execution_beat is not None and execution_beat > job_beat):
        job_beat = execution_beat
    return Signals(
        age_s=max(0.0, now - started) if started is not None else None,
        heartbeat_age_s=max(0.0, now - job_beat) if job_beat is not None else None,
        worker=worker,
        worker_alive=liveness.alive if worker else None,
        worker_evidence=liveness.evidence,
        timeout_s=parse_int(job.get("timeout")),
        status=job.get("status") if entry.job is not None else None,
        worker_birth=birth,
    )


_NO_FIELDS: Mapping[str, str] = {}
