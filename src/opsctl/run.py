"""One run of a policy: read, decide, act, and record every outcome for the report."""

from __future__ import annotations

import functools
import gc
import logging
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import redis

from opsctl import engine
from opsctl.engine import ACTION_NONE, ACTION_REMOVE_ENTRY, ACTION_STOP, Verdict
from opsctl.errors import StoppedEarly
from opsctl.keys import Keys, legacy_rescue_key, nothing_under, rescue_key
from opsctl.keyspace import (
    Survey,
    find_lost,
    find_stranded,
    function_names,
    scheduler_references,
    survey,
)
from opsctl.model import StartedEntry, WorkerRecord, parse_int, retry_interval
from opsctl.policy import Limits, Policy, Rule
from opsctl.progress import SCANNING, WALKING, OnProgress
from opsctl.shown import printable, quoted
from opsctl.state import (
    ListedIds,
    Snapshot,
    channel_listeners,
    known_queues,
    may_be_read_again,
    read_clients,
    read_snapshot,
    read_workers,
    replies_of,
    server_notes,
    text,
    twin_client,
)

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
    max_actions: int | None = None  # replaces the run-wide max_actions cap
    #: Seconds for which a worker found without a connection is looked at again
    #: before it counts as dead (0: at once); see _confirm_disconnected.
    reconnect_grace_s: float = 10.0


@dataclass(slots=True)
class JobOutcome:
    """One started entry: its verdict and what became of it."""

    entry: StartedEntry
    verdict: Verdict
    rule: Rule
    action: str
    outcome: str
    reason: str
    stop_confirmed: bool | None = None
    function: str = ""  # the job's function, read without unpickling; "" when not read
    #: Requeues counted under the counter's name of before (see legacy_rescue_key).
    requeued_before: int = 0

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
    dry_run: bool = False
    #: Found live again since it was read (by ``apply --plan``): then not removed.
    alive: bool = False


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
    disabled: list[str] = field(default_factory=list)  # --queue names the policy disables
    limits_tripped: list[str] = field(default_factory=list)
    redis_lost: bool = False  # the connection dropped and could not be restored
    refused: str | None = None  # Redis refused a command mid-run (an ACL, say)
    server_version: str | None = None
    warnings: list[str] = field(default_factory=list)  # about the server's settings
    stopped: bool = False  # asked to stop, it left changes for a later run
    #: Asked to stop while waiting for workers to stop jobs: those stops were not waited for.
    stops_not_waited_for: bool = False
    #: Queues whose jobs were skipped: RQ's maintenance lock of the queue was held
    #: for longer than --lock-timeout.
    locked_out: list[str] = field(default_factory=list)
    #: Queues whose started registry could not be read (each is also a problem).
    unread: set[str] = field(default_factory=set)
    #: Whether the run carries out a plan file (its jobs are the plan's, not a read's).
    from_plan: bool = False

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
    # --dry-run holds the whole run back (Run.dry_run) and leaves each queue's
    # own setting visible, so caps count what a real run would act on;
    # --no-dry-run lifts every queue's dry_run.
    if overrides.dry_run is False:
        changes["dry_run"] = False
    return replace(rule, **changes)  # type: ignore[arg-type]


def _choose_queues(
    names: list[str], policy: Policy, overrides: Overrides
) -> tuple[list[QueuePlan], list[str]]:
    """Queues to inspect among ``names`` (matched, enabled, and named by --queue
    if given), and the --queue names the policy does not match."""
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


def new_run_id() -> str:
    """A short random id that names one run in reports and the audit trail."""
    return uuid.uuid4().hex[:12]


def plan(
    conn: redis.Redis,
    keys: Keys,
    policy: Policy,
    overrides: Overrides,
    on_progress: OnProgress | None = None,
    run_id: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Run:
    """Read Redis and decide every entry's state and action; changes nothing.

    ``should_stop`` is polled as the reads go on (at each page of the walk,
    each batch of entries and between the steps after them); once it holds,
    the reads end with :class:`StoppedEarly`. On a large keyspace they may
    take minutes, and nothing is lost by ending them.
    """
    checkpoint = _Checkpoint(should_stop)
    with collector_paused():
        return _plan(
            conn, keys, policy, overrides, checkpoint.around(on_progress), run_id, checkpoint
        )


class _Checkpoint:
    """Where a run's reads end when it is asked to stop."""

    def __init__(self, should_stop: Callable[[], bool] | None) -> None:
        self.should_stop = should_stop

    def __call__(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise StoppedEarly("asked to stop while reading Redis: nothing was done")

    def around(self, report: OnProgress | None) -> OnProgress | None:
        """``report``, passing this checkpoint first."""
        if self.should_stop is None:
            return report

        def progress(done: int, total: int | None, what: str = SCANNING) -> None:
            self()
            if report is not None:
                report(done, total, what)

        return progress


@contextmanager
def collector_paused(keep: bool = False) -> Iterator[None]:
    """Pause Python's cycle collector while records pile up.

    A large run builds hundreds of thousands of small records that never form
    cycles; the collector would walk all of them again and again for nothing.
    With ``keep``, what was built meanwhile is left out of the collector's
    walks from then on (:func:`gc.freeze`): for a process that keeps the
    records until it exits, so that its first collection afterwards does not
    walk them all once more. A process that runs again and again (``opsctl
    watch``) must not keep: cycles left over from each run would never be freed.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if keep:
                gc.freeze()
            gc.enable()


def _plan(
    conn: redis.Redis,
    keys: Keys,
    policy: Policy,
    overrides: Overrides,
    on_progress: OnProgress | None,
    run_id: str | None,
    checkpoint: _Checkpoint,
) -> Run:
    dry_run = bool(overrides.dry_run) if overrides.dry_run is not None else policy.defaults.dry_run
    decide = _Classifier(dry_run)
    queues, unmatched, snapshot, found = _read_state(
        conn, keys, policy, overrides, on_progress, decide
    )
    rules = decide.rules = {q.name: q.rule for q in queues}
    run = Run(
        run_id=run_id or new_run_id(),
        dry_run=dry_run,
        now=snapshot.now,
        queues=queues,
        problems=list(snapshot.problems),
        unread=snapshot.unread,
        unmatched=unmatched,
        disabled=[
            name
            for name in overrides.queues
            if (rule := policy.rule_for(name)) is not None and not rule.enabled
        ],
    )
    run.server_version, run.warnings = server_notes(conn)
    run.warnings += snapshot.warnings
    if found.scanned == 0 and found.refused is None:
        run.warnings.append(nothing_under(keys.prefix, "redis.key_prefix"))
    checkpoint()
    entries = snapshot.entries + _lost_entries(conn, keys, snapshot, run, found)
    del found  # its candidate lists are large and no longer needed
    checkpoint()
    _confirm_disconnected(
        conn, keys, snapshot, entries, decide, overrides.reconnect_grace_s, checkpoint
    )
    run.jobs = decide.outcomes(entries, snapshot.workers, snapshot.now)
    _respect_origins(policy, overrides, run)
    inspected = Counter(j.entry.queue for j in run.jobs)
    for queue in queues:
        queue.inspected = inspected[queue.name]
    run.workers = _dead_registrations(snapshot, keys, rules)
    _read_functions(conn, keys, run)
    checkpoint()
    _hold_back_scheduled_deletes(conn, keys, run)
    _keep_reserved_related_keys(keys, run)
    _apply_rescue_limits(conn, keys, run)
    _note_stops_not_sent(conn, keys, run)
    _note_unwritable_targets(conn, keys, run)
    _note_jobs_changed_twice(run)
    run.limits_tripped = _tripped_limits(run, policy, overrides)
    checkpoint()
    return run


def _note_jobs_changed_twice(run: Run) -> None:
    """Say so where two entries of one job (an RQ 1 bare id beside an RQ 2 entry, say)
    each plan a change of the job: the second to run finds the job changed since it
    was read and is skipped, its entry left for a later run to remove."""
    first: dict[str, JobOutcome] = {}
    for job in run.jobs:
        if job.outcome != PLANNED or job.action in (ACTION_NONE, ACTION_REMOVE_ENTRY):
            continue
        earlier = first.setdefault(job.entry.job_id, job)
        if earlier is not job:
            other = f"{quoted(earlier.entry.member_text)} in {quoted(earlier.entry.queue)}"
            job.reason += (
                f"; another entry of this job ({other}) plans a change of it too: the "
                "second to run finds the job changed and is skipped, and a later run "
                "removes its entry"
            )


def _read_state(
    conn: redis.Redis,
    keys: Keys,
    policy: Policy,
    overrides: Overrides,
    on_progress: OnProgress | None,
    decide: _Classifier,
) -> tuple[list[QueuePlan], list[str], Snapshot, Survey]:
    """The queues to inspect, the --queue names no rule matches, what their
    registries and workers hold, and the keyspace survey.

    The survey (a walk over every key, for lost jobs and for queues known
    only by their keys) runs on a helper thread while the registries of the
    queues in RQ's queue set are read: Redis works on one while opsctl
    decodes the other, and ``decide`` classifies each batch of entries as it
    comes. Queues the survey alone finds are read after it.
    """
    names = known_queues(conn, keys, listed=[])
    first, _ = _choose_queues(names, policy, overrides)
    covered = {q.name for q in first}
    decide.rules = {q.name: q.rule for q in first}
    # Jobs waiting in queues the run leaves alone (a backlog of a million,
    # say) are never sent as lost-job candidates.
    left_alone = [name for name in names if name not in covered]
    progress = _WalkAndScan(on_progress)
    ids: dict[str, str] = {}  # one copy of each job id, met in a registry and on the walk
    listed = ListedIds(ids)  # the registries' jobs, whose status the walk need not read
    stop = threading.Event()
    # The walk has a connection of its own: the registry reads hold the
    # caller's while it runs.
    twin = twin_client(conn)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="opsctl-walk") as walker:
            walking = walker.submit(
                survey, twin or conn, keys, left_alone, progress.walk, stop, ids, listed
            )
            try:
                snapshot = read_snapshot(
                    conn,
                    keys,
                    [q.name for q in first],
                    progress.scan,
                    with_functions=True,
                    on_entries=decide.batch,
                    ids=ids,
                    listed=listed,
                )
                progress.scan_done()
                found = walking.result()
            except BaseException:
                stop.set()  # the run is over (or interrupted): no need to finish the walk
                raise
    finally:
        if twin is not None:
            twin.connection_pool.disconnect()
    del listed
    named = known_queues(conn, keys, found.listed, snapshot.problems)
    # A started job may be all that is left of its queue (a queue deleted while the
    # job ran): its origin names the queue, which then needs a rule like any other.
    # Queued jobs do not: deleting a queue but not its jobs leaves them so, and such
    # a queue stays deleted.
    named = sorted({*named, *(origin for origin in found.started if origin)})
    queues, unmatched = _choose_queues(sorted({*named, *covered}), policy, overrides)
    later = [q.name for q in queues if q.name not in covered]
    if later:
        # Their ages count from the first snapshot's clock, a moment before
        # they were read: a job is never taken for older than it is.
        more = read_snapshot(conn, keys, later, on_progress, with_functions=True, ids=ids)
        for name, again in more.workers.items():
            known = snapshot.workers.get(name)
            if known is None:
                snapshot.workers[name] = again
            else:
                # The first read stands; the later one adds the worker sets of the
                # queues found since, which it looked in.
                seen_in = known.registered_in | again.registered_in
                snapshot.workers[name] = replace(known, registered_in=seen_in)
        snapshot.problems += more.problems
        snapshot.unread |= more.unread
        snapshot.entries += more.entries
        place = {q.name: i for i, q in enumerate(queues)}
        snapshot.entries.sort(key=lambda e: place[e.queue])  # stable: registry order kept
    snapshot.queues = [q.name for q in queues]
    for name in sorted(set(overrides.queues) - set(named)):
        snapshot.warnings.append(
            f"--queue {quoted(name)}: Redis knows no such queue (it is not in {keys.queues}, "
            "and no started registry or worker set names it), so nothing of it was inspected; "
            "--queue takes exact names"
        )
    return queues, unmatched, snapshot, found


class _Classifier:
    """Decides entries as they are read, so deciding overlaps reading.

    ``batch`` decides the entries it can while the snapshot is still being
    read; ``outcomes`` returns every entry's outcome, deciding the rest.
    """

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.rules: dict[str, Rule] = {}
        self._early: list[JobOutcome] = []
        # engine.jobs_in_hand of the workers, and how many workers it was made of:
        # the snapshot's workers only grow while it is read.
        self._in_hand: tuple[int, dict[str, str]] = (-1, {})

    def batch(
        self, entries: list[StartedEntry], workers: dict[str, WorkerRecord], now: float
    ) -> None:
        for entry in entries:
            name = entry.worker_name
            if (name and name not in workers) or may_be_read_again(entry):
                # Its worker is read at the end, or it may be read again whole
                # (an RQ 1 id holding a colon): decided with the full snapshot.
                continue
            self._early.append(self._outcome(entry, workers, now))

    def forget(self, workers: set[str] | None) -> None:
        """Decide again the entries that name one of ``workers`` (None: every
        entry), whose records were read again since."""
        self._in_hand = (-1, {})
        if workers is None:
            self._early = []
        else:
            self._early = [o for o in self._early if o.entry.worker_name not in workers]

    def outcomes(
        self, entries: list[StartedEntry], workers: dict[str, WorkerRecord], now: float
    ) -> list[JobOutcome]:
        """Every entry's outcome, in order: those decided early, the rest now."""
        early = iter(self._early)
        ahead = next(early, None)
        found = []
        for entry in entries:
            if ahead is not None and ahead.entry is entry:
                found.append(ahead)
                ahead = next(early, None)
            else:
                found.append(self._outcome(entry, workers, now))
        self._early = []
        return found

    def _outcome(
        self, entry: StartedEntry, workers: dict[str, WorkerRecord], now: float
    ) -> JobOutcome:
        rule = self.rules[entry.queue]
        if self._in_hand[0] != len(workers):
            self._in_hand = (len(workers), engine.jobs_in_hand(workers))
        verdict = engine.classify(entry, workers, rule, now, self._in_hand[1])
        return _initial_outcome(entry, verdict, rule, self.dry_run)


class _WalkAndScan:
    """Progress of the walk and of the registry scan, which run at once.

    The bar starts on the walk, follows the scan while it runs, and shows
    the walk again if it outlasts the scan.
    """

    def __init__(self, on_progress: OnProgress | None) -> None:
        self.report = on_progress
        self.scanning = False
        if on_progress is not None:
            on_progress(0, None, WALKING)

    def walk(self, done: int, total: int | None, what: str) -> None:
        if self.report is not None and not self.scanning:
            self.report(done, total, what)

    def scan(self, done: int, total: int | None, what: str) -> None:
        if self.report is not None:
            self.scanning = True
            self.report(done, total, what)

    def scan_done(self) -> None:
        self.scanning = False


def _lost_entries(
    conn: redis.Redis, keys: Keys, snapshot: Snapshot, run: Run, found: Survey
) -> list[StartedEntry]:
    """Lost and stranded jobs of the snapshot's queues; their workers join the snapshot's."""
    scan = find_lost(conn, keys, snapshot.queues, snapshot.entries, found)
    stranded = find_stranded(conn, keys, snapshot.queues, snapshot.entries)
    run.problems.extend(scan.problems + stranded.problems)
    names = {e.worker_name for e in scan.entries if e.worker_name} - set(snapshot.workers)
    if names:
        snapshot.workers.update(read_workers(conn, keys, names, run.problems, snapshot.queues))
    return scan.entries + stranded.entries


#: Seconds between two looks at the workers found without a connection.
RELOOK_EVERY_S = 1.0


#: Workers named at most in the warning that some hold no connection.
WORKERS_NAMED_MAX = 10


def _confirm_disconnected(
    conn: redis.Redis,
    keys: Keys,
    snapshot: Snapshot,
    entries: list[StartedEntry],
    decide: _Classifier,
    grace_s: float,
    checkpoint: _Checkpoint,
) -> None:
    """Look again, every second for ``grace_s``, at the workers found dead only
    because they held no connection (their hash is there, with no death).

    A killed worker loses its connections for good, but so, for a moment, does
    a live one whose connections the server dropped (a restart, a failover, a
    proxy, ``CLIENT KILL``): it subscribes again within seconds, while its work
    horse runs on. A worker that is back at any look within the grace is live;
    one that never is, is dead, and says so ("... (still none <grace>s later)").
    """
    # Every worker the run's decisions rest on: one its entries name, one whose
    # records say it runs one of their jobs (under another entry, say), and one
    # whose registration it would remove (and record its death). A worker of
    # other queues, idle or busy with their jobs, is no concern: not waited for.
    named = {e.worker_name for e in entries}
    jobs = {e.job_id for e in entries}

    def concerns_the_run(name: str, worker: WorkerRecord) -> bool:
        return (
            name in named
            or worker.current_job in jobs
            or any(e.rpartition(":")[0] in jobs for e in worker.executions)
            or bool(_in_scope(worker, keys, decide.rules)[1])
        )

    doubtful = sorted(
        n
        for n, w in snapshot.workers.items()
        if engine.disconnected_only(w) and concerns_the_run(n, w)
    )
    if not doubtful or grace_s <= 0:
        return
    shown = ",".join(printable(n) for n in doubtful[:WORKERS_NAMED_MAX])
    more = (
        f",... ({len(doubtful) - WORKERS_NAMED_MAX} more)"
        if len(doubtful) > WORKERS_NAMED_MAX
        else ""
    )
    log.warning(
        "workers_without_connection count=%d looking_again_for=%ss workers=%s%s",
        len(doubtful),
        grace_s,
        shown,
        more,
    )
    # Looked at every second: RQ's workers try to subscribe again every 2 s, so
    # one that is back at any moment of the grace counts as live.
    deadline = time.monotonic() + grace_s
    back: set[str] = set()
    while True:
        checkpoint()
        left = deadline - time.monotonic()
        if left > 0:
            time.sleep(min(left, RELOOK_EVERY_S))
        waiting = [n for n in doubtful if n not in back]
        again = read_workers(conn, keys, waiting, None, snapshot.queues)
        for name in waiting:
            fresh = again.get(name)
            if fresh is not None and engine.worker_liveness(fresh).alive:
                back.add(name)
                snapshot.workers[name] = fresh
            elif fresh is not None and deadline - time.monotonic() <= 0:
                snapshot.workers[name] = replace(fresh, looked_again_after_s=grace_s)
        if len(back) == len(doubtful) or deadline - time.monotonic() <= 0:
            break
    decide.forget(None if back else set(doubtful))


def _note_stops_not_sent(conn: redis.Redis, keys: Keys, run: Run) -> None:
    """In a dry run, say of each stop that a run that acts would not send, why."""
    previewed = [
        j
        for j in run.jobs
        if j.action == ACTION_STOP and j.outcome == PLANNED and (run.dry_run or j.rule.dry_run)
    ]
    for job, why in zip(previewed, stops_that_may_stray(conn, keys, previewed), strict=True):
        if why is not None:
            job.reason += f"; the stop would not be sent: {why}"


def _filed_in(job: JobOutcome, keys: Keys) -> list[tuple[str, str]]:
    """The registries and lists a planned action files ``job`` in or takes it from,
    each with the type it must be; those of its origin queue, as RQ's are."""
    fields = job.entry.job or {}
    origin = fields.get("origin") or job.entry.queue
    action = job.action
    if action == ACTION_STOP:
        # RQ files a stopped job as failed; a requeue or cancel takes it from there.
        action = job.verdict.follow_up or ""
        if action not in ("requeue", "cancel"):
            return []
        taken_from = [(keys.failed(origin), "zset")]
    else:
        taken_from = []
    if action == "fail":
        interval = retry_interval(fields, parse_int(fields.get("retries_left")))
        if interval is None:
            return [(keys.failed(origin), "zset")]
        # A fail with retries left retries the job, as RQ does.
        return [(keys.queue(origin), "list") if interval == 0 else (keys.scheduled(origin), "zset")]
    if action == "requeue":
        return [*taken_from, (keys.queue(origin), "list")]
    if action == "cancel":
        return [*taken_from, (keys.canceled(origin), "zset")]
    return []


def _note_unwritable_targets(conn: redis.Redis, keys: Keys, run: Run) -> None:
    """Name under problems each registry or queue list a planned action would file
    a job in (or take it from) but that holds another type: the action would end in
    an error there. A job held back by a dry run says so in its reason too."""
    targets: dict[tuple[str, str], list[JobOutcome]] = {}  # (key, its type) → jobs
    for job in run.jobs:
        if job.outcome == PLANNED:
            for target in _filed_in(job, keys):
                targets.setdefault(target, []).append(job)
    if not targets:
        return
    # ZCARD and LLEN, which a dry run's user may send (TYPE it may not), refuse a
    # key of another type; TYPE then names it where it is allowed.
    pipe = conn.pipeline(transaction=False)
    for key, expected in targets:
        if expected == "zset":
            pipe.zcard(key)
        else:
            pipe.llen(key)
    wrong = [
        target
        for target, reply in zip(targets, replies_of(pipe), strict=True)
        if isinstance(reply, redis.ResponseError) and "WRONGTYPE" in str(reply)
    ]
    if not wrong:
        return
    pipe = conn.pipeline(transaction=False)
    for key, _ in wrong:
        pipe.type(key)
    for (key, expected), kind in zip(wrong, pipe.execute(raise_on_error=False), strict=True):
        held = f"a {text(kind)}" if isinstance(kind, bytes | str) else "another type"
        jobs = targets[key, expected]
        why = f"{printable(key)} holds {held}, not a {expected}"
        run.problems.append(f"{why}: {len(jobs)} action(s) on its jobs cannot succeed")
        for job in jobs:
            if run.dry_run or job.rule.dry_run:
                job.reason += f"; it would end in an error: {why}"


def stops_that_may_stray(
    conn: redis.Redis, keys: Keys, outcomes: list[JobOutcome]
) -> list[str | None]:
    """For each stop, why it is not sent (None: it is sent).

    A worker's command channel is the server's, not the database's: a stop may
    reach a worker of the same name on another database (staging beside
    production), which would stop its job of the same id. It is sent only when
    every connection that would hear it can be told to be this database's.
    """
    if not outcomes:
        return []
    names = sorted({o.entry.worker_name for o in outcomes})
    heard = channel_listeners(conn, keys, names)
    clients = read_clients(conn)
    found: list[str | None] = []
    for outcome in outcomes:
        worker = outcome.entry.worker_name
        counted = heard.get(worker) if heard is not None else None
        if counted is None or (clients is not None and clients.replica):
            found.append(None)  # nothing to tell by: the stop goes as RQ's own would
        elif clients is None and counted > 1:
            found.append(
                f"{counted} connections listen on {worker}'s command channel, which "
                "every database of this server shares, and the Redis user may not list "
                "connections (CLIENT LIST) to tell whose they are"
            )
        elif clients is not None and clients.may_reach_elsewhere(keys, worker, counted):
            found.append(
                f"a connection of another database of this server may listen on "
                f"{worker}'s command channel, which every database shares; a worker "
                "of the same name there would stop its job of the same id (give "
                "workers names of their own per database)"
            )
        else:
            found.append(None)
    return found


def _respect_origins(policy: Policy, overrides: Overrides, run: Run) -> None:
    """Hold a job that sits in another queue's registry to its origin queue's rule too
    (see :func:`origin_hold`)."""

    @functools.cache
    def origin_rule(origin: str) -> Rule | None:
        if overrides.queues and origin not in overrides.queues:
            return None
        found = policy.rule_for(origin)
        return effective_rule(found, overrides) if found is not None else None

    for job in run.jobs:
        held = origin_hold(job.action, job.entry, job.rule.dry_run, origin_rule)
        if held is None:
            continue
        planned_only, words = held
        if planned_only:
            job.rule = replace(job.rule, dry_run=True)
        else:
            job.action, job.outcome = ACTION_NONE, KEPT
        job.reason = f"{job.reason}; {words}"


def origin_hold(
    action: str,
    entry: StartedEntry,
    dry_run: bool,
    origin_rule: Callable[[str], Rule | None],
) -> tuple[bool, str] | None:
    """How the rule of the job's origin queue holds back ``action`` on a job found
    in another queue's registry: whether it is only planned rather than left
    alone, and the words for the reason; None when it goes ahead as the rule of
    the registry's queue says (``dry_run``: whether that rule only plans).

    ``origin_rule`` gives a queue's rule, None for a queue the run does not
    cover. Actions write to the origin's registries and queue (a stop too: RQ
    files the stopped job there). A queue the policy disables, or that the run
    does not cover (no policy entry matches it, or --queue leaves it out), is
    never changed, so the job is left alone; one in dry-run mode is only planned
    for, so the job is only planned. Removing an entry touches only the registry
    it sits in, so that is never held back.
    """
    origin = entry.job.get("origin") if entry.job is not None else None
    if action in (ACTION_NONE, ACTION_REMOVE_ENTRY) or not origin or origin == entry.queue:
        return None
    rule = origin_rule(origin)
    if rule is None:
        return False, f"left alone: this run does not cover queue {quoted(origin)}"
    if not rule.enabled:
        return False, f"left alone: {rule.source} disables queue {quoted(origin)}"
    if rule.dry_run and not dry_run:
        return True, f"only planned: {rule.source} sets dry_run for {quoted(origin)}"
    return None


def _read_functions(conn: redis.Redis, keys: Keys, run: Run) -> None:
    """Name the function of every job that is not simply running (for the report).

    Most were read along with the job; the rest (jobs of workers that looked
    alive, lost and stranded jobs) are read here.
    """
    jobs = [j for j in run.jobs if j.verdict.state is not engine.State.RUNNING]
    unread: list[JobOutcome] = []
    for job in jobs:
        if job.entry.function is None:
            unread.append(job)
        else:
            job.function = job.entry.function
    names = function_names(conn, keys, [j.entry.job_id for j in unread])
    for job, name in zip(unread, names, strict=True):
        job.function = name


def _hold_back_scheduled_deletes(conn: redis.Redis, keys: Keys, run: Run) -> None:
    """Never delete a job a scheduler will enqueue again: the delete becomes a skip.

    Deleting it would leave the scheduler pointing at nothing (RQ's scheduler
    then drops the entry silently, rq-scheduler loses a repeating job), so the
    job is left as it is and the report says why.
    """
    deletes = _planned_to("delete", run)
    origins = [(j.entry.job or {}).get("origin") or j.entry.queue for j in deletes]
    pairs = [(j.entry.job_id, o) for j, o in zip(deletes, origins, strict=True)]
    for job, why in zip(deletes, scheduler_references(conn, keys, pairs), strict=True):
        if why:
            job.outcome = SKIPPED
            job.reason = f"{job.reason}; not deleted: a scheduler still refers to it ({why})"


def _keep_reserved_related_keys(keys: Keys, run: Run) -> None:
    """Say which related keys a delete keeps because the job's id places them
    among RQ's or opsctl's keys (the delete itself leaves them out)."""
    for job in _planned_to("delete", run):
        note = job.rule.kept_related_keys_note(job.entry.job_id, keys.prefix)
        if note:
            job.reason = f"{job.reason}; {note}"


def _planned_to(action: str, run: Run) -> list[JobOutcome]:
    """The jobs the run plans ``action`` for, now or once their worker has stopped them."""
    return [j for j in run.jobs if action in (j.action, j.verdict.follow_up) and j.acts]


def _apply_rescue_limits(conn: redis.Redis, keys: Keys, run: Run) -> None:
    """Turn a requeue into a fail for jobs opsctl already requeued max_requeues times."""
    requeues = _planned_to("requeue", run)
    if not requeues:
        return
    pipe = conn.pipeline(transaction=False)
    for j in requeues:
        pipe.get(rescue_key(keys.prefix, j.entry.job_id))
        pipe.get(legacy_rescue_key(j.entry.job_id))
    replies = replies_of(pipe)
    for j, raw, before in zip(requeues, replies[::2], replies[1::2], strict=True):
        if isinstance(before, bytes):  # a damaged one counts none: nothing writes it
            j.requeued_before = _requeue_count(before) or 0
        if isinstance(raw, Exception):
            run.problems.append(f"requeue count of job {j.entry.job_id}: cannot be read ({raw})")
            raw = None
        count = _requeue_count(raw) if raw else None
        if raw and count is None:
            # The requeue's script refuses to write past it: say so before it runs.
            key = rescue_key(keys.prefix, j.entry.job_id)
            run.problems.append(
                f"requeue count of job {j.entry.job_id}: {key} holds something other than a "
                "count of requeues, so the requeue would fail; mend or delete it"
            )
        count = (count or 0) + j.requeued_before
        if count < j.rule.max_requeues:
            continue
        note = (
            f"requeued by opsctl {count} times already (max_requeues "
            f"{j.rule.max_requeues}): failing instead"
        )
        if j.action == "requeue":
            j.action = "fail"
        else:
            j.verdict = replace(j.verdict, follow_up="fail")
        j.reason = f"{j.reason}; {note}"


#: A count of requeues as the requeue's script reads it (as Redis's INCR does:
#: no sign, no leading zero, at most 15 digits here).
_COUNT = re.compile(rb"0|[1-9][0-9]{0,14}")


def _requeue_count(raw: bytes) -> int | None:
    """opsctl's count of a job's requeues, or None when the script would refuse it."""
    return int(raw) if _COUNT.fullmatch(raw) else None


def _tripped_limits(run: Run, policy: Policy, overrides: Overrides) -> list[str]:
    """Every blast-radius cap this run's planned actions exceed, in words."""
    tripped = []
    acting = [
        j
        for j in run.jobs
        if j.acts and not j.rule.dry_run and j.outcome != SKIPPED and not _touches_no_job(j)
    ]
    for queue in run.queues:
        limits = queue.rule.limits
        if limits is None:
            continue
        count = sum(1 for j in acting if j.entry.queue == queue.name)
        why = limits.tripped(count, queue.inspected)
        if why:
            tripped.append(f"queue {queue.name} ({queue.rule.source}.limits): {why}")
    run_limits = policy.limits or Limits()
    if overrides.max_actions is not None:
        run_limits = replace(run_limits, max_actions=overrides.max_actions)
    why = run_limits.tripped(len(acting), len(run.jobs))
    if why:
        source = "--max-actions" if overrides.max_actions is not None else "defaults.limits"
        tripped.append(f"whole run ({source}): {why}")
    return tripped


def _touches_no_job(job: JobOutcome) -> bool:
    """Whether acting removes only the entry of a job whose hash is gone: caps
    guard jobs, and counting such entries would let old debris block every run."""
    return job.action == ACTION_REMOVE_ENTRY and job.entry.job is None


def _initial_outcome(
    entry: StartedEntry, verdict: Verdict, rule: Rule, dry_run: bool
) -> JobOutcome:
    # Planned outcomes become done, skipped or error once acted on; in a dry
    # run (or a queue whose rule says dry_run) they stay planned.
    outcome = KEPT if verdict.action == ACTION_NONE else PLANNED
    return JobOutcome(
        entry, verdict, rule, verdict.action, outcome, verdict.reason + _retried(entry, verdict)
    )


def _retried(entry: StartedEntry, verdict: Verdict) -> str:
    """What failing the job does instead when it has retries left (RQ's own rule),
    so that a plan says it before it happens; '' otherwise."""
    if verdict.action != "fail" or entry.job is None:
        return ""
    left = parse_int(entry.job.get("retries_left"))
    if left is None or left <= 0:
        return ""
    return f"; it has {retries_left(left)}, so failing it retries it, as RQ does"


def retries_left(count: int) -> str:
    """``count`` retries left, in words."""
    return f"{count} {'retry' if count == 1 else 'retries'} left"


def _dead_registrations(
    snapshot: Snapshot, keys: Keys, rules: dict[str, Rule]
) -> list[WorkerOutcome]:
    """Dead workers still listed in a registration set that concerns a target queue.

    A worker whose target queues are all in dry-run mode is reported as planned
    and left alone, like their jobs.
    """
    found = []
    for worker in sorted(snapshot.workers.values(), key=lambda w: w.name):
        worker, queues = _in_scope(worker, keys, rules)
        if not queues:
            continue
        liveness = engine.worker_liveness(worker)
        if liveness.alive:
            continue
        outcome = WorkerOutcome(worker, liveness.evidence, PLANNED, liveness.evidence)
        ruled = [rules[q] for q in queues if q in rules]
        outcome.dry_run = bool(ruled) and all(r.dry_run for r in ruled)
        found.append(outcome)
    return found


def _in_scope(
    worker: WorkerRecord, keys: Keys, rules: dict[str, Rule]
) -> tuple[WorkerRecord, set[str]]:
    """``worker`` with only the registrations this run may touch (the global set
    and the sets of the queues it covers), and the target queues they concern."""
    allowed = {keys.workers} | {keys.queue_workers(q) for q in rules}
    elsewhere = bool(worker.registered_in - allowed)
    worker = replace(worker, registered_in=worker.registered_in & allowed)
    if not worker.registered_in:
        return worker, set()
    return worker, _target_queues(worker, keys, rules, elsewhere)


def _target_queues(
    worker: WorkerRecord, keys: Keys, rules: dict[str, Rule], elsewhere: bool = False
) -> set[str]:
    """The target queues a worker's registration concerns; empty when none does.
    ``elsewhere``: the worker is also in the worker set of a queue the run does
    not cover, which says it served that queue."""
    queues = {q for q in rules if keys.queue_workers(q) in worker.registered_in}
    queues |= {q for q in worker.queues if q in rules}
    if not queues and not elsewhere and keys.workers in worker.registered_in and not worker.exists:
        # Listed globally with nothing left to say which queues it served.
        queues = {""}
    return queues
