"""One run of a policy: read, decide, act, and record every outcome for the report."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import redis

from opsctl import engine
from opsctl.actions import Actor, ChangeResult, JobChange
from opsctl.engine import ACTION_NONE, ACTION_STOP, Verdict
from opsctl.keys import DEFAULT_FAILURE_TTL_S, Keys
from opsctl.model import StartedEntry, WorkerRecord, parse_int
from opsctl.policy import Policy, Rule
from opsctl.state import Snapshot, known_queues, read_snapshot, server_time

log = logging.getLogger(__name__)

#: Outcomes a report can show.
PLANNED, DONE, KEPT, SKIPPED, ERROR = "planned", "done", "kept", "skipped", "error"

#: Seconds between polls while waiting for workers to stop jobs.
STOP_POLL_S = 0.2


@dataclass
class Overrides:
    """Command-line settings that override the policy for one run."""

    dry_run: bool | None = None
    force: bool | None = None
    max_age_seconds: int | None = None
    queues: tuple[str, ...] = ()
    stop_timeout_s: float = 15.0


@dataclass
class JobOutcome:
    """One started entry: its verdict and what became of it."""

    entry: StartedEntry
    verdict: Verdict
    rule: Rule
    action: str
    outcome: str
    reason: str
    stop_confirmed: bool | None = None

    @property
    def acts(self) -> bool:
        return self.action != ACTION_NONE


@dataclass
class WorkerOutcome:
    """A dead worker that is still registered, and what became of its registration."""

    worker: WorkerRecord
    evidence: str
    outcome: str
    reason: str
    action: str = "remove-registration"


@dataclass
class QueuePlan:
    """A queue the policy names, with the rule that applies to it."""

    name: str
    rule: Rule
    inspected: int = 0


@dataclass
class Run:
    """Everything a report shows about one run."""

    run_id: str
    dry_run: bool
    now: float
    queues: list[QueuePlan]
    jobs: list[JobOutcome] = field(default_factory=list)
    workers: list[WorkerOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Whether any action failed (the CLI then exits 1)."""
        return any(j.outcome == ERROR for j in self.jobs) or any(
            w.outcome == ERROR for w in self.workers
        )


def effective_rule(rule: Rule, overrides: Overrides) -> Rule:
    """``rule`` with this run's command-line overrides applied."""
    changes: dict[str, object] = {}
    if overrides.force is not None:
        changes["force"] = overrides.force
    if overrides.max_age_seconds is not None:
        changes["max_age_seconds"] = overrides.max_age_seconds
    if overrides.dry_run is not None:
        changes["dry_run"] = overrides.dry_run
    return replace(rule, **changes)  # type: ignore[arg-type]


def select_queues(
    conn: redis.Redis, keys: Keys, policy: Policy, overrides: Overrides
) -> tuple[list[QueuePlan], list[str]]:
    """Queues to inspect (matched, enabled, and named by --queue if given), and
    the --queue names the policy does not match."""
    names = known_queues(conn, keys)
    wanted = set(overrides.queues)
    if wanted:
        names = sorted(wanted)
    plans, unmatched = [], []
    for name in names:
        rule = policy.rule_for(name)
        if rule is None:
            if name in wanted:
                unmatched.append(name)
            continue
        if rule.enabled:
            plans.append(QueuePlan(name, effective_rule(rule, overrides)))
    return plans, unmatched


def plan(
    conn: redis.Redis,
    keys: Keys,
    policy: Policy,
    overrides: Overrides,
    on_progress: Callable[[int], None] | None = None,
) -> Run:
    """Read Redis and decide every entry's state and action; changes nothing."""
    queues, unmatched = select_queues(conn, keys, policy, overrides)
    snapshot = read_snapshot(conn, keys, [q.name for q in queues], on_progress)
    rules = {q.name: q.rule for q in queues}
    dry_run = bool(overrides.dry_run) if overrides.dry_run is not None else policy.defaults.dry_run
    run = Run(
        run_id=uuid.uuid4().hex[:12],
        dry_run=dry_run,
        now=snapshot.now,
        queues=queues,
        problems=list(snapshot.problems),
        unmatched=unmatched,
    )
    for entry in snapshot.entries:
        rule = rules[entry.queue]
        verdict = engine.classify(entry, snapshot.workers, rule, snapshot.now)
        run.jobs.append(_initial_outcome(entry, verdict, rule, dry_run))
    for queue in queues:
        queue.inspected = sum(1 for j in run.jobs if j.entry.queue == queue.name)
    run.workers = _dead_registrations(snapshot, keys, rules)
    return run


def _initial_outcome(
    entry: StartedEntry, verdict: Verdict, rule: Rule, dry_run: bool
) -> JobOutcome:
    # Planned outcomes become done, skipped or error once acted on; in a dry
    # run (or a queue whose rule says dry_run) they stay planned.
    outcome = KEPT if verdict.action == ACTION_NONE else PLANNED
    return JobOutcome(entry, verdict, rule, verdict.action, outcome, verdict.reason)


def _dead_registrations(
    snapshot: Snapshot, keys: Keys, rules: dict[str, Rule]
) -> list[WorkerOutcome]:
    """Dead workers still listed in a registration set that concerns a target queue."""
    targets = {keys.queue_workers(q) for q in rules}
    found = []
    for worker in sorted(snapshot.workers.values(), key=lambda w: w.name):
        if not worker.registered_in:
            continue
        liveness = engine.worker_liveness(worker)
        if liveness.alive or not _concerns_targets(worker, keys, rules, targets):
            continue
        found.append(WorkerOutcome(worker, liveness.evidence, PLANNED, liveness.evidence))
    return found


def _concerns_targets(
    worker: WorkerRecord, keys: Keys, rules: dict[str, Rule], targets: set[str]
) -> bool:
    if worker.registered_in & targets:
        return True
    if keys.workers not in worker.registered_in:
        return False
    # Listed globally only: act when its queues are ours, or nothing is left
    # of it to say which queues it served.
    return not worker.exists or any(q in rules for q in worker.queues)


def execute(conn: redis.Redis, keys: Keys, run: Run, stop_timeout_s: float) -> None:
    """Carry out every planned action of ``run`` and record the outcomes."""
    actor = Actor(conn, keys)
    live = [j for j in run.jobs if j.outcome == PLANNED and not j.rule.dry_run]
    stops = [j for j in live if j.action == ACTION_STOP]
    changes = [j for j in live if j.action != ACTION_STOP]

    _stop_jobs(conn, actor, keys, run, stops, stop_timeout_s)
    _change_jobs(conn, actor, run, changes)
    for worker in run.workers:
        _deregister(actor, run, worker)


def _now(conn: redis.Redis) -> float:
    return server_time(conn)


def _change_jobs(conn: redis.Redis, actor: Actor, run: Run, outcomes: list[JobOutcome]) -> None:
    if not outcomes:
        return
    pending = [(o, _job_change(actor.keys, o, run)) for o in outcomes]
    results = actor.apply_jobs([c for _, c in pending], _now(conn))
    for (outcome, change), result in zip(pending, results, strict=True):
        _record(outcome, result)
        if result.done and result.dependents and change.action == "fail":
            _enqueue_dependents(conn, actor.keys, outcome)


def _job_change(keys: Keys, outcome: JobOutcome, run: Run) -> JobChange:
    entry, verdict = outcome.entry, outcome.verdict
    job = entry.job or {}
    origin = job.get("origin") or entry.queue
    retries = parse_int(job.get("retries_left"))
    interval = _retry_interval(job, retries) if outcome.action == "fail" else None
    return JobChange(
        action=outcome.action,
        queue=origin,
        job_id=entry.job_id,
        member=entry.member,
        execution_id=entry.execution_id,
        source=keys.started(entry.queue),
        expect=job,
        expect_execution_heartbeat=(entry.execution or {}).get("last_heartbeat", ""),
        reason=failure_reason(run, verdict),
        worker=entry.worker_name,
        failure_ttl_s=_failure_ttl(job),
        retry_interval_s=interval,
        retry_at_front=job.get("enqueue_at_front_on_retry") == "1",
    )


def failure_reason(run: Run, verdict: Verdict) -> str:
    """The failure text RQ will show for a job opsctl failed."""
    s = verdict.signals
    parts = [f"Failed by opsctl (run {run.run_id}): {verdict.state.value}: {verdict.reason}"]
    if s.age_s is not None:
        parts.append(f"started {s.age_s:.0f}s ago")
    if s.heartbeat_age_s is not None:
        parts.append(f"last heartbeat {s.heartbeat_age_s:.0f}s ago")
    if s.worker:
        alive = "live" if s.worker_alive else "dead"
        parts.append(f"worker {s.worker} ({alive})")
    if s.timeout_s is not None:
        parts.append(f"timeout {s.timeout_s}s")
    return "; ".join(parts)


def _retry_interval(job: dict[str, str], retries_left: int | None) -> int | None:
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
    return int(value) if isinstance(value, (int, float)) else 0


def _failure_ttl(job: dict[str, str]) -> int:
    ttl = parse_int(job.get("failure_ttl"))
    return DEFAULT_FAILURE_TTL_S if ttl is None else ttl


def _record(outcome: JobOutcome, result: ChangeResult) -> None:
    if result.done:
        outcome.outcome = DONE
        if result.detail not in {"removed", "failed", "queued", "canceled", "deleted"}:
            outcome.reason = f"{outcome.reason}; {result.detail}"
    elif result.error:
        outcome.outcome = ERROR
        outcome.reason = result.detail
    else:
        outcome.outcome = SKIPPED
        outcome.reason = f"changed since it was read: {result.detail}"
    log.info(
        "queue=%s job=%s state=%s action=%s outcome=%s",
        outcome.entry.queue,
        outcome.entry.job_id,
        outcome.verdict.state.value,
        outcome.action,
        outcome.outcome,
    )


def _enqueue_dependents(conn: redis.Redis, keys: Keys, outcome: JobOutcome) -> None:
    """Let RQ enqueue the dependents a failure releases, as RQ does after a failure.

    RQ's dependency rules (allow_dependency_failures, several parents) live in
    its own code; opsctl calls it rather than re-implementing them. That code
    reads the dependent job records the way RQ does.
    """
    if keys.prefix != "rq":
        outcome.reason += "; dependents left deferred (custom key prefix)"
        return
    from rq.job import Job
    from rq.queue import Queue

    try:
        job = Job.fetch(outcome.entry.job_id, connection=conn)
        Queue(job.origin, connection=conn).enqueue_dependents(job)
    except Exception as exc:  # RQ raises many kinds; the failure itself is done
        log.warning("job=%s dependents_not_enqueued error=%s", outcome.entry.job_id, exc)
        outcome.reason += f"; dependents not enqueued: {exc}"


def _stop_jobs(
    conn: redis.Redis,
    actor: Actor,
    keys: Keys,
    run: Run,
    outcomes: list[JobOutcome],
    timeout_s: float,
) -> None:
    """Ask each live worker to stop its overdue job, wait, then apply the follow-up."""
    waiting = []
    for outcome in outcomes:
        worker, job_id = outcome.entry.worker_name, outcome.entry.job_id
        if actor.send_stop(worker, job_id) == 0:
            outcome.outcome, outcome.stop_confirmed = ERROR, False
            outcome.reason += f"; {worker} did not receive the stop command"
        else:
            waiting.append(outcome)
    statuses = _wait_until_ended(conn, keys, waiting, timeout_s)
    follow_ups = []
    for outcome in waiting:
        status = statuses.get(outcome.entry.job_id, "started")
        if status == "started":
            outcome.outcome, outcome.stop_confirmed = ERROR, False
            outcome.reason += f"; {outcome.entry.worker_name} did not stop it within {timeout_s:g}s"
            continue
        outcome.stop_confirmed = True
        outcome.reason += f"; stopped by {outcome.entry.worker_name} (status {status})"
        follow_up = outcome.verdict.follow_up
        if status != "stopped" or follow_up in (None, "fail"):
            outcome.outcome = DONE
        else:
            follow_ups.append(outcome)
    _follow_up(conn, actor, keys, run, follow_ups)


def _wait_until_ended(
    conn: redis.Redis, keys: Keys, outcomes: list[JobOutcome], timeout_s: float
) -> dict[str, str]:
    statuses: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    pending = [o.entry.job_id for o in outcomes]
    while pending:
        pipe = conn.pipeline(transaction=False)
        for job_id in pending:
            pipe.hget(keys.job(job_id), "status")
        for job_id, status in zip(pending, pipe.execute(), strict=True):
            statuses[job_id] = status.decode() if status else "missing"
        pending = [j for j in pending if statuses[j] == "started"]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(STOP_POLL_S)
    return statuses


def _follow_up(
    conn: redis.Redis, actor: Actor, keys: Keys, run: Run, outcomes: list[JobOutcome]
) -> None:
    """Apply the policy's action to jobs a worker has stopped (they sit in the failed registry)."""
    if not outcomes:
        return
    pipe = conn.pipeline(transaction=False)
    for o in outcomes:
        pipe.hmget(keys.job(o.entry.job_id), "status", "last_heartbeat", "retries_left")
    changes = []
    for o, (status, beat, retries) in zip(outcomes, pipe.execute(), strict=True):
        job = o.entry.job or {}
        origin = job.get("origin") or o.entry.queue
        expect = {
            k: v.decode()
            for k, v in (("status", status), ("last_heartbeat", beat), ("retries_left", retries))
            if v is not None
        }
        o.action = o.verdict.follow_up or "fail"
        changes.append(
            JobChange(
                action=o.action,
                queue=origin,
                job_id=o.entry.job_id,
                member=o.entry.job_id.encode(),
                execution_id=None,
                source=keys.failed(origin),
                expect=expect,
                expect_execution_heartbeat="",
                worker=o.entry.worker_name,
            )
        )
    for o, result in zip(outcomes, actor.apply_jobs(changes, _now(conn)), strict=True):
        _record(o, result)


def _deregister(actor: Actor, run: Run, worker: WorkerOutcome) -> None:
    result = actor.deregister_worker(worker.worker, run.now)
    if result.done:
        worker.outcome = DONE
    elif result.error:
        worker.outcome, worker.reason = ERROR, result.detail
    else:
        worker.outcome, worker.reason = SKIPPED, result.detail
    log.info("worker=%s action=remove-registration outcome=%s", worker.worker.name, worker.outcome)
