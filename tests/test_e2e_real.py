"""opsctl end to end: a private redis-server, real `rq worker` processes, the real CLI.

Each test builds a situation with real workers (killed, slow, healthy), runs
`python -m opsctl apply POLICY --redis-url URL --format json`, reads the JSON report, and
then checks the end state through RQ's own API, the way an RQ user would see it. Registry
reads always pass `cleanup=False`: RQ's cleanup would itself change what is checked.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.utils import utcformat
from rq.worker_registration import get_keys

from conftest import (
    WorkerFactory,
    WorkerProcess,
    invoke_opsctl,
    job_status,
    run_opsctl,
    wait_for_status,
    wait_until_watched,
)

pytestmark = pytest.mark.redis_server


QUEUE = "e2e"
SLOW_QUEUE = "e2e-slow"

# Seconds a job may take to reach the status a test waits for.
STATUS_TIMEOUT_S = 10


# --- running opsctl -----------------------------------------------------------------------


def apply(policy: Path, redis_url: str, *extra: str) -> dict[str, Any]:
    """`opsctl apply` with a JSON report; the parsed report, after checking it exited 0."""
    result = run_opsctl("apply", str(policy), "--redis-url", redis_url, "--format", "json", *extra)
    assert result.returncode == 0, (
        f"opsctl apply exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def write_policy(
    tmp_path: Path,
    *,
    action: str = "fail",
    max_age: str = "10m",
    queues: dict[str, str] | None = None,
) -> Path:
    """A policy for QUEUE with `action` and `max_age`; `queues` adds name: max_age entries."""
    lines = ["version: 1", "defaults:", f"  max_age: {max_age}", f"  action: {action}"]
    lines += ["queues:", f"  - name: {QUEUE}"]
    for name, queue_max_age in (queues or {}).items():
        lines += [f"  - name: {name}", f"    max_age: {queue_max_age}"]
    path = tmp_path / f"policy-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def job_line(report: dict[str, Any], job_id: str) -> dict[str, Any]:
    """The report's one line about `job_id`."""
    lines: list[dict[str, Any]] = [line for line in report["jobs"] if line["id"] == job_id]
    assert len(lines) == 1, f"expected one line for job {job_id}: {json.dumps(report, indent=2)}"
    return lines[0]


def show(value: Any) -> str:
    """A report line in full, for assertion messages (pytest shortens dicts)."""
    return json.dumps(value, indent=2)


# --- building situations ------------------------------------------------------------------


def start_job(
    rq_workers: WorkerFactory,
    conn: redis.Redis,
    queue: str,
    seconds: float,
    **worker_options: Any,
) -> tuple[WorkerProcess, Job]:
    """A worker on `queue` that has started `sleep_for(seconds)`."""
    worker = rq_workers.start([queue], **worker_options)
    job = Queue(queue, connection=conn).enqueue("jobs.sleep_for", seconds)
    assert wait_for_status(conn, job.id, "started", STATUS_TIMEOUT_S) == "started"
    return worker, job


def abandon_job(rq_workers: WorkerFactory, conn: redis.Redis, seconds: float = 30) -> Job:
    """A job whose worker and work horse were SIGKILLed while it ran."""
    worker, job = start_job(rq_workers, conn, QUEUE, seconds)
    assert worker.kill(), "the worker had a work horse running the job"
    assert job_status(conn, job.id) == "started"
    return job


def add_orphan_entry(conn: redis.Redis, queue: str) -> str:
    """A started-registry entry whose job hash does not exist; its job id."""
    job_id = str(uuid.uuid4())
    lease_end = int(time.time()) + 60
    conn.zadd(f"rq:wip:{queue}", {f"{job_id}:{uuid.uuid4().hex}": lease_end})
    return job_id


def started_ids(conn: redis.Redis, queue: str = QUEUE) -> list[str]:
    """Job ids in the queue's started registry, read without RQ's cleanup."""
    registry = StartedJobRegistry(queue, connection=conn)
    return [job_id for job_id, _ in registry.get_job_and_execution_ids(cleanup=False)]


def failed_ids(conn: redis.Redis, queue: str = QUEUE) -> list[str]:
    """Job ids in the queue's failed registry, read without RQ's cleanup."""
    return FailedJobRegistry(queue, connection=conn).get_job_ids(cleanup=False)


def redis_state(conn: redis.Redis) -> dict[bytes, tuple[bytes | None, bool]]:
    """Every key with its DUMP and whether it has a TTL: equal states mean no change."""
    return {key: (conn.dump(key), conn.pttl(key) >= 0) for key in conn.scan_iter(count=1000)}


# --- abandoned: the worker died mid-job ---------------------------------------------------


def test_job_of_killed_worker_is_abandoned_and_failed_with_a_reason(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = abandon_job(rq_workers, redis_conn)

    report = apply(write_policy(tmp_path, action="fail"), redis_url)

    line = job_line(report, job.id)
    assert (line["state"], line["action"], line["outcome"]) == ("abandoned", "fail", "done"), show(
        line
    )
    assert job_status(redis_conn, job.id) == "failed"
    assert job.id in failed_ids(redis_conn)
    assert job.id not in started_ids(redis_conn)
    result = Job.fetch(job.id, connection=redis_conn).latest_result()
    assert result is not None and "opsctl" in (result.exc_string or "")


def test_job_of_killed_worker_is_requeued_and_a_new_worker_runs_it_to_the_end(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = abandon_job(rq_workers, redis_conn, seconds=1.5)

    report = apply(write_policy(tmp_path, action="requeue"), redis_url)

    line = job_line(report, job.id)
    assert (line["state"], line["action"], line["outcome"]) == ("abandoned", "requeue", "done"), (
        show(line)
    )
    assert job_status(redis_conn, job.id) == "queued"
    assert job.id in Queue(QUEUE, connection=redis_conn).get_job_ids()
    assert job.id not in started_ids(redis_conn)

    rq_workers.start([QUEUE])
    assert wait_for_status(redis_conn, job.id, "finished", STATUS_TIMEOUT_S) == "finished"
    result = Job.fetch(job.id, connection=redis_conn).latest_result()
    assert result is not None and result.return_value == "slept 1.5s"


def test_a_job_enqueued_again_under_its_id_runs_to_the_end_past_its_dead_entry(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # A scheduler enqueues a job under a fixed id; one run's worker died mid-job,
    # and the next run of the same id is now on a live worker.
    first = abandon_job(rq_workers, redis_conn)
    [(_, dead_execution)] = StartedJobRegistry(
        QUEUE, connection=redis_conn
    ).get_job_and_execution_ids(cleanup=False)
    rq_workers.start([QUEUE], job_monitoring_interval=30)
    job = Queue(QUEUE, connection=redis_conn).enqueue("jobs.sleep_for", 12, job_id=first.id)
    assert wait_for_status(redis_conn, job.id, "started", STATUS_TIMEOUT_S) == "started"

    report = apply(write_policy(tmp_path, action="fail"), redis_url)

    lines = {line["execution_id"]: line for line in report["jobs"] if line["id"] == job.id}
    dead = lines.pop(dead_execution)
    assert (dead["state"], dead["action"], dead["outcome"]) == (
        "leftover",
        "remove-entry",
        "done",
    ), show(dead)
    [running] = lines.values()
    assert (running["state"], running["action"]) == ("running", "none"), show(running)
    assert wait_for_status(redis_conn, job.id, "finished", 2 * STATUS_TIMEOUT_S) == "finished"
    results = Job.fetch(job.id, connection=redis_conn).results()
    assert [r.return_value for r in results] == ["slept 12s"]  # no failure was recorded
    assert started_ids(redis_conn) == []


def test_job_of_killed_worker_is_canceled(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = abandon_job(rq_workers, redis_conn)

    report = apply(write_policy(tmp_path, action="cancel"), redis_url)

    line = job_line(report, job.id)
    assert (line["state"], line["action"], line["outcome"]) == ("abandoned", "cancel", "done"), (
        show(line)
    )
    assert job_status(redis_conn, job.id) == "canceled"
    canceled = CanceledJobRegistry(QUEUE, connection=redis_conn).get_job_ids(cleanup=False)
    assert job.id in canceled
    assert job.id not in started_ids(redis_conn)


def test_job_of_killed_worker_is_deleted_without_a_trace(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = abandon_job(rq_workers, redis_conn)

    report = apply(write_policy(tmp_path, action="delete"), redis_url)

    line = job_line(report, job.id)
    assert (line["state"], line["action"], line["outcome"]) == ("abandoned", "delete", "done"), (
        show(line)
    )
    with pytest.raises(NoSuchJobError):
        Job.fetch(job.id, connection=redis_conn)
    assert_held_by_no_registry(redis_conn, job.id)
    keys = [key for key in redis_conn.scan_iter(count=1000) if job.id.encode() in key]
    assert keys == [], "no key names the deleted job"


def assert_held_by_no_registry(conn: redis.Redis, job_id: str) -> None:
    """The job is in no registry of QUEUE and not waiting on it."""
    registries = [
        StartedJobRegistry,
        FinishedJobRegistry,
        FailedJobRegistry,
        CanceledJobRegistry,
        DeferredJobRegistry,
        ScheduledJobRegistry,
    ]
    for registry_class in registries:
        registry = registry_class(QUEUE, connection=conn)
        assert job_id not in registry.get_job_ids(cleanup=False), registry_class.__name__
    assert job_id not in Queue(QUEUE, connection=conn).get_job_ids()


# --- overdue and running: the worker is alive ---------------------------------------------


def stopped_then_failed(conn: redis.Redis, job_id: str) -> None:
    assert job_status(conn, job_id) == "stopped"
    assert job_id in failed_ids(conn)


def stopped_then_requeued(conn: redis.Redis, job_id: str) -> None:
    assert job_status(conn, job_id) == "queued"
    assert job_id in Queue(QUEUE, connection=conn).get_job_ids()
    assert job_id not in failed_ids(conn)
    # RQ gave the stopped job's hash its failure_ttl; a queued job must not expire.
    assert conn.ttl(f"rq:job:{job_id}") == -1


def stopped_then_canceled(conn: redis.Redis, job_id: str) -> None:
    assert job_status(conn, job_id) == "canceled"
    assert job_id in CanceledJobRegistry(QUEUE, connection=conn).get_job_ids(cleanup=False)
    assert job_id not in failed_ids(conn)


def stopped_then_deleted(conn: redis.Redis, job_id: str) -> None:
    with pytest.raises(NoSuchJobError):
        Job.fetch(job_id, connection=conn)
    assert_held_by_no_registry(conn, job_id)


@pytest.mark.parametrize(
    ("action", "check_end_state"),
    [
        ("fail", stopped_then_failed),
        ("requeue", stopped_then_requeued),
        ("cancel", stopped_then_canceled),
        ("delete", stopped_then_deleted),
    ],
)
def test_overdue_job_is_stopped_by_its_live_worker_then_gets_the_policy_action(
    action: str,
    check_end_state: Any,
    rq_workers: WorkerFactory,
    redis_conn: redis.Redis,
    redis_url: str,
    tmp_path: Path,
) -> None:
    # After a requeue the worker would take the job again; one job and it exits instead.
    extra = ["--max-jobs", "1"] if action == "requeue" else []
    worker, job = start_job(rq_workers, redis_conn, QUEUE, 60, extra=extra)
    wait_until_watched(redis_conn, job.id)  # and so past max_age 1s

    policy = write_policy(tmp_path, action=action, max_age="1s")
    logged = "-v", "--log-format", "json"
    result = run_opsctl("apply", str(policy), "--redis-url", redis_url, "--format", "json", *logged)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    line = job_line(report, job.id)
    assert line["state"] == "overdue"
    assert line["action"] in ({"stop"} if action == "fail" else {"stop", action})
    assert line["outcome"] == "done", show(line)
    logs = [json.loads(entry) for entry in result.stderr.splitlines()]
    [log] = [entry for entry in logs if entry.get("job_id") == job.id]
    assert (log["action"], log["outcome"]) == (line["action"], "done")
    assert line["worker"] == worker.name
    assert line["stop_confirmed"] is True, "the report says the worker confirmed the stop"
    assert job.id not in started_ids(redis_conn)
    check_end_state(redis_conn, job.id)
    if action != "requeue":
        assert worker.running(), "stopping a job leaves its worker running"
        assert report["workers"] == []
    if action == "fail":  # an undo leaves a stopped job, and says so
        undo = run_opsctl(
            "requeue", "--run", report["run_id"], "--redis-url", redis_url, "--format", "json"
        )
        assert undo.returncode == 0, undo.stderr
        assert (json.loads(undo.stdout)["jobs"], json.loads(undo.stdout)["stopped_not_undone"]) == (
            [],
            1,
        )
        check_end_state(redis_conn, job.id)


@pytest.mark.parametrize("action", ["delete", "cancel", "requeue"])
def test_a_stopped_job_enqueued_again_before_its_follow_up_is_left_to_its_new_run(
    action: str,
    rq_workers: WorkerFactory,
    redis_conn: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opsctl.apply import Executor

    # One job, and the worker exits: no worker takes the job when it is enqueued again.
    _, job = start_job(rq_workers, redis_conn, QUEUE, 60, extra=["--max-jobs", "1"])
    wait_until_watched(redis_conn, job.id)  # and so past max_age 1s
    waited = Executor._wait_until_ended

    def enqueued_again_once_stopped(self: Executor, outcomes: Any) -> dict[str, str]:
        statuses = waited(self, outcomes)
        # A scheduler puts the same id back on its queue the moment it was stopped.
        Queue(QUEUE, connection=redis_conn).enqueue("jobs.sleep_for", 5, job_id=job.id)
        return statuses

    monkeypatch.setattr(Executor, "_wait_until_ended", enqueued_again_once_stopped)
    policy = write_policy(tmp_path, action=action, max_age="1s")
    result = invoke_opsctl("apply", str(policy), "--redis-url", redis_url, "--format", "json")

    assert result.exit_code == 0, result.output
    line = job_line(json.loads(result.stdout), job.id)
    assert (line["stop_confirmed"], line["outcome"]) == (True, "skipped"), show(line)
    assert line["reason"].endswith(
        f"{action} not done: it changed since it was stopped (its status is now 'queued')"
    )
    assert job_status(redis_conn, job.id) == "queued"
    assert job.id in Queue(QUEUE, connection=redis_conn).get_job_ids()


@pytest.mark.parametrize(
    ("action", "spoil", "said"),
    [
        ("cancel", f"rq:canceled:{QUEUE}", f"rq:canceled:{QUEUE} holds a string"),
        ("requeue", "opsctl:rescues:rq:{job}", "holds something other than a count"),
        # RQ's worker files a stopped job there: it would be left in no registry.
        ("fail", f"rq:failed:{QUEUE}", f"rq:failed:{QUEUE} holds a string"),
    ],
)
def test_an_overdue_job_whose_follow_up_could_not_be_done_is_not_stopped(
    action: str,
    spoil: str,
    said: str,
    rq_workers: WorkerFactory,
    redis_conn: redis.Redis,
    redis_url: str,
    tmp_path: Path,
) -> None:
    # Stopped, the job would be left failed and killed, not what the policy says.
    worker, job = start_job(rq_workers, redis_conn, QUEUE, 60)
    redis_conn.set(spoil.format(job=job.id), "not what opsctl wrote")
    wait_until_watched(redis_conn, job.id)  # and so past max_age 1s
    policy = write_policy(tmp_path, action=action, max_age="1s")

    result = run_opsctl("apply", str(policy), "--redis-url", redis_url, "--format", "json")

    assert result.returncode == 1, result.stderr  # an error, named in the report
    line = job_line(json.loads(result.stdout), job.id)
    assert (line["outcome"], line["stop_confirmed"]) == ("error", False), show(line)
    assert f"not stopped: its follow-up ({action}) could not be done: " in line["reason"]
    assert said in line["reason"]
    assert job_status(redis_conn, job.id) == "started"  # through RQ's API: still running
    assert job.id in started_ids(redis_conn)
    assert worker.running()


def test_an_overdue_job_is_not_stopped_while_rqs_lock_would_hold_off_its_follow_up(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # A worker killed while cleaning leaves RQ's maintenance lock for 15 minutes:
    # stopped, the job would sit failed with its requeue never applied.
    worker, job = start_job(rq_workers, redis_conn, QUEUE, 60)
    redis_conn.set(f"rq:clean_registries:{QUEUE}", "a worker that died cleaning", ex=899)
    wait_until_watched(redis_conn, job.id)  # and so past max_age 1s
    policy = write_policy(tmp_path, action="requeue", max_age="1s")

    result = run_opsctl(
        "apply", str(policy), "--redis-url", redis_url, "--format", "json", "--lock-timeout", "1"
    )

    assert result.returncode == 5, result.stderr  # RQ's lock held: run again later
    line = job_line(json.loads(result.stdout), job.id)
    assert (line["outcome"], line["stop_confirmed"]) == ("skipped", False), show(line)
    assert "not stopped, as its requeue could not follow: RQ's maintenance lock" in line["reason"]
    assert job_status(redis_conn, job.id) == "started"
    assert worker.running()


def test_a_stopped_job_requeued_keeps_what_waits_for_it(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # RQ gives a stopped job's hash and its dependents set the job's failure_ttl; once
    # requeued, neither may expire while it waits, or its dependents wait for ever.
    _, job = start_job(rq_workers, redis_conn, QUEUE, 60, extra=["--max-jobs", "1"])
    waiting = Queue(QUEUE, connection=redis_conn).enqueue("jobs.quick", depends_on=job)
    wait_until_watched(redis_conn, job.id)  # and so past max_age 1s

    report = apply(write_policy(tmp_path, action="requeue", max_age="1s"), redis_url)

    line = job_line(report, job.id)
    assert (line["action"], line["outcome"]) == ("requeue", "done"), show(line)
    assert job_status(redis_conn, job.id) == "queued"
    assert job_status(redis_conn, waiting.id) == "deferred"
    assert redis_conn.ttl(job.key) == -1
    assert redis_conn.ttl(job.dependents_key) == -1


def test_job_within_max_age_is_left_running_and_finishes_normally(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # Long enough that the job is still running when apply returns on a loaded machine.
    worker, job = start_job(rq_workers, redis_conn, QUEUE, 12)

    report = apply(write_policy(tmp_path, max_age="10m"), redis_url)

    line = job_line(report, job.id)
    assert (line["state"], line["action"], line["outcome"]) == ("running", "none", "kept"), show(
        line
    )
    assert line["worker"] == worker.name
    assert job_status(redis_conn, job.id) == "started"
    assert job.id in started_ids(redis_conn)
    assert wait_for_status(redis_conn, job.id, "finished", 12 + STATUS_TIMEOUT_S) == "finished"
    result = Job.fetch(job.id, connection=redis_conn).latest_result()
    assert result is not None and result.return_value == "slept 12s"


def test_a_job_an_idle_worker_still_lists_is_failed_once_lost_after_passes_and_never_stopped(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # A work horse that ends its process at once (a library calling os._exit) leaves
    # the job started and listed among the now idle worker's executions. A stop sent
    # for it finds no work horse, and RQ's worker then kills its own process group.
    worker = rq_workers.start([QUEUE])
    job = Queue(QUEUE, connection=redis_conn).enqueue("jobs.exit_at_once")
    deadline = time.monotonic() + STATUS_TIMEOUT_S
    listed = f"rq:worker:{worker.name}:executions"
    while time.monotonic() < deadline and not (
        redis_conn.hget(f"rq:worker:{worker.name}", "state") == b"idle"
        and redis_conn.scard(listed) == 1
    ):
        time.sleep(0.2)
    assert job_status(redis_conn, job.id) == "started"
    assert redis_conn.scard(listed) == 1, "the idle worker still lists the job"
    time.sleep(2.5)  # past max_age 1s and lost_after 2s
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\ndefaults:\n  max_age: 1s\n  lost_after: 2s\n  action: fail\n"
        f"queues:\n  - name: {QUEUE}\n"
    )

    report = apply(policy, redis_url)

    line = job_line(report, job.id)
    assert (line["state"], line["action"], line["outcome"]) == ("abandoned", "fail", "done"), show(
        line
    )
    assert f"{worker.name} is live but not executing it" in line["reason"]
    assert job_status(redis_conn, job.id) == "failed"
    assert job.id in failed_ids(redis_conn)
    time.sleep(1)  # a stop would have killed the worker by now
    assert worker.running(), "the worker is left running"


def test_job_of_a_stopped_worker_whose_hash_expired_is_left_to_its_work_horse(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # SIGSTOP freezes the worker (not its horse): its heartbeats stop and its hash
    # expires, deleted here at once, while the horse runs on and the frozen worker
    # still holds its connection.
    worker, job = start_job(rq_workers, redis_conn, QUEUE, 8)
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        redis_conn.delete(f"rq:worker:{worker.name}")

        report = apply(write_policy(tmp_path, action="requeue"), redis_url)

        line = job_line(report, job.id)
        assert (line["state"], line["outcome"], line["worker_alive"]) == (
            "running",
            "kept",
            True,
        ), show(line)
        assert "still holds its connection" in line["worker_evidence"]
        assert worker.name not in {w["name"] for w in report["workers"]}
        assert Queue(QUEUE, connection=redis_conn).get_job_ids() == []
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert wait_for_status(redis_conn, job.id, "finished", 8 + STATUS_TIMEOUT_S) == "finished"
    assert Job.fetch(job.id, connection=redis_conn).return_value() == "slept 8s"


# --- entries without a started job ---------------------------------------------------------


def test_orphaned_entry_is_removed(redis_conn: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    job_id = add_orphan_entry(redis_conn, QUEUE)

    report = apply(write_policy(tmp_path), redis_url)

    line = job_line(report, job_id)
    assert (line["state"], line["action"], line["outcome"]) == (
        "orphaned",
        "remove-entry",
        "done",
    ), show(line)
    assert redis_conn.zcard(f"rq:wip:{QUEUE}") == 0
    assert started_ids(redis_conn) == []


def test_leftover_entry_of_finished_job_is_removed_and_the_job_stays_finished(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    rq_workers.start([QUEUE])
    job = Queue(QUEUE, connection=redis_conn).enqueue("jobs.quick")
    assert wait_for_status(redis_conn, job.id, "finished", STATUS_TIMEOUT_S) == "finished"
    result = Job.fetch(job.id, connection=redis_conn).latest_result()
    execution_id = (result.execution_id if result else None) or uuid.uuid4().hex
    lease_end = int(time.time()) + 60
    redis_conn.zadd(f"rq:wip:{QUEUE}", {f"{job.id}:{execution_id}": lease_end})
    assert started_ids(redis_conn) == [job.id]

    report = apply(write_policy(tmp_path), redis_url)

    line = job_line(report, job.id)
    assert (line["state"], line["action"], line["outcome"]) == (
        "leftover",
        "remove-entry",
        "done",
    ), show(line)
    assert started_ids(redis_conn) == []
    assert job_status(redis_conn, job.id) == "finished"
    assert job.id in FinishedJobRegistry(QUEUE, connection=redis_conn).get_job_ids(cleanup=False)
    assert job.id not in failed_ids(redis_conn)


# --- runs that must change nothing --------------------------------------------------------


def build_mixed_scene(rq_workers: WorkerFactory, conn: redis.Redis) -> dict[str, str]:
    """An abandoned job, an overdue job on a live worker and an orphaned entry.

    The live worker heartbeats only every 30 s, so for the next half minute nothing but
    opsctl writes to Redis. Returns the job ids by the state opsctl should find.
    """
    abandoned = abandon_job(rq_workers, conn)
    worker, overdue = start_job(rq_workers, conn, SLOW_QUEUE, 60, job_monitoring_interval=30)
    orphaned = add_orphan_entry(conn, QUEUE)
    time.sleep(1.5)  # the slow queue's max_age is 1s
    # The heartbeat the worker writes as it watches its work horse, 30 s early.
    conn.hset(f"rq:worker:{worker.name}", "last_heartbeat", utcformat(datetime.now(timezone.utc)))
    return {"abandoned": abandoned.id, "overdue": overdue.id, "orphaned": orphaned}


def test_dry_run_changes_nothing_in_redis(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    scene = build_mixed_scene(rq_workers, redis_conn)
    policy = write_policy(tmp_path, queues={SLOW_QUEUE: "1s"})
    before = redis_state(redis_conn)

    report = apply(policy, redis_url, "--dry-run")

    assert redis_state(redis_conn) == before
    assert report["dry_run"] is True
    for state, job_id in scene.items():
        line = job_line(report, job_id)
        assert (line["state"], line["outcome"]) == (state, "planned"), show(line)
    assert report["summary"]["acted"] == 0
    assert [w["outcome"] for w in report["workers"]] == ["planned"]


def test_second_apply_right_after_the_first_changes_nothing(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    abandoned = abandon_job(rq_workers, redis_conn)
    orphaned = add_orphan_entry(redis_conn, QUEUE)
    policy = write_policy(tmp_path)
    first = apply(policy, redis_url)
    assert first["summary"]["acted"] == 2, first
    before = redis_state(redis_conn)

    second = apply(policy, redis_url)

    assert redis_state(redis_conn) == before
    assert second["summary"]["acted"] == 0
    assert second["summary"]["errors"] == 0
    assert second["workers"] == []
    assert {line["id"] for line in second["jobs"]}.isdisjoint({abandoned.id, orphaned})
    assert job_status(redis_conn, abandoned.id) == "failed"


# --- worker registrations -----------------------------------------------------------------


def test_dead_worker_registration_is_removed_and_a_live_one_stays(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    dead = rq_workers.start([QUEUE])
    live = rq_workers.start([QUEUE])
    job = Queue(QUEUE, connection=redis_conn).enqueue("jobs.quick")
    assert wait_for_status(redis_conn, job.id, "finished", STATUS_TIMEOUT_S) == "finished"
    dead.kill()
    dead_key, live_key = f"rq:worker:{dead.name}", f"rq:worker:{live.name}"
    assert dead_key in get_keys(connection=redis_conn)

    report = apply(write_policy(tmp_path), redis_url)

    lines = {line["name"]: line for line in report["workers"]}
    assert set(lines) == {dead.name}, report["workers"]
    assert lines[dead.name]["alive"] is False
    assert lines[dead.name]["outcome"] == "done"
    assert get_keys(connection=redis_conn) == {live_key}
    assert get_keys(Queue(QUEUE, connection=redis_conn)) == {live_key}
    assert live.running()


def test_a_worker_started_again_under_a_removed_name_does_not_inherit_its_jobs(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # A supervisor that gives workers fixed names starts one again after a crash. The
    # run that removed the dead registration covered another queue only, so the
    # crashed job is still there for a later run.
    other = f"{QUEUE}-other"
    worker = rq_workers.start([QUEUE, other], name="fixed-name")
    job = Queue(QUEUE, connection=redis_conn).enqueue("jobs.sleep_for", 60)
    assert wait_for_status(redis_conn, job.id, "started", STATUS_TIMEOUT_S) == "started"
    assert worker.kill(), "the worker had a work horse running the job"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\ndefaults:\n  action: fail\n  lost_after: 2s\n"
        f"queues:\n  - name: {QUEUE}\n  - name: {other}\n"
    )
    grace = ("--reconnect-grace", "0")
    first = apply(policy, redis_url, "--queue", other, *grace)
    assert [(w["name"], w["outcome"]) for w in first["workers"]] == [("fixed-name", "done")]
    assert job_status(redis_conn, job.id) == "started"
    again = rq_workers.start([QUEUE, other], name="fixed-name")
    time.sleep(2.5)  # past lost_after since the job last ran

    report = apply(policy, redis_url, *grace)

    line = job_line(report, job.id)
    assert (line["state"], line["outcome"]) == ("abandoned", "done"), show(line)
    assert job_status(redis_conn, job.id) == "failed"
    assert job.id in failed_ids(redis_conn)
    assert again.running()


def test_report_names_the_server_version_and_warns_when_keys_can_be_evicted(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path)
    calm = apply(policy, redis_url, "--dry-run")
    # Our own private server: its setting is put back before the test ends.
    redis_conn.config_set("maxmemory-policy", "allkeys-lru")
    try:
        evicting = apply(policy, redis_url, "--dry-run")
    finally:
        redis_conn.config_set("maxmemory-policy", "noeviction")

    assert calm["server_version"] == redis_conn.info()["redis_version"]
    assert not any("maxmemory-policy" in w for w in calm["warnings"])
    assert any("maxmemory-policy is allkeys-lru" in w for w in evicting["warnings"])
