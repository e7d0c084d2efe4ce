"""Carrying out a run's plan: stops, atomic job changes, worker registrations.

The order of work, per queue: take RQ's maintenance lock for the queue (so a
worker's own registry cleaning never handles the same job at the same time),
ask live workers to stop overdue jobs, change abandoned, orphaned and leftover
entries in atomic batches, release the lock. Dead worker registrations come
last. Every attempt lands in the audit trail.

If the connection to Redis drops, the batch in flight is reconciled after
reconnecting: the audit trail, written in the same atomic script as each
change, says exactly which changes happened; the others are retried (their
scripts re-check everything first). If Redis stays away, the jobs not acted on
are reported as errors and the next run completes them.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace

import redis

from opsctl import audit, compat
from opsctl.actions import Actor, ChangeResult, JobChange
from opsctl.audit import AuditContext
from opsctl.engine import (
    ACTION_REMOVE_ENTRY,
    ACTION_STOP,
    LEASE_GRACE_S,
    holding,
    jobs_in_hand,
    out_of_place_since,
    runs_elsewhere,
    started_moment,
    worker_liveness,
)
from opsctl.errors import StoppedEarly
from opsctl.keys import DEFAULT_FAILURE_TTL_S, Keys
from opsctl.keyspace import lost_notes, note_lost
from opsctl.lock import Lock, maintenance_lock, released
from opsctl.model import MAX_TTL_S, format_timestamp, parse_int, retry_interval
from opsctl.progress import APPLYING, OnProgress
from opsctl.run import (
    DONE,
    ERROR,
    PLANNED,
    SKIPPED,
    JobOutcome,
    Run,
    WorkerOutcome,
    stops_that_may_stray,
)
from opsctl.shown import quoted
from opsctl.state import (
    CONNECTION_LOST,
    forget_no_answer,
    gave_no_answer,
    read_registered_workers,
    refuse_foreign_key,
    server_time,
    text,
    unanswered,
)

log = logging.getLogger(__name__)

#: Seconds between polls while waiting for workers to stop jobs.
STOP_POLL_S = 0.2
#: Waits before each attempt to reach Redis again after the connection dropped.
RECONNECT_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)
#: Rounds of applying, after which changes still unknown are left to the next run.
RECONCILE_ROUNDS = 5
#: Job changes carried out between two checks of whether opsctl was asked to stop.
STOP_CHECK_EVERY = 200
#: Details a successful script reports that add nothing to the reason.
_PLAIN_DETAILS = {"removed", "failed", "queued", "canceled", "deleted"}


class Interrupted(Exception):
    """Raised between two changes when the run was asked to stop."""


@dataclass
class Executor:
    """Carries out one run against one Redis."""

    conn: redis.Redis
    keys: Keys
    run: Run
    context: AuditContext
    stop_timeout_s: float = 15.0
    lock_timeout_s: float = 5.0
    #: Polled between queues and between batches of changes (never inside one
    #: change): True makes the run stop there and leave the rest for later.
    should_stop: Callable[[], bool] | None = None
    #: Told how many of the jobs to act on are dealt with, after each batch.
    on_progress: OnProgress | None = None

    def __post_init__(self) -> None:
        self.actor = Actor(self.conn, self.keys)
        self._held: list[Lock] = []
        self._renewed_at = time.monotonic()  # see _waiting_for_lock
        self._lock_deadline: float | None = None  # see _lock_wait_s
        self._dealt_with, self._to_deal_with = 0, 0
        self._slow_once = False  # see _apply_reconciled

    def execute(self) -> None:
        """Act on every planned job and worker; nothing at all if a limit tripped."""
        if self._asked_to_stop():
            # Nothing is changed yet: leave no note, no audit entry, no report.
            raise StoppedEarly("asked to stop before the first change: nothing was done")
        if self.run.limits_tripped:
            self._note_lost()  # bookkeeping, not an action: the grace starts all the same
            return
        then = ", then run again (nothing was changed)"
        refuse_foreign_key(self.conn, audit.AUDIT_STREAM, "stream", "opsctl's audit stream", then)
        work = self._work_by_queue()
        self._to_deal_with = sum(len(outcomes) for outcomes in work.values())
        try:
            self._note_lost()
            # Jobs that need no stop are changed first, queue by queue; then every
            # stop of the run is sent and waited for at once (a hung worker holds up
            # no other clean-up, and --stop-timeout is waited once, not per queue);
            # then the stopped jobs get their follow-up actions.
            stops = [o for outcomes in work.values() for o in outcomes if o.action == ACTION_STOP]
            for queue, outcomes in work.items():
                if self.run.redis_lost:
                    break
                self._checkpoint()
                self._under_queue_lock(queue, [o for o in outcomes if o.action != ACTION_STOP])
            if stops and not self.run.redis_lost:
                self._checkpoint()
                self._stop_and_follow_up(stops)
            if self.run.redis_lost:
                # A batch could not be confirmed and Redis stayed away: the
                # queues not reached yet wait for the next run.
                self._give_up("not acted on: lost the connection to Redis")
            self._checkpoint()
            for worker in self.run.workers:
                if worker.outcome == PLANNED and not worker.dry_run and not self.run.redis_lost:
                    self._deregister(worker)
            if not gave_no_answer():  # the report tells it all the same
                self._audit_the_rest()
        except Interrupted:
            log.warning("stopping: the remaining actions are left for the next run")
            for job in self.run.jobs:
                if job.outcome == PLANNED and not job.rule.dry_run:
                    _set(job, SKIPPED, "not acted on: opsctl was asked to stop")
                    self.run.stopped = True
            for worker in self.run.workers:
                if worker.outcome == PLANNED and not worker.dry_run:
                    worker.outcome, worker.reason = (
                        SKIPPED,
                        "not acted on: opsctl was asked to stop",
                    )
                    self.run.stopped = True
            if not gave_no_answer():
                try:
                    self._audit_the_rest()
                except CONNECTION_LOST as exc:  # the report tells it all the same
                    log.error("audit_not_written error=%s", exc)
        except CONNECTION_LOST as exc:
            log.error("connection_lost error=%s", exc)
            unanswered(exc)  # noted: what is left to tidy is not waited for
            self.run.redis_lost = True
            self._give_up("not acted on: lost the connection to Redis")
        except redis.ResponseError as exc:
            # Refused mid-run (an ACL, or a failover that made the server a
            # replica): keep the report of what was done.
            log.error("refused error=%s", exc)
            replica = isinstance(exc, redis.exceptions.ReadOnlyError)
            self.run.refused = (
                f"the server is a read-only replica now: {exc}" if replica else str(exc)
            )
            self._give_up(f"not acted on: Redis refused a command ({self.run.refused})")

    def _work_by_queue(self) -> dict[str, list[JobOutcome]]:
        work: dict[str, list[JobOutcome]] = {}
        for job in self.run.jobs:
            if job.outcome == PLANNED and not job.rule.dry_run:
                work.setdefault(job.entry.queue, []).append(job)
        return work

    def _under_queue_lock(self, queue: str, outcomes: list[JobOutcome]) -> None:
        """Change ``outcomes`` while holding RQ's maintenance lock of ``queue``."""
        if not outcomes:
            return
        with ExitStack() as held:
            refused = self._take_queue_lock(queue, held)
            if refused is not None:
                for outcome in outcomes:
                    _set(outcome, *refused)
                self._dealt(len(outcomes))
                return
            self._change_jobs(outcomes)

    def _take_queue_lock(self, queue: str, held: ExitStack) -> tuple[str, str] | None:
        """Take RQ's maintenance lock of ``queue`` until ``held`` closes; None once
        taken, else the outcome of the queue's jobs and why it could not be."""
        lock = maintenance_lock(self.conn, self.keys.prefix, queue, self.run.run_id)
        if lock.try_acquire():
            pass
        elif (odd := self._odd_queue_lock(queue, lock.key)) is not None:
            return odd
        elif not lock.acquire(self._lock_wait_s(), self._waiting_for_lock):
            self._checkpoint()  # asked to stop while waiting: the rest is left
            ttl = self.conn.ttl(lock.key)
            lasts = f", for {ttl}s more" if isinstance(ttl, int) and ttl > 0 else ""
            return self._locked_out(
                queue,
                f"RQ's maintenance lock of this queue is held ({_holder(lock)}{lasts}): "
                "RQ is cleaning its registries, or a worker killed while cleaning left the "
                "lock behind; run again once it is gone",
            )
        self._held.append(lock)
        held.callback(self._held.remove, lock)
        held.enter_context(released(lock))
        return None

    def _odd_queue_lock(self, queue: str, key: str) -> tuple[str, str] | None:
        """The outcome, and why, for the jobs of a queue whose maintenance lock ``key``
        neither RQ nor a run left: a key of another type, or one that never expires
        (RQ's lock expires, and so does opsctl's). Waiting for it would be in vain,
        and neither RQ nor opsctl cleans the queue while it stays. None for a lock
        that is simply held."""
        kind = self.conn.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind not in ("string", "none"):
            return (
                ERROR,
                f"RQ's maintenance lock of this queue, {key}, is a {kind}, not the string "
                "RQ writes: something else wrote it, and neither RQ nor opsctl cleans this "
                "queue while it is there; remove it if nothing needs it",
            )
        if kind == "string" and self.conn.ttl(key) == -1:
            holder = self.conn.get(key)
            shown = holder.decode("utf-8", "replace") if isinstance(holder, bytes) else holder
            return self._locked_out(
                queue,
                f"RQ's maintenance lock of this queue, {key}, is held ({shown}) and never "
                "expires, so it was not left by RQ or by a run: neither RQ nor opsctl "
                f"cleans this queue until it is removed (DEL {key})",
            )
        return None

    def _locked_out(self, queue: str, why: str) -> tuple[str, str]:
        """Note that a lock kept the run from ``queue`` (exit 5); its jobs are skipped."""
        if queue not in self.run.locked_out:
            self.run.locked_out.append(queue)
        return SKIPPED, why

    def _stop_and_follow_up(self, stops: list[JobOutcome]) -> None:
        """Stop ``stops`` through their workers, then apply their follow-ups. RQ's
        maintenance lock of each queue with a follow-up is taken first and held
        through both: its cleaning must not file a stopped job elsewhere before the
        follow-up, and a job is not stopped whose follow-up the lock would hold off."""
        with ExitStack() as held:
            refused: dict[str, tuple[str, str] | None] = {}
            sent = []
            for outcome in stops:
                queue, follow_up = outcome.entry.queue, outcome.verdict.follow_up
                if follow_up in (None, "fail"):
                    sent.append(outcome)
                    continue
                if queue not in refused:
                    refused[queue] = self._take_queue_lock(queue, held)
                lock_refused = refused[queue]
                if lock_refused is None:
                    sent.append(outcome)
                else:
                    outcome.stop_confirmed = False
                    result, why = lock_refused
                    _set(
                        outcome,
                        result,
                        f"not stopped, as its {follow_up} could not follow: {why}",
                        append=True,
                    )
            follow_ups: dict[str, list[JobOutcome]] = {}
            for outcome in self._stop_jobs(sent):
                follow_ups.setdefault(outcome.entry.queue, []).append(outcome)
            self._dealt(len(stops))
            for stopped in follow_ups.values():
                if self.run.redis_lost:
                    break
                self._follow_up(stopped)

    def _lock_wait_s(self) -> float:
        """What is left of --lock-timeout for RQ's maintenance locks: one budget for
        the whole run, spent only while waiting, so that many locks left behind by
        killed workers cost one --lock-timeout, not one each."""
        if self._lock_deadline is None:
            self._lock_deadline = time.monotonic() + self.lock_timeout_s
        return max(0.0, self._lock_deadline - time.monotonic())

    def _dealt(self, count: int) -> None:
        self._dealt_with += count
        if self.on_progress is not None:
            self.on_progress(self._dealt_with, self._to_deal_with, APPLYING)

    def _waiting_for_lock(self) -> bool:
        """Called while waiting for a maintenance lock: keeps the ones already held
        (a third of their expiry apart; a wait may outlast them), and tells whether
        to stop waiting."""
        if self._held and time.monotonic() - self._renewed_at >= self._held[0].ttl_s / 3:
            self.renew_locks()
        return self._asked_to_stop()

    def renew_locks(self) -> None:
        """Keep the maintenance locks held while work goes on (the run lock is
        renewed in the background for the whole run: see opsctl.lock.run_lock)."""
        self._renewed_at = time.monotonic()
        for lock in self._held:
            if not lock.renew():
                log.warning("lock=%s lost while working", lock.key)

    def _note_lost(self) -> None:
        """Start the grace of queued jobs found out of place for the first time (see
        :func:`opsctl.keys.lost_note_key`); queues in dry-run mode are left alone."""
        found = [j.entry for j in self.run.jobs if not j.rule.dry_run]
        if note_lost(self.conn, self.keys, found, self.run.now):
            log.info("noted queued jobs found out of place, to be acted on after lost_after")

    # Job changes ---------------------------------------------------------------------------

    def _asked_to_stop(self) -> bool:
        return self.should_stop is not None and self.should_stop()

    def _checkpoint(self) -> None:
        """Stop here, between two changes, if opsctl was asked to stop."""
        if self._asked_to_stop():
            raise Interrupted

    def _change_jobs(self, outcomes: list[JobOutcome]) -> None:
        for start in range(0, len(outcomes), STOP_CHECK_EVERY):
            if self.run.redis_lost:
                # A batch could not be confirmed (Redis stayed away, or the
                # reconcile rounds ran out): trying each later batch again would
                # hold a deploy for minutes. The rest stays planned, and is
                # reported as not acted on.
                return
            if start:
                self._checkpoint()
            batch = outcomes[start : start + STOP_CHECK_EVERY]
            self._change_batch(batch)
            self._dealt(len(batch))

    def _change_batch(self, outcomes: list[JobOutcome]) -> None:
        if not outcomes:
            return
        changes = [self._job_change(o) for o in outcomes]
        results = self._apply_reconciled(outcomes, changes)
        failed = []
        for outcome, change, result in zip(outcomes, changes, results, strict=True):
            if result is None:
                continue
            _record(outcome, result)  # every result first: a release below may lose Redis
            if result.done and change.action == "fail":
                failed.append((outcome, change, result))
        for at, (outcome, change, result) in enumerate(failed):
            try:
                if result.dependents or (
                    result.from_audit and self._failed_with_dependents(change)
                ):
                    _enqueue_dependents(self.conn, self.keys, outcome)
            except CONNECTION_LOST:
                for left, _, _ in failed[at:]:
                    left.reason += "; dependents not enqueued: lost the connection to Redis"
                raise
        for result in results:
            if result is not None and result.refused:
                self._note_refused(result.refused)
        refused = next((r.read_only for r in results if r is not None and r.read_only), None)
        if refused is not None:
            # Demoted to a replica mid-run: every later change would be refused too.
            raise redis.exceptions.ReadOnlyError(refused)

    def _apply_reconciled(
        self, outcomes: list[JobOutcome], changes: list[JobChange]
    ) -> list[ChangeResult | None]:
        """Apply ``changes``; after a dropped connection, find out what happened.

        Each round applies what is still unknown. After a drop, the audit trail
        (written atomically with each change) tells which changes happened; the
        rest are applied again, safely, since every script re-checks first.
        After a few rounds, or when Redis stays away, the unknown ones are
        reported as errors for the next run to complete.
        """
        results: list[ChangeResult | None] = [None] * len(changes)
        self._slow_once = False  # whether a batch got no answer once yet Redis answered after
        for attempt in range(RECONCILE_ROUNDS):
            try:
                if attempt:
                    self._settle_from_audit(changes, results)
                todo = [i for i, r in enumerate(results) if r is None]
                now = server_time(self.conn)
                applied = self.actor.apply_jobs(
                    [changes[i] for i in todo], now, between_batches=self.renew_locks
                )
                for i, result in zip(todo, applied, strict=True):
                    results[i] = result
            except CONNECTION_LOST as exc:
                log.warning("connection_lost during=reconcile error=%s", exc)
                unanswered(exc)
            if all(r is not None for r in results) or not self._reconnect():
                break
        else:
            # The rounds ran out with Redis back: what the trail shows done is done.
            try:
                self._settle_from_audit(changes, results)
            except CONNECTION_LOST as exc:
                log.warning("connection_lost during=reconcile error=%s", exc)
        if any(r is None for r in results):
            self.run.redis_lost = True
            for outcome, result in zip(outcomes, results, strict=True):
                if result is None:
                    why = "not known to be done: lost the connection to Redis; rerun to finish"
                    _set(outcome, ERROR, why)
        return results

    def _settle_from_audit(
        self, changes: list[JobChange], results: list[ChangeResult | None]
    ) -> None:
        """Mark as done the unknown changes the audit trail shows this run made.

        An entry is matched by its job, queue, state and action, as the change
        would have written it, and counts once: one job may have two changes in a
        run (a left-over entry removed, and its abandoned run failed)."""
        recorded = Counter(
            _audit_key(entry)
            for entry in audit.history(self.conn, run_id=self.run.run_id, limit=None)
            if entry.get("outcome") == DONE
        )
        known = [i for i, r in enumerate(results) if r is not None and r.done]
        unknown = [i for i, r in enumerate(results) if r is None]
        for i in known + unknown:  # the entries of changes known done are not another's
            key = _audit_key(dict(changes[i].audit))
            if recorded[key] > 0:
                recorded[key] -= 1
                if results[i] is None:
                    results[i] = ChangeResult(
                        True, "done (confirmed after reconnecting)", from_audit=True
                    )

    def _failed_with_dependents(self, change: JobChange) -> bool:
        """Whether a job a fail is known to have changed (its reply was lost) is
        now failed, not retried, with a set of dependents to release."""
        pipe = self.conn.pipeline(transaction=False)
        pipe.hget(self.keys.job(change.job_id), "status")
        pipe.scard(self.keys.dependents(change.job_id))
        try:
            status, dependents = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:  # the change itself is done; say what is not
            log.warning("job=%s dependents_not_enqueued error=%s", change.job_id, exc)
            return False
        return text(status) == "failed" and isinstance(dependents, int) and dependents > 0

    def _reconnect(self) -> bool:
        """Whether Redis answers again after the connection dropped. A server that
        gave no answer within --timeout gets one ping, not several (each would wait
        as long): one that answers it was slow, not gone."""
        if gave_no_answer():
            if self._slow_once:
                return False  # it answers pings but not changes (writes paused): given up
            try:
                self.conn.ping()
            except CONNECTION_LOST:
                return False
            forget_no_answer()  # it was slow, not hung
            self._slow_once = True
            log.warning("Redis answers again; reconciling the interrupted batch")
            return True
        for wait_s in RECONNECT_BACKOFF_S:
            time.sleep(wait_s)
            try:
                self.conn.ping()
            except CONNECTION_LOST as exc:
                if unanswered(exc):
                    return False
                continue
            log.warning("reconnected to Redis; reconciling the interrupted batch")
            return True
        return False

    def _job_change(self, outcome: JobOutcome) -> JobChange:
        entry = outcome.entry
        job = entry.job or {}
        retries = parse_int(job.get("retries_left"))
        reason = failure_reason(self.run, outcome)
        return JobChange(
            action=outcome.action,
            queue=job.get("origin") or entry.queue,
            job_id=entry.job_id,
            member=entry.member,
            execution_id=entry.execution_id,
            source=(
                self.keys.intermediate(entry.queue)
                if entry.stranded
                else self.keys.started(entry.queue)
            ),
            expect=dict(job),
            expect_execution_heartbeat=(entry.execution or {}).get("last_heartbeat", ""),
            reason=reason,
            worker=entry.worker_name,
            failure_ttl_s=_failure_ttl(job),
            retry_interval_s=retry_interval(job, retries) if outcome.action == "fail" else None,
            retry_at_front=job.get("enqueue_at_front_on_retry") == "1",
            audit=self._audit_fields(outcome, outcome.action, outcome.reason),
            related_keys=outcome.rule.related_keys_of(entry.job_id, self.keys.prefix),
            lost=entry.lost,
            worker_birth=outcome.verdict.signals.worker_birth,
            job_heartbeat_checked=not runs_elsewhere(entry, outcome.verdict),
        )

    def _audit_fields(
        self, outcome: JobOutcome, action: str, reason: str
    ) -> tuple[tuple[str, str], ...]:
        return audit.entry_fields(
            self.context,
            format_timestamp(time.time()),
            outcome.entry.job_id,
            outcome.entry.queue,
            outcome.verdict.state.value,
            action,
            reason,
        )

    # Overdue jobs ----------------------------------------------------------------------------

    def _stop_jobs(self, outcomes: list[JobOutcome]) -> list[JobOutcome]:
        """Ask each live worker to stop its overdue job and wait; the stopped jobs
        whose policy action follows the stop (see :meth:`_follow_up`)."""
        waiting = []
        unsent = stops_that_may_stray(self.conn, self.keys, outcomes)
        # The moment before which a lease ended counts as no longer renewed.
        lapsed = server_time(self.conn) - LEASE_GRACE_S if outcomes else 0.0
        undoable = self._follow_ups_that_would_fail(outcomes)
        for outcome, why in zip(outcomes, unsent, strict=True):
            entry = outcome.entry
            if why is None and id(outcome) in undoable:
                # Stopped, the job would be left failed, not what the policy says.
                action = outcome.verdict.follow_up or "fail"
                why = f"its follow-up ({action}) could not be done: {undoable[id(outcome)]}"
            if why is not None:
                outcome.stop_confirmed = False
                _set(outcome, ERROR, f"not stopped: {why}", append=True)
                continue
            started_at = (entry.job or {}).get("started_at") or ""
            sent = self.actor.send_stop(
                entry.worker_name, entry.job_id, entry.queue, entry.member, started_at, lapsed
            )
            if sent.not_sent is not None:
                # It ended, or began again, since it was read (a plan's reads may be
                # minutes old): this run of it is not there to stop.
                outcome.stop_confirmed = False
                _set(outcome, SKIPPED, f"not stopped: {sent.not_sent}", append=True)
            elif sent.receivers == 0:
                outcome.stop_confirmed = False
                why = f"{entry.worker_name} did not receive the stop command"
                _set(outcome, ERROR, why, append=True)
            else:
                waiting.append(outcome)
        try:
            statuses = self._wait_until_ended(waiting)
        except CONNECTION_LOST:
            for outcome in waiting:
                outcome.stop_confirmed = False
                why = "stop sent, but not confirmed: lost the connection to Redis"
                _set(outcome, ERROR, why, append=True)
            raise
        asked_to_stop = self._asked_to_stop()
        follow_ups = []
        for outcome in waiting:
            status = statuses.get(outcome.entry.job_id, "started")
            worker = outcome.entry.worker_name
            if status == "started" and asked_to_stop:
                outcome.stop_confirmed = False
                self.run.stops_not_waited_for = True
                why = (
                    "stop sent, but not waited for: opsctl was asked to stop (a worker that "
                    "stops the job later leaves it stopped in FailedJobRegistry, where no "
                    "later run takes the policy's action on it)"
                )
                _set(outcome, SKIPPED, why, append=True)
                continue
            if status == "started":
                outcome.stop_confirmed = False
                why = (
                    f"{worker} did not stop it within {self.stop_timeout_s:g}s: a worker "
                    "frozen or starved of CPU reads the stop late (RQ then files the job as "
                    "stopped in FailedJobRegistry, kept for its failure_ttl, and no later "
                    "run takes the policy's action on it), and one whose process was killed "
                    "alone never does (its work horse runs on)"
                )
                _set(outcome, ERROR, why, append=True)
                continue
            if status != "stopped":
                # It ended on its own while opsctl waited (a worker that cannot
                # stop a job, such as RQ's SimpleWorker, lets it run to its end).
                outcome.stop_confirmed = False
                why = f"not stopped by {worker}: it ended meanwhile ({_now_is(status)})"
                _set(outcome, SKIPPED, why, append=True)
                continue
            outcome.stop_confirmed = True
            outcome.reason += f"; stopped by {worker} (status now {status})"
            if outcome.verdict.follow_up not in (None, "fail"):
                follow_ups.append(outcome)
            else:
                outcome.outcome = DONE
                _log_outcome(outcome)
        # No stop request is heeded before the follow-ups: a job stopped is no longer
        # started, so no later run would make them (the next change's check heeds it).
        return follow_ups

    def _statuses(self, job_ids: list[str]) -> dict[str, str]:
        """Each job's status now ("missing" when its hash is gone or holds none)."""
        pipe = self.conn.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "status")
        return {
            job_id: text(status) if status else "missing"
            for job_id, status in zip(job_ids, pipe.execute(), strict=True)
        }

    def _wait_until_ended(self, outcomes: list[JobOutcome]) -> dict[str, str]:
        statuses: dict[str, str] = {}
        deadline = time.monotonic() + self.stop_timeout_s
        pending = [o.entry.job_id for o in outcomes]
        while pending:
            statuses.update(self._statuses(pending))
            pending = [j for j in pending if statuses[j] == "started"]
            if not pending or time.monotonic() >= deadline:
                break
            if self._asked_to_stop():
                break  # asked to stop: what has not ended is reported as not waited for
            time.sleep(STOP_POLL_S)
            self.renew_locks()
        return statuses

    def _follow_ups_that_would_fail(self, outcomes: list[JobOutcome]) -> dict[int, str]:
        """Why the follow-up of each stop (by ``id`` of its outcome) could not be done,
        for those that could not: checked before the stop is sent, by the script that
        will apply it (the user's rights, the types of the keys it writes, opsctl's count
        of requeues), so that no job is stopped whose follow-up would then fail. A stop
        whose action is ``fail`` is checked as opsctl's own fail: RQ's worker files the
        stopped job in the same failed registry, and a key of another type there would
        leave the job in no registry at all."""
        following = [o for o in outcomes if o.action == ACTION_STOP]
        if not following:
            return {}
        changes = [self._follow_up_change(o, o.verdict.follow_up or "fail", {}) for o in following]
        results = self.actor.apply_jobs(changes, self.run.now, check_only=True)
        if any(result is None for result in results):
            raise redis.exceptions.ConnectionError("lost the connection to Redis")
        return {
            id(o): result.detail
            for o, result in zip(following, results, strict=True)
            if result is not None and not result.done
        }

    def _follow_up_change(self, o: JobOutcome, action: str, expect: dict[str, str]) -> JobChange:
        """The change that applies ``action`` to a job stopped by this run."""
        # The queue written to is the origin read before the stop: the change
        # goes ahead only while the job's origin is still that one.
        expect["origin"] = (o.entry.job or {}).get("origin", "")
        origin = expect["origin"] or o.entry.queue
        return JobChange(
            action=action,
            queue=origin,
            job_id=o.entry.job_id,
            member=o.entry.job_id.encode("utf-8", "surrogateescape"),
            execution_id=None,
            source=self.keys.failed(origin),
            expect=expect,
            expect_execution_heartbeat="",
            worker=o.entry.worker_name,
            audit=self._audit_fields(o, action, o.reason),
            related_keys=o.rule.related_keys_of(o.entry.job_id, self.keys.prefix),
        )

    def _follow_up(self, outcomes: list[JobOutcome]) -> None:
        """Apply the policy's action to stopped jobs (RQ files them as failed)."""
        for o in outcomes:
            o.action = o.verdict.follow_up or "fail"
        pipe = self.conn.pipeline(transaction=False)
        for o in outcomes:
            pipe.hmget(self.keys.job(o.entry.job_id), *_FOLLOW_UP_FIELDS)
        changes, stopped = [], []
        for o, fields in zip(outcomes, pipe.execute(), strict=True):
            names = _FOLLOW_UP_FIELDS
            expect = {k: text(v) for k, v in zip(names, fields, strict=True) if v is not None}
            if expect.get("status") != "stopped":
                # Enqueued again since it was stopped (under the same id, by a
                # scheduler, say), and perhaps taken by a worker: not the job stopped.
                now = _now_is(expect.get("status") or "missing")
                why = f"{o.action} not done: it changed since it was stopped ({now})"
                _set(o, SKIPPED, why, append=True)
                continue
            stopped.append(o)
            changes.append(self._follow_up_change(o, o.action, expect))
        for o, result in zip(stopped, self._apply_reconciled(stopped, changes), strict=True):
            if result is not None:
                # The stop stays in the reason, whatever became of the follow-up.
                _record(o, result, append=True)

    # Workers and the audit trail -------------------------------------------------------------

    def _note_refused(self, refusal: str) -> None:
        """Note the first command the Redis user was refused (an ACL): the run goes
        on with what it may do, and exits as refused."""
        if self.run.refused is None:
            self.run.refused = refusal

    def _deregister(self, worker: WorkerOutcome) -> None:
        result = self.actor.deregister_worker(worker.worker, self.run.now)
        if result.refused:
            self._note_refused(result.refused)
        if result.done:
            worker.outcome = DONE
        elif result.error:
            worker.outcome, worker.reason = ERROR, result.detail
        else:
            worker.outcome, worker.reason = SKIPPED, result.detail
        log.info(
            "worker=%s action=remove-registration outcome=%s",
            worker.worker.name,
            worker.outcome,
            extra={
                "worker": worker.worker.name,
                "action": "remove-registration",
                "outcome": worker.outcome,
            },
        )

    def _audit_the_rest(self) -> None:
        """Audit what the change scripts did not: stops, skips, errors, workers."""
        entries = []
        for job in self.run.jobs:
            stopped = job.stop_confirmed is not None and job.outcome == DONE
            if job.outcome in (SKIPPED, ERROR) or (stopped and job.action == ACTION_STOP):
                fields = self._audit_fields(job, job.action, job.reason)
                entries.append((fields, job.outcome, ""))
        for w in self.run.workers:
            if w.outcome in (DONE, SKIPPED, ERROR):
                fields = audit.entry_fields(
                    self.context,
                    format_timestamp(time.time()),
                    "",
                    "",
                    "dead-worker",
                    w.action,
                    f"{w.worker.name}: {w.reason}",
                )
                entries.append((fields, w.outcome, ""))
        try:
            audit.append(self.conn, entries)
        except redis.ResponseError as exc:
            # The actions themselves are recorded (or refused) atomically; losing
            # these extra entries must not hide the report of what was done.
            log.error("audit_not_written error=%s", exc)
            self.run.problems.append(f"audit trail: skipped and failed attempts not written: {exc}")

    def _give_up(self, why: str) -> None:
        """The run cannot go on: report every planned action as not done."""
        for job in self.run.jobs:
            if job.outcome == PLANNED and not job.rule.dry_run:
                _set(job, ERROR, why)
        for worker in self.run.workers:
            if worker.outcome == PLANNED and not worker.dry_run:
                worker.outcome, worker.reason = ERROR, why


def recheck_plan(conn: redis.Redis, keys: Keys, run: Run) -> None:
    """Read again what a plan's actions rest on; a plan may be old, or edited.

    A worker that is live now is not removed, and a job it is executing now is
    not acted on (a stop, which asks the worker itself, still is). A planned stop
    goes ahead only if the job, its start read again, is overdue by its rule now.
    """
    _hold_back_live_workers(conn, keys, run)
    _hold_back_stops_not_due(conn, keys, run)
    _hold_back_out_of_place_within_grace(conn, keys, run)


def _hold_back_live_workers(conn: redis.Redis, keys: Keys, run: Run) -> None:
    names = {w.worker.name for w in run.workers}
    names |= {name for j in run.jobs for name in (j.entry.worker_name, j.verdict.signals.worker)}
    names.discard("")
    # A worker that took one of the jobs again since the plan was made.
    queues = [q.name for q in run.queues]
    fresh, _ = read_registered_workers(conn, keys, queues, also=names)
    for w in run.workers:
        now_read = fresh.get(w.worker.name)
        live = worker_liveness(now_read)
        if w.outcome == PLANNED and not w.dry_run and live.alive:
            w.outcome, w.reason = SKIPPED, f"not removed: the worker is live now ({live.evidence})"
            w.alive = True
        elif now_read is not None:
            # The removal re-checks the listeners of its channel against this count
            # (those of the server's other databases); a plan does not record it.
            w.worker = replace(w.worker, heard_on_server=now_read.heard_on_server)
    in_hand = jobs_in_hand(fresh)
    for job in run.jobs:
        signals = job.verdict.signals
        if (shown := fresh.get(signals.worker)) is not None:
            # The report shows the worker it names as it is now, not as the plan
            # saw it (the worker that runs the job, which the records may not name).
            live = worker_liveness(shown)
            signals.worker_alive, signals.worker_evidence = live.alive, live.evidence
        if job.outcome != PLANNED or job.action == ACTION_STOP:
            continue
        name = job.entry.worker_name
        holds, holder = holding(job.entry, fresh, in_hand)
        if holds:
            _set(job, SKIPPED, f"not acted on: {name} is live now and executing it")
        elif holder is not None and job.action != ACTION_REMOVE_ENTRY:
            _set(job, SKIPPED, f"not acted on: {holder} is live now and executing this job")


def _hold_back_stops_not_due(conn: redis.Redis, keys: Keys, run: Run) -> None:
    stops = [j for j in run.jobs if j.outcome == PLANNED and j.action == ACTION_STOP]
    if not stops:
        return
    pipe = conn.pipeline(transaction=False)
    for job in stops:
        entry = job.entry
        pipe.hget(keys.job(entry.job_id), "started_at")
        pipe.hget(keys.execution(entry.job_id, entry.execution_id or "-"), "created_at")
    # A key of another type answers with an error: no start read, so no stop.
    replies = [r if isinstance(r, bytes) else None for r in pipe.execute(raise_on_error=False)]
    now = server_time(conn)
    for i, job in enumerate(stops):
        if job.rule.force:
            continue
        started_at, created_at = replies[2 * i : 2 * i + 2]
        started = started_moment({"started_at": text(started_at)}, {"created_at": text(created_at)})
        if started is None:
            _set(job, SKIPPED, "not stopped: its start cannot be read now, so its age is unknown")
        elif now - started <= job.rule.max_age_seconds:
            _set(
                job,
                SKIPPED,
                f"not stopped: running for {now - started:.0f}s now, within max_age "
                f"{job.rule.max_age_seconds}s",
            )


def _hold_back_out_of_place_within_grace(conn: redis.Redis, keys: Keys, run: Run) -> None:
    """Act on a queued job found lost or stranded only if, read again, it has been out
    of place for longer than lost_after: a plan's own moments may be old, or edited."""
    planned = [
        j
        for j in run.jobs
        if j.outcome == PLANNED
        and (j.entry.lost or j.entry.stranded)
        and (j.entry.job or {}).get("status") == "queued"
    ]
    if not planned:
        return
    pipe = conn.pipeline(transaction=False)
    for j in planned:
        pipe.hget(keys.job(j.entry.job_id), "enqueued_at")
        pipe.get(keys.intermediate_first_seen(j.entry.queue, j.entry.job_id))
    replies = [r if isinstance(r, bytes) else None for r in pipe.execute(raise_on_error=False)]
    # A note fits the job as it is now, not as the plan recorded it.
    as_now = {
        j.entry.job_id: {"status": "queued", "enqueued_at": text(replies[2 * i])}
        for i, j in enumerate(planned)
    }
    noted = lost_notes(conn, keys, as_now, run.problems)
    now = server_time(conn)
    for i, j in enumerate(planned):
        job = {**as_now[j.entry.job_id]}
        if mark := replies[2 * i + 1]:
            job["first_seen"] = text(mark)
        again = replace(j.entry, job=job, first_lost=noted.get(j.entry.job_id))
        since = out_of_place_since(again)
        if since is None or now - since <= j.rule.lost_after_seconds:
            _set(
                j,
                SKIPPED,
                "not acted on: not known now to be out of place for longer than lost_after "
                f"{j.rule.lost_after_seconds}s",
            )


def failure_reason(run: Run, outcome: JobOutcome) -> str:
    """The failure text RQ will show for a job opsctl failed."""
    s = outcome.verdict.signals
    state = outcome.verdict.state.value
    parts = [f"Failed by opsctl (run {run.run_id}): {state}: {outcome.reason}"]
    if s.age_s is not None:
        parts.append(f"started {s.age_s:.0f}s ago")
    if s.heartbeat_age_s is not None:
        parts.append(f"last heartbeat {s.heartbeat_age_s:.0f}s ago")
    if s.worker:
        parts.append(f"worker {s.worker} ({'live' if s.worker_alive else 'dead'})")
    if s.timeout_s is not None:
        parts.append(f"timeout {s.timeout_s}s")
    return "; ".join(parts)


#: The fields a stopped job's follow-up expects to find as they are now.
_FOLLOW_UP_FIELDS = ("status", "last_heartbeat", "retries_left")


def _now_is(status: str) -> str:
    """A job's status now, in words."""
    return "the job is gone" if status == "missing" else f"its status is now {quoted(status)}"


def _failure_ttl(job: Mapping[str, str]) -> int:
    ttl = parse_int(job.get("failure_ttl"))
    if ttl is None:
        return DEFAULT_FAILURE_TTL_S
    # Redis refuses expiries past its clock's range; such a TTL means "keep it".
    return -1 if ttl > MAX_TTL_S else ttl


def _holder(lock: Lock) -> str:
    """Who holds a queue's maintenance lock, in words: an opsctl run names itself in
    it; RQ writes only "1"."""
    holder = lock.holder()
    return f"by {holder}" if holder.startswith("opsctl ") else f"by RQ, value {quoted(holder)}"


def _set(outcome: JobOutcome, result: str, why: str, append: bool = False) -> None:
    outcome.outcome = result
    outcome.reason = f"{outcome.reason}; {why}" if append else why
    _log_outcome(outcome)


def _record(outcome: JobOutcome, result: ChangeResult, append: bool = False) -> None:
    """Settle ``outcome`` from its change's result; with ``append``, an error or a
    skip is added to the reason rather than put in its place."""
    if result.done:
        outcome.outcome = DONE
        if result.detail not in _PLAIN_DETAILS:
            outcome.reason = f"{outcome.reason}; {result.detail}"
        if result.rescues:
            so_far = result.rescues + outcome.requeued_before
            outcome.reason += f"; requeued by opsctl {so_far} time(s) so far"
        _log_outcome(outcome)
    elif result.error:
        _set(outcome, ERROR, result.detail, append)
    else:
        _set(outcome, SKIPPED, f"changed since it was read: {result.detail}", append)


def _log_outcome(outcome: JobOutcome) -> None:
    """The one log line (-v) of a job whose outcome is settled."""
    log.info(
        "queue=%s job=%s state=%s action=%s outcome=%s",
        outcome.entry.queue,
        outcome.entry.job_id,
        outcome.verdict.state.value,
        outcome.action,
        outcome.outcome,
        extra={
            "queue": outcome.entry.queue,
            "job_id": outcome.entry.job_id,
            "state": outcome.verdict.state.value,
            "action": outcome.action,
            "outcome": outcome.outcome,
        },
    )


def _enqueue_dependents(conn: redis.Redis, keys: Keys, outcome: JobOutcome) -> None:
    """Enqueue the dependents a failure releases, as the job's own RQ release does.

    For an RQ 3 job opsctl calls RQ's own code, where RQ 3's dependency rules
    and its ready registry live; that code loads the job records involved the
    way RQ does, including their ``meta``. RQ 1 and 2 never drain that ready
    registry, so for their jobs opsctl writes the one-step release those
    releases make (see :mod:`opsctl.compat`).
    """
    if compat.owner_major(conn, keys, outcome.entry) < 3:
        # RQ 1 and 2 never drain RQ 3's ready registry: write what they expect.
        try:
            compat.release_dependents(conn, keys, outcome.entry.job_id, server_time(conn))
        except CONNECTION_LOST:
            raise  # the caller stops releasing, and says so
        except redis.RedisError as exc:
            log.warning("job=%s dependents_not_enqueued error=%s", outcome.entry.job_id, exc)
            outcome.reason += f"; dependents not enqueued: {exc}"
        return
    try:
        from rq.job import Job
        from rq.queue import Queue

        # RQ takes its key prefix from RQ_KEY_PREFIX once, when first imported.
        rq_prefix = Job.redis_job_namespace_prefix.removesuffix(":job:")
        if rq_prefix != keys.prefix:
            source = (
                "from RQ_KEY_PREFIX" if "RQ_KEY_PREFIX" in os.environ else "RQ_KEY_PREFIX unset"
            )
            why = (
                f"RQ's key prefix here is {rq_prefix!r} ({source}), "
                f"the policy's key_prefix {keys.prefix!r}"
            )
            log.warning("job=%s dependents_left_deferred: %s", outcome.entry.job_id, why)
            outcome.reason += f"; dependents left deferred: {why}"
            return
        job = Job.fetch(outcome.entry.job_id, connection=conn)
        Queue(job.origin, connection=conn).enqueue_dependents(job)
    except CONNECTION_LOST:
        raise  # the caller stops releasing, and says so
    except Exception as exc:  # RQ raises many kinds; the failure itself is done
        log.warning("job=%s dependents_not_enqueued error=%s", outcome.entry.job_id, exc)
        outcome.reason += f"; dependents not enqueued: {exc}"


def _audit_key(entry: Mapping[str, str]) -> tuple[str | None, ...]:
    """What tells one change's audit entry from another's within a run."""
    return tuple(entry.get(name) for name in ("job", "queue", "state", "action"))


__all__ = ["Executor", "failure_reason", "recheck_plan"]
