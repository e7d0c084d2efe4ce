"""The engine's decisions, from plain records: no Redis, no clock.

Every test builds the records the reader would have produced (a started-registry entry
with its job and execution hashes, and the workers involved) and checks the state and
action a user would see in the report.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from opsctl import model
from opsctl.engine import (
    ACTION_NONE,
    ACTION_REMOVE_ENTRY,
    ACTION_STOP,
    LEASE_GRACE_S,
    RQ1_SINCE_RESTART,
    Liveness,
    State,
    Verdict,
    classify,
    disconnected_only,
    worker_liveness,
)
from opsctl.model import StartedEntry, WorkerRecord, format_timestamp, parse_timestamp
from opsctl.policy import Rule
from opsctl.run import retries_left
from opsctl.state import split_member

#: The server time of every snapshot in this module, in epoch seconds.
NOW = 1_700_000_000.0

JOB_ID = "job1"
EXECUTION_ID = "ex1"
MEMBER = f"{JOB_ID}:{EXECUTION_ID}"
WORKER = "w1"

#: max_age 10m, action requeue: an action other than the built-in default, so a verdict
#: that carries it shows the policy was consulted.
RULE = Rule(max_age_seconds=600, action="requeue", source="queues[0] (default)")

_ABSENT: Any = object()


def iso(seconds_ago: float) -> str:
    """A timestamp `seconds_ago` before NOW, written the way RQ writes job timestamps."""
    return format_timestamp(NOW - seconds_ago)


def job_hash(
    status: str = "started", started_ago_s: float = 30.0, worker: str = WORKER, **fields: str
) -> dict[str, str]:
    """The job fields the reader returns for a job a worker started `started_ago_s` ago.

    The job was created and enqueued an hour before NOW; pass a field as "" to leave it out.
    """
    job = {
        "status": status,
        "origin": "default",
        "created_at": iso(3600),
        "enqueued_at": iso(3600),
        "started_at": iso(started_ago_s),
        "last_heartbeat": iso(started_ago_s),
        "worker_name": worker,
        "timeout": "180",
    }
    job.update(fields)
    return {name: value for name, value in job.items() if value != ""}


def execution_hash(
    worker: str = WORKER, created_ago_s: float = 30.0, heartbeat_ago_s: float | None = None
) -> dict[str, str]:
    """An RQ 2/3 execution hash; its timestamps are float epoch seconds, as RQ writes them."""
    beat = created_ago_s if heartbeat_ago_s is None else heartbeat_ago_s
    return {
        "worker_name": worker,
        "created_at": repr(NOW - created_ago_s),
        "last_heartbeat": repr(NOW - beat),
    }


def entry(job: Any = _ABSENT, execution: Any = _ABSENT, member: str = MEMBER) -> StartedEntry:
    """A started-registry entry; by default a job started 30s ago by WORKER."""
    job_id, _, execution_id = member.rpartition(":")
    if not job_id:
        job_id, execution_id = member, ""
    return StartedEntry(
        queue="default",
        job_id=job_id,
        execution_id=execution_id or None,
        score=NOW + 60,
        job=job_hash() if job is _ABSENT else job,
        execution=execution_hash() if execution is _ABSENT else execution,
    )


def worker(
    name: str = WORKER,
    *,
    exists: bool = True,
    executing: tuple[str, ...] = (MEMBER,),
    subscribers: int | None = 1,
    connected: bool | None = True,
    **fields: str,
) -> WorkerRecord:
    """A worker record; by default a live RQ 3 worker executing MEMBER."""
    hash_fields = {"birth": iso(7200), "last_heartbeat": iso(5), "state": "busy"}
    hash_fields.update(fields)
    return WorkerRecord(
        name=name,
        exists=exists,
        fields={k: v for k, v in hash_fields.items() if v != ""} if exists else {},
        ttl_s=90 if exists else None,
        subscribers=subscribers,
        connected=connected,
        executions=frozenset(executing),
        registered_in=frozenset({"rq:workers", "rq:workers:default"}),
    )


def decide(started: StartedEntry, *workers: WorkerRecord, rule: Rule = RULE) -> Verdict:
    """The verdict on `started` with `workers` in the snapshot."""
    return classify(started, {w.name: w for w in workers}, rule, NOW)


# Orphaned and leftover entries ----------------------------------------------------------------


def test_entry_whose_job_hash_is_gone_is_orphaned_and_only_the_entry_is_removed() -> None:
    verdict = decide(entry(job=None), worker(executing=(), state="idle"))

    assert verdict.state is State.ORPHANED
    assert verdict.action == ACTION_REMOVE_ENTRY
    assert verdict.reason == "job hash is gone"
    assert verdict.signals.status is None


def test_job_hash_holding_only_heartbeat_fields_is_orphaned() -> None:
    # What a late heartbeat leaves behind when it recreates a deleted job's hash.
    leftover_fields = {"last_heartbeat": iso(5)}

    verdict = decide(entry(job=leftover_fields, execution=None), worker(executing=(), state="idle"))

    assert verdict.state is State.ORPHANED
    assert verdict.action == ACTION_REMOVE_ENTRY
    assert "last_heartbeat" in verdict.reason


def test_job_hash_gone_while_its_live_worker_executes_it_is_left_running() -> None:
    verdict = decide(entry(job=None), worker())

    assert verdict.state is State.RUNNING
    assert verdict.action == ACTION_NONE


@pytest.mark.parametrize(
    "status", ["finished", "failed", "stopped", "canceled", "queued", "scheduled", "deferred"]
)
def test_entry_of_a_job_that_ended_or_was_queued_again_is_a_leftover(status: str) -> None:
    verdict = decide(entry(job=job_hash(status=status)))  # its worker is gone

    assert verdict.state is State.LEFTOVER
    assert verdict.action == ACTION_REMOVE_ENTRY
    assert verdict.reason == f"status is '{status}'"
    assert verdict.signals.status == status


def test_job_with_no_status_but_a_creation_time_is_a_leftover_not_an_orphan() -> None:
    verdict = decide(entry(job=job_hash(status="")))

    assert verdict.state is State.LEFTOVER
    assert verdict.reason == "status is missing"


@pytest.mark.parametrize("status", ["queued", "finished"])
def test_live_worker_holding_a_job_not_yet_or_no_longer_started_keeps_it(status: str) -> None:
    # Between taking a job and marking it started (or while writing its end) the
    # entry belongs to the worker; removing it then would pull it from under the worker.
    verdict = decide(entry(job=job_hash(status=status)), worker())

    assert verdict.state is State.RUNNING
    assert verdict.action == ACTION_NONE
    assert WORKER in verdict.reason


# Abandoned jobs -------------------------------------------------------------------------------


def test_job_whose_worker_hash_is_gone_is_abandoned_and_gets_the_policy_action() -> None:
    verdict = decide(entry())  # WORKER is in no record at all

    assert verdict.state is State.ABANDONED
    assert verdict.action == "requeue"
    assert verdict.reason == f"{WORKER} is dead: worker hash is gone"
    assert verdict.signals.worker_alive is False


def test_job_whose_worker_record_says_the_hash_does_not_exist_is_abandoned() -> None:
    verdict = decide(entry(), worker(exists=False, subscribers=0, connected=False))

    assert verdict.state is State.ABANDONED
    assert "worker hash is gone" in verdict.reason


def test_job_whose_worker_recorded_its_death_is_abandoned_even_if_still_subscribed() -> None:
    # It shuts down: its last heartbeat, then its death; its subscription ends last.
    died = worker(death=iso(60), last_heartbeat=iso(61))

    verdict = decide(entry(), died)

    assert verdict.state is State.ABANDONED
    assert verdict.action == "requeue"
    assert "recorded its death" in verdict.reason


@pytest.mark.parametrize(
    ("noted_by", "said"),
    [
        ("opsctl {death}", "an opsctl run found it dead at {death}"),
        # The worker came back, then shut down cleanly: the death is its own.
        ("opsctl 2023-01-01T00:00:00.000000Z", "worker recorded its death at {death}"),
    ],
)
def test_a_death_opsctl_wrote_is_told_from_one_the_worker_recorded(
    noted_by: str, said: str
) -> None:
    death = iso(60)
    died = worker(death=death, last_heartbeat=iso(61), death_noted_by=noted_by.format(death=death))

    verdict = decide(entry(), died)

    assert verdict.state is State.ABANDONED
    assert said.format(death=death) in verdict.reason


@pytest.mark.parametrize(
    ("version", "born_ago_s", "beat_ago_s", "ttl_s", "alive"),
    [
        ("1.16.2", 3600, 5, 90, True),  # born before the restart, heartbeated since
        # Not yet heartbeated since the restart 300 s ago: running a job, it beats only
        # every 30 s, and a worker killed before the restart has a hash that expires.
        ("1.16.2", 3600, 310, 50, True),
        ("1.16.2", 3600, 310, -1, False),  # a hash that never expires proves nothing
        ("1.16.2", 100, 5, 90, False),  # born after the restart: it subscribed, and left
        ("2.6.0", 3600, 5, 90, False),  # RQ 2 subscribes again after a restart
    ],
)
def test_an_rq1_worker_born_before_redis_restarted_is_live_without_a_connection(
    version: str, born_ago_s: float, beat_ago_s: float, ttl_s: int, alive: bool
) -> None:
    # RQ 1's command thread dies with the connection and never subscribes again.
    rq1 = replace(
        worker(
            executing=(),
            current_job=JOB_ID,
            subscribers=0,
            connected=False,
            version=version,
            birth=iso(born_ago_s),
            last_heartbeat=iso(beat_ago_s),
        ),
        ttl_s=ttl_s,
        server_started=NOW - 300,
    )

    verdict = decide(entry(member=JOB_ID, execution=None), rq1)

    assert verdict.signals.worker_alive is alive
    assert (verdict.state is State.RUNNING) is alive
    if alive:
        assert verdict.signals.worker_evidence == RQ1_SINCE_RESTART


def test_job_whose_worker_holds_no_connection_is_abandoned_while_its_hash_lingers() -> None:
    # A SIGKILLed worker: the hash expires minutes later, the connection is gone at once.
    killed = worker(subscribers=0, connected=False)

    verdict = decide(entry(), killed)

    assert verdict.state is State.ABANDONED
    assert verdict.reason == f"{WORKER} is dead: worker holds no connection to Redis"


def test_a_verdict_carries_the_named_workers_birth_for_the_change_to_check() -> None:
    assert decide(entry(), worker(birth="2026-01-01T00:00:00.000000Z")).signals.worker_birth == (
        "2026-01-01T00:00:00.000000Z"
    )
    assert decide(entry(), worker(exists=False)).signals.worker_birth == ""
    assert decide(entry()).signals.worker_birth is None  # its worker was not read


def test_job_of_a_live_worker_executing_another_job_is_abandoned_after_lost_after() -> None:
    busy_elsewhere = worker(executing=("other:ex9",))
    # It last ran (started, or beat) 700 s ago: past lost_after (600 s).
    stale = entry(
        job=job_hash(started_ago_s=3600, last_heartbeat=iso(700)),
        execution=execution_hash(created_ago_s=3600, heartbeat_ago_s=700),
    )

    verdict = decide(stale, busy_elsewhere)

    assert verdict.state is State.ABANDONED
    assert verdict.action == "requeue"
    assert verdict.reason == f"{WORKER} is live but not executing it for 700s, over lost_after 600s"
    assert verdict.signals.worker_alive is True


def test_job_a_live_worker_has_just_taken_is_left_alone_though_its_records_miss_it() -> None:
    # The worker's records were read a moment before the job's entry, and it
    # took the job in between: they do not name it yet.
    not_yet = worker(executing=("other:ex9",))

    verdict = decide(entry(), not_yet)

    assert (verdict.state, verdict.action) == (State.ABANDONED, "none")
    assert (
        verdict.reason == f"{WORKER} is live but not executing it for 30s, within lost_after 600s"
    )


def test_entry_of_a_queued_job_a_live_worker_has_just_taken_is_left_until_lost_after() -> None:
    # RQ 3 writes the entry and execution while the job is still 'queued'; the
    # worker's records, read a moment before, do not list it yet.
    idle = worker(executing=(), state="idle")
    just_taken = entry(
        job=job_hash(status="queued", started_at="", last_heartbeat=""),
        execution=execution_hash(created_ago_s=2),
    )
    stale = entry(
        job=job_hash(status="queued", started_at="", last_heartbeat=""),
        execution=execution_hash(created_ago_s=700),
    )

    fresh, old = decide(just_taken, idle), decide(stale, idle)

    assert (fresh.state, fresh.action) == (State.LEFTOVER, "none")
    assert fresh.reason == (
        f"status is 'queued' and {WORKER} is live but not executing it for 2s, "
        "within lost_after 600s"
    )
    assert (old.state, old.action) == (State.LEFTOVER, "remove-entry")
    assert decide(just_taken, worker(executing=(), state="idle", death=iso(1))).action == (
        "remove-entry"
    )  # its worker is dead: nobody will run it from this entry


def test_entry_of_a_queued_job_whose_taker_no_record_names_stays_while_its_lease_lasts() -> None:
    # RQ 2.0 to 2.10: a worker enters the job it takes, with an execution record that
    # names no worker, while the job is still 'queued' and its worker_name still names
    # the dead worker of an earlier run; its work horse marks it started a moment later.
    rq210 = {"created_at": repr(NOW - 1), "last_heartbeat": repr(NOW - 1)}
    earlier_worker_dead = worker(exists=False, executing=(), subscribers=0, connected=False)
    job = job_hash(status="queued", started_at="", last_heartbeat="")
    taken = replace(entry(job=job, execution=rq210), score=NOW + 90)
    lapsed = replace(taken, score=NOW - LEASE_GRACE_S - 1)

    verdict = decide(taken, earlier_worker_dead)

    assert (verdict.state, verdict.action) == (State.LEFTOVER, "none")
    assert "no record names the worker that took it" in verdict.reason
    assert decide(replace(taken, job={**job, "worker_name": ""})).action == "none"
    # Once the lease has ended, no worker holds it: only the entry is left.
    assert decide(lapsed, earlier_worker_dead).action == "remove-entry"
    # A lease that never ends (RQ 1 scores a job without a timeout +inf), and an RQ 1
    # entry (a bare id: RQ 1 writes the entry and the start at once), show no taker.
    endless = replace(taken, score=float("inf"))
    rq1 = replace(entry(job=job, execution=None, member="j1"), score=NOW + 90)
    assert decide(endless, earlier_worker_dead).action == "remove-entry"
    assert decide(rq1, earlier_worker_dead).action == "remove-entry"


@pytest.mark.parametrize("death", ["xyz", "2026-13-45T99:99:99Z"])
def test_a_death_that_is_no_moment_leaves_liveness_to_the_connections(death: str) -> None:
    # Neither RQ nor opsctl writes such a death: a worker that holds its connection
    # is live, and its running job is left alone.
    subscribed = worker(death=death, last_heartbeat=iso(5))
    gone = worker(death=death, last_heartbeat=iso(5), subscribers=0, connected=False)

    assert decide(entry(), subscribed).state is State.RUNNING
    assert worker_liveness(gone) == Liveness(False, "worker holds no connection to Redis")


def test_a_death_written_while_a_worker_was_cut_off_gives_way_to_its_return() -> None:
    # A run took the worker for dead while it was cut off from Redis and wrote its
    # death; it came back, holds its connection and has heartbeated since.
    back = worker(death=iso(60), last_heartbeat=iso(5))
    gone = worker(death=iso(60), last_heartbeat=iso(5), subscribers=0, connected=False)
    shut_down = worker(death=iso(5), last_heartbeat=iso(60))  # a clean shutdown, still closing

    assert worker_liveness(back).alive is True
    # Cut off again: judged by its connections like any other, so looked at again.
    assert worker_liveness(gone) == Liveness(False, "worker holds no connection to Redis")
    assert disconnected_only(gone)
    assert worker_liveness(shut_down).alive is False
    assert not disconnected_only(shut_down)


def test_job_that_names_no_worker_is_abandoned() -> None:
    started = entry(job=job_hash(worker=""), execution=execution_hash(worker=""))

    verdict = decide(started, worker(executing=()))

    assert verdict.state is State.ABANDONED
    assert verdict.reason == "no worker is named for it"
    assert verdict.signals.worker_alive is None


def test_entry_naming_no_worker_that_a_live_worker_executes_is_left_running() -> None:
    started = entry(job=job_hash(worker=""), execution=execution_hash(worker=""))

    verdict = decide(started, worker(), rule=Rule(action="requeue", max_age_seconds=1))

    assert (verdict.state, verdict.action) == (State.RUNNING, ACTION_NONE)
    assert verdict.reason == f"{WORKER} is executing it, though its records name no worker"
    assert verdict.signals.worker == WORKER


def test_entry_of_an_earlier_execution_of_a_job_a_live_worker_runs_is_only_removed() -> None:
    dead = worker("w-dead", exists=False, subscribers=0, connected=False, executing=())
    earlier = entry(
        execution=execution_hash(worker="w-dead"), member=MEMBER.rpartition(":")[0] + ":old"
    )

    verdict = decide(earlier, dead, worker())

    assert (verdict.state, verdict.action) == (State.LEFTOVER, ACTION_REMOVE_ENTRY)
    assert (
        verdict.reason == f"{WORKER} is executing this job as another execution; this entry is left"
    )
    assert (verdict.signals.worker, verdict.signals.worker_alive) == (WORKER, True)


def test_dead_workers_run_of_a_job_a_live_rq2_worker_runs_again_is_only_removed() -> None:
    # An RQ 2 worker names only the job it runs, not the execution; but the entry's
    # own execution record names the worker that created it, a dead one.
    dead = worker("w-dead", exists=False, subscribers=0, connected=False, executing=())
    job_id = MEMBER.rpartition(":")[0]
    rq2 = worker("w-rq2", executing=(), current_job=job_id)
    named_dead = entry(execution=execution_hash(worker="w-dead"))

    verdict = decide(named_dead, dead, rq2, rule=Rule(action="requeue", max_age_seconds=1))

    assert (verdict.state, verdict.action) == (State.LEFTOVER, ACTION_REMOVE_ENTRY)
    assert (
        verdict.reason == "w-rq2 is executing this job; this entry is w-dead's run, and it is dead"
    )
    assert (verdict.signals.worker, verdict.signals.worker_alive) == ("w-rq2", True)


@pytest.mark.parametrize(
    ("execution", "named"),
    [
        # RQ 2.0 to 2.10 write no worker_name in the execution record: the entry may
        # be the holder's own run, which its job hash names.
        ({"created_at": repr(NOW - 30), "last_heartbeat": repr(NOW - 30)}, "w-dead"),
        # The record names a live worker that does not run the job now: it may be
        # about to run it itself.
        (execution_hash(worker="w-idle"), "w-idle"),
    ],
    ids=["record-names-no-worker", "record-names-a-live-worker"],
)
def test_entry_of_a_job_a_live_rq2_worker_runs_is_left_when_it_may_be_its_own(
    execution: dict[str, str], named: str
) -> None:
    dead = worker("w-dead", exists=False, subscribers=0, connected=False, executing=())
    idle = worker("w-idle", executing=(), state="idle")
    rq2 = worker("w-rq2", executing=(), current_job=MEMBER.rpartition(":")[0])
    started = entry(job=job_hash(worker="w-dead"), execution=execution)

    verdict = decide(started, dead, idle, rq2, rule=Rule(action="requeue", max_age_seconds=1))

    assert (verdict.state, verdict.action) == (State.RUNNING, ACTION_NONE)
    assert verdict.reason == f"w-rq2 is executing it, though its records name {named}"


def test_lost_job_a_live_worker_executes_without_being_named_is_left_running() -> None:
    dead = worker("w-dead", exists=False, subscribers=0, connected=False, executing=())
    lost = replace(entry(), execution_id=None, execution=None, lost=True, first_lost=NOW - 3600)
    lost = replace(lost, job=job_hash(worker="w-dead"))

    verdict = decide(lost, dead, worker("w-other"))

    assert (verdict.state, verdict.action) == (State.RUNNING, ACTION_NONE)
    assert verdict.signals.worker == "w-other"


def test_worker_named_by_the_execution_wins_over_the_stale_one_in_the_job() -> None:
    # The job hash still names the worker of an earlier execution; the execution is current.
    started = entry(job=job_hash(worker="old-worker"), execution=execution_hash(worker=WORKER))

    verdict = decide(started, worker(), worker("old-worker", exists=False))

    assert verdict.state is State.RUNNING
    assert verdict.signals.worker == WORKER


# Liveness ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subscribers", "connected", "alive", "evidence"),
    [
        (None, None, True, "worker hash exists (its connections cannot be checked here)"),
        (1, False, True, "worker is subscribed to its command channel"),
        (1, None, True, "worker is subscribed to its command channel"),
        (0, True, True, "worker holds a named connection"),
        (None, True, True, "worker holds a named connection"),
        (0, False, False, "worker holds no connection to Redis"),
        (0, None, False, "worker holds no connection to Redis"),
        (None, False, False, "worker holds no connection to Redis"),
    ],
)
def test_worker_liveness_follows_its_connection_signals(
    subscribers: int | None, connected: bool | None, alive: bool, evidence: str
) -> None:
    liveness = worker_liveness(worker(subscribers=subscribers, connected=connected))

    assert (liveness.alive, liveness.evidence) == (alive, evidence)


def test_when_connection_checks_are_not_permitted_the_hash_alone_decides() -> None:
    def unknown(**fields: str) -> WorkerRecord:
        return worker(subscribers=None, connected=None, **fields)

    running = decide(entry(), unknown())
    died = decide(entry(), unknown(death=iso(1)))
    gone = decide(entry(), worker(exists=False, subscribers=None, connected=None))

    assert running.state is State.RUNNING
    assert (died.state, gone.state) == (State.ABANDONED, State.ABANDONED)


def test_worker_with_only_a_named_connection_keeps_its_job() -> None:
    verdict = decide(entry(), worker(subscribers=0, connected=True))

    assert verdict.state is State.RUNNING
    assert verdict.signals.worker_evidence == "worker holds a named connection"


# What a live worker is executing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("executing", "fields", "state"),
    [
        pytest.param((MEMBER,), {}, State.RUNNING, id="rq3-executions-set-lists-it"),
        pytest.param(("other:ex9",), {}, State.ABANDONED, id="rq3-executions-set-lists-another"),
        pytest.param(
            (MEMBER,),
            {"current_job": "other"},
            State.RUNNING,
            id="rq3-executions-set-beats-current_job",
        ),
        pytest.param((), {"current_job": JOB_ID}, State.RUNNING, id="rq2-current_job-is-it"),
        pytest.param((), {"current_job": "other"}, State.ABANDONED, id="rq2-current_job-other"),
        pytest.param((), {"state": "busy"}, State.RUNNING, id="busy-with-no-record-yet"),
        pytest.param((), {"state": "idle"}, State.ABANDONED, id="idle-with-no-record"),
        # Records a worker that is not busy left behind (its work horse exited without
        # RQ's cleanup): it runs no job, and a stop would make it kill its own group.
        pytest.param((MEMBER,), {"state": "idle"}, State.ABANDONED, id="rq3-idle-lists-it"),
        pytest.param((), {"current_job": JOB_ID, "state": "idle"}, State.ABANDONED, id="rq2-idle"),
        pytest.param((MEMBER,), {"state": "suspended"}, State.ABANDONED, id="suspended-lists-it"),
    ],
)
def test_live_worker_executes_a_job_when_its_own_records_say_so(
    executing: tuple[str, ...], fields: dict[str, str], state: State
) -> None:
    verdict = decide(entry(), worker(executing=executing, **fields))

    assert verdict.state is state


def test_an_idle_workers_left_behind_record_is_not_a_job_it_holds_elsewhere() -> None:
    # The entry names another worker; the idle one's records still list the job.
    idle = worker("w-idle", executing=(MEMBER,), state="idle")
    named = worker(executing=(), state="idle")

    verdict = decide(entry(job=job_hash(started_ago_s=3600)), named, idle)

    assert (verdict.state, verdict.signals.worker) == (State.ABANDONED, WORKER)
    assert verdict.action != ACTION_STOP


def test_rq1_bare_member_is_matched_by_the_workers_current_job() -> None:
    started = entry(member=JOB_ID, execution=None)

    verdict = decide(started, worker(executing=(), current_job=JOB_ID, state="busy"))

    assert started.execution_id is None
    assert verdict.state is State.RUNNING


# Overdue and running ------------------------------------------------------------------------


def test_job_over_max_age_on_a_live_worker_is_overdue_and_stopped_first() -> None:
    verdict = decide(entry(job=job_hash(started_ago_s=3600)), worker())

    assert verdict.state is State.OVERDUE
    assert verdict.action == ACTION_STOP
    assert verdict.follow_up == "requeue"
    assert verdict.reason == "running longer than max_age 600s"
    assert verdict.signals.age_s == 3600.0


@pytest.mark.parametrize("force", [False, True])
def test_an_overdue_job_whose_lease_its_worker_stopped_renewing_is_not_stopped(
    force: bool,
) -> None:
    # The worker's records name the job, but it renews no lease on it (frozen, say, or
    # a SimpleWorker, which renews nothing): a stop that finds no work horse kills the
    # worker's group.
    lapsed = replace(entry(job=job_hash(started_ago_s=3600)), score=NOW - LEASE_GRACE_S - 1)
    rule = Rule(max_age_seconds=600, action="requeue", force=force)
    frozen = worker(last_heartbeat=iso(LEASE_GRACE_S + 30))

    verdict = decide(lapsed, frozen, rule=rule)
    renewed = decide(replace(lapsed, score=NOW - LEASE_GRACE_S + 1), frozen, rule=rule)

    assert (verdict.state, verdict.action) == (State.OVERDUE, ACTION_NONE)
    assert "but not stopped: w1 has stopped renewing its lease on this run" in verdict.reason
    assert (renewed.state, renewed.action) == (State.OVERDUE, ACTION_STOP)


@pytest.mark.parametrize(
    "records",
    [
        {"executing": (MEMBER, "other:ex9")},  # RQ 3: it runs another job now
        {"executing": (), "current_job": JOB_ID},  # RQ 2, data restored from an older copy
    ],
)
def test_a_run_whose_lease_ended_before_its_workers_last_heartbeat_is_not_held_by_it(
    records: dict[str, Any],
) -> None:
    # A worker renews the lease of the run it executes with every heartbeat: one that
    # heartbeated after this run's lease ended runs no such job, whatever it lists.
    ended = replace(entry(job=job_hash(started_ago_s=3600)), score=NOW - LEASE_GRACE_S - 20)
    busy = worker(last_heartbeat=iso(5), **records)

    verdict = decide(ended, busy)
    # Within the margin: the heartbeat before a horse past its timeout is killed
    # renews no lease.
    renewed = decide(replace(ended, score=NOW - LEASE_GRACE_S + 20), busy)

    # Acted on once it has not run for longer than lost_after, and never stopped.
    assert (verdict.state, verdict.action) == (State.ABANDONED, ACTION_NONE), verdict.reason
    assert "w1 is live but not executing it for 30s, within lost_after" in verdict.reason
    assert (renewed.state, renewed.action) == (State.OVERDUE, ACTION_STOP)


@pytest.mark.parametrize(
    ("records", "state"),
    [
        ({"executing": (f"{JOB_ID}:e2",)}, State.LEFTOVER),  # RQ 3: its own run, e2
        ({"executing": (), "current_job": JOB_ID}, State.RUNNING),  # RQ 2: names the job
    ],
)
def test_a_dead_runs_entry_never_gets_the_job_a_worker_runs_again_acted_on(
    records: dict[str, Any], state: State
) -> None:
    # The job was enqueued again under its id and a SimpleWorker (which renews no
    # heartbeat) runs it; the dead run's execution record expired, so its entry names
    # the job hash's worker, the new one, which has heartbeated since that lease ended.
    again = job_hash(started_ago_s=700, worker="w-simple", last_heartbeat=iso(700))
    dead_run = replace(entry(job=again, execution=None), score=NOW - 3600)
    simple = worker("w-simple", last_heartbeat=iso(700), **records)

    verdict = decide(dead_run, simple)

    assert verdict.state is state, verdict.reason
    assert verdict.action in (ACTION_NONE, ACTION_REMOVE_ENTRY)


def test_job_within_max_age_on_a_live_worker_is_running_and_kept() -> None:
    verdict = decide(entry(job=job_hash(started_ago_s=30)), worker())

    assert verdict.state is State.RUNNING
    assert verdict.action == ACTION_NONE
    assert verdict.follow_up is None


def test_job_exactly_max_age_old_is_still_running() -> None:
    verdict = decide(entry(job=job_hash(started_ago_s=600)), worker())

    assert verdict.state is State.RUNNING
    assert verdict.signals.age_s == 600


def test_job_one_second_over_max_age_is_overdue() -> None:
    verdict = decide(entry(job=job_hash(started_ago_s=601)), worker())

    assert verdict.state is State.OVERDUE
    assert verdict.signals.age_s == 601


def test_force_turns_a_running_job_into_an_overdue_one() -> None:
    forced = Rule(max_age_seconds=86400, action="cancel", force=True)

    # Its worker has heartbeated since it started: it watches a work horse.
    verdict = decide(
        entry(job=job_hash(started_ago_s=5)), worker(last_heartbeat=iso(2)), rule=forced
    )

    assert verdict.state is State.OVERDUE
    assert (verdict.action, verdict.follow_up) == (ACTION_STOP, "cancel")
    assert verdict.reason == "force is set"


@pytest.mark.parametrize(("beat_ago_s", "stopped"), [(901, False), (900, False), (870, True)])
def test_no_stop_goes_to_a_worker_that_has_not_heartbeated_since_the_job_started(
    beat_ago_s: float, stopped: bool
) -> None:
    # A SimpleWorker heartbeats just before it starts a job, and not again until it ends;
    # asked to stop it, RQ 3's files the job's own failure as stopped (no retries), RQ
    # 1.16's kills its own process group. A forking worker heartbeats while it watches.
    started = entry(job=job_hash(started_ago_s=900), execution=execution_hash(created_ago_s=900))

    verdict = decide(started, worker(last_heartbeat=iso(beat_ago_s)))

    assert verdict.state is State.OVERDUE
    assert verdict.action == (ACTION_STOP if stopped else "none")
    if not stopped:
        assert "but not stopped: " in verdict.reason
        assert "has not heartbeated since the job started" in verdict.reason


def test_no_stop_goes_to_a_worker_that_nothing_listens_for_on_its_command_channel() -> None:
    # Live by its named connection (an RQ 1 worker after Redis restarted never
    # subscribes again): a stop published on its channel would reach no one.
    started = entry(job=job_hash(started_ago_s=900), execution=execution_hash(created_ago_s=900))

    deaf = replace(worker(subscribers=0, connected=True), heard_on_server=0)

    verdict = decide(started, deaf)

    assert (verdict.state, verdict.action) == (State.OVERDUE, "none")
    assert "nothing listens on w1's command channel" in verdict.reason


def test_no_stop_goes_to_a_worker_whose_hash_expired_while_it_held_its_connection() -> None:
    # A SimpleWorker's hash expires during a long job (nothing renews it), as a frozen
    # worker's does; either still holds its connection, so it is live and holds the job.
    started = entry(job=job_hash(started_ago_s=900), execution=execution_hash(created_ago_s=900))

    verdict = decide(started, worker(exists=False, subscribers=1))

    assert (verdict.state, verdict.action) == (State.OVERDUE, "none")
    assert "has let its hash expire (it writes no heartbeat)" in verdict.reason


def test_force_does_not_change_what_happens_to_an_abandoned_job() -> None:
    forced = Rule(max_age_seconds=600, action="cancel", force=True)

    verdict = decide(entry(), rule=forced)

    assert (verdict.state, verdict.action) == (State.ABANDONED, "cancel")


def test_job_of_unknown_age_is_never_overdue_without_force() -> None:
    no_start = entry(job=job_hash(started_at=""), execution=None)
    zero = Rule(max_age_seconds=0, action="fail")

    verdict = decide(no_start, worker(), rule=zero)

    assert verdict.signals.age_s is None
    assert (verdict.state, verdict.action) == (State.RUNNING, ACTION_NONE)
    assert "age unknown" in verdict.reason


def test_job_of_unknown_age_is_overdue_with_force() -> None:
    no_start = entry(job=job_hash(started_at="garbage"), execution=None)

    verdict = decide(no_start, worker(), rule=Rule(force=True))

    assert verdict.signals.age_s is None
    assert verdict.state is State.OVERDUE


# Signals ----------------------------------------------------------------------------------------


def test_age_counts_from_the_start_not_from_creation() -> None:
    # Waited an hour in the queue, started 5s ago: 5 seconds old, not an hour.
    started = entry(job=job_hash(started_ago_s=5), execution=execution_hash(created_ago_s=5))

    verdict = decide(started, worker(), rule=Rule(max_age_seconds=60))

    assert verdict.signals.age_s == 5
    assert verdict.state is State.RUNNING


def test_age_falls_back_to_the_executions_float_creation_time() -> None:
    started = entry(job=job_hash(started_at=""), execution=execution_hash(created_ago_s=90.5))

    verdict = decide(started, worker(), rule=Rule(max_age_seconds=60))

    assert verdict.signals.age_s == pytest.approx(90.5)
    assert verdict.state is State.OVERDUE


def test_started_at_wins_over_the_execution_creation_time() -> None:
    started = entry(job=job_hash(started_ago_s=10), execution=execution_hash(created_ago_s=900))

    assert decide(started, worker()).signals.age_s == 10


@pytest.mark.parametrize(("job_beat_ago_s", "execution_beat_ago_s"), [(100.0, 10.0), (10.0, 100.0)])
def test_heartbeat_age_is_the_freshest_of_job_and_execution(
    job_beat_ago_s: float, execution_beat_ago_s: float
) -> None:
    started = entry(
        job=job_hash(started_ago_s=200, last_heartbeat=iso(job_beat_ago_s)),
        execution=execution_hash(created_ago_s=200, heartbeat_ago_s=execution_beat_ago_s),
    )

    signals = decide(started, worker()).signals

    assert signals.heartbeat_age_s == pytest.approx(10.0)


def test_heartbeat_age_is_unknown_when_no_heartbeat_was_written() -> None:
    started = entry(job=job_hash(last_heartbeat=""), execution=None)

    assert decide(started, worker()).signals.heartbeat_age_s is None


def test_signals_carry_the_jobs_timeout_and_status() -> None:
    signals = decide(entry(job=job_hash(timeout="-1")), worker()).signals

    assert (signals.timeout_s, signals.status, signals.worker) == (-1, "started", WORKER)


def test_age_is_never_negative_when_clocks_disagree() -> None:
    from_the_future = entry(job=job_hash(started_ago_s=-30))

    assert decide(from_the_future, worker()).signals.age_s == 0.0


# Timestamps and registry members ------------------------------------------------------------

EPOCH_2024 = 1_704_067_200.0  # 2024-01-01T00:00:00Z


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-01T00:00:00.000000Z", EPOCH_2024),
        ("2024-01-01T00:00:00.250000Z", EPOCH_2024 + 0.25),
        ("2024-01-01T00:00:00Z", EPOCH_2024),
        ("2024-01-01T00:00:00", EPOCH_2024),
        ("2024-01-01T00:00:00.500", EPOCH_2024 + 0.5),
        ("2024-01-01T02:00:00+02:00", EPOCH_2024),
        ("2023-12-31T19:00:00.000000-05:00", EPOCH_2024),
        ("1704067200.25", EPOCH_2024 + 0.25),
        ("1704067200", EPOCH_2024),
        (" 1704067200.5 ", EPOCH_2024 + 0.5),
    ],
)
def test_parse_timestamp_reads_every_form_rq_writes(text: str, expected: float) -> None:
    assert parse_timestamp(text) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "   ",
        "yesterday",
        "2024-13-01T00:00:00Z",
        "2024-01-01T00:00:00.000000+",
        "2024-01-01T00:00:00.1-0100Z",  # RQ's length and Z, with an offset inside
        "nan",
        "inf",
        "-5",
        "0",
    ],
)
def test_parse_timestamp_returns_none_for_what_is_not_a_moment(text: str | None) -> None:
    assert parse_timestamp(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-01T00:00:00.250000Z", EPOCH_2024 + 0.25),
        ("2024-01-01T00:00:00.1-0100Z", None),
    ],
)
def test_parse_timestamp_reads_rqs_form_where_fromisoformat_knows_no_z(
    monkeypatch: pytest.MonkeyPatch, text: str, expected: float | None
) -> None:
    # Python 3.10's fromisoformat refuses a trailing Z: the zone is cut off first.
    monkeypatch.setattr(model, "_READS_Z", False)
    assert parse_timestamp(text) == (None if expected is None else pytest.approx(expected))


def test_format_timestamp_round_trips_through_parse_timestamp() -> None:
    text = format_timestamp(EPOCH_2024 + 0.123456)

    assert text == "2024-01-01T00:00:00.123456Z"
    assert parse_timestamp(text) == pytest.approx(EPOCH_2024 + 0.123456, abs=1e-6)


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        (b"4f2a9c", ("4f2a9c", None)),
        (b"4f2a9c:0d1e2f", ("4f2a9c", "0d1e2f")),
        (b"old:style:ex1", ("old:style", "ex1")),
        (b"job1:", ("job1:", None)),
        (b":ex1", (":ex1", None)),
        (b"caf\xe9", ("caf\udce9", None)),
    ],
)
def test_split_member_separates_job_and_execution(
    member: bytes, expected: tuple[str, str | None]
) -> None:
    job_id, execution_id = split_member(member)

    assert (job_id, execution_id) == expected
    # Bytes that are not UTF-8 come back unchanged, so keys built from the id match.
    whole = job_id + (f":{execution_id}" if execution_id else "")
    assert whole.encode("utf-8", "surrogateescape") == member


def test_a_bare_id_entry_of_a_job_its_worker_runs_says_the_run_is_not_told() -> None:
    # An RQ 1 entry beside the RQ 3 run of the same job, on the worker both name.
    bare = entry(execution=None, member=JOB_ID)

    verdict = decide(bare, worker(executing=(MEMBER,)))

    assert (verdict.state, verdict.action) == (State.RUNNING, ACTION_NONE)
    assert verdict.reason == (
        f"{WORKER} is executing it, and its records do not say whether this entry is that run"
    )


def test_an_origin_that_is_not_utf8_is_shown_as_every_other_name_is() -> None:
    # The byte 0xc3 that is no UTF-8 shows as \xc3, as the queue's own name does elsewhere.
    verdict = decide(entry(job=job_hash(origin="\udcc3(")), worker())

    assert "; its origin is queue '\\xc3(', not 'default'" in verdict.reason


def test_one_retry_left_is_said_in_the_singular() -> None:
    assert (retries_left(1), retries_left(2)) == ("1 retry left", "2 retries left")
