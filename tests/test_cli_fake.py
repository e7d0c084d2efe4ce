"""`opsctl apply` end to end, against a fakeredis server reached over TCP.

RQ's state is built with RQ's own API, the way a worker writes it (see RQ-NOTES §7): a job
is enqueued, then an execution is created for it, the job is marked started by a worker
name and taken off its queue. A dead worker is a name with no live connection; a live one
is a registered worker whose command channel a test client listens on. The end state is
checked through RQ's API, as a user of RQ would see it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
from click.testing import Result
from rich.console import Console
from rq import Queue, Retry, SimpleWorker, Worker
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Dependency, Job, JobStatus
from rq.registry import (
    CanceledJobRegistry,
    FailedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.utils import utcformat, utcparse
from rq.worker_registration import get_keys
from typer.testing import CliRunner

from conftest import opsctl_env, serve_fake_redis
from opsctl import apply as apply_module
from opsctl import run, terminal
from opsctl.actions import Actor
from opsctl.cli import app
from opsctl.engine import ACTION_NONE, ACTION_REMOVE_ENTRY, ACTION_STOP, State
from opsctl.keys import Keys
from opsctl.policy import ACTIONS, load_policy

REPOSITORY = Path(__file__).resolve().parent.parent
REPORT_SCHEMA = json.loads((REPOSITORY / "schemas" / "report.schema.json").read_text())

#: Seconds a fixture's execution lease lasts; long enough that nothing expires mid-test.
LEASE_S = 3600

#: A policy with one queue, "default", allowing 10 minutes; the test fills in the action.
DEFAULT_POLICY = """
    version: 1
    defaults:
      max_age: 10m
      action: {action}
    queues:
      - name: default
"""


# --- the fake server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    """A fakeredis server on 127.0.0.1 and a free port for this module; its URL."""
    with serve_fake_redis() as url:
        yield url


@pytest.fixture
def url(fake_server: str) -> str:
    """The fake server's URL, emptied before the test."""
    # FLUSHALL only ever reaches the fake server this module started.
    client = redis.Redis.from_url(fake_server)
    try:
        client.flushall()
        client.config_set("requirepass", "")
    finally:
        client.close()
    return fake_server


@pytest.fixture
def conn(url: str) -> Iterator[redis.Redis]:
    """A client of the fake server with the bytes replies RQ needs."""
    client = redis.Redis.from_url(url, decode_responses=False)
    yield client
    client.close()


# --- building RQ state ----------------------------------------------------------------------


def started_job(
    conn: redis.Redis,
    worker: str,
    queue: str = "default",
    *,
    started_ago_s: float = 0.0,
    **enqueue: Any,
) -> Job:
    """A job that `worker` took from `queue` and started `started_ago_s` seconds ago."""
    rq_queue = Queue(queue, connection=conn)
    job = rq_queue.enqueue("jobs.quick", **enqueue)
    with conn.pipeline() as pipe:
        Execution.create(job, LEASE_S, pipe, worker_name=worker)
        job.prepare_for_execution(worker, pipe)
        pipe.lrem(rq_queue.key, 0, job.id)
        pipe.execute()

    if started_ago_s:
        moment = datetime.now(timezone.utc) - timedelta(seconds=started_ago_s)
        conn.hset(job.key, mapping={"started_at": utcformat(moment)})
        for execution in job.get_executions():
            conn.hset(execution.key, "created_at", moment.timestamp())
    return job


def register_worker(url: str, name: str, queue: str = "default") -> None:
    """Register a worker the way RQ does at start-up, then let it die without a goodbye.

    Its hash and registrations stay, as after a SIGKILL; the connection RQ named after it
    is closed and nothing listens on its command channel.
    """
    client = redis.Redis.from_url(url, decode_responses=False)
    try:
        worker = SimpleWorker([Queue(queue, connection=client)], name=name, connection=client)
        worker.register_birth()
        worker.set_state("busy")
    finally:
        client.close()


class LiveWorker:
    """A registered worker that holds its connection: it listens on its command channel.

    With `obeys_stop` it handles RQ's stop-job command as a real worker does: the job
    becomes `stopped`, its execution ends and it is filed in the FailedJobRegistry.
    """

    def __init__(self, url: str, name: str, queue: str = "default", obeys_stop: bool = False):
        self.name = name
        self.obeys_stop = obeys_stop
        self.conn = redis.Redis.from_url(url, decode_responses=False)
        queues = [Queue(queue, connection=self.conn)]
        self.worker = SimpleWorker(queues, name=name, connection=self.conn)
        self.worker.register_birth()
        self.worker.set_state("busy")
        self.commands: list[dict[str, Any]] = []
        self.received_at: list[float] = []  # time.monotonic() of each command
        self.pubsub = self.conn.pubsub()
        self.pubsub.subscribe(**{f"rq:pubsub:{name}": self._on_command})
        self.thread = self.pubsub.run_in_thread(sleep_time=0.02, daemon=True)

    def _on_command(self, message: dict[str, Any]) -> None:
        payload = json.loads(message["data"])
        self.received_at.append(time.monotonic())
        self.commands.append(payload)
        if self.obeys_stop and payload.get("command") == "stop-job":
            self._stop(payload["job_id"])

    def _stop(self, job_id: str) -> None:
        job = Job.fetch(job_id, connection=self.conn)
        with self.conn.pipeline() as pipe:
            job.set_status(JobStatus.STOPPED, pipeline=pipe)
            for execution in job.get_executions():
                execution.delete(job, pipe)
            FailedJobRegistry(job.origin, connection=self.conn).add(
                job, exc_string="stopped by command", pipeline=pipe
            )
            pipe.execute()

    def close(self) -> None:
        self.thread.stop()
        self.thread.join(timeout=5)
        self.pubsub.close()
        self.conn.close()


@pytest.fixture
def live_worker(url: str) -> Iterator[Any]:
    """A factory of live workers: `live_worker("w-live", obeys_stop=True)`."""
    started: list[LiveWorker] = []

    def start(name: str, queue: str = "default", obeys_stop: bool = False) -> LiveWorker:
        worker = LiveWorker(url, name, queue, obeys_stop)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def everything(conn: redis.Redis) -> dict[bytes, tuple[bytes | None, bool]]:
    """Every key's serialized value and whether it expires: what 'nothing changed' means."""
    return {key: (conn.dump(key), conn.ttl(key) >= 0) for key in sorted(conn.keys("*"))}


def status_of(conn: redis.Redis, job_id: str) -> str | None:
    """The job's status through RQ's API; None when the job no longer exists."""
    try:
        return Job.fetch(job_id, connection=conn).get_status().value
    except NoSuchJobError:
        return None


def started_ids(conn: redis.Redis, queue: str = "default") -> list[str]:
    return StartedJobRegistry(queue, connection=conn).get_job_ids(cleanup=False)


# --- running opsctl -------------------------------------------------------------------------


def write_policy(tmp_path: Path, text: str, **values: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text.format(**values) if values else text))
    return path


def opsctl(*args: str) -> Result:
    """Run the CLI in-process, with no Redis URL in its environment."""
    result = CliRunner().invoke(app, list(args), env={"REDIS_URL": None})
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def apply(policy: Path, url: str, *options: str, exit_code: int = 0) -> dict[str, Any]:
    """`opsctl apply --format json`; the report, once the exit code is as expected."""
    result = opsctl("apply", str(policy), "--redis-url", url, "--format", "json", *options)
    assert result.exit_code == exit_code, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def jobs_by_id(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["id"]: job for job in report["jobs"]}


# --- dry run --------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_changes_nothing(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    register_worker(url, "w-crashed")
    abandoned = started_job(conn, "w-crashed")
    orphan = started_job(conn, "w-crashed")
    conn.delete(orphan.key)
    leftover = started_job(conn, "w-crashed")
    leftover.set_status(JobStatus.FINISHED)
    live_worker("w-live")
    running = started_job(conn, "w-live")
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="delete")
    before = everything(conn)

    result = opsctl("apply", str(policy), "--redis-url", url, "--dry-run")

    assert result.exit_code == 0, result.output
    assert everything(conn) == before
    assert "dry run: nothing will be changed" in result.stdout
    rows = {line for line in result.stdout.splitlines() if line.startswith("│ default │")}
    assert len(rows) == 4, result.stdout
    for job, state, action, outcome in [
        (abandoned, "abandoned", "delete", "planned"),
        (orphan, "orphaned", "remove-entry", "planned"),
        (leftover, "leftover", "remove-entry", "planned"),
        (running, "running", "none", "kept"),
    ]:
        [row] = [r for r in rows if job.id[:15] in r]
        cells = [cell.strip() for cell in row.split("│")]
        assert (state, action, outcome) == (cells[3], cells[-4], cells[-3]), row
    assert "w-crashed" in result.stdout.split("dead worker registrations")[1]


# --- each action ----------------------------------------------------------------------------


def test_fail_files_an_abandoned_job_as_failed_with_a_reason_naming_opsctl(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job = started_job(conn, "w-crashed")
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    report = apply(policy, url)

    assert status_of(conn, job.id) == "failed"
    assert FailedJobRegistry("default", connection=conn).get_job_ids(cleanup=False) == [job.id]
    assert started_ids(conn) == []
    reason = Job.fetch(job.id, connection=conn).latest_result().exc_string
    assert f"Failed by opsctl (run {report['run_id']})" in reason
    assert "abandoned" in reason and "w-crashed" in reason
    assert jobs_by_id(report)[job.id]["outcome"] == "done"


def test_job_failed_by_opsctl_can_be_retried_with_rqs_own_tools(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job = started_job(conn, "w-crashed")
    apply(write_policy(tmp_path, DEFAULT_POLICY, action="fail"), url)
    failed = FailedJobRegistry("default", connection=conn)

    failed.requeue(job.id)

    queue = Queue("default", connection=conn)
    assert queue.get_job_ids() == [job.id]
    assert SimpleWorker([queue], connection=conn).work(burst=True)
    assert status_of(conn, job.id) == "finished"
    assert failed.get_job_ids(cleanup=False) == []


def test_abandoned_job_whose_execution_record_expired_is_failed_and_can_be_retried(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    # After a SIGKILL the execution hash expires with its lease; the job hash, its
    # executions index and the registry entry stay behind.
    job = started_job(conn, "w-crashed")
    for execution in job.get_executions():
        conn.delete(execution.key)
    apply(write_policy(tmp_path, DEFAULT_POLICY, action="fail"), url)
    failed = FailedJobRegistry("default", connection=conn)

    failed.requeue(job.id)

    assert status_of(conn, job.id) == "queued"
    assert started_ids(conn) == []
    assert Job.fetch(job.id, connection=conn).get_executions() == []


def test_requeue_puts_an_abandoned_job_back_on_its_queue_and_a_worker_runs_it(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job = started_job(conn, "w-crashed")
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="requeue")

    apply(policy, url)

    queue = Queue("default", connection=conn)
    assert status_of(conn, job.id) == "queued"
    assert queue.get_job_ids() == [job.id]
    assert started_ids(conn) == []
    assert SimpleWorker([queue], connection=conn).work(burst=True)
    assert status_of(conn, job.id) == "finished"
    assert Job.fetch(job.id, connection=conn).return_value() == "done"


@pytest.mark.parametrize(
    ("kind", "outcome", "exit_code", "said"),
    [
        ("hash", "error", 1, "rq:clean_registries:aa, is a hash, not the string RQ writes"),
        ("pinned", "skipped", 5, "rq:clean_registries:aa, is held (by hand) and never expires"),
    ],
)
def test_a_maintenance_lock_that_no_run_left_holds_back_its_own_queue_alone(
    conn: redis.Redis, url: str, tmp_path: Path, kind: str, outcome: str, exit_code: int, said: str
) -> None:
    if kind == "hash":
        conn.hset("rq:clean_registries:aa", "x", "1")
    else:
        conn.set("rq:clean_registries:aa", "by hand")
    held_back, cleaned = started_job(conn, "w-dead", "aa"), started_job(conn, "w-dead", "bb")
    policy = write_policy(tmp_path, 'version: 1\nqueues:\n  - name: "*"\n    action: fail\n')

    began = time.monotonic()
    report = apply(policy, url, "--lock-timeout", "30", exit_code=exit_code)

    assert time.monotonic() - began < 20, "a lock that will never go is not waited for"
    lines = jobs_by_id(report)
    assert lines[held_back.id]["outcome"] == outcome
    assert said in lines[held_back.id]["reason"]
    assert status_of(conn, held_back.id) == "started"
    assert lines[cleaned.id]["outcome"] == "done"
    assert status_of(conn, cleaned.id) == "failed"
    assert report["refused"] is None


def test_a_run_a_live_worker_lists_but_whose_record_is_gone_holds_its_job_no_more(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    # An earlier run of the job on w-busy ended its process at once, without RQ's
    # cleanup: w-busy's set of executions still lists it (its heartbeat keeps the set),
    # and the run's record has expired. The job was retried on w-crashed, which died.
    live_worker("w-busy")
    other = started_job(conn, "w-busy")  # what w-busy runs now
    register_worker(url, "w-crashed")
    job = started_job(conn, "w-crashed")
    conn.sadd("rq:worker:w-busy:executions", f"{job.id}:{'0' * 32}")
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="requeue")

    report = apply(policy, url)

    line = jobs_by_id(report)[job.id]
    assert (line["state"], line["action"], line["outcome"]) == ("abandoned", "requeue", "done")
    assert status_of(conn, job.id) == "queued"
    assert Queue("default", connection=conn).get_job_ids() == [job.id]
    assert started_ids(conn) == [other.id]


def test_cancel_marks_an_abandoned_job_canceled(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job = started_job(conn, "w-crashed")
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="cancel")

    apply(policy, url)

    assert status_of(conn, job.id) == "canceled"
    assert CanceledJobRegistry("default", connection=conn).get_job_ids(cleanup=False) == [job.id]
    assert started_ids(conn) == []
    assert Queue("default", connection=conn).get_job_ids() == []


def test_delete_removes_an_abandoned_job_without_a_trace(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job = started_job(conn, "w-crashed")
    kept = Queue("default", connection=conn).enqueue("jobs.quick")
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="delete")

    apply(policy, url)

    with pytest.raises(NoSuchJobError):
        Job.fetch(job.id, connection=conn)
    assert started_ids(conn) == []
    mentions = [key for key in conn.keys("*") if job.id.encode() in key]
    assert mentions == []
    members = _all_members(conn)
    assert [m for m in members if job.id.encode() in m] == []
    assert status_of(conn, kept.id) == "queued", "other jobs are left alone"


def _all_members(conn: redis.Redis) -> list[bytes]:
    """Every member of every set, sorted set and list on the server."""
    members: list[bytes] = []
    for key in conn.keys("*"):
        kind = conn.type(key)
        if kind == b"set":
            members += conn.smembers(key)
        elif kind == b"zset":
            members += conn.zrange(key, 0, -1)
        elif kind == b"list":
            members += conn.lrange(key, 0, -1)
    return members


def test_fail_of_a_job_with_retries_left_requeues_it_with_one_retry_fewer(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job = started_job(conn, "w-crashed", retry=Retry(max=2))
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    apply(policy, url)

    refreshed = Job.fetch(job.id, connection=conn)
    assert refreshed.get_status() == JobStatus.QUEUED
    assert refreshed.retries_left == 1
    assert Queue("default", connection=conn).get_job_ids() == [job.id]
    assert FailedJobRegistry("default", connection=conn).get_job_ids(cleanup=False) == []


def test_fail_of_a_job_with_a_retry_interval_schedules_it(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job = started_job(conn, "w-crashed", retry=Retry(max=1, interval=300))
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    apply(policy, url)

    refreshed = Job.fetch(job.id, connection=conn)
    assert refreshed.get_status() == JobStatus.SCHEDULED
    assert refreshed.retries_left == 0
    scheduled = ScheduledJobRegistry("default", connection=conn)
    assert scheduled.get_job_ids(cleanup=False) == [job.id]
    eta = scheduled.get_scheduled_time(job.id).timestamp()
    assert eta == pytest.approx(datetime.now(timezone.utc).timestamp() + 300, abs=10)


def test_fail_releases_dependents_that_allow_a_failed_parent(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    parent = started_job(conn, "w-crashed")
    queue = Queue("default", connection=conn)
    lenient = queue.enqueue("jobs.quick", depends_on=Dependency([parent], allow_failure=True))
    strict = queue.enqueue("jobs.quick", depends_on=parent)
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    apply(policy, url)

    assert status_of(conn, parent.id) == "failed"
    assert status_of(conn, lenient.id) == "queued"
    assert status_of(conn, strict.id) == "deferred"
    assert queue.get_job_ids() == [lenient.id]


# --- entries without a job to act on --------------------------------------------------------


def test_orphaned_and_leftover_entries_are_removed_and_the_finished_job_stays_finished(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    orphan = started_job(conn, "w-crashed")
    conn.delete(orphan.key)
    finished = started_job(conn, "w-crashed")
    finished.set_status(JobStatus.FINISHED)
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    report = apply(policy, url)

    assert started_ids(conn) == []
    assert status_of(conn, finished.id) == "finished"
    assert status_of(conn, orphan.id) is None
    assert FailedJobRegistry("default", connection=conn).get_job_ids(cleanup=False) == []
    states = {j["id"]: (j["state"], j["action"], j["outcome"]) for j in report["jobs"]}
    assert states == {
        orphan.id: ("orphaned", "remove-entry", "done"),
        finished.id: ("leftover", "remove-entry", "done"),
    }


def test_entry_of_a_job_an_rq_2_10_worker_is_taking_stays_until_its_lease_ends(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    # RQ 2.0 to 2.10 enter the job a worker takes while it is still 'queued', with an
    # execution record that names no worker; the job's worker_name still names the
    # dead worker of its earlier run. Removing the entry would break the run about to start.
    register_worker(url, "w-crashed")
    queue = Queue("default", connection=conn)
    job = queue.enqueue("jobs.quick")
    with conn.pipeline() as pipe:
        execution = Execution.create(job, LEASE_S, pipe)
        pipe.hset(job.key, "worker_name", "w-crashed")
        pipe.lrem(queue.key, 0, job.id)
        pipe.execute()
    conn.hdel(execution.key, "worker_name")
    registry = StartedJobRegistry("default", connection=conn)
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    taking = apply(policy, url)

    [line] = taking["jobs"]
    assert (line["state"], line["action"]) == ("leftover", "none")
    assert registry.get_job_ids(cleanup=False) == [job.id]
    assert status_of(conn, job.id) == "queued"
    assert conn.exists(execution.key) == 1

    # Its lease ended long ago: no worker is about to run it from this entry.
    [member] = conn.zrange(registry.key, 0, -1)
    conn.zadd(registry.key, {member: time.time() - 3600})
    later = apply(policy, url)

    assert [(j["state"], j["action"], j["outcome"]) for j in later["jobs"]] == [
        ("leftover", "remove-entry", "done")
    ]
    assert registry.get_job_ids(cleanup=False) == []
    assert status_of(conn, job.id) == "queued"


def test_second_apply_right_after_the_first_changes_nothing(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    register_worker(url, "w-crashed")
    started_job(conn, "w-crashed")
    orphan = started_job(conn, "w-crashed")
    conn.delete(orphan.key)
    live_worker("w-live")
    running = started_job(conn, "w-live")
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")
    first = apply(policy, url)
    after_first = everything(conn)

    second = apply(policy, url)

    assert (first["summary"]["acted"], first["summary"]["workers_removed"]) == (2, 1)
    assert everything(conn) == after_first
    assert second["summary"] == {
        "inspected": 1,
        "stuck": 0,
        "acted": 0,
        "planned": 0,
        "kept": 1,
        "skipped": 0,
        "errors": 0,
        "workers_removed": 0,
    }
    assert [j["id"] for j in second["jobs"]] == [running.id]


# --- workers --------------------------------------------------------------------------------


def test_job_of_a_live_worker_within_max_age_is_left_running(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    worker = live_worker("w-live")
    job = started_job(conn, "w-live", started_ago_s=60)
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="delete")

    report = apply(policy, url)

    assert status_of(conn, job.id) == "started"
    assert started_ids(conn) == [job.id]
    assert worker.commands == []
    entry = jobs_by_id(report)[job.id]
    assert (entry["state"], entry["outcome"], entry["worker_alive"]) == ("running", "kept", True)
    assert report["workers"] == []


def test_dead_worker_registration_is_removed_and_a_live_one_stays(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    register_worker(url, "w-crashed")
    live_worker("w-live")
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")
    queue = Queue("default", connection=conn)
    waiting = queue.enqueue("jobs.quick")

    report = apply(policy, url)

    assert get_keys(queue) == {"rq:worker:w-live"}
    assert get_keys(connection=conn) == {"rq:worker:w-live"}
    assert conn.hget("rq:worker:w-crashed", "death"), "its death is recorded"
    assert [(w["name"], w["outcome"]) for w in report["workers"]] == [("w-crashed", "done")]
    assert report["summary"]["workers_removed"] == 1
    assert queue.get_job_ids() == [waiting.id], "a queued job is not opsctl's business"


def found_dead_by_a_run(conn: redis.Redis, url: str, tmp_path: Path, name: str) -> tuple[Job, Path]:
    """A worker a run found dead, with a job in queue "other": the run removed its
    registrations (its queue "default" is covered) but left the job alone."""
    register_worker(url, name)
    job = started_job(conn, name, queue="other")
    policy = write_policy(tmp_path, 'version: 1\nqueues:\n  - name: "*"\n    action: fail\n')
    first = apply(policy, url, "--queue", "default")
    assert [(w["name"], w["outcome"]) for w in first["workers"]] == [(name, "done")]
    return job, policy


def test_a_death_opsctl_recorded_is_never_shown_as_the_workers_own(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job, policy = found_dead_by_a_run(conn, url, tmp_path, "w-crashed")

    later = apply(policy, url, "--queue", "other")

    [line] = [j for j in later["jobs"] if j["id"] == job.id]
    assert line["outcome"] == "done"
    assert "an opsctl run found it dead at " in line["reason"]
    assert "recorded its death" not in line["reason"]
    failure = Job.fetch(job.id, connection=conn).latest_result()
    assert failure is not None and "an opsctl run found it dead at " in str(failure.exc_string)


def test_a_worker_back_after_a_run_found_it_dead_is_live_whatever_its_clock(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    # A run takes a worker cut off from Redis for dead and notes its death (server
    # time). The worker comes back, subscribes and heartbeats by its own clock, two
    # minutes behind the server's: its heartbeat reads as older than the death.
    job, policy = found_dead_by_a_run(conn, url, tmp_path, "w-back")
    death = utcparse(conn.hget("rq:worker:w-back", "death").decode())
    back = redis.Redis.from_url(url, client_name="w-back").pubsub()  # named, as RQ 3 does
    back.subscribe("rq:pubsub:w-back")
    assert back.get_message(timeout=5)["type"] == "subscribe"
    behind = death - timedelta(seconds=120)
    conn.hset("rq:worker:w-back", "last_heartbeat", utcformat(behind))
    conn.expire("rq:worker:w-back", 420)
    try:
        later = apply(policy, url, "--queue", "other")
    finally:
        back.close()

    [line] = [j for j in later["jobs"] if j["id"] == job.id]
    assert (line["worker_alive"], line["state"], line["outcome"]) == (True, "running", "kept")
    assert status_of(conn, job.id) == "started"
    assert started_ids(conn, "other") == [job.id]


@pytest.mark.parametrize(
    ("state", "lease_ago_s", "said"),
    [
        ("busy", None, None),
        ("idle", None, "w-live is idle, not busy, so it runs no job"),
        ("suspended", None, "w-live is suspended, not busy, so it runs no job"),
        ("busy", 120, "w-live has stopped renewing its lease on this run"),
        (None, None, "the hash of w-live has expired"),
    ],
)
def test_a_stop_is_sent_only_to_a_busy_worker_that_renews_the_runs_lease(
    conn: redis.Redis,
    live_worker: Any,
    state: str | None,
    lease_ago_s: float | None,
    said: str | None,
) -> None:
    # Checked again as the stop is sent (a plan's reads may be minutes old): a stop that
    # finds no work horse makes RQ's worker kill its own process group.
    worker = live_worker("w-live")
    job = started_job(conn, "w-live")
    if state is None:
        conn.delete("rq:worker:w-live")  # expired since it was read
    else:
        conn.hset("rq:worker:w-live", "state", state)
    [member] = conn.zrange("rq:wip:default", 0, -1)
    if lease_ago_s is not None:
        conn.zadd("rq:wip:default", {member: time.time() - lease_ago_s})
    actor = Actor(conn, Keys("rq"))
    started_at = conn.hget(job.key, "started_at").decode()

    sent = actor.send_stop("w-live", job.id, "default", member, started_at, time.time() - 60)

    if said is None:
        assert (sent.receivers, sent.not_sent) == (1, None)
        deadline = time.monotonic() + 5
        while not worker.commands and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker's listener thread takes it
        assert worker.commands == [{"command": "stop-job", "job_id": job.id}]
    else:
        assert sent.not_sent is not None and said in sent.not_sent
        assert worker.commands == []
    assert status_of(conn, job.id) == "started"


def test_forced_job_is_stopped_by_its_live_worker_then_gets_the_policy_action(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    worker = live_worker("w-live", obeys_stop=True)
    job = started_job(conn, "w-live", started_ago_s=5)
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="requeue")

    report = apply(policy, url, "--force", "--stop-timeout", "10")

    assert worker.commands == [{"command": "stop-job", "job_id": job.id}]
    assert status_of(conn, job.id) == "queued"
    assert Queue("default", connection=conn).get_job_ids() == [job.id]
    assert FailedJobRegistry("default", connection=conn).get_job_ids(cleanup=False) == []
    assert started_ids(conn) == []
    entry = jobs_by_id(report)[job.id]
    assert (entry["state"], entry["action"], entry["stop_confirmed"]) == (
        "overdue",
        "requeue",
        True,
    )
    jsonschema.validate(report, REPORT_SCHEMA)


def test_an_overdue_job_whose_id_is_not_utf_8_is_stopped_without_ending_the_run(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    # Ids are bytes to Redis; one that is not UTF-8 made the stop's follow-up fail to
    # encode, and the whole run ended with an unexpected error and no report.
    worker = live_worker("w-live")
    job = started_job(conn, "w-live", started_ago_s=5)
    [member] = conn.zrange("rq:wip:default", 0, -1)
    execution_id = member.decode().rpartition(":")[2]
    odd = b"odd\xffid"
    conn.rename(job.key, b"rq:job:" + odd)
    conn.rename(
        f"rq:execution:{member.decode()}", b"rq:execution:" + odd + b":" + execution_id.encode()
    )
    conn.zadd("rq:wip:default", {odd + b":" + execution_id.encode(): time.time() + 60})
    conn.zrem("rq:wip:default", member)
    conn.srem("rq:worker:w-live:executions", member)
    conn.sadd("rq:worker:w-live:executions", odd + b":" + execution_id.encode())
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="requeue")

    result = opsctl(
        "apply",
        str(policy),
        "--redis-url",
        url,
        "--format",
        "json",
        "--force",
        "--stop-timeout",
        "1",
    )

    assert result.exit_code == 1, result.output  # the worker does not stop it
    [line] = json.loads(result.stdout)["jobs"]
    assert (line["id"], line["state"], line["stop_confirmed"]) == ("odd\\xffid", "overdue", False)
    assert worker.commands == [{"command": "stop-job", "job_id": "odd\udcffid"}]
    assert conn.hget(b"rq:job:" + odd, "status") == b"started"


@pytest.fixture
def short_maintenance_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """RQ's maintenance locks taken by a run expire after 2 s, not 60 s."""
    monkeypatch.setattr("opsctl.lock.MAINTENANCE_LOCK_TTL_S", 2)


@pytest.mark.usefixtures("short_maintenance_locks")
def test_a_maintenance_lock_held_through_a_stop_is_kept_while_another_is_waited_for(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    # Queue aa's lock is taken for its stop and follow-up; RQ holds queue bb's, and the
    # wait for it outlasts aa's expiry: RQ's cleaning must not get aa's lock meanwhile.
    jobs = {}
    for queue in ("aa", "bb"):
        live_worker(f"w-{queue}", queue=queue, obeys_stop=True)
        jobs[queue] = started_job(conn, f"w-{queue}", queue, started_ago_s=5)
    conn.set("rq:clean_registries:bb", "1", ex=899)
    policy = write_policy(tmp_path, "version: 1\nqueues:\n  - name: '*'\n    action: requeue\n")
    rq_took_it: list[float] = []
    running = threading.Event()

    def rq_cleaning() -> None:  # a worker's cleaning, trying for the lock as RQ does
        key = "rq:clean_registries:aa"
        with redis.Redis.from_url(url) as own:
            while running.is_set() and own.get(key) in (None, b"1"):
                time.sleep(0.02)  # until the run has taken it
            while running.is_set() and status_of(own, jobs["aa"].id) == "started":
                if own.set(key, "1", nx=True, ex=899):  # before the follow-up: taken from it
                    rq_took_it.append(time.monotonic())
                    own.delete(key)
                time.sleep(0.1)

    running.set()
    rival = threading.Thread(target=rq_cleaning)
    rival.start()
    try:
        report = apply(policy, url, "--force", "--lock-timeout", "5", exit_code=5)
    finally:
        running.clear()
        rival.join()

    states = {j["queue"]: (j["action"], j["outcome"]) for j in report["jobs"]}
    assert states["bb"][1] == "skipped"
    assert states["aa"] == ("requeue", "done")
    assert rq_took_it == []


def test_follow_up_after_a_confirmed_stop_is_reported_done_once(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    live_worker("w-live", obeys_stop=True)
    job = started_job(conn, "w-live", started_ago_s=5)
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="requeue")

    report = apply(policy, url, "--force", "--stop-timeout", "10")

    assert status_of(conn, job.id) == "queued"
    assert jobs_by_id(report)[job.id]["outcome"] == "done"
    assert (report["summary"]["acted"], report["summary"]["skipped"]) == (1, 0)
    outcomes = [entry[b"outcome"] for _, entry in conn.xrange("opsctl:audit")]
    assert outcomes == [b"done"]


def test_a_job_deleted_after_its_worker_stopped_it_takes_its_related_keys_along(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    live_worker("w-live", obeys_stop=True)
    job = started_job(conn, "w-live", started_ago_s=5)
    conn.set(f"job_progress:{job.id}", "42%")
    conn.set("job_progress:unrelated", "7%")
    related = 'action: delete\n      related_keys: ["job_progress:{job_id}"]'
    policy = write_policy(tmp_path, DEFAULT_POLICY.replace("action: {action}", related))

    report = apply(policy, url, "--force", "--stop-timeout", "10")

    assert jobs_by_id(report)[job.id]["outcome"] == "done"
    assert status_of(conn, job.id) is None
    assert not conn.exists(f"job_progress:{job.id}")
    assert conn.get("job_progress:unrelated") == b"7%"


def test_stops_on_several_queues_are_waited_for_once_after_the_other_changes(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    hung = [live_worker(f"w-{q}", q, obeys_stop=False) for q in ("default", "spare")]
    overdue = [started_job(conn, f"w-{q}", q, started_ago_s=3600) for q in ("default", "spare")]
    register_worker(url, "w-crashed")
    abandoned = started_job(conn, "w-crashed")
    policy = write_policy(tmp_path, DEFAULT_POLICY + "      - name: spare\n", action="fail")

    report = apply(policy, url, "--stop-timeout", "3", "--reconnect-grace", "0", exit_code=1)

    # Both stops went out together: the second was not held back by the first wait.
    [first], [second] = (worker.received_at for worker in hung)
    assert abs(second - first) < 1.5
    lines = jobs_by_id(report)
    assert [lines[j.id]["outcome"] for j in overdue] == ["error", "error"]
    assert all(
        "did not stop it within 3s: a worker frozen" in lines[j.id]["reason"] for j in overdue
    )
    assert lines[abandoned.id]["outcome"] == "done"
    assert status_of(conn, abandoned.id) == "failed"
    assert [status_of(conn, j.id) for j in overdue] == ["started", "started"]


def test_an_overdue_job_that_ends_on_its_own_while_opsctl_waits_is_not_reported_stopped(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    # A worker that cannot stop a job (RQ's SimpleWorker) lets it run to its end.
    worker = live_worker("w-live", obeys_stop=False)
    job = started_job(conn, "w-live", started_ago_s=3600)
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="requeue")

    def finish() -> None:
        with conn.pipeline() as pipe:
            job.set_status(JobStatus.FINISHED, pipeline=pipe)
            StartedJobRegistry("default", connection=conn).remove_executions(job, pipeline=pipe)
            pipe.execute()

    ends = threading.Timer(1.0, finish)
    ends.start()
    try:
        report = apply(policy, url, "--stop-timeout", "10")
    finally:
        ends.join()

    assert worker.commands == [{"command": "stop-job", "job_id": job.id}]
    entry = jobs_by_id(report)[job.id]
    assert (entry["state"], entry["outcome"], entry["stop_confirmed"]) == (
        "overdue",
        "skipped",
        False,
    )
    assert (
        "not stopped by w-live: it ended meanwhile (its status is now 'finished')"
        in (entry["reason"])
    )
    assert status_of(conn, job.id) == "finished"  # not requeued to run again
    assert Queue("default", connection=conn).get_job_ids() == []


def test_a_stop_is_not_sent_to_a_run_of_the_job_that_began_after_the_read(
    conn: redis.Redis,
    url: str,
    tmp_path: Path,
    live_worker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # RQ's stop-job names the job, not the run: a retry begun since the read
    # (within max_age) would be the one stopped, and never retried again.
    worker = live_worker("w-live", obeys_stop=True)
    job = started_job(conn, "w-live", started_ago_s=3600)
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")
    just_now = utcformat(datetime.now(timezone.utc))
    check_strays = apply_module.stops_that_may_stray

    def retried_meanwhile(*args: Any) -> Any:
        conn.hset(job.key, "started_at", just_now)  # the job started again
        return check_strays(*args)

    monkeypatch.setattr(apply_module, "stops_that_may_stray", retried_meanwhile)
    report = apply(policy, url)

    entry = jobs_by_id(report)[job.id]
    assert (entry["outcome"], entry["stop_confirmed"]) == ("skipped", False), entry
    assert "not stopped: it started again since it was read" in entry["reason"]
    assert worker.commands == [], "no stop was sent"
    assert status_of(conn, job.id) == "started"


def test_a_planned_stop_of_a_job_stopped_since_the_plan_is_not_sent_again(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    worker = live_worker("w-live", obeys_stop=True)
    job = started_job(conn, "w-live", started_ago_s=3600)
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")
    plan = tmp_path / "plan.json"
    made = opsctl("plan", str(policy), "--output", str(plan), "--redis-url", url)
    assert made.exit_code == 0, made.output
    apply(policy, url)  # an earlier run stops it
    assert worker.commands == [{"command": "stop-job", "job_id": job.id}]
    assert status_of(conn, job.id) == "stopped"

    result = opsctl("apply", "--plan", str(plan), "--format", "json", "--redis-url", url)

    assert result.exit_code == 0, result.output
    entry = jobs_by_id(json.loads(result.stdout))[job.id]
    assert (entry["outcome"], entry["stop_confirmed"]) == ("skipped", False), entry
    assert "not stopped: its status is now 'stopped'" in entry["reason"]
    assert len(worker.commands) == 1, "no second stop was sent"
    assert status_of(conn, job.id) == "stopped"


def test_overdue_job_whose_worker_ignores_the_stop_is_an_error_and_exits_1(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    worker = live_worker("w-live", obeys_stop=False)
    job = started_job(conn, "w-live", started_ago_s=3600)
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    report = apply(policy, url, "--stop-timeout", "0.5", exit_code=1)

    assert worker.commands == [{"command": "stop-job", "job_id": job.id}]
    assert status_of(conn, job.id) == "started"
    entry = jobs_by_id(report)[job.id]
    assert (entry["state"], entry["outcome"], entry["stop_confirmed"]) == (
        "overdue",
        "error",
        False,
    )
    assert "did not stop it" in entry["reason"]
    jsonschema.validate(report, REPORT_SCHEMA)


# --- the JSON report ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["--dry-run", "--no-dry-run"])
def test_json_report_follows_its_schema_and_masks_the_password(
    mode: str, conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    register_worker(url, "w-crashed")
    abandoned = started_job(conn, "w-crashed")
    orphan = started_job(conn, "w-crashed")
    conn.delete(orphan.key)
    leftover = started_job(conn, "w-crashed")
    leftover.set_status(JobStatus.CANCELED)
    live_worker("w-live")
    running = started_job(conn, "w-live")
    conn.config_set("requirepass", "s3cret")
    secret_url = url.replace("redis://", "redis://:s3cret@")
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    result = opsctl("apply", str(policy), "--redis-url", secret_url, "--format", "json", mode)

    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    report = json.loads(result.stdout)
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["redis"] == url.replace("redis://", "redis://:***@")
    assert report["dry_run"] is (mode == "--dry-run")
    assert {j["id"]: j["state"] for j in report["jobs"]} == {
        abandoned.id: "abandoned",
        orphan.id: "orphaned",
        leftover.id: "leftover",
        running.id: "running",
    }
    assert [w["name"] for w in report["workers"]] == ["w-crashed"]


def test_report_schema_rejects_what_opsctl_never_prints(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    started_job(conn, "w-crashed")
    report = apply(write_policy(tmp_path, DEFAULT_POLICY, action="fail"), url)
    jsonschema.Draft202012Validator.check_schema(REPORT_SCHEMA)
    validator = jsonschema.Draft202012Validator(REPORT_SCHEMA)
    assert validator.is_valid(report)

    unknown_state = json.loads(json.dumps(report))
    unknown_state["jobs"][0]["state"] = "stale"
    extra_key = json.loads(json.dumps(report))
    extra_key["summary"]["stuck_jobs"] = 1
    missing_key = json.loads(json.dumps(report))
    del missing_key["jobs"][0]["stop_confirmed"]

    for broken in (unknown_state, extra_key, missing_key):
        assert not validator.is_valid(broken)


def test_report_schema_names_every_state_action_and_outcome_opsctl_can_report() -> None:
    job = REPORT_SCHEMA["$defs"]["job"]["properties"]
    outcomes = {run.PLANNED, run.DONE, run.KEPT, run.SKIPPED, run.ERROR}

    assert set(job["state"]["enum"]) == {state.value for state in State}
    assert set(job["action"]["enum"]) == {*ACTIONS, ACTION_STOP, ACTION_REMOVE_ENTRY, ACTION_NONE}
    assert set(job["outcome"]["enum"]) == outcomes
    assert set(REPORT_SCHEMA["$defs"]["policy_action"]["enum"]) == set(ACTIONS)


# --- which queues, and with which rule ------------------------------------------------------

OVERRIDES_POLICY = """
    version: 1
    defaults:
      max_age: 10m
      action: fail
    queues:
      - name: "reports-*"
        action: requeue
      - name: reports-daily
        action: cancel
      - name: imports
        enabled: false
"""


def test_per_queue_rules_decide_each_queues_action(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    weekly = started_job(conn, "w-crashed", "reports-weekly")
    daily = started_job(conn, "w-crashed", "reports-daily")
    imports = started_job(conn, "w-crashed", "imports")
    billing = started_job(conn, "w-crashed", "billing")
    policy = write_policy(tmp_path, OVERRIDES_POLICY)

    report = apply(policy, url)

    assert status_of(conn, weekly.id) == "queued", "the glob's requeue applies"
    assert status_of(conn, daily.id) == "canceled", "the exact name beats the earlier glob"
    assert status_of(conn, imports.id) == "started", "a disabled queue is not touched"
    assert started_ids(conn, "imports") == [imports.id]
    assert status_of(conn, billing.id) == "started", "an unmatched queue is not touched"
    assert started_ids(conn, "billing") == [billing.id]
    assert [(q["name"], q["rule"], q["action"]) for q in report["queues"]] == [
        ("reports-daily", "queues[1] (reports-daily)", "cancel"),
        ("reports-weekly", "queues[0] (reports-*)", "requeue"),
    ]


def test_queue_option_limits_the_run_to_the_named_queues(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    weekly = started_job(conn, "w-crashed", "reports-weekly")
    monthly = started_job(conn, "w-crashed", "reports-monthly")
    policy = write_policy(tmp_path, OVERRIDES_POLICY)

    report = apply(policy, url, "--queue", "reports-weekly", "--queue", "nightly")

    assert status_of(conn, weekly.id) == "queued"
    assert status_of(conn, monthly.id) == "started"
    assert [q["name"] for q in report["queues"]] == ["reports-weekly"]
    assert report["unmatched_queues"] == ["nightly"]


def test_a_queue_option_naming_no_queue_redis_knows_is_warned_of(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job = started_job(conn, "w-crashed", "emails")
    Queue("idle", connection=conn).enqueue("jobs.quick")  # known, with nothing started
    policy = write_policy(tmp_path, 'version: 1\nqueues:\n  - name: "*"\n    action: fail\n')

    report = apply(policy, url, "--queue", "emials", "--queue", "idle")
    text = opsctl("apply", str(policy), "--redis-url", url, "--queue", "emials", "--dry-run")

    assert report["summary"]["inspected"] == 0
    assert [w for w in report["warnings"] if "--queue" in w] == [
        "--queue 'emials': Redis knows no such queue (it is not in rq:queues, and no started "
        "registry or worker set names it), so nothing of it was inspected; --queue takes "
        "exact names"
    ]
    assert "warning: --queue 'emials': Redis knows no such queue" in text.stdout
    assert status_of(conn, job.id) == "started"


def test_unmatched_queue_option_is_noted_in_the_text_report(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path, OVERRIDES_POLICY)

    result = opsctl("apply", str(policy), "--redis-url", url, "--queue", "nightly")

    assert result.exit_code == 0, result.output
    assert "note: queue 'nightly' is matched by no policy entry; skipped" in result.stdout


def test_a_queue_option_naming_a_disabled_queue_says_the_policy_disables_it(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    imports = started_job(conn, "w-crashed", "imports")
    policy = write_policy(tmp_path, OVERRIDES_POLICY)

    text = opsctl("apply", str(policy), "--redis-url", url, "--queue", "imports")
    report = apply(policy, url, "--queue", "imports")

    assert text.exit_code == 0, text.output
    assert "note: queue 'imports' is disabled by the policy; skipped" in text.stdout
    assert (report["disabled_queues"], report["unmatched_queues"]) == (["imports"], [])
    jsonschema.validate(report, REPORT_SCHEMA)
    assert status_of(conn, imports.id) == "started"


def test_the_text_report_shows_each_job_id_whole_to_paste_into_explain(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    register_worker(url, "w-crashed")
    job = started_job(conn, "w-crashed")
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    result = opsctl("apply", str(policy), "--redis-url", url, "--dry-run")

    assert result.exit_code == 0, result.output
    assert len(job.id) == 36 and job.id in result.stdout
    explained = opsctl("explain", job.id, "--redis-url", url)
    assert explained.exit_code == 0, explained.output
    assert f"  read from: {url}, key prefix 'rq'" in explained.stdout.splitlines()
    # explain looks once; apply looks at a worker without a connection twice
    assert "w-crashed: dead (worker holds no connection to Redis; apply looks at it again" in (
        explained.stdout
    )


def test_max_age_option_overrides_the_policy(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    live_worker("w-live")
    job = started_job(conn, "w-live", started_ago_s=120)
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    by_policy = apply(policy, url, "--dry-run")
    by_option = apply(policy, url, "--dry-run", "--max-age", "1m")
    by_minutes = apply(policy, url, "--dry-run", "--max-age", "1")

    assert jobs_by_id(by_policy)[job.id]["state"] == "running"
    assert by_policy["queues"][0]["max_age_seconds"] == 600
    for report in (by_option, by_minutes):
        assert (jobs_by_id(report)[job.id]["state"], report["queues"][0]["max_age_seconds"]) == (
            "overdue",
            60,
        )
        assert jobs_by_id(report)[job.id]["action"] == "stop"


def test_force_option_makes_a_young_job_overdue_and_no_force_undoes_the_policy(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    live_worker("w-live")
    job = started_job(conn, "w-live", started_ago_s=5)
    plain = write_policy(tmp_path, DEFAULT_POLICY, action="fail")
    forced_report = apply(plain, url, "--dry-run", "--force")
    forced = tmp_path / "forced.yaml"
    forced.write_text(plain.read_text().replace("action: fail", "action: fail\n  force: true"))

    unforced_report = apply(forced, url, "--dry-run", "--no-force")
    policy_report = apply(forced, url, "--dry-run")

    assert jobs_by_id(forced_report)[job.id]["state"] == "overdue"
    assert forced_report["queues"][0]["force"] is True
    assert jobs_by_id(unforced_report)[job.id]["state"] == "running"
    assert jobs_by_id(policy_report)[job.id]["state"] == "overdue"


HELD_POLICY = """
    version: 1
    defaults:
      action: fail
    queues:
      - name: held
        dry_run: true
      - name: live
"""


def test_queue_with_dry_run_is_held_back_while_other_queues_are_acted_on(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    register_worker(url, "w-held", "held")
    held = started_job(conn, "w-held", "held")
    live = started_job(conn, "w-crashed", "live")

    report = apply(write_policy(tmp_path, HELD_POLICY), url)

    assert status_of(conn, live.id) == "failed"
    assert status_of(conn, held.id) == "started"
    assert started_ids(conn, "held") == [held.id]
    assert get_keys(Queue("held", connection=conn)) == {"rq:worker:w-held"}
    assert report["dry_run"] is False
    assert jobs_by_id(report)[held.id]["outcome"] == "planned"
    assert jobs_by_id(report)[live.id]["outcome"] == "done"


def test_every_queue_of_a_dry_run_is_reported_dry_whatever_its_own_setting(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job = started_job(conn, "w-crashed", "live")
    started_job(conn, "w-crashed", "held")
    dry_defaults = HELD_POLICY.replace("action: fail", "action: fail\n      dry_run: true")
    dry_defaults = dry_defaults.replace("- name: live", "- name: live\n        dry_run: false")

    by_defaults = apply(write_policy(tmp_path, dry_defaults), url)
    by_option = apply(write_policy(tmp_path, HELD_POLICY), url, "--dry-run")

    for report in (by_defaults, by_option):
        assert report["dry_run"] is True
        assert {q["name"]: q["dry_run"] for q in report["queues"]} == {"held": True, "live": True}
    assert status_of(conn, job.id) == "started"


def test_entries_of_jobs_whose_hash_is_gone_do_not_count_against_the_caps(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    conn.zadd("rq:wip:default", {f"gone-{i}:exec{i}": 1 for i in range(5)})
    job = started_job(conn, "w-crashed")
    capped = FAIL_ALL.replace(
        "version: 1", "version: 1\n    defaults:\n      limits: {max_actions: 1}"
    )

    report = apply(write_policy(tmp_path, capped), url)

    assert report["limits_tripped"] == []
    assert status_of(conn, job.id) == "failed"
    assert conn.zcard("rq:wip:default") == 0
    assert Counter(j["state"] for j in report["jobs"]) == Counter({"orphaned": 5, "abandoned": 1})


def test_jobs_held_back_by_a_dry_run_queue_do_not_count_against_the_run_cap(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    for _ in range(3):
        started_job(conn, "w-crashed", "held")
    live = started_job(conn, "w-crashed", "live")
    capped = HELD_POLICY.replace("action: fail", "action: fail\n      limits: {max_actions: 1}")

    report = apply(write_policy(tmp_path, capped), url)  # exits 4 today

    assert report["limits_tripped"] == []
    assert status_of(conn, live.id) == "failed"


def test_policy_wide_dry_run_changes_nothing_until_no_dry_run_is_given(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job = started_job(conn, "w-crashed")
    policy = write_policy(
        tmp_path, DEFAULT_POLICY.replace("max_age", "dry_run: true\n      max_age"), action="fail"
    )
    before = everything(conn)

    planned = apply(policy, url)
    unchanged = everything(conn)
    applied = apply(policy, url, "--no-dry-run")

    assert unchanged == before
    assert (planned["dry_run"], jobs_by_id(planned)[job.id]["outcome"]) == (True, "planned")
    assert (applied["dry_run"], jobs_by_id(applied)[job.id]["outcome"]) == (False, "done")
    assert status_of(conn, job.id) == "failed"


# --- the text report ------------------------------------------------------------------------


def test_status_under_a_prefix_where_nothing_lives_says_what_to_check(
    conn: redis.Redis, url: str
) -> None:
    started_job(conn, "w-crashed")

    wrong = opsctl("status", "--redis-url", url, "--key-prefix", "rq:")
    right = opsctl("status", "--redis-url", url)

    assert wrong.exit_code == 0, wrong.output
    said = " ".join(wrong.stdout.split())
    assert "no RQ queues found; no RQ job, registry or worker key under the prefix 'rq:'" in said
    assert (
        "(opsctl puts the ':' after the prefix itself): if RQ has jobs, check --key-prefix" in said
    )
    assert "default" in right.stdout and "no RQ queues found" not in right.stdout


def test_status_names_every_record_it_could_not_read_and_counts_them_all(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    started_job(conn, "w-crashed", "sound")
    for queue in ("broken-list", "broken-failed", "broken-started"):
        conn.sadd("rq:queues", f"rq:queue:{queue}")
    conn.hset("rq:queue:broken-list", "x", "1")
    conn.set("rq:failed:broken-failed", "x")
    conn.set("rq:wip:broken-started", "x")
    metrics_file = tmp_path / "status.prom"

    json_run = opsctl("status", "--redis-url", url, "--format", "json")
    text_run = opsctl("status", "--redis-url", url, "--metrics-file", str(metrics_file))

    assert json_run.exit_code == 0 and text_run.exit_code == 0, json_run.output
    problems = json.loads(json_run.stdout)["problems"]
    for key in ("rq:queue:broken-list", "rq:failed:broken-failed", "rq:wip:broken-started"):
        assert sum(key in p for p in problems) == 1, problems
        assert f"problem: {key}" in text_run.stdout or f"{key} cannot be read" in text_run.stdout
    assert len(problems) == 3
    assert 'opsctl_problems{command="status"} 3.0' in metrics_file.read_text()


@pytest.mark.parametrize("key", ["rq:queues", "rq:workers"])
def test_status_names_a_queue_set_or_worker_set_it_could_not_read(
    conn: redis.Redis, url: str, key: str
) -> None:
    Queue("waiting", connection=conn).enqueue("jobs.quick")  # nothing started anywhere
    conn.delete(key)
    conn.set(key, "not a set")

    result = opsctl("status", "--redis-url", url, "--format", "json")

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [p for p in document["problems"] if key in p] != [], document["problems"]


def test_status_on_a_narrow_terminal_shows_every_name_whole(
    conn: redis.Redis, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for queue in ("reports-daily-eu-central", "reports-daily-us-eastern"):
        started_job(conn, "w-crashed", queue)
    # An 80-column terminal, as rich would see it.
    monkeypatch.setattr(
        terminal,
        "console",
        lambda **_: Console(file=sys.stdout, width=80, no_color=True, soft_wrap=False),
    )

    result = opsctl("status", "--redis-url", url)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["queue", "queued"] and lines[0].split()[-1] == "workers"
    eu = next(line for line in lines if line.startswith("reports-daily-eu-central "))
    assert eu.split()[1:3] == ["0", "1"]  # queued, started
    assert eu.split()[-4:] == ["0", "alive,", "0", "dead"]
    assert any(line.startswith("reports-daily-us-eastern ") for line in lines)


@pytest.mark.parametrize(("prefix", "hinted"), [("rq:", True), ("app", False)])
def test_a_key_prefix_under_which_nothing_lives_is_warned_about(
    conn: redis.Redis, url: str, tmp_path: Path, prefix: str, hinted: bool
) -> None:
    started_job(conn, "w-crashed")
    text = f"version: 1\nredis:\n  key_prefix: '{prefix}'\nqueues:\n  - name: default\n"
    wrong = apply(write_policy(tmp_path, text), url, "--dry-run")
    right = apply(write_policy(tmp_path, DEFAULT_POLICY, action="fail"), url, "--dry-run")

    [warning] = [w for w in wrong["warnings"] if "under the prefix" in w]
    assert f"no RQ job, registry or worker key under the prefix {prefix!r}" in warning
    assert ("puts the ':' after the prefix itself" in warning) is hinted
    assert wrong["jobs"] == [] and len(right["jobs"]) == 1
    assert not any("under the prefix" in w for w in right["warnings"])


def test_a_run_lock_key_of_another_type_is_named_and_nothing_is_done(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job = started_job(conn, "w-crashed")
    conn.hset("opsctl:lock", "set by", "someone else")
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    result = opsctl(
        "apply", str(policy), "--redis-url", url, "--lock-timeout", "5", "--best-effort"
    )

    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        "opsctl: error: opsctl:lock holds a hash, not opsctl's run lock; rename or remove it "
        "(no opsctl apply runs until then)"
    ]
    assert status_of(conn, job.id) == "started"
    assert conn.hgetall("opsctl:lock") == {b"set by": b"someone else"}


@pytest.mark.parametrize("ended", [True, False])
def test_a_run_lock_left_by_a_run_that_has_ended_says_so_and_when_it_expires(
    conn: redis.Redis, url: str, tmp_path: Path, ended: bool
) -> None:
    # A run that lost Redis leaves its lock to expire; the next run is not told that
    # another run holds it, when none does.
    job = started_job(conn, "w-crashed")
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    pid = process.pid if ended else os.getppid()  # a process that runs: pytest's parent
    token = f"opsctl run=0123456789ab host={os.uname().nodename} pid={pid} abcd1234"
    conn.set("opsctl:lock", token, ex=60)
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    result = opsctl("apply", str(policy), "--redis-url", url, "--lock-timeout", "0")

    assert result.exit_code == 5, result.output
    if ended:
        assert "held by an opsctl run that has ended, it seems" in result.stderr
        assert "left the lock to expire, in 60s at most. Try again then" in result.stderr
    else:
        assert f"another opsctl run holds the lock ({token})" in result.stderr
    assert status_of(conn, job.id) == "started"


def test_plans_made_one_after_another_leave_no_garbage_behind(
    conn: redis.Redis, tmp_path: Path
) -> None:
    # `opsctl watch` plans every round for as long as it runs: each plan's
    # cyclic garbage must be collected as it goes, not pile up.
    started_job(conn, "w-crashed")
    policy = load_policy(write_policy(tmp_path, DEFAULT_POLICY, action="fail"))

    def plan_rounds(rounds: int) -> None:
        for _ in range(rounds):
            run.plan(conn, Keys("rq"), policy, run.Overrides(dry_run=True))

    plan_rounds(5)
    before = len(gc.get_objects())
    plan_rounds(30)

    assert len(gc.get_objects()) - before < 3_000


def test_a_terminal_too_narrow_for_a_table_gets_every_cell_whole_on_lines(
    conn: redis.Redis, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue, worker = "billing-invoices-nightly-export", "w-billing-invoices-nightly-export-7f9c2"
    register_worker(url, worker, queue)
    job = started_job(conn, worker, queue)
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"version: 1\ndefaults:\n  action: fail\nqueues:\n  - name: {queue}\n")
    # An 80-column terminal, as rich would see it.
    monkeypatch.setattr(
        terminal,
        "console",
        lambda **_: Console(file=sys.stdout, width=80, no_color=True, soft_wrap=False),
    )

    result = opsctl("apply", str(policy), "--redis-url", url, "--dry-run", "--reconnect-grace", "0")

    assert result.exit_code == 0, result.output
    [row] = [line for line in result.stdout.splitlines() if job.id in line]
    # The job's row holds every cell in full, on one line: no word or name is cut.
    for cell in (queue, job.id, "abandoned", f"{worker} (dead)", "fail", "planned"):
        assert cell in row, result.stdout
    assert f"{worker} is dead" in row

    applied = apply(policy, url, "--reconnect-grace", "0")
    history = opsctl("history", "--redis-url", url)

    assert history.exit_code == 0, history.output
    [line] = [line for line in history.stdout.splitlines() if job.id in line]
    for cell in (applied["run_id"], queue, "abandoned", "fail", "done"):
        assert cell in line, history.stdout


def test_text_report_has_the_table_headers_and_a_summary_with_the_run_id(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    register_worker(url, "w-crashed")
    started_job(conn, "w-crashed")
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    result = opsctl("apply", str(policy), "--redis-url", url)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines[0]
    assert header.startswith("opsctl run ") and f"against {url} (applying)" in header
    run_id = header.split()[2]
    [columns] = [line for line in lines if "┃" in line and "queue" in line and "job" in line]
    names = [cell.strip() for cell in columns.split("┃") if cell.strip()]
    assert names[:4] == ["queue", "job", "state", "age"]
    assert {"worker", "action", "outcome", "reason"} <= set(names)
    assert lines[-1] == (
        f"run {run_id}: 1 inspected, 1 stuck, 1 acted, 0 planned, 0 skipped, 0 errors; "
        "1 dead worker registration removed"
    )


def test_a_dry_runs_summary_counts_the_registrations_it_would_remove(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    register_worker(url, "w-crashed")
    started_job(conn, "w-crashed")
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")

    result = opsctl("apply", str(policy), "--redis-url", url, "--dry-run")

    assert result.exit_code == 0, result.output
    summary = result.stdout.splitlines()[-1]
    assert summary.endswith(
        "1 planned, 0 skipped, 0 errors; 0 dead worker registrations removed, 1 planned "
        "(dry run: nothing was changed)"
    ), summary
    assert conn.sismember("rq:workers", "rq:worker:w-crashed")


# --- odd input a real deployment produces ----------------------------------------------------

FAIL_ALL = """\
    version: 1
    queues:
      - name: default
    """


def test_dry_run_with_a_plan_changes_nothing(conn: redis.Redis, url: str, tmp_path: Path) -> None:
    job = started_job(conn, "w-dead")
    policy = write_policy(tmp_path, FAIL_ALL)
    plan = tmp_path / "plan.json"
    made = opsctl("plan", str(policy), "--output", str(plan), "--redis-url", url)
    assert made.exit_code == 0, made.output
    before = everything(conn)

    result = opsctl("apply", "--plan", str(plan), "--dry-run", "--redis-url", url)

    assert result.exit_code == 0, result.output
    assert "dry run" in result.stdout
    assert everything(conn) == before
    assert status_of(conn, job.id) == "started"


def test_plan_says_what_it_wrote_unless_quiet(conn: redis.Redis, url: str, tmp_path: Path) -> None:
    register_worker(url, "w-crashed")
    started_job(conn, "w-crashed")
    policy = write_policy(tmp_path, FAIL_ALL)
    plan = tmp_path / "plan.json"

    said = opsctl("plan", str(policy), "--output", str(plan), "--redis-url", url)
    quiet = opsctl("plan", str(policy), "--output", str(plan), "--redis-url", url, "-q")

    assert said.exit_code == quiet.exit_code == 0, quiet.output
    assert f"opsctl: wrote 1 planned action(s) to {plan}" in said.stderr
    assert "wrote" not in quiet.stderr
    assert len(json.loads(plan.read_text())["jobs"]) == 1  # written all the same


def test_a_plan_applied_twice_reports_no_registration_removed_the_second_time(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    register_worker(url, "w-crashed")
    job = started_job(conn, "w-crashed")
    policy = write_policy(tmp_path, FAIL_ALL)
    plan = tmp_path / "plan.json"
    made = opsctl("plan", str(policy), "--output", str(plan), "--redis-url", url)
    assert made.exit_code == 0, made.output

    first = opsctl("apply", "--plan", str(plan), "--format", "json", "--redis-url", url)
    again = opsctl("apply", "--plan", str(plan), "--format", "json", "--redis-url", url)

    assert first.exit_code == again.exit_code == 0, again.output
    workers = [json.loads(r.stdout)["workers"] for r in (first, again)]
    assert [[(w["name"], w["outcome"]) for w in ws] for ws in workers] == [
        [("w-crashed", "done")],
        [("w-crashed", "skipped")],
    ]
    assert json.loads(again.stdout)["summary"]["workers_removed"] == 0
    assert status_of(conn, job.id) == "failed"
    assert not conn.sismember("rq:workers", "rq:worker:w-crashed")


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_plans_report_names_the_policy_it_was_made_from(
    conn: redis.Redis, url: str, tmp_path: Path, dry_run: bool
) -> None:
    register_worker(url, "w-crashed")
    job = started_job(conn, "w-crashed")
    policy = write_policy(tmp_path, FAIL_ALL)
    plan = tmp_path / "plan.json"
    grace = ("--reconnect-grace", "0")
    made = opsctl("plan", str(policy), "--output", str(plan), "--redis-url", url, *grace)
    assert made.exit_code == 0, made.output
    direct = apply(policy, url, "--dry-run", *grace)

    extra = ["--dry-run"] if dry_run else []
    result = opsctl("apply", "--plan", str(plan), "--format", "json", "--redis-url", url, *extra)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (
        report["policy"]
        == direct["policy"]
        == {
            "path": str(policy),
            "sha256": hashlib.sha256(policy.read_bytes()).hexdigest(),
        }
    )
    assert status_of(conn, job.id) == ("started" if dry_run else "failed")


def test_url_without_a_host_is_refused_rather_than_completed_with_a_default(
    tmp_path: Path,
) -> None:
    policy = write_policy(tmp_path, FAIL_ALL)

    result = opsctl("apply", str(policy), "--redis-url", "redis://:s3cret@/0")

    assert result.exit_code == 2, result.output
    assert "names no host" in result.output
    assert "s3cret" not in result.output


def test_password_written_without_its_colon_is_still_masked() -> None:
    result = opsctl("status", "--redis-url", "redis://s3cret@127.0.0.1:1/0", "--timeout", "1")

    assert result.exit_code == 3, result.output
    assert "s3cret" not in result.output


def test_status_that_is_not_utf8_is_reported_and_the_other_jobs_are_acted_on(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    odd = started_job(conn, "w-dead")
    conn.hset(odd.key, "status", b"\xff\xfe")
    plain = started_job(conn, "w-dead")
    policy = write_policy(tmp_path, FAIL_ALL)

    report = apply(policy, url)

    jobs = jobs_by_id(report)
    assert jobs[plain.id]["outcome"] == "done"
    assert jobs[odd.id]["state"] == "leftover"
    assert Job.fetch(plain.id, connection=conn).get_status() == "failed"


def test_plan_written_into_a_missing_folder_is_a_usage_error(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    started_job(conn, "w-dead")
    policy = write_policy(tmp_path, FAIL_ALL)
    target = tmp_path / "missing" / "plan.json"

    result = opsctl("plan", str(policy), "--output", str(target), "--redis-url", url)

    assert result.exit_code == 2, result.output
    assert "cannot write there" in result.output


def test_waits_that_are_not_a_finite_number_of_seconds_are_refused(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, FAIL_ALL)

    for option, value in (
        ("--stop-timeout", "nan"),
        ("--lock-timeout", "-1"),
        ("--timeout", "inf"),
    ):
        result = opsctl("apply", str(policy), "--redis-url", "redis://127.0.0.1:1/0", option, value)
        assert result.exit_code == 2, (option, result.output)
        assert "not a number of seconds" in result.output


def test_started_registry_of_the_wrong_type_is_a_problem_not_a_failed_run(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    conn.set("rq:wip:broken", "not a sorted set")
    job = started_job(conn, "w-dead")
    policy = write_policy(
        tmp_path,
        """\
        version: 1
        queues:
          - name: "*"
        """,
    )

    report = apply(policy, url, "--dry-run")

    assert any("rq:wip:broken" in p for p in report["problems"])
    assert jobs_by_id(report)[job.id]["outcome"] == "planned"


def test_dead_worker_of_a_queue_the_run_does_not_cover_keeps_its_registration(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    register_worker(url, "w-billing", queue="billing")
    conn.delete("rq:worker:w-billing")  # its hash expired, as after a crash
    Queue("billing", connection=conn).enqueue("jobs.quick")  # RQ's queue set names billing
    started_job(conn, "w-dead")
    policy = write_policy(
        tmp_path,
        """\
        version: 1
        queues:
          - name: default
          - name: billing
            enabled: false
        """,
    )

    report = apply(policy, url)

    assert conn.sismember("rq:workers:billing", "rq:worker:w-billing")
    # Nor is it taken out of RQ's set of all workers: none or all of its sets.
    assert "rq:worker:w-billing" in Worker.all_keys(connection=conn)
    assert "w-billing" not in [w["name"] for w in report["workers"]]


def test_dead_worker_is_removed_from_covered_queues_known_only_by_their_worker_sets(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    # Its queues hold no job and are missing from RQ's queue set: only the
    # worker sets name them.
    conn.sadd("rq:workers", "rq:worker:w-gone")
    for queue in ("mq-a", "mq-b", "billing"):
        conn.sadd(f"rq:workers:{queue}", "rq:worker:w-gone")
    policy = write_policy(
        tmp_path,
        """\
        version: 1
        queues:
          - name: "mq-*"
          - name: billing
            enabled: false
        """,
    )

    apply(policy, url)

    for queue in ("mq-a", "mq-b"):
        assert Worker.all_keys(connection=conn, queue=Queue(queue, connection=conn)) == []
    billing = Worker.all_keys(connection=conn, queue=Queue("billing", connection=conn))
    assert billing == ["rq:worker:w-gone"]
    assert Worker.all_keys(connection=conn) == []


def test_registration_set_member_that_is_no_worker_key_is_left_alone(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    conn.sadd("rq:workers", "garbage-member")
    started_job(conn, "w-dead")
    policy = write_policy(tmp_path, FAIL_ALL)

    report = apply(policy, url)

    assert conn.sismember("rq:workers", "garbage-member")
    assert all(w["name"] != "garbage-member" for w in report["workers"])


def test_audit_key_of_the_wrong_type_stops_the_run_before_any_change(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    conn.set("opsctl:audit", "someone else's value")
    job = started_job(conn, "w-dead")
    policy = write_policy(tmp_path, FAIL_ALL)

    result = opsctl("apply", str(policy), "--redis-url", url, "--best-effort")

    # A setup mistake, never hidden by --best-effort: a deploy would pass while nothing is cleaned.
    assert result.exit_code == 2, result.output
    assert "opsctl:audit" in result.output
    assert started_ids(conn) == [job.id]
    assert job.id not in FailedJobRegistry("default", connection=conn).get_job_ids(cleanup=False)


def test_destination_of_the_wrong_type_leaves_the_job_untouched_and_exits_1(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    conn.set("rq:failed:default", "not a sorted set")
    job = started_job(conn, "w-dead")
    policy = write_policy(tmp_path, FAIL_ALL)

    report = apply(policy, url, exit_code=1)

    assert jobs_by_id(report)[job.id]["outcome"] == "error"
    assert "rq:failed:default holds a string" in jobs_by_id(report)[job.id]["reason"]
    assert started_ids(conn) == [job.id]
    assert status_of(conn, job.id) == "started"


def test_names_from_redis_cannot_send_control_sequences_to_the_terminal(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    conn.zadd("rq:wip:default", {b"evil\x1b[2J\x07:exec1": 1})
    policy = write_policy(tmp_path, FAIL_ALL)

    result = opsctl("apply", str(policy), "--redis-url", url, "--dry-run")

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b[2J" in result.stdout


def test_an_id_that_is_not_utf8_is_shown_alike_in_text_and_json_as_valid_unicode(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    conn.zadd("rq:wip:default", {b"bad\xff\xfeid": 1})  # an RQ 1 id, its hash gone
    policy = write_policy(tmp_path, FAIL_ALL)

    as_json = opsctl("apply", str(policy), "--redis-url", url, "--dry-run", "--format", "json")
    as_text = opsctl("apply", str(policy), "--redis-url", url, "--dry-run")

    assert "\\ud" not in as_json.stdout  # no lone surrogates, which strict parsers refuse
    [line] = json.loads(as_json.stdout)["jobs"]
    assert line["id"] == line["entry"] == "bad\\xff\\xfeid"
    assert "bad\\xff\\xfeid" in as_text.stdout


def test_names_from_redis_cannot_send_control_sequences_or_forge_lines_in_text_logs(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    conn.zadd("rq:wip:default", {b"evil\x1b]0;title\x07:exec1": 1, b"nl\nFAKE error:exec2": 1})
    policy = write_policy(tmp_path, FAIL_ALL)

    result = opsctl("apply", str(policy), "--redis-url", url, "-v")  # logs each change

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert "job=evil\\x1b]0;title\\x07" in result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("FAKE")]
    assert "job=nl\\nFAKE error" in result.stderr


def test_plan_output_that_is_the_policy_file_is_refused(
    conn: redis.Redis, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started_job(conn, "w-dead")
    policy = write_policy(tmp_path, FAIL_ALL)
    written = policy.read_text()
    monkeypatch.chdir(tmp_path)

    for output in (str(policy), policy.name, f"../{tmp_path.name}/{policy.name}"):
        result = opsctl("plan", str(policy), "--output", output, "--redis-url", url)
        assert result.exit_code == 2, (output, result.output)
        assert "this command reads" in result.output
    assert policy.read_text() == written


@pytest.mark.parametrize("command", ["apply", "watch", "apply-plan"])
def test_a_metrics_file_that_is_an_input_file_is_refused(
    conn: redis.Redis, url: str, tmp_path: Path, command: str
) -> None:
    job = started_job(conn, "w-dead")
    policy = write_policy(tmp_path, FAIL_ALL)
    if command == "apply-plan":
        plan = tmp_path / "plan.json"
        assert opsctl("plan", str(policy), "-o", str(plan), "--redis-url", url).exit_code == 0
        given, args = plan, ["apply", "--plan", str(plan)]
    else:
        given, args = policy, [command, str(policy)]
    written = given.read_text()

    result = opsctl(*args, "--redis-url", url, "--metrics-file", str(given))

    assert result.exit_code == 2, result.output
    # A policy or a plan never holds opsctl's gauges: refused before it is even compared.
    assert "does not hold opsctl's metrics in the Prometheus text format" in result.output
    assert given.read_text() == written
    assert status_of(conn, job.id) == "started"


def test_plan_output_replaces_only_a_regular_file(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    started_job(conn, "w-dead")
    policy = write_policy(tmp_path, FAIL_ALL)
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    folder = tmp_path / "folder"
    folder.mkdir()
    fifo = tmp_path / "fifo"  # a special file of the test's own: a regression replaces it alone
    os.mkfifo(fifo)

    for path in (link, folder, fifo):
        result = opsctl("plan", str(policy), "--output", str(path), "--redis-url", url)
        assert result.exit_code == 2, (path, result.output)
        assert "not a regular file" in result.output
    assert target.read_text() == "keep me"
    assert link.is_symlink() and stat.S_ISFIFO(fifo.lstat().st_mode)
    result = opsctl("plan", str(policy), "--output", "", "--redis-url", url)
    assert (result.exit_code, result.output.strip()) == (
        2,
        "opsctl: error: --output is empty; give the path of the plan file to write",
    )

    regular = tmp_path / "plan.json"
    regular.write_text("")
    for _ in range(2):  # an empty file, then the plan written the first time
        result = opsctl("plan", str(policy), "--output", str(regular), "--redis-url", url)
        assert result.exit_code == 0, result.output
        assert json.loads(regular.read_text())["format"] == "opsctl-plan"


@pytest.mark.parametrize(
    "held",
    [
        "SECRET=hunter2\n",
        "-----BEGIN PRIVATE KEY-----\nMIIEvQ\n-----END PRIVATE KEY-----\n",
        '{"format": "something else"}',
        FAIL_ALL,
    ],
)
def test_plan_output_never_replaces_a_file_that_holds_something_else(
    conn: redis.Redis, url: str, tmp_path: Path, held: str
) -> None:
    # A slip of the output path during an incident must not destroy a policy, a key,
    # an env file: only a file that is empty or holds an opsctl plan is replaced.
    started_job(conn, "w-dead")
    policy = write_policy(tmp_path, FAIL_ALL)
    other = tmp_path / "other"
    other.write_text(held)
    other.chmod(0o600)

    result = opsctl("plan", str(policy), "--output", str(other), "--redis-url", url)
    closed = opsctl(
        "plan", str(policy), "--output", str(other), "--redis-url", "redis://127.0.0.1:1"
    )

    for refused in (result, closed):  # refused before Redis is read
        assert refused.exit_code == 2, refused.output
        assert "holds something other than an opsctl plan" in refused.output
        assert "hunter2" not in refused.output and "MIIE" not in refused.output
    assert other.read_text() == held
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", policy.name]


@pytest.mark.parametrize("command", ["apply-text", "apply-json", "status-json", "status-prom"])
@pytest.mark.parametrize("leaves", ["before", "after-one-byte"])
def test_a_reader_that_goes_away_cuts_the_report_short_but_not_the_exit_code(
    conn: redis.Redis, url: str, tmp_path: Path, command: str, leaves: str
) -> None:
    # `opsctl apply ... | head -c 1`: the pipe's reader goes before the report is written.
    jobs = [started_job(conn, "w-dead") for _ in range(3)]
    policy = write_policy(tmp_path, FAIL_ALL)
    name, output = command.split("-")
    args = ["apply", str(policy)] if name == "apply" else ["status"]
    output = {"prom": "prometheus"}.get(output, output)
    env = opsctl_env()
    env.pop("PYTHONUNBUFFERED", None)  # buffered, as in a real pipe
    child = subprocess.Popen(
        [sys.executable, "-m", "opsctl", *args, "--redis-url", url, "--format", output],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None and child.stderr is not None
    if leaves == "after-one-byte":
        assert child.stdout.read(1)
    child.stdout.close()
    stderr = child.stderr.read().decode()
    code = child.wait(timeout=120)

    assert code == 0, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    if name == "apply":
        assert {status_of(conn, job.id) for job in jobs} == {"failed"}


def test_a_report_cut_short_is_not_called_complete_when_the_metrics_fail_too(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    started_job(conn, "w-dead")
    policy = write_policy(tmp_path, FAIL_ALL)
    env = opsctl_env()
    env.pop("PYTHONUNBUFFERED", None)  # buffered, as in a real pipe
    argv = ["apply", str(policy), "--redis-url", url, "--dry-run", "--format", "json"]
    argv += ["--metrics-file", str(tmp_path / "missing" / "opsctl.prom")]
    child = subprocess.Popen(
        [sys.executable, "-m", "opsctl", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader goes before the report is written
    stderr = child.stderr.read().decode()

    assert child.wait(timeout=120) == 6, stderr
    assert "the output was cut short" in stderr
    assert "cannot write the metrics file" in stderr
    assert "report above is complete" not in stderr


def made_plan(url: str, tmp_path: Path, text: str = FAIL_ALL) -> tuple[Path, Path]:
    """A policy and the plan `opsctl plan` made from it."""
    policy, plan = write_policy(tmp_path, text), tmp_path / "plan.json"
    made = opsctl("plan", str(policy), "--output", str(plan), "--redis-url", url)
    assert made.exit_code == 0, made.output
    return policy, plan


def test_a_plan_with_nothing_to_do_says_so_rather_than_speak_of_a_policy(
    url: str, tmp_path: Path
) -> None:
    _, plan = made_plan(url, tmp_path)  # nothing is stuck

    result = opsctl("apply", "--plan", str(plan), "--redis-url", url)

    assert result.exit_code == 0, result.output
    assert "the plan lists no job to act on" in result.output
    assert "policy" not in result.output


def edit_plan(plan: Path, change: Callable[[dict[str, Any]], object]) -> None:
    document = json.loads(plan.read_text())
    change(document)
    plan.write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        pytest.param(
            lambda p: p["jobs"][0].update(job=None, rule=None),
            "a rule is not a mapping",
            id="nulls",
        ),
        pytest.param(lambda p: p["jobs"][0].pop("rule"), "no 'rule' field", id="missing"),
        pytest.param(lambda p: p["jobs"][0].update(state="asleep"), "'asleep'", id="value"),
        pytest.param(lambda p: p.update(queues={}), "'queues' is not a list", id="queues"),
        pytest.param(lambda p: p["jobs"][0].update(job_id=7), "'job_id' is not text", id="id"),
        pytest.param(
            lambda p: p["jobs"][0]["signals"].update(age_s="old"),
            "'age_s' is not a number",
            id="signal",
        ),
        pytest.param(
            lambda p: p["jobs"][0]["rule"].update(dry_run="no"),
            "'dry_run' is not true or false",
            id="rule",
        ),
        pytest.param(
            lambda p: p["workers"].append(
                {"name": "w", "exists": 1, "fields": {}, "registered_in": [], "evidence": ""}
            ),
            "'exists' is not true or false",
            id="worker",
        ),
    ],
)
def test_a_damaged_plan_is_named_in_words_and_nothing_changes(
    conn: redis.Redis, url: str, tmp_path: Path, damage: Any, words: str
) -> None:
    job = started_job(conn, "w-dead")
    _, plan = made_plan(url, tmp_path)
    edit_plan(plan, damage)
    before = everything(conn)

    result = opsctl("apply", "--plan", str(plan), "--redis-url", url)

    assert result.exit_code == 2, result.output
    assert f"plan {str(plan)!r} is damaged" in result.output
    assert words in result.output and "make a new one" in result.output
    assert "Error" not in result.output and "Traceback" not in result.output
    assert everything(conn) == before
    assert status_of(conn, job.id) == "started"


def test_a_planned_stop_goes_ahead_only_for_a_job_overdue_when_read_again(
    conn: redis.Redis, url: str, tmp_path: Path, live_worker: Any
) -> None:
    worker, other = live_worker("w-live", obeys_stop=True), live_worker("w-other", obeys_stop=True)
    job = started_job(conn, "w-live", started_ago_s=5)
    overdue = started_job(conn, "w-other", started_ago_s=5)
    policy = write_policy(tmp_path, DEFAULT_POLICY, action="fail")  # max_age 10m
    plan = tmp_path / "plan.json"
    made = opsctl("plan", str(policy), "--max-age", "1s", "-o", str(plan), "--redis-url", url)
    assert made.exit_code == 0, made.output

    def forge(document: dict[str, Any]) -> None:
        # Edited: the job's rule says 10m, as the policy does, and it claims a great age.
        [planned] = [j for j in document["jobs"] if j["job_id"] == job.id]
        planned["rule"]["max_age_seconds"] = 600
        planned["signals"]["age_s"] = 99_999

    edit_plan(plan, forge)

    result = opsctl(
        "apply", "--plan", str(plan), str(policy), "--format", "json", "--redis-url", url
    )

    assert result.exit_code == 0, result.output
    lines = {line["id"]: line for line in json.loads(result.stdout)["jobs"]}
    assert lines[job.id]["outcome"] == "skipped", lines[job.id]
    assert lines[job.id]["reason"].startswith("not stopped: running for ")
    assert lines[job.id]["reason"].endswith("s now, within max_age 600s")
    assert worker.commands == []
    assert status_of(conn, job.id) == "started"
    # The other is overdue by its own planned rule (1s): its stop goes ahead.
    assert (lines[overdue.id]["action"], lines[overdue.id]["outcome"]) == ("stop", "done")
    assert [c["job_id"] for c in other.commands] == [overdue.id]
    assert status_of(conn, overdue.id) == "stopped"


def test_a_plan_nested_past_any_json_parser_is_refused_as_damaged(url: str, tmp_path: Path) -> None:
    plan = tmp_path / "deep.json"
    plan.write_text("[" * 100_000)

    result = opsctl("apply", "--plan", str(plan), "--redis-url", url)

    assert result.exit_code == 2, result.output
    assert "nests values deeper than any plan opsctl writes" in result.output


@pytest.mark.parametrize("kind", ["fifo", "directory", "missing"])
def test_a_plan_path_that_is_no_file_is_refused_at_once(
    conn: redis.Redis, url: str, tmp_path: Path, kind: str
) -> None:
    job = started_job(conn, "w-dead")
    plan = tmp_path / "plan.json"
    if kind == "fifo":
        os.mkfifo(plan)  # opening it would wait for a writer that never comes
    elif kind == "directory":
        plan.mkdir()
    why = {"fifo": "it is a FIFO, not a file", "directory": "it is a directory"}

    result = opsctl("apply", "--plan", str(plan), "--redis-url", url)
    without_url = opsctl("apply", "--plan", str(plan))  # the plan is named first

    said = f"cannot read plan {str(plan)!r}: {why.get(kind, 'no such file')}"
    assert (result.exit_code, without_url.exit_code) == (2, 2), result.output
    assert said in result.output and said in without_url.output, without_url.output
    assert status_of(conn, job.id) == "started"


def test_a_plan_of_a_policy_whose_defaults_say_dry_run_changes_nothing(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    register_worker(url, "w-crashed")
    job = started_job(conn, "w-crashed")
    _, plan = made_plan(
        url,
        tmp_path,
        "version: 1\ndefaults:\n  dry_run: true\nqueues:\n  - name: default\n    dry_run: false\n",
    )
    before = everything(conn)

    result = opsctl("apply", "--plan", str(plan), "--format", "json", "--redis-url", url)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] is True
    assert report["summary"]["acted"] == 0 and report["summary"]["workers_removed"] == 0
    assert everything(conn) == before
    assert status_of(conn, job.id) == "started"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (("--queue", "default"), "--queue"),
        (("--max-actions", "1"), "--max-actions"),
        (("--max-age", "1h", "--force"), "--force and --max-age"),
        (("--no-dry-run",), "--no-dry-run (or OPSCTL_DRY_RUN=false)"),
    ],
)
def test_options_a_plan_cannot_honour_are_refused_with_it(
    conn: redis.Redis, url: str, tmp_path: Path, options: tuple[str, ...], named: str
) -> None:
    job = started_job(conn, "w-dead")
    _, plan = made_plan(url, tmp_path)

    result = opsctl("apply", "--plan", str(plan), *options, "--redis-url", url)

    assert result.exit_code == 2, result.output
    assert f"{named} cannot be used with --plan" in result.output
    assert status_of(conn, job.id) == "started"


def test_max_plan_age_without_a_plan_is_refused_rather_than_acting_on_the_policy(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job = started_job(conn, "w-dead")
    policy, _plan = made_plan(url, tmp_path)

    result = opsctl("apply", str(policy), "--max-plan-age", "5m", "--redis-url", url)

    assert result.exit_code == 2, result.output
    assert "--max-plan-age applies only with --plan" in result.output
    assert status_of(conn, job.id) == "started"


@pytest.mark.parametrize(
    "when",
    [float("nan"), float("inf"), 1e11, "1000"],
    ids=["nan", "infinity", "far-future", "text"],
)
def test_a_plan_whose_making_time_is_not_in_the_past_is_refused(
    conn: redis.Redis, url: str, tmp_path: Path, when: object
) -> None:
    job = started_job(conn, "w-dead")
    _, plan = made_plan(url, tmp_path)
    edit_plan(plan, lambda d: d.update(created_at_epoch=when, created_at="2001-01-01T00:00:00Z"))

    result = opsctl("apply", "--plan", str(plan), "--redis-url", url)

    assert result.exit_code == 2, result.output
    assert "make a new one" in result.output
    assert status_of(conn, job.id) == "started"


@pytest.mark.parametrize(
    ("edit", "action"),
    [
        ({"action": "explode"}, "explode"),
        # A stop is followed by its rule's action (fail here) or fail: never delete.
        ({"action": "stop", "follow_up": "delete"}, "stop"),
    ],
    ids=["unknown-action", "follow-up-no-rule-chooses"],
)
def test_a_plan_edited_to_an_action_no_rule_chooses_is_refused_before_any_job_is_touched(
    conn: redis.Redis, url: str, tmp_path: Path, edit: dict[str, str], action: str
) -> None:
    jobs = [started_job(conn, "w-dead") for _ in range(3)]
    _, plan = made_plan(url, tmp_path)
    edit_plan(plan, lambda d: d["jobs"][0].update(edit))

    result = opsctl("apply", "--plan", str(plan), "--redis-url", url)

    assert result.exit_code == 2, result.output
    assert f"has the action {action!r}" in result.output
    assert [status_of(conn, job.id) for job in jobs] == ["started"] * 3


def test_a_job_whose_origin_is_not_the_one_read_is_left_alone(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    # The queue and registries a change writes to are the origin's as read (here,
    # as a plan edited by hand says); the job's own hash names another.
    job = started_job(conn, "w-dead")
    _, plan = made_plan(url, tmp_path)
    edit_plan(plan, lambda d: d["jobs"][0]["job"].update(origin="payments"))

    result = opsctl("apply", "--plan", str(plan), "--redis-url", url, "--format", "json")

    assert result.exit_code == 0, result.output
    [line] = json.loads(result.stdout)["jobs"]
    assert line["outcome"] == "skipped", line
    assert line["reason"].endswith("its origin changed since it was read"), line
    assert status_of(conn, job.id) == "started"
    assert FailedJobRegistry("payments", connection=conn).get_job_ids() == []


def test_a_plan_edited_against_its_policy_is_refused_when_the_policy_is_given(
    conn: redis.Redis, url: str, tmp_path: Path
) -> None:
    job = started_job(conn, "w-dead")
    policy, plan = made_plan(url, tmp_path)

    def to_delete(document: dict[str, Any]) -> None:
        document["jobs"][0]["action"] = "delete"
        document["jobs"][0]["rule"]["action"] = "delete"

    edit_plan(plan, to_delete)

    result = opsctl("apply", str(policy), "--plan", str(plan), "--redis-url", url)

    assert result.exit_code == 2, result.output
    assert "the plan's rule for queue 'default' differs from the policy's (action)" in result.output
    assert status_of(conn, job.id) == "started"


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("apply", "policy.yaml", "--bogus"), {}),
        (("apply", "policy.yaml"), {"OPSCTL_DRY_RUN": ""}),
        (("status", "--timeout", "0"), {}),
    ],
    ids=["unknown-option", "blank-variable", "out-of-range"],
)
def test_an_option_refused_keeps_exit_2_when_the_reader_of_stderr_is_gone(
    args: tuple[str, ...], env: dict[str, str]
) -> None:
    # `opsctl ... 2>&1 | head -1`: the reader of stderr may be gone before the
    # error is written, and a deploy script must still see 2, not 1.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        child = subprocess.run(
            [sys.executable, "-m", "opsctl", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
            env={**opsctl_env(), **env},
            timeout=60,
        )
    finally:
        os.close(write_end)

    assert child.returncode == 2
