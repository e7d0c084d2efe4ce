"""Broken and unusual RQ records: each kind is read, reported and decided correctly.

Every test builds one odd record beside what RQ itself writes (with RQ's own API), runs
opsctl in-process against the suite's private redis-server, and checks the JSON report and,
for whatever was acted on, the end state through RQ's API. A *live worker* here is a worker
hash plus an open subscription to its command channel, which is what opsctl's liveness
check looks for; a *dead worker* is a name with no hash and no connection.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
from rq import Queue, Retry, Worker
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.rate_limit import RateLimit, RateLimitRegistry
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.results import Result

from conftest import (
    WorkerFactory,
    clean_env,
    invoke_opsctl,
    job_hashes,
    job_status,
    listed_in,
    opsctl_env,
    run_opsctl,
    wait_for_status,
)
from opsctl.errors import ExitCode
from opsctl.keys import Keys
from opsctl.keyspace import find_lost, note_lost, survey
from opsctl.model import StartedEntry
from opsctl.policy import load_policy
from opsctl.state import read_snapshot

pytestmark = pytest.mark.redis_server

QUEUE = "odd"
OTHER_QUEUE = "odd-other"
DEAD = "dead-worker"
HOUR_S = 3600

REPORT_SCHEMA = json.loads((Path(__file__).parents[1] / "schemas/report.schema.json").read_text())


# --- building records ----------------------------------------------------------------------


def started_job(
    conn: redis.Redis,
    worker: str = DEAD,
    queue: str = QUEUE,
    func: str = "jobs.quick",
    retry: Retry | None = None,
) -> Job:
    """A job RQ started on ``worker``: hash, execution record and started-registry entry."""
    job = Queue(queue, connection=conn).enqueue(func, retry=retry)
    with conn.pipeline() as pipe:
        Execution.create(job, 600, pipe, worker_name=worker)
        job.prepare_for_execution(worker, pipe)
        pipe.lrem(f"rq:queue:{queue}", 0, job.id)
        pipe.execute()
    return job


def iso(moment: datetime, form: str = "%Y-%m-%dT%H:%M:%S.%fZ") -> str:
    return moment.strftime(form)


def ago(seconds: float) -> datetime:
    return datetime.now(timezone.utc) - timedelta(seconds=seconds)


def started_member(conn: redis.Redis, job_id: str, queue: str = QUEUE) -> bytes:
    [member] = [m for m in conn.zrange(f"rq:wip:{queue}", 0, -1) if m.startswith(job_id.encode())]
    return bytes(member)


@pytest.fixture
def live_worker(redis_conn: redis.Redis) -> Iterator[Any]:
    """A factory of live workers: hash fields given, subscribed to their command channel."""
    subscriptions = []

    def start(name: str, fields: dict[str, str], executions: list[str] = ()) -> str:  # type: ignore[assignment]
        if fields:
            redis_conn.hset(f"rq:worker:{name}", mapping=fields)
        # RQ 3 lists a worker's executions in a set; only the ones given here stay.
        redis_conn.delete(f"rq:worker:{name}:executions")
        if executions:
            redis_conn.sadd(f"rq:worker:{name}:executions", *executions)
        redis_conn.sadd("rq:workers", f"rq:worker:{name}")
        pubsub = redis_conn.pubsub()
        pubsub.subscribe(f"rq:pubsub:{name}")
        pubsub.get_message(timeout=1)
        subscriptions.append(pubsub)
        return name

    yield start
    for pubsub in subscriptions:
        pubsub.close()


# --- running opsctl ------------------------------------------------------------------------


def policy(tmp_path: Path, action: str = "fail", extra: str = "") -> Path:
    path = tmp_path / f"policy-{action}.yaml"
    text = f'version: 1\ndefaults:\n  action: {action}\n{extra}queues:\n  - name: "*"\n'
    path.write_text(text)
    return path


def run(path: Path, url: str, *extra: str) -> dict[str, Any]:
    """`opsctl apply` with a JSON report; the report, after checking it exited 0."""
    result = invoke_opsctl("apply", str(path), "--redis-url", url, "--format", "json", *extra)
    assert result.exit_code == 0, f"{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    jsonschema.validate(report, REPORT_SCHEMA)
    return report


def job_in(report: dict[str, Any], job_id: str) -> dict[str, Any]:
    [item] = [j for j in report["jobs"] if j["id"] == job_id]
    return item


def explain(job_id: str, url: str, *extra: str) -> tuple[int, dict[str, Any] | str]:
    result = invoke_opsctl("explain", job_id, "--redis-url", url, "--format", "json", *extra)
    if result.exit_code != 0:
        return result.exit_code, result.stderr
    return 0, json.loads(result.stdout)


# --- 1. hashes that hold no job -------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"last_heartbeat": iso(ago(5))},
        {"status": "", "created_at": "", "timeout": "", "started_at": ""},
        {"worker_name": DEAD, "timeout": "ten", "retries_left": "x"},
    ],
    ids=["heartbeat-only", "empty-strings", "unparsable-numbers"],
)
def test_a_hash_that_holds_no_job_is_orphaned_and_only_its_entry_is_removed(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, fields: dict[str, str]
) -> None:
    normal = started_job(redis_conn)
    redis_conn.hset("rq:job:husk", mapping=fields)
    redis_conn.zadd(f"rq:wip:{QUEUE}", {"husk:e1": time.time() - 10})

    report = run(policy(tmp_path), redis_url)

    husk = job_in(report, "husk")
    assert (husk["state"], husk["action"], husk["outcome"]) == (
        "orphaned",
        "remove-entry",
        "done",
    )
    assert "holds no job" in husk["reason"]
    assert redis_conn.zscore(f"rq:wip:{QUEUE}", "husk:e1") is None
    assert redis_conn.exists("rq:job:husk"), "the husk itself is left as it is"
    assert job_status(redis_conn, normal.id) == "failed"


def test_an_entry_whose_job_key_holds_no_hash_is_removed_and_the_key_kept(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    redis_conn.set("rq:job:not-a-hash", "written by something else")
    redis_conn.zadd(f"rq:wip:{QUEUE}", {"not-a-hash": time.time() - 10})

    report = run(policy(tmp_path), redis_url)

    item = job_in(report, "not-a-hash")
    assert (item["state"], item["action"], item["outcome"]) == ("orphaned", "remove-entry", "done")
    assert any("job not-a-hash: could not be read" in p for p in report["problems"])
    registry = StartedJobRegistry(QUEUE, connection=redis_conn)
    assert "not-a-hash" not in registry.get_job_ids(cleanup=False)
    assert redis_conn.get("rq:job:not-a-hash") == b"written by something else"


def test_an_empty_registry_member_is_removed_as_an_orphaned_entry(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    normal = started_job(redis_conn)
    redis_conn.zadd(f"rq:wip:{QUEUE}", {"": time.time() - 10})

    report = run(policy(tmp_path), redis_url)

    [item] = [j for j in report["jobs"] if j["entry"] == ""]
    assert (item["state"], item["action"], item["outcome"]) == ("orphaned", "remove-entry", "done")
    registry = StartedJobRegistry(QUEUE, connection=redis_conn)
    assert registry.get_job_and_execution_ids(cleanup=False) == []
    assert job_status(redis_conn, normal.id) == "failed"
    assert run(policy(tmp_path), redis_url)["jobs"] == []  # nothing is left for the next run


def test_a_started_job_with_a_timeout_that_is_not_a_number_is_still_failed(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = started_job(redis_conn)
    redis_conn.hset(job.key, mapping={"timeout": "forever", "failure_ttl": ""})

    item = job_in(run(policy(tmp_path), redis_url), job.id)

    assert (item["state"], item["outcome"], item["timeout_seconds"]) == ("abandoned", "done", None)
    assert job.id in FailedJobRegistry(QUEUE, connection=redis_conn).get_job_ids(cleanup=False)


# --- 2. timestamps ---------------------------------------------------------------------------

#: How a moment is written in each form RQ has used; None: as float epoch seconds.
TIMESTAMP_FORMS: dict[str, tuple[str | None, timezone]] = {
    "fraction-Z": ("%Y-%m-%dT%H:%M:%S.%fZ", timezone.utc),
    "no-fraction-Z": ("%Y-%m-%dT%H:%M:%SZ", timezone.utc),
    "naive": ("%Y-%m-%dT%H:%M:%S.%f", timezone.utc),
    "offset-zero": ("%Y-%m-%dT%H:%M:%S+00:00", timezone.utc),
    "offset-plus-2": ("%Y-%m-%dT%H:%M:%S%z", timezone(timedelta(hours=2))),
    "float-epoch": (None, timezone.utc),
}


@pytest.mark.parametrize("form", sorted(TIMESTAMP_FORMS))
def test_every_timestamp_form_rq_wrote_gives_the_same_age(
    redis_conn: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    live_worker: Any,
    form: str,
) -> None:
    pattern, zone = TIMESTAMP_FORMS[form]
    moment = ago(2 * HOUR_S).astimezone(zone)
    job = started_job(redis_conn, worker="busy")
    member = started_member(redis_conn, job.id)
    live_worker("busy", {"state": "busy", "current_job": job.id, "birth": iso(ago(9000))})
    if pattern is None:  # execution records hold float epoch seconds
        redis_conn.hset(job.key, "started_at", "")
        redis_conn.hset(f"rq:execution:{member.decode()}", "created_at", str(moment.timestamp()))
    else:
        redis_conn.hset(job.key, "started_at", iso(moment, pattern))
        redis_conn.hset(f"rq:execution:{member.decode()}", "created_at", "")

    item = job_in(run(policy(tmp_path), redis_url, "--dry-run"), job.id)

    assert item["state"] == "overdue", item
    assert 2 * HOUR_S - 120 < item["age_seconds"] < 2 * HOUR_S + 120


@pytest.mark.parametrize("started_at", [None, "", "yesterday", "2026-13-45T99:00:00Z"])
def test_the_execution_gives_the_age_of_a_job_whose_started_at_cannot_be_read(
    redis_conn: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    live_worker: Any,
    started_at: str | None,
) -> None:
    job = started_job(redis_conn, worker="busy")
    live_worker("busy", {"state": "busy", "current_job": job.id})
    if started_at is None:
        redis_conn.hdel(job.key, "started_at")
    else:
        redis_conn.hset(job.key, "started_at", started_at)
    execution = f"rq:execution:{started_member(redis_conn, job.id).decode()}"
    redis_conn.hset(execution, "created_at", str(ago(2 * HOUR_S).timestamp()))

    item = job_in(run(policy(tmp_path), redis_url, "--dry-run"), job.id)

    assert item["state"] == "overdue", item
    assert 2 * HOUR_S - 120 < item["age_seconds"] < 2 * HOUR_S + 120


def test_a_hash_with_an_empty_status_but_a_creation_time_is_a_job_that_ended(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    redis_conn.hset("rq:job:blank", mapping={"status": "", "created_at": iso(ago(60))})
    redis_conn.zadd(f"rq:wip:{QUEUE}", {"blank:e1": time.time() - 10})

    item = job_in(run(policy(tmp_path), redis_url, "--dry-run"), "blank")

    assert (item["state"], item["action"], item["reason"]) == (
        "leftover",
        "remove-entry",
        "status is missing",
    )


@pytest.mark.parametrize("started_at", ["", "yesterday", "nan", "-1", "2026-13-45T99:00:00Z"])
def test_a_job_whose_age_cannot_be_known_is_never_acted_on_by_age(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, live_worker: Any, started_at: str
) -> None:
    job = started_job(redis_conn, worker="busy")
    live_worker("busy", {"state": "busy", "current_job": job.id})
    redis_conn.hset(job.key, "started_at", started_at)
    redis_conn.hset(f"rq:execution:{started_member(redis_conn, job.id).decode()}", "created_at", "")

    item = job_in(run(policy(tmp_path), redis_url, "--max-age", "1s"), job.id)

    assert (item["state"], item["action"], item["age_seconds"]) == ("running", "none", None)
    assert "never acted on by age" in item["reason"]
    # RQ's own Job.fetch cannot parse such a started_at; read the status raw.
    assert redis_conn.hget(job.key, "status") == b"started"


# --- 3. data that cannot be decoded --------------------------------------------------------


class Trap:
    """Unpickling this would write a file: proof that opsctl never unpickles."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(self.path).write_text, ("unpickled!",))


class Gone:
    """Pickled under this module's name, which is then swapped for one never installed."""


def _uninstalled_pickle() -> bytes:
    data = pickle.dumps(("billing.charge", None, (Gone(),), {}), protocol=5)
    # Same length, so the pickle's own length prefixes stay right.
    assert len(__name__) == len("nomodule_install")
    return data.replace(__name__.encode(), b"nomodule_install")


LARGE = random.Random(3).randbytes(200_000)

DATA_CASES = {
    "uninstalled-module": (zlib.compress(_uninstalled_pickle()), None, "billing.charge"),
    "protocol-0": (
        zlib.compress(pickle.dumps(("mail.send", None, (), {}), protocol=0)),
        None,
        "mail.send",
    ),
    "uncompressed-protocol-2": (pickle.dumps(("mail.send", None, (), {}), 2), None, "mail.send"),
    "json-serializer": (zlib.compress(b'["reports.build", null, [1], {}]'), None, "reports.build"),
    # Arguments that do not compress: only the start of data is read.
    "large-pickle": (
        zlib.compress(pickle.dumps(("mail.send", None, (LARGE,), {}), 5)),
        None,
        "mail.send",
    ),
    "large-json": (
        zlib.compress(b'["reports.build", null, ["' + LARGE.hex().encode() + b'"], {}]'),
        None,
        "reports.build",
    ),
    "corrupt-with-description": (b"\x78\x9c\x00garbage", "legacy.task(3)", "legacy.task"),
    "corrupt": (zlib.compress(b"\x80\x05\x95garbage"), None, "unknown"),
    "empty": (b"", None, "unknown"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_the_function_name_is_read_from_data_without_unpickling(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, case: str
) -> None:
    data, description, expected = DATA_CASES[case]
    trap = tmp_path / "unpickled"
    job = started_job(redis_conn)
    poisoned_meta = pickle.dumps({"trap": Trap(str(trap))})
    redis_conn.hset(job.key, mapping={"data": data, "meta": poisoned_meta})
    redis_conn.hset(job.key, "description", description or "")

    report = run(policy(tmp_path), redis_url, "--dry-run")
    code, explained = explain(job.id, redis_url)

    assert job_in(report, job.id)["function"] == expected
    assert code == 0 and isinstance(explained, dict)
    assert explained["function"] == expected
    assert explained["fields"]["data"] == f"<{len(data)} bytes>"
    assert explained["fields"]["meta"] == f"<{len(poisoned_meta)} bytes>"
    assert not trap.exists(), "opsctl unpickled a job's data or meta"


# --- 4. registry scores that lie --------------------------------------------------------------


def test_every_stuck_job_is_named_whether_read_with_the_job_or_afterwards(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, live_worker: Any
) -> None:
    # The function of a dead worker's job comes with the registry read; that of
    # a job a live-looking worker does not hold, and of a lost job, is read
    # once the job is found stuck. A running job is not named.
    dead = started_job(redis_conn, func="mail.send")
    not_held = started_job(redis_conn, worker="elsewhere", func="reports.build")
    running = started_job(redis_conn, worker="elsewhere", func="jobs.quick")
    held = started_member(redis_conn, running.id).decode()
    live_worker("elsewhere", {"state": "busy"}, executions=[held])
    lost = lost_started(redis_conn)

    report = run(policy(tmp_path), redis_url, "--dry-run")

    named = {j["id"]: (j["state"], j["function"]) for j in report["jobs"]}
    assert named[dead.id] == ("abandoned", "mail.send")
    assert named[not_held.id] == ("abandoned", "reports.build")
    assert named[running.id] == ("running", None)
    assert named[lost.id] == ("lost", "jobs.quick")


def test_an_infinite_score_does_not_protect_a_job_whose_worker_is_dead(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = Queue(QUEUE, connection=redis_conn).enqueue("jobs.quick")
    redis_conn.lrem(f"rq:queue:{QUEUE}", 0, job.id)
    # RQ up to 1.8 scored a no-timeout job +inf and stored the bare id.
    redis_conn.hset(job.key, mapping={"status": "started", "worker_name": DEAD, "timeout": "-1"})
    redis_conn.hset(job.key, "started_at", iso(ago(60)))
    redis_conn.zadd(f"rq:wip:{QUEUE}", {job.id: float("inf")})

    item = job_in(run(policy(tmp_path), redis_url), job.id)

    assert (item["state"], item["outcome"]) == ("abandoned", "done")
    assert job_status(redis_conn, job.id) == "failed"


def test_an_expired_score_does_not_condemn_a_job_a_live_worker_holds(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, live_worker: Any
) -> None:
    job = started_job(redis_conn, worker="paused")
    member = started_member(redis_conn, job.id)
    live_worker("paused", {"state": "busy", "current_job": job.id})
    redis_conn.zadd(f"rq:wip:{QUEUE}", {member: time.time() - HOUR_S})  # the lease lapsed

    item = job_in(run(policy(tmp_path), redis_url), job.id)

    assert (item["state"], item["action"], item["outcome"]) == ("running", "none", "kept")
    assert job_status(redis_conn, job.id) == "started"


def test_two_entries_of_one_abandoned_job_say_the_second_change_will_be_skipped(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # An RQ 1 bare id beside the RQ 3 entry of the same job, its worker dead.
    job = started_job(redis_conn)
    redis_conn.zadd(f"rq:wip:{QUEUE}", {job.id: time.time() - HOUR_S})
    path = policy(tmp_path)

    dry = [j for j in run(path, redis_url, "--dry-run")["jobs"] if j["id"] == job.id]
    done = [j for j in run(path, redis_url)["jobs"] if j["id"] == job.id]
    later = [j for j in run(path, redis_url)["jobs"] if j["id"] == job.id]

    assert [(j["action"], j["outcome"]) for j in dry] == [("fail", "planned")] * 2
    assert "plans a change of it too" not in dry[0]["reason"]
    assert "plans a change of it too: the second to run finds the job changed" in dry[1]["reason"]
    assert sorted(j["outcome"] for j in done) == ["done", "skipped"]
    assert [(j["action"], j["outcome"]) for j in later] == [("remove-entry", "done")]
    assert job_status(redis_conn, job.id) == "failed"
    assert redis_conn.zcard(f"rq:wip:{QUEUE}") == 0


# --- 5. lost jobs ---------------------------------------------------------------------------


def lost_started(conn: redis.Redis, worker: str = DEAD, since_s: float = HOUR_S) -> Job:
    """Status started, but the worker died before its started-registry entry was written."""
    job = started_job(conn, worker=worker)
    conn.zrem(f"rq:wip:{QUEUE}", started_member(conn, job.id))
    conn.hset(
        job.key, mapping={"started_at": iso(ago(since_s)), "last_heartbeat": iso(ago(since_s))}
    )
    return job


def lost_queued(conn: redis.Redis, since_s: float = HOUR_S, noted_s: float | None = HOUR_S) -> Job:
    """Status queued, but taken off its queue by a worker that died at once; with
    `noted_s`, an earlier opsctl run found it lost that many seconds ago."""
    job = Queue(QUEUE, connection=conn).enqueue("jobs.quick")
    conn.lrem(f"rq:queue:{QUEUE}", 0, job.id)
    enqueued_at = iso(ago(since_s))
    conn.hset(job.key, "enqueued_at", enqueued_at)
    if noted_s is not None:
        job_fields = {"status": "queued", "enqueued_at": enqueued_at}
        entry = StartedEntry(QUEUE, job.id, None, math.nan, job_fields, None, lost=True)
        note_lost(conn, Keys(), [entry], time.time() - noted_s)
    return job


def test_a_queued_job_found_lost_is_acted_on_only_once_lost_after_has_passed_since(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # It waited an hour in its queue; that says nothing of when a worker took it.
    job = lost_queued(redis_conn, noted_s=None)
    path = policy(tmp_path, "requeue", extra="  lost_after: 4s\n")

    dry = job_in(run(path, redis_url, "--dry-run"), job.id)
    first = job_in(run(path, redis_url), job.id)
    still = job_in(run(path, redis_url), job.id)
    time.sleep(4.5)
    later = job_in(run(path, redis_url), job.id)

    for seen in (dry, first):
        assert (seen["state"], seen["action"], seen["outcome"]) == ("lost", "none", "kept")
        assert "found lost now (a worker may have just taken it)" in seen["reason"]
    assert "within lost_after 4s" in still["reason"], "the second run counts from the first"
    assert (later["state"], later["action"], later["outcome"]) == ("lost", "requeue", "done")
    assert job.id in Queue(QUEUE, connection=redis_conn).get_job_ids()


def test_a_started_job_in_no_started_registry_is_lost_and_failed_after_lost_after(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = lost_started(redis_conn)

    item = job_in(run(policy(tmp_path), redis_url), job.id)

    assert (item["state"], item["lost"], item["action"], item["outcome"]) == (
        "lost",
        True,
        "fail",
        "done",
    )
    assert "in no started registry" in item["reason"]
    assert job_status(redis_conn, job.id) == "failed"
    assert job.id in FailedJobRegistry(QUEUE, connection=redis_conn).get_job_ids(cleanup=False)


@pytest.mark.parametrize("only", [[], ["--queue", "retired q"]])
def test_a_lost_job_whose_queue_redis_no_longer_knows_is_found_by_its_origin(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, only: list[str]
) -> None:
    # The queue was deleted while the job ran: neither RQ's queue set, a started
    # registry nor a worker set names it, only the job's own origin.
    job = started_job(redis_conn, queue="retired q")
    redis_conn.zrem("rq:wip:retired q", started_member(redis_conn, job.id, "retired q"))
    long_ago = iso(ago(HOUR_S))
    redis_conn.hset(job.key, mapping={"started_at": long_ago, "last_heartbeat": long_ago})
    redis_conn.srem("rq:queues", "rq:queue:retired q")

    report = run(policy(tmp_path), redis_url, *only)

    item = job_in(report, job.id)
    assert (item["state"], item["action"], item["outcome"]) == ("lost", "fail", "done")
    assert not [w for w in report["warnings"] if "no such queue" in w]
    assert job_status(redis_conn, job.id) == "failed"
    failed = FailedJobRegistry("retired q", connection=redis_conn)
    assert job.id in failed.get_job_ids(cleanup=False)


def test_the_queued_jobs_of_a_deleted_queue_do_not_bring_it_back(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # RQ deletes a queue but keeps its jobs when asked: they stay queued, in no queue.
    queue = Queue("retired", connection=redis_conn)
    jobs = [queue.enqueue("jobs.quick") for _ in range(2)]
    queue.delete(delete_jobs=False)
    path = policy(tmp_path, "requeue", extra="  lost_after: 1s\n")

    first = run(path, redis_url)
    time.sleep(1.5)
    later = run(path, redis_url)

    assert first["jobs"] == later["jobs"] == []
    assert Queue.all(connection=redis_conn) == []
    assert {job_status(redis_conn, j.id) for j in jobs} == {"queued"}


def test_a_queued_job_in_no_queue_or_registry_is_lost_and_requeued(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = lost_queued(redis_conn)
    waiting = Queue(QUEUE, connection=redis_conn).enqueue("jobs.quick")

    report = run(policy(tmp_path, "requeue"), redis_url)

    item = job_in(report, job.id)
    assert (item["state"], item["action"], item["outcome"]) == ("lost", "requeue", "done")
    assert [j["id"] for j in report["jobs"]] == [job.id], "a job on its queue is not lost"
    assert job.id in Queue(QUEUE, connection=redis_conn).get_job_ids()
    assert waiting.id in Queue(QUEUE, connection=redis_conn).get_job_ids()


def test_a_job_in_the_registry_of_a_queue_left_alone_is_not_lost_once_its_executions_expire(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # The job's origin is covered, but it sits in the started registry of a
    # disabled queue; RQ's list of the job's executions has expired, as it
    # does minutes after its worker dies.
    job = started_job(redis_conn)
    member = started_member(redis_conn, job.id)
    redis_conn.zrem(f"rq:wip:{QUEUE}", member)
    redis_conn.zadd(f"rq:wip:{OTHER_QUEUE}", {member: time.time() + 600})
    redis_conn.sadd("rq:queues", f"rq:queue:{OTHER_QUEUE}")
    redis_conn.delete(f"rq:executions:{job.id}")
    redis_conn.hset(job.key, "started_at", iso(ago(HOUR_S)))
    path = tmp_path / "other-disabled.yaml"
    path.write_text(
        "version: 1\ndefaults:\n  action: fail\n  lost_after: 1m\nqueues:\n"
        f"  - name: {OTHER_QUEUE}\n    enabled: false\n  - name: '*'\n"
    )

    report = run(path, redis_url)

    assert job.id not in [j["id"] for j in report["jobs"]]
    assert job_status(redis_conn, job.id) == "started"


@pytest.mark.parametrize("release", ["rq2+", "rq1"])
def test_a_job_that_entered_its_registry_after_the_registry_was_read_is_not_lost(
    redis_conn: redis.Redis, release: str
) -> None:
    # The keyspace is walked while the registries are read: a job that starts
    # in between is in its registry, yet not among the entries read before.
    job = started_job(redis_conn)
    if release == "rq1":  # RQ 1 keeps the bare id as the member
        redis_conn.zrem(f"rq:wip:{QUEUE}", started_member(redis_conn, job.id))
        redis_conn.zadd(f"rq:wip:{QUEUE}", {job.id: time.time() + 600})
        redis_conn.delete(f"rq:executions:{job.id}")
    lost = lost_started(redis_conn)

    found = find_lost(redis_conn, Keys(), [QUEUE], started=[])

    assert [e.job_id for e in found.entries] == [lost.id]


def test_a_queued_job_that_only_another_queues_registry_lists_is_still_found_lost(
    redis_conn: redis.Redis,
) -> None:
    # It ran on QUEUE and its worker died, leaving its entry there; it was then
    # enqueued on OTHER_QUEUE and taken off it by a worker that died at once.
    job = started_job(redis_conn)
    Queue(OTHER_QUEUE, connection=redis_conn).enqueue_job(job)
    redis_conn.lrem(f"rq:queue:{OTHER_QUEUE}", 0, job.id)
    queues = [QUEUE, OTHER_QUEUE]
    walked = survey(redis_conn, Keys(), listed=listed_in(redis_conn, f"rq:wip:{QUEUE}"))
    snapshot = read_snapshot(redis_conn, Keys(), queues)

    found = find_lost(redis_conn, Keys(), queues, snapshot.entries, walked)

    assert walked.queued == {}, "the walk passed over it: a registry lists it"
    assert [(e.job_id, e.queue, e.lost) for e in found.entries] == [(job.id, OTHER_QUEUE, True)]


def taken_by_a_worker(conn: redis.Redis, job: Job, worker: str) -> None:
    """What a worker writes first once it has popped ``job``: an execution, entered
    in the started registry, while the job's own status still says queued."""
    with conn.pipeline() as pipe:
        Execution.create(job, 600, pipe, worker_name=worker)
        pipe.execute()


def test_a_queued_job_a_worker_has_just_taken_is_not_lost(redis_conn: redis.Redis) -> None:
    job = lost_queued(redis_conn)  # waited an hour, far past lost_after
    taken_by_a_worker(redis_conn, job, "taker")
    lost = lost_queued(redis_conn)

    found = find_lost(redis_conn, Keys(), [QUEUE], started=[])

    assert [e.job_id for e in found.entries] == [lost.id]


def test_a_lost_job_a_worker_takes_before_the_change_is_skipped(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = lost_queued(redis_conn)
    plan = tmp_path / "p.json"
    made = invoke_opsctl(
        "plan", str(policy(tmp_path, "requeue")), "--redis-url", redis_url, "-o", str(plan)
    )
    assert made.exit_code == 0, made.stderr
    taken_by_a_worker(redis_conn, job, "taker")

    report = run(policy(tmp_path, "requeue"), redis_url, "--plan", str(plan))

    item = job_in(report, job.id)
    assert (item["outcome"], item["reason"]) == (
        "skipped",
        "changed since it was read: the job is in its started registry now",
    )
    assert Queue(QUEUE, connection=redis_conn).get_job_ids() == []
    registry = StartedJobRegistry(QUEUE, connection=redis_conn)
    assert registry.get_job_ids(cleanup=False) == [job.id]


def test_a_queue_known_only_by_its_registry_is_read_after_the_walk_and_reported_in_order(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # RQ's queue set names only the other queue; this one is found by the walk.
    unlisted, listed = started_job(redis_conn), started_job(redis_conn, queue=OTHER_QUEUE)
    redis_conn.srem("rq:queues", f"rq:queue:{QUEUE}")

    report = run(policy(tmp_path), redis_url)

    assert [(j["queue"], j["id"]) for j in report["jobs"]] == [
        (QUEUE, unlisted.id),
        (OTHER_QUEUE, listed.id),
    ]
    assert [q["name"] for q in report["queues"]] == [QUEUE, OTHER_QUEUE]
    assert job_status(redis_conn, unlisted.id) == job_status(redis_conn, listed.id) == "failed"


def test_a_lost_job_within_lost_after_is_reported_and_left_alone(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = lost_started(redis_conn, since_s=60)
    path = policy(tmp_path, extra="  lost_after: 5m\n")

    item = job_in(run(path, redis_url), job.id)

    assert (item["state"], item["action"], item["outcome"]) == ("lost", "none", "kept")
    assert "within lost_after 300s" in item["reason"]
    assert job_status(redis_conn, job.id) == "started"


def test_a_lost_job_a_live_worker_holds_is_never_acted_on(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, live_worker: Any
) -> None:
    job = lost_started(redis_conn, worker="holder")
    live_worker("holder", {"state": "busy", "current_job": job.id})

    item = job_in(run(policy(tmp_path), redis_url), job.id)

    assert (item["state"], item["action"], item["outcome"]) == ("running", "none", "kept")
    assert job_status(redis_conn, job.id) == "started"


def test_a_lost_job_that_reappears_in_its_queue_before_the_change_is_skipped(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = lost_queued(redis_conn)
    result = invoke_opsctl(
        "plan", str(policy(tmp_path)), "--redis-url", redis_url, "-o", str(tmp_path / "p.json")
    )
    assert result.exit_code == 0, result.stderr
    redis_conn.rpush(f"rq:queue:{QUEUE}", job.id)  # RQ put it back meanwhile

    report = run(policy(tmp_path), redis_url, "--plan", str(tmp_path / "p.json"))

    item = job_in(report, job.id)
    assert item["outcome"] == "skipped" and "on its queue again" in item["reason"]
    assert job_status(redis_conn, job.id) == "queued"


def test_a_planned_lost_job_enqueued_and_taken_again_since_is_skipped(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = lost_queued(redis_conn)  # found lost an hour ago
    plan = tmp_path / "p.json"
    made = invoke_opsctl(
        "plan", str(policy(tmp_path, "requeue")), "--redis-url", redis_url, "-o", str(plan)
    )
    assert made.exit_code == 0, made.stderr
    # Meanwhile RQ enqueued it again and a worker took it at once: a new episode.
    redis_conn.hset(job.key, "enqueued_at", iso(ago(1)))

    report = run(policy(tmp_path, "requeue"), redis_url, "--plan", str(plan))

    item = job_in(report, job.id)
    assert item["outcome"] == "skipped", item
    assert item["reason"].startswith("not acted on: not known now to be out of place")
    assert Queue(QUEUE, connection=redis_conn).get_job_ids() == []


def sent_bytes(conn: redis.Redis) -> int:
    return int(conn.info("stats")["total_net_output_bytes"])


def test_the_lost_search_filters_on_the_server_and_falls_back_to_plain_reads(
    redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_hashes(redis_conn, 3000, QUEUE)
    Queue(QUEUE, connection=redis_conn).enqueue("jobs.quick")
    lost = lost_started(redis_conn)

    before = sent_bytes(redis_conn)
    filtered = find_lost(redis_conn, Keys(), [QUEUE], [])
    filtered_bytes = sent_bytes(redis_conn) - before

    send = redis_conn.execute_command

    def no_scripts(command: str, *args: object, **options: object) -> object:
        if command in ("EVAL_RO", "EVAL"):
            raise redis.ResponseError(f"unknown command '{command}'")
        return send(command, *args, **options)

    monkeypatch.setattr(redis_conn, "execute_command", no_scripts)
    before = sent_bytes(redis_conn)
    plain = find_lost(redis_conn, Keys(), [QUEUE], [])
    plain_bytes = sent_bytes(redis_conn) - before

    assert [e.job_id for e in filtered.entries] == [e.job_id for e in plain.entries] == [lost.id]
    assert filtered.scanned >= 3001 and filtered.filtered_server_side
    assert not plain.filtered_server_side
    # Each finished job's status crossed the wire only on the plain path.
    assert plain_bytes - filtered_bytes > 3000 * len(b"finished")


def test_a_backlog_in_a_queue_the_policy_leaves_alone_never_crosses_the_wire(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    backlog = Queue("bulk", connection=redis_conn)
    with redis_conn.pipeline() as pipe:
        for _ in range(3000):
            backlog.enqueue("jobs.quick", pipeline=pipe)
        pipe.execute()
    stuck = started_job(redis_conn)
    path = tmp_path / "only-odd.yaml"
    path.write_text(f"version: 1\ndefaults:\n  action: fail\nqueues:\n  - name: {QUEUE}\n")

    before = sent_bytes(redis_conn)
    report = run(path, redis_url, "--dry-run")
    sent = sent_bytes(redis_conn) - before

    assert [j["id"] for j in report["jobs"]] == [stuck.id]
    # Each waiting job's id is 36 bytes: none of the 3,000 was sent.
    assert sent < 3000 * 36


# --- 7. origin names another queue ----------------------------------------------------------


def test_a_job_whose_origin_names_another_queue_is_failed_into_its_origins_registry(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = started_job(redis_conn, queue=OTHER_QUEUE)
    member = started_member(redis_conn, job.id, OTHER_QUEUE)
    score = redis_conn.zscore(f"rq:wip:{OTHER_QUEUE}", member)
    redis_conn.zrem(f"rq:wip:{OTHER_QUEUE}", member)
    redis_conn.zadd(f"rq:wip:{QUEUE}", {member: score})

    item = job_in(run(policy(tmp_path), redis_url), job.id)

    assert (item["queue"], item["state"], item["outcome"]) == (QUEUE, "abandoned", "done")
    assert f"origin is queue '{OTHER_QUEUE}'" in item["reason"]
    assert job.id in FailedJobRegistry(OTHER_QUEUE, connection=redis_conn).get_job_ids(
        cleanup=False
    )
    assert redis_conn.zcard(f"rq:wip:{QUEUE}") == 0


@pytest.mark.parametrize(
    ("setting", "expected", "said"),
    [
        ("enabled: false", ("none", "kept"), "left alone: queues[0] ({q}) disables queue '{q}'"),
        (
            "dry_run: true",
            ("fail", "planned"),
            "only planned: queues[0] ({q}) sets dry_run for '{q}'",
        ),
    ],
    ids=["disabled", "dry-run"],
)
def test_a_job_whose_origin_queue_is_disabled_or_in_dry_run_is_not_changed(
    redis_conn: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    setting: str,
    expected: tuple[str, str],
    said: str,
) -> None:
    job = started_job(redis_conn, queue=OTHER_QUEUE)
    member = started_member(redis_conn, job.id, OTHER_QUEUE)
    redis_conn.zrem(f"rq:wip:{OTHER_QUEUE}", member)
    redis_conn.zadd(f"rq:wip:{QUEUE}", {member: time.time() - HOUR_S})
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"version: 1\nqueues:\n  - name: {OTHER_QUEUE}\n    {setting}\n  - name: {QUEUE}\n"
    )

    item = job_in(run(path, redis_url), job.id)

    assert (item["state"], item["action"], item["outcome"]) == ("abandoned", *expected)
    assert said.format(q=OTHER_QUEUE) in item["reason"]
    assert Job.fetch(job.id, connection=redis_conn).get_status() == JobStatus.STARTED
    assert FailedJobRegistry(OTHER_QUEUE, connection=redis_conn).get_job_ids(cleanup=False) == []


@pytest.mark.parametrize(
    ("entries", "extra"),
    [
        (f"  - name: {QUEUE}\n", ()),
        (f"  - name: {OTHER_QUEUE}\n  - name: {QUEUE}\n", ("--queue", QUEUE)),
    ],
    ids=["no-policy-entry", "left-out-by-queue-option"],
)
def test_a_job_whose_origin_queue_the_run_does_not_cover_is_not_changed(
    redis_conn: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    entries: str,
    extra: tuple[str, ...],
) -> None:
    job = started_job(redis_conn, queue=OTHER_QUEUE)
    member = started_member(redis_conn, job.id, OTHER_QUEUE)
    redis_conn.zadd(f"rq:wip:{QUEUE}", {member: time.time() - HOUR_S})  # a copy of its entry
    path = tmp_path / "policy.yaml"
    path.write_text(f"version: 1\nqueues:\n{entries}")

    report = run(path, redis_url, *extra)

    [item] = [j for j in report["jobs"] if j["id"] == job.id and j["queue"] == QUEUE]
    assert (item["state"], item["action"], item["outcome"]) == ("abandoned", "none", "kept")
    assert f"left alone: this run does not cover queue '{OTHER_QUEUE}'" in item["reason"]
    assert Job.fetch(job.id, connection=redis_conn).get_status() == JobStatus.STARTED
    assert FailedJobRegistry(OTHER_QUEUE, connection=redis_conn).get_job_ids(cleanup=False) == []
    assert [j for j, _ in StartedJobRegistry(OTHER_QUEUE, connection=redis_conn)
            .get_job_and_execution_ids(cleanup=False)] == [job.id]  # fmt: skip


# --- 8. worker hashes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "executions"),
    [
        ({"last_heartbeat": iso(ago(5))}, "member"),
        ({"birth": "", "last_heartbeat": "", "state": "busy", "queues": ""}, None),
        ({"state": "busy", "current_job": "JOB"}, None),
    ],
    ids=["partial-rebuilt", "empty-dates", "current-job-field"],
)
def test_odd_worker_hashes_of_a_live_worker_keep_its_job_running(
    redis_conn: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    live_worker: Any,
    fields: dict[str, str],
    executions: str | None,
) -> None:
    job = started_job(redis_conn, worker="odd-worker")
    member = started_member(redis_conn, job.id).decode()
    fields = {k: v.replace("JOB", job.id) for k, v in fields.items()}
    live_worker("odd-worker", fields, [member] if executions else [])

    item = job_in(run(policy(tmp_path), redis_url), job.id)

    assert (item["state"], item["worker_alive"], item["outcome"]) == ("running", True, "kept")
    assert job_status(redis_conn, job.id) == "started"


def test_a_live_worker_whose_current_job_is_another_leaves_this_job_abandoned(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, live_worker: Any
) -> None:
    job = started_job(redis_conn, worker="moved-on")
    # It last ran (started, or beat) an hour ago.
    hour_ago = ago(HOUR_S)
    redis_conn.hset(job.key, mapping={"started_at": iso(hour_ago), "last_heartbeat": iso(hour_ago)})
    execution = f"rq:execution:{started_member(redis_conn, job.id).decode()}"
    moment = repr(hour_ago.timestamp())
    redis_conn.hset(execution, mapping={"created_at": moment, "last_heartbeat": moment})
    live_worker("moved-on", {"state": "busy", "current_job": "some-other-job"})

    item = job_in(run(policy(tmp_path), redis_url), job.id)

    assert (item["state"], item["outcome"]) == ("abandoned", "done")
    assert "live but not executing it for " in item["reason"]
    assert "over lost_after 600s" in item["reason"]
    assert job_status(redis_conn, job.id) == "failed"


def test_a_job_a_live_worker_has_just_taken_is_left_alone_though_its_records_miss_it(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, live_worker: Any
) -> None:
    # RQ 2 names the job in current_job only once the work horse runs: until
    # then its entry and status say started, and the worker names its last job.
    job = started_job(redis_conn, worker="taker")
    live_worker("taker", {"state": "busy", "current_job": "its-last-job"})

    item = job_in(run(policy(tmp_path), redis_url), job.id)

    assert (item["state"], item["action"], item["outcome"]) == ("abandoned", "none", "kept")
    assert "within lost_after 600s" in item["reason"]
    assert job_status(redis_conn, job.id) == "started"


def test_a_dead_workers_run_of_a_job_an_rq2_worker_runs_again_is_removed_at_once(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, live_worker: Any
) -> None:
    # The job's first run died with its worker; it was enqueued again and an RQ 2
    # worker, which names only the job (current_job), runs it as a new execution.
    job = started_job(redis_conn, worker=DEAD)
    dead_member = started_member(redis_conn, job.id)
    with redis_conn.pipeline() as pipe:
        Execution.create(job, 600, pipe, worker_name="rq2-holder")
        job.prepare_for_execution("rq2-holder", pipe)
        pipe.execute()
    live_worker("rq2-holder", {"state": "busy", "current_job": job.id})
    code, explained = explain(job.id, redis_url, "--policy", str(policy(tmp_path)))
    assert code == 0 and isinstance(explained, dict), explained
    said = sorted((v["state"], v["action"]) for v in explained["verdicts"])

    report = run(policy(tmp_path), redis_url)

    items = {j["execution_id"]: j for j in report["jobs"] if j["id"] == job.id}
    dead_run = items.pop(dead_member.decode().rpartition(":")[2])
    [(holder_execution, holder_run)] = items.items()
    assert (dead_run["state"], dead_run["action"], dead_run["outcome"]) == (
        "leftover",
        "remove-entry",
        "done",
    )
    assert dead_run["reason"] == (
        f"rq2-holder is executing this job; this entry is {DEAD}'s run, and it is dead"
    )
    assert (holder_run["state"], holder_run["outcome"]) == ("running", "kept")
    assert said == [("leftover", "remove-entry"), ("running", "none")]  # explain agrees
    registry = StartedJobRegistry(QUEUE, connection=redis_conn)
    assert registry.get_job_and_execution_ids(cleanup=False) == [(job.id, holder_execution)]
    assert job_status(redis_conn, job.id) == "started"


@pytest.mark.parametrize("beating", ["job", "dead-execution"])
def test_a_planned_removal_of_a_dead_run_minds_only_that_runs_own_heartbeat(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, live_worker: Any, beating: str
) -> None:
    # The job hash's heartbeat is the new run's: it changing says nothing of the
    # dead run's entry. A heartbeat of that entry's own execution does.
    job = started_job(redis_conn, worker=DEAD)
    dead_member = started_member(redis_conn, job.id).decode()
    with redis_conn.pipeline() as pipe:
        Execution.create(job, 600, pipe, worker_name="rq2-holder")
        job.prepare_for_execution("rq2-holder", pipe)
        pipe.execute()
    live_worker("rq2-holder", {"state": "busy", "current_job": job.id})
    plan = tmp_path / "plan.json"
    made = invoke_opsctl("plan", str(policy(tmp_path)), "--redis-url", redis_url, "-o", str(plan))
    assert made.exit_code == 0, made.stderr
    if beating == "job":
        redis_conn.hset(job.key, "last_heartbeat", iso(ago(0)))
    else:
        redis_conn.hset(f"rq:execution:{dead_member}", "last_heartbeat", repr(time.time()))

    report = run(policy(tmp_path), redis_url, "--plan", str(plan))

    [dead_run] = [j for j in report["jobs"] if j["entry"] == dead_member]
    left = StartedJobRegistry(QUEUE, connection=redis_conn).get_job_and_execution_ids(cleanup=False)
    assert job_status(redis_conn, job.id) == "started"
    if beating == "job":
        assert (dead_run["action"], dead_run["outcome"]) == ("remove-entry", "done"), dead_run
        [(_, kept)] = left
        assert f"{job.id}:{kept}" != dead_member
    else:
        assert dead_run["outcome"] == "skipped"
        assert "execution heartbeat changed since it was read" in dead_run["reason"]
        assert len(left) == 2


def test_a_job_kept_for_ever_on_failure_keeps_its_results_for_ever_too(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = started_job(redis_conn)
    redis_conn.hset(job.key, "failure_ttl", "-1")
    # An earlier run of this id left a result that expires.
    Result.create(job, Result.Type.SUCCESSFUL, ttl=500, return_value="earlier")

    item = job_in(run(policy(tmp_path), redis_url), job.id)

    assert (item["action"], item["outcome"]) == ("fail", "done")
    failed = Job.fetch(job.id, connection=redis_conn)
    latest = failed.latest_result()
    assert latest is not None and latest.type == Result.Type.FAILED
    assert redis_conn.ttl(job.key) == -1
    assert redis_conn.ttl(f"rq:results:{job.id}") == -1


def test_a_requeued_job_with_a_ttl_of_its_own_keeps_the_set_of_what_waits_for_it(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # The job's ttl bounds its wait in the queue (RQ sets it on the hash alone); the
    # set of its dependents must last until its end releases them.
    job = started_job(redis_conn)
    redis_conn.hset(job.key, "ttl", "100")
    waiting = Queue(QUEUE, connection=redis_conn).enqueue("jobs.quick", depends_on=job)
    redis_conn.expire(job.dependents_key, 50)  # as a failure_ttl would have left it

    item = job_in(run(policy(tmp_path, "requeue"), redis_url), job.id)

    assert (item["action"], item["outcome"]) == ("requeue", "done")
    assert job_status(redis_conn, job.id) == "queued"
    assert 0 < redis_conn.ttl(job.key) <= 100
    assert redis_conn.ttl(job.dependents_key) == -1
    assert job_status(redis_conn, waiting.id) == "deferred"


@pytest.mark.parametrize("ttl", ["0.5", "inf", "1e3", "99999999999999999999"])
def test_a_requeued_job_whose_ttl_is_no_whole_number_of_seconds_is_requeued_whole(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, ttl: str
) -> None:
    # Not written by RQ: "0.5" expired the hash at once while its id was pushed, and
    # "inf" stopped the script after its first writes, leaving the job in no queue.
    job = started_job(redis_conn)
    redis_conn.hset(job.key, "ttl", ttl)

    item = job_in(run(policy(tmp_path, "requeue"), redis_url), job.id)

    assert (item["action"], item["outcome"]) == ("requeue", "done")
    # RQ cannot load such a job (its ttl is no integer), so its hash is read as stored.
    assert redis_conn.hget(job.key, "status") == b"queued"
    assert Queue(QUEUE, connection=redis_conn).get_job_ids() == [job.id]
    assert redis_conn.ttl(job.key) == -1  # kept while it waits, as a ttl of -1 is


# --- 10. jobs a scheduler refers to ---------------------------------------------------------


@pytest.mark.parametrize("scheduler_key", [f"rq:scheduled:{QUEUE}", "rq:scheduler:scheduled_jobs"])
def test_a_job_a_scheduler_refers_to_is_never_deleted(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, scheduler_key: str
) -> None:
    job = started_job(redis_conn)
    redis_conn.zadd(scheduler_key, {job.id: time.time() + HOUR_S})

    item = job_in(run(policy(tmp_path, "delete"), redis_url), job.id)

    assert (item["action"], item["outcome"]) == ("delete", "skipped")
    assert "a scheduler still refers to it" in item["reason"] and scheduler_key in item["reason"]
    assert job_status(redis_conn, job.id) == "started"


def test_the_delete_script_itself_refuses_a_job_a_scheduler_took_after_the_plan(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = started_job(redis_conn)
    plan = tmp_path / "plan.json"
    path = policy(tmp_path, "delete")
    assert (
        invoke_opsctl("plan", str(path), "--redis-url", redis_url, "-o", str(plan)).exit_code == 0
    )
    redis_conn.zadd("rq:scheduler:scheduled_jobs", {job.id: time.time() + HOUR_S})

    item = job_in(run(path, redis_url, "--plan", str(plan)), job.id)

    assert item["outcome"] == "skipped" and "scheduler still refers to it" in item["reason"]
    assert job_status(redis_conn, job.id) == "started"


# --- 12. related keys ------------------------------------------------------------------------

RELATED = '  related_keys: ["job_progress:{job_id}"]\n'


def test_delete_removes_the_related_keys_with_the_job(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = started_job(redis_conn)
    bystander = started_job(redis_conn, worker="busy-elsewhere")
    redis_conn.set(f"job_progress:{job.id}", "42%")
    redis_conn.set("job_progress:unrelated", "7%")

    item = job_in(run(policy(tmp_path, "delete", RELATED), redis_url), job.id)

    assert item["outcome"] == "done"
    assert job_status(redis_conn, job.id) is None
    assert not redis_conn.exists(f"job_progress:{job.id}")
    assert redis_conn.get("job_progress:unrelated") == b"7%"
    assert job_status(redis_conn, bystander.id) is None, "both were abandoned, both deleted"


@pytest.mark.parametrize("action", ["fail", "requeue", "cancel"])
def test_other_actions_keep_the_related_keys(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, action: str
) -> None:
    job = started_job(redis_conn)
    redis_conn.set(f"job_progress:{job.id}", "42%")

    item = job_in(run(policy(tmp_path, action, RELATED), redis_url), job.id)

    assert item["outcome"] == "done"
    assert redis_conn.get(f"job_progress:{job.id}") == b"42%"


def test_a_related_key_that_an_odd_id_places_among_rqs_keys_is_kept(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # The template passes its check; the id (RQ 1 allowed colons) makes it name a queue.
    waiting = Queue("victim", connection=redis_conn).enqueue("jobs.quick")
    odd_id = "q:queue:victim"
    started = iso(ago(HOUR_S))
    fields = {"status": "started", "origin": QUEUE, "worker_name": DEAD, "started_at": started}
    redis_conn.hset(f"rq:job:{odd_id}", mapping={**fields, "created_at": started})
    redis_conn.zadd(f"rq:wip:{QUEUE}", {odd_id: time.time() - HOUR_S})

    path = policy(tmp_path, "delete", '  related_keys: ["r{job_id}"]\n')
    code, explained = explain(odd_id, redis_url, "--policy", str(path))
    item = job_in(run(path, redis_url), odd_id)

    kept = "kept related keys that belong to RQ or opsctl: 'rq:queue:victim'"
    assert code == 0 and isinstance(explained, dict)
    assert [kept in v["reason"] for v in explained["verdicts"]] == [True]
    assert item["outcome"] == "done" and not redis_conn.exists(f"rq:job:{odd_id}")
    assert kept in item["reason"]
    assert Queue("victim", connection=redis_conn).job_ids == [waiting.id]


# --- explain ---------------------------------------------------------------------------------


def test_explain_shows_places_executions_worker_signals_and_the_policys_verdict(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = started_job(redis_conn)
    member = started_member(redis_conn, job.id).decode()

    code, explained = explain(job.id, redis_url, "--policy", str(policy(tmp_path, "requeue")))

    assert code == 0 and isinstance(explained, dict)
    assert explained["fields"]["status"] == "started"
    assert any(member in place for place in explained["places"])
    assert [e["id"] for e in explained["executions"]] == [member.split(":")[1]]
    [worker] = explained["workers"]
    assert (worker["name"], worker["alive"], worker["hash_exists"]) == (DEAD, False, False)
    [verdict] = explained["verdicts"]
    assert (verdict["state"], verdict["action"]) == ("abandoned", "requeue")
    assert job_status(redis_conn, job.id) == "started", "explain changes nothing"


def test_explain_says_that_failing_a_job_with_retries_left_retries_it(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = started_job(redis_conn, retry=Retry(max=2, interval=[30, 60]))

    code, explained = explain(job.id, redis_url, "--policy", str(policy(tmp_path)))
    applied = job_in(run(policy(tmp_path), redis_url), job.id)

    assert code == 0 and isinstance(explained, dict)
    [verdict] = explained["verdicts"]
    assert (verdict["state"], verdict["action"]) == ("abandoned", "fail")
    said = "it has 2 retries left, so failing it retries it (scheduled 30s later)"
    assert verdict["reason"].endswith(said)
    # What it said is what the run then did.
    assert applied["outcome"] == "done"
    assert job_status(redis_conn, job.id) == "scheduled"
    assert job.id in ScheduledJobRegistry(QUEUE, connection=redis_conn).get_job_ids(cleanup=False)


def test_a_dry_run_says_that_failing_a_job_with_retries_left_retries_it(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = started_job(redis_conn, retry=Retry(max=2, interval=[30, 60]))

    planned = job_in(run(policy(tmp_path), redis_url, "--dry-run"), job.id)
    applied = job_in(run(policy(tmp_path), redis_url), job.id)

    assert (planned["action"], planned["outcome"]) == ("fail", "planned")
    assert "it has 2 retries left, so failing it retries it, as RQ does" in planned["reason"]
    assert applied["outcome"] == "done" and "scheduled for retry" in applied["reason"]
    assert job_status(redis_conn, job.id) == "scheduled"


def test_explain_never_promises_a_retry_after_a_stop(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, live_worker: Any
) -> None:
    # An overdue job is stopped by its worker, which files it as stopped: RQ
    # retries no stopped job, whatever its retries left.
    job = started_job(redis_conn, worker="busy", retry=Retry(max=2))
    live_worker("busy", {"state": "busy"}, executions=[started_member(redis_conn, job.id).decode()])
    path = policy(tmp_path, extra="  max_age: 1s\n")
    time.sleep(1.5)
    # As a worker writes while it watches the work horse running the job.
    redis_conn.hset("rq:worker:busy", "last_heartbeat", iso(ago(0)))

    code, explained = explain(job.id, redis_url, "--policy", str(path))

    assert code == 0 and isinstance(explained, dict)
    [verdict] = explained["verdicts"]
    assert (verdict["state"], verdict["action"], verdict["follow_up"]) == (
        "overdue",
        "stop",
        "fail",
    )
    assert "retries" not in verdict["reason"]


def test_explain_shows_a_worker_with_thousands_of_executions_on_one_short_line(
    redis_conn: redis.Redis, redis_url: str, live_worker: Any
) -> None:
    job = started_job(redis_conn, worker="busy")
    member = started_member(redis_conn, job.id).decode()
    others = [f"old-{i}:e{i}" for i in range(4000)]
    with redis_conn.pipeline(transaction=False) as pipe:
        for other in others:  # each with its record, as RQ writes them
            pipe.hset(f"rq:execution:{other}", "worker_name", "busy")
        pipe.execute()
    live_worker("busy", {"state": "busy"}, executions=[member, *others])

    text = invoke_opsctl("explain", job.id, "--redis-url", redis_url)
    code, explained = explain(job.id, redis_url)

    assert text.exit_code == 0, text.stderr
    [line] = [line for line in text.stdout.splitlines() if "executions: " in line]
    assert line.endswith("… (4,001 in all)") and len(line) < 400, line
    assert code == 0 and isinstance(explained, dict)
    assert len(explained["workers"][0]["executions"]) == 4001


def test_explain_of_a_lost_job_says_it_is_lost(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = lost_queued(redis_conn)

    result = invoke_opsctl("explain", job.id, "--redis-url", redis_url)

    assert result.exit_code == 0, result.stderr
    assert "lost (in no registry or list): lost -> fail" in result.stdout
    assert "no list or registry" in result.stdout


def test_explain_shows_bytes_that_are_not_utf8_as_xnn_in_the_places_it_lists(
    redis_conn: redis.Redis, redis_url: str
) -> None:
    redis_conn.hset(b"rq:job:sx-\xff-1", mapping={"status": "failed", "origin": "q1"})
    redis_conn.zadd("rq:failed:q1", {b"sx-\xff-1": 4102444800})

    text = invoke_opsctl("explain", "sx-\udcff-1", "--redis-url", redis_url)
    code, explained = explain("sx-\udcff-1", redis_url)

    assert text.exit_code == 0, text.stderr
    assert "rq:failed:q1 member 'sx-\\xff-1'" in text.stdout
    assert code == 0 and isinstance(explained, dict)
    [place] = explained["places"]
    assert place.startswith("rq:failed:q1 member 'sx-\\xff-1' score 4102444800")


def test_explain_shows_the_start_of_a_huge_field_and_its_length_and_json_all_of_it(
    redis_conn: redis.Redis, redis_url: str
) -> None:
    job = started_job(redis_conn, worker="w")
    redis_conn.hset(job.key, "description", "x" * 5_000_000)

    text = invoke_opsctl("explain", job.id, "--redis-url", redis_url)
    code, explained = explain(job.id, redis_url)

    assert text.exit_code == 0, text.stderr
    [line] = [line for line in text.stdout.splitlines() if line.startswith("  description: ")]
    assert line.endswith("… (5,000,000 characters in all; --format json has it whole)")
    assert len(line) < 2100
    assert code == 0 and isinstance(explained, dict)
    assert len(explained["fields"]["description"]) == 5_000_000


def test_explain_of_an_unknown_job_exits_6_with_one_line(redis_url: str) -> None:
    result = invoke_opsctl("explain", "no-such-job", "--redis-url", redis_url)

    assert result.exit_code == ExitCode.INVALID
    assert result.stderr.strip() == (
        "opsctl: error: job 'no-such-job' does not exist: no hash, list or registry names it "
        f"(looked for on {redis_url}, key prefix 'rq')"
    )


# --- real workers: SimpleWorker and RQ 3 concurrency limits --------------------------------


def lapse_simple_lease(conn: redis.Redis, worker: str, job_id: str) -> None:
    """Make a SimpleWorker's job look as if it ran past its lease an hour ago: the lease
    (fixed at the start, timeout + 60 s later) and the worker's last heartbeat (written
    at the start; none while the job runs) both moved back, as RQ would have left them."""
    lease_end = time.time() - HOUR_S
    conn.zadd(f"rq:wip:{QUEUE}", {started_member(conn, job_id): lease_end})
    conn.hset(f"rq:worker:{worker}", "last_heartbeat", iso(ago(HOUR_S + 660)))


def test_a_simpleworkers_job_is_never_abandoned_while_the_worker_lives(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    worker = rq_workers.start([QUEUE], simple=True)
    job = Queue(QUEUE, connection=redis_conn).enqueue("jobs.sleep_for", 60, job_timeout=600)
    assert wait_for_status(redis_conn, job.id, "started", timeout=20) == "started"
    # No horse and no heartbeats while the job runs: its lease can lapse.
    lapse_simple_lease(redis_conn, worker.name, job.id)

    item = job_in(run(policy(tmp_path), redis_url), job.id)

    assert (item["state"], item["worker"], item["worker_alive"]) == ("running", worker.name, True)
    assert item["outcome"] == "kept"
    assert job_status(redis_conn, job.id) == "started"
    worker.kill()
    item = job_in(run(policy(tmp_path), redis_url), job.id)
    assert (item["state"], item["outcome"]) == ("abandoned", "done")
    assert job_status(redis_conn, job.id) == "failed"


def stuck_holding_a_slot(rq_workers: WorkerFactory, conn: redis.Redis) -> tuple[Job, Job]:
    """A job whose worker was killed while it held the one slot of its rate limit,
    and a job waiting for that slot."""
    limit = RateLimit(key="api", concurrency=1)
    queue = Queue(QUEUE, connection=conn)
    first = rq_workers.start([QUEUE])
    stuck = queue.enqueue("jobs.sleep_for", 60, rate_limit=limit)
    assert wait_for_status(conn, stuck.id, "started", timeout=20) == "started"
    waiting = queue.enqueue("jobs.quick", rate_limit=limit)
    assert job_status(conn, waiting.id) == "rate_limited"
    first.kill()
    return stuck, waiting


@pytest.mark.parametrize("action", ["fail", "cancel", "delete"])
def test_ending_a_stuck_job_that_holds_a_concurrency_slot_lets_a_waiting_job_run(
    rq_workers: WorkerFactory,
    redis_conn: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    action: str,
) -> None:
    stuck, waiting = stuck_holding_a_slot(rq_workers, redis_conn)
    rq_workers.start([QUEUE])

    item = job_in(run(policy(tmp_path, action), redis_url), stuck.id)

    assert (item["state"], item["outcome"]) == ("abandoned", "done")
    assert wait_for_status(redis_conn, waiting.id, "finished", timeout=20) == "finished"
    registry = RateLimitRegistry("api", connection=redis_conn)
    assert stuck.id not in registry.get_allowed_job_ids()


def test_requeueing_a_stuck_job_keeps_its_concurrency_slot(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    stuck, waiting = stuck_holding_a_slot(rq_workers, redis_conn)

    item = job_in(run(policy(tmp_path, "requeue"), redis_url), stuck.id)

    assert item["outcome"] == "done"
    assert job_status(redis_conn, stuck.id) == "queued"
    assert job_status(redis_conn, waiting.id) == "rate_limited"
    registry = RateLimitRegistry("api", connection=redis_conn)
    assert registry.get_allowed_job_ids() == [stuck.id]


def limited_job(conn: redis.Redis, key: str) -> Job:
    """An abandoned job holding the one slot of the concurrency limit ``key``."""
    job = started_job(conn)
    conn.hset(job.key, mapping={"rate_limit_key": key, "rate_limit_concurrency": "1"})
    conn.zadd(f"rq:rl:{key}:allowed", {job.id: time.time()})
    return job


@pytest.mark.parametrize(
    ("damage", "value", "action"),
    [
        ("rescue-count", "not a count", "requeue"),
        ("rescue-count", "01", "requeue"),  # Redis's INCR reads no leading zero
        ("limit-allowed", "not a set", "fail"),
        ("limit-config", "not a hash", "cancel"),
    ],
)
def test_a_damaged_key_a_change_reaches_leaves_the_job_untouched_and_names_the_key(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, damage: str, value: str, action: str
) -> None:
    job = limited_job(redis_conn, "api")
    key = {
        "rescue-count": f"opsctl:rescues:rq:{job.id}",
        "limit-allowed": "rq:rl:api:allowed",
        "limit-config": "rq:rl:api",
    }[damage]
    redis_conn.delete(key)
    redis_conn.set(key, value)
    member = started_member(redis_conn, job.id)

    result = invoke_opsctl("apply", str(policy(tmp_path, action)), "--redis-url", redis_url)

    assert result.exit_code == 1, result.output
    assert key in result.output, result.output
    assert job_status(redis_conn, job.id) == "started"
    assert redis_conn.zscore(f"rq:wip:{QUEUE}", member) is not None
    assert Queue(QUEUE, connection=redis_conn).get_job_ids() == []
    assert redis_conn.get(key) == value.encode()


@pytest.mark.parametrize("value", ["not a count", "01"])
def test_a_dry_run_says_which_requeue_a_damaged_count_would_make_fail(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, value: str
) -> None:
    job = started_job(redis_conn)
    key = f"opsctl:rescues:rq:{job.id}"
    redis_conn.set(key, value)

    report = run(policy(tmp_path, "requeue"), redis_url, "--dry-run")

    assert job_in(report, job.id)["outcome"] == "planned"
    assert report["problems"] == [
        f"requeue count of job {job.id}: {key} holds something other than a count of "
        "requeues, so the requeue would fail; mend or delete it"
    ]
    assert redis_conn.get(key) == value.encode()


def test_a_damaged_concurrency_limit_does_not_stop_a_requeue_which_keeps_its_slot(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = limited_job(redis_conn, "api")
    redis_conn.set("rq:rl:api:rate_limited", "not a set")

    item = job_in(run(policy(tmp_path, "requeue"), redis_url), job.id)

    assert (item["action"], item["outcome"]) == ("requeue", "done")
    assert job_status(redis_conn, job.id) == "queued"
    assert Queue(QUEUE, connection=redis_conn).get_job_ids() == [job.id]


@pytest.mark.parametrize("setting", ["inf", "1e3", "0x10", "-5", "many"])
def test_a_limit_setting_rq_cannot_read_never_lets_more_jobs_through_than_the_job_says(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, setting: str
) -> None:
    job = limited_job(redis_conn, "api")  # its own rate_limit_concurrency: 1
    redis_conn.hset("rq:rl:api", "concurrency", setting)
    waiting = [f"waiting-{i}" for i in range(3)]
    for i, waiter in enumerate(waiting):
        redis_conn.hset(f"rq:job:{waiter}", mapping={"status": "rate_limited", "origin": QUEUE})
        redis_conn.zadd("rq:rl:api:rate_limited", {waiter: time.time() + i})

    item = job_in(run(policy(tmp_path, "fail"), redis_url), job.id)

    assert (item["state"], item["outcome"]) == ("abandoned", "done")
    registry = RateLimitRegistry("api", connection=redis_conn)
    assert registry.get_allowed_job_ids() == waiting[:1]
    assert registry.get_rate_limited_job_ids() == waiting[1:]
    assert Queue(QUEUE, connection=redis_conn).get_job_ids() == waiting[:1]


def test_a_waiting_id_that_names_no_job_leaves_the_line_and_the_change_is_made(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = limited_job(redis_conn, "api")
    redis_conn.zadd("rq:rl:api:rate_limited", {"waiter": time.time()})
    redis_conn.set("rq:job:waiter", "written by something else")

    item = job_in(run(policy(tmp_path, "fail"), redis_url), job.id)

    assert (item["state"], item["outcome"]) == ("abandoned", "done")
    assert job_status(redis_conn, job.id) == "failed"
    registry = RateLimitRegistry("api", connection=redis_conn)
    assert registry.get_allowed_job_ids() == registry.get_rate_limited_job_ids() == []
    assert redis_conn.get("rq:job:waiter") == b"written by something else"


@pytest.mark.parametrize(
    ("action", "retries", "key"),
    [
        ("fail", 0, "failed"),
        ("requeue", 0, "queue"),
        ("cancel", 0, "canceled"),
        ("fail", 2, "queue"),  # a fail with retries left retries the job: into its queue
    ],
)
def test_a_dry_run_names_a_registry_of_another_type_that_its_actions_would_fail_on(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, action: str, retries: int, key: str
) -> None:
    job = started_job(redis_conn, retry=Retry(max=retries) if retries else None)
    target = f"rq:{key}:{QUEUE}"
    redis_conn.delete(target)
    redis_conn.set(target, "written by something else")
    why = f"{target} holds a string, not a {'list' if key == 'queue' else 'zset'}"

    preview = run(policy(tmp_path, action), redis_url, "--dry-run")
    result = invoke_opsctl("apply", str(policy(tmp_path, action)), "--redis-url", redis_url)

    assert preview["problems"] == [f"{why}: 1 action(s) on its jobs cannot succeed"]
    item = job_in(preview, job.id)
    assert item["outcome"] == "planned"
    assert item["reason"].endswith(f"; it would end in an error: {why}")
    assert result.exit_code == ExitCode.ACTION_FAILED, result.output
    assert why in result.stdout
    assert job_status(redis_conn, job.id) == "started"
    assert redis_conn.get(target) == b"written by something else"


def test_a_registry_a_retrying_fail_does_not_file_in_is_no_problem(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = started_job(redis_conn, retry=Retry(max=2))
    redis_conn.set(f"rq:failed:{QUEUE}", "written by something else")

    preview = run(policy(tmp_path), redis_url, "--dry-run")
    done = run(policy(tmp_path), redis_url)

    assert preview["problems"] == [] and done["problems"] == []
    assert job_in(done, job.id)["outcome"] == "done"
    assert job_status(redis_conn, job.id) == "queued"  # retried, as RQ does


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("rq:queues", "queue set: rq:queues"),
        ("rq:workers", "worker registrations: rq:workers"),
        (f"rq:worker:{DEAD}:executions", f"worker {DEAD}: rq:worker:{DEAD}:executions"),
    ],
)
def test_a_set_of_another_type_that_a_run_reads_is_named_under_problems(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, key: str, named: str
) -> None:
    job = started_job(redis_conn)
    redis_conn.delete(key)
    redis_conn.set(key, "written by something else")

    preview = run(policy(tmp_path), redis_url, "--dry-run", "--reconnect-grace", "0")

    assert f"{named} could not be read (WRONGTYPE" in " ".join(preview["problems"])
    assert job_in(preview, job.id)["outcome"] == "planned"  # the rest of the run goes on
    assert redis_conn.get(key) == b"written by something else"


# --- 11. a custom key prefix ------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["tenant", "app:rq.{7}"])
def test_a_custom_key_prefix_is_used_by_every_read_and_write(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, prefix: str
) -> None:
    old = iso(ago(HOUR_S))
    common = {"origin": QUEUE, "worker_name": DEAD, "started_at": old, "created_at": old}
    redis_conn.sadd(f"{prefix}:queues", f"{prefix}:queue:{QUEUE}")
    redis_conn.hset(f"{prefix}:job:stuck", mapping={"status": "started", **common})
    redis_conn.zadd(f"{prefix}:wip:{QUEUE}", {"stuck:e1": time.time() - 10})
    redis_conn.hset(f"{prefix}:job:lost", mapping={"status": "started", **common})
    gone = {"status": "queued", **common, "enqueued_at": old}
    redis_conn.hset(f"{prefix}:job:gone", mapping=gone)
    entry = StartedEntry(QUEUE, "gone", None, math.nan, gone, None, lost=True)
    note_lost(redis_conn, Keys(prefix), [entry], time.time() - HOUR_S)  # an earlier run
    redis_conn.set("progress:gone", "1")
    path = tmp_path / "tenant.yaml"
    path.write_text(
        f"version: 1\nredis:\n  key_prefix: '{prefix}'\ndefaults:\n  action: delete\n"
        '  related_keys: ["progress:{job_id}"]\nqueues:\n  - name: "*"\n'
    )

    report = run(path, redis_url)

    states = {j["id"]: (j["state"], j["outcome"]) for j in report["jobs"]}
    assert states == {
        "stuck": ("abandoned", "done"),
        "lost": ("lost", "done"),
        "gone": ("lost", "done"),
    }
    assert not redis_conn.exists(f"{prefix}:job:stuck", f"{prefix}:job:lost", f"{prefix}:job:gone")
    assert not redis_conn.exists("progress:gone")
    assert not [k for k in redis_conn.scan_iter("rq:*")], "nothing was written under rq:"


def test_requeue_of_a_run_under_a_custom_key_prefix_finds_its_jobs_without_being_told(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    old = iso(ago(HOUR_S))
    redis_conn.sadd("tenant:queues", f"tenant:queue:{QUEUE}")
    redis_conn.hset(
        "tenant:job:stuck",
        mapping={"status": "started", "origin": QUEUE, "worker_name": DEAD, "started_at": old},
    )
    redis_conn.zadd(f"tenant:wip:{QUEUE}", {"stuck:e1": time.time() - 10})
    path = tmp_path / "tenant.yaml"
    path.write_text('version: 1\nredis:\n  key_prefix: tenant\nqueues:\n  - name: "*"\n')
    failed = run(path, redis_url)
    assert redis_conn.hget("tenant:job:stuck", "status") == b"failed"

    result = invoke_opsctl(
        "requeue", "--run", failed["run_id"], "--redis-url", redis_url, "--format", "json"
    )

    assert result.exit_code == 0, result.output
    [job] = json.loads(result.stdout)["jobs"]
    assert (job["id"], job["outcome"]) == ("stuck", "done")
    assert redis_conn.hget("tenant:job:stuck", "status") == b"queued"
    assert redis_conn.lrange(f"tenant:queue:{QUEUE}", 0, -1) == [b"stuck"]
    assert not [k for k in redis_conn.scan_iter("rq:*")], "nothing was written under rq:"


#: Run under RQ_KEY_PREFIX, as a deploy's own code would be: a job started on a dead
#: worker and a dependent that allows it to fail. Prints their ids.
WITH_A_DEPENDENT = """
import json, sys
import redis
from rq import Queue
from rq.job import Dependency
from rq.executions import Execution
conn = redis.Redis.from_url(sys.argv[1])
queue = Queue(sys.argv[2], connection=conn)
parent = queue.enqueue("jobs.quick")
with conn.pipeline() as pipe:
    Execution.create(parent, 600, pipe, worker_name=sys.argv[3])
    parent.prepare_for_execution(sys.argv[3], pipe)
    pipe.lrem(queue.key, 0, parent.id)
    pipe.execute()
child = queue.enqueue("jobs.quick", depends_on=Dependency([parent], allow_failure=True))
print(json.dumps([parent.id, child.id]))
"""

#: Run under RQ_KEY_PREFIX: each job's status, as RQ reads it.
STATUSES = """
import json, sys
import redis
from rq.job import Job
conn = redis.Redis.from_url(sys.argv[1])
print(json.dumps([Job.fetch(i, connection=conn).get_status() for i in sys.argv[2:]]))
"""


def under_prefix(prefix: str, code: str, *argv: str) -> Any:
    env = {**opsctl_env(), "RQ_KEY_PREFIX": prefix}
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    ("key_prefix", "rq_key_prefix", "released"),
    [("tenant", "tenant", True), ("rq", "tenant", False), ("tenant", "rq", False)],
)
def test_dependents_are_released_when_rqs_key_prefix_is_the_policys(
    redis_conn: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    key_prefix: str,
    rq_key_prefix: str,
    released: bool,
) -> None:
    # RQ's code, which releases an RQ 3 job's dependents, reads its keys under
    # RQ_KEY_PREFIX: opsctl uses it only where that is the policy's key_prefix.
    parent, child = under_prefix(key_prefix, WITH_A_DEPENDENT, redis_url, QUEUE, DEAD)
    path = tmp_path / "policy.yaml"
    path.write_text(f"version: 1\nredis:\n  key_prefix: '{key_prefix}'\nqueues:\n  - name: '*'\n")
    env = {**opsctl_env(), "RQ_KEY_PREFIX": rq_key_prefix}
    argv = [sys.executable, "-m", "opsctl", "apply", str(path), "--redis-url", redis_url]

    done = subprocess.run(
        [*argv, "--format", "json"], capture_output=True, env=env, timeout=120, check=False
    )

    assert done.returncode == 0, done.stderr
    item = job_in(json.loads(done.stdout), parent)
    assert item["outcome"] == "done"
    statuses = under_prefix(key_prefix, STATUSES, redis_url, parent, child)
    assert statuses == ["failed", "queued" if released else "deferred"]
    if not released:
        why = (
            f"RQ's key prefix here is '{rq_key_prefix}' (from RQ_KEY_PREFIX), "
            f"the policy's key_prefix '{key_prefix}'"
        )
        assert f"dependents left deferred: {why}" in item["reason"]
        assert why in done.stderr.decode()
    else:
        assert "deferred" not in item["reason"]


@pytest.mark.parametrize(("version", "alive"), [("1.16.2", True), ("2.6.0", False)])
def test_an_rq1_worker_born_before_redis_restarted_is_live_without_a_connection(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, version: str, alive: bool
) -> None:
    # RQ 1's command thread dies with the connection to a restarted Redis and never
    # subscribes again; its main loop reconnects, heartbeats and runs jobs on. Here:
    # born a day before this server started, heartbeating now, no connection.
    job = Queue(QUEUE, connection=redis_conn).enqueue("jobs.quick")
    redis_conn.hset(
        job.key,
        mapping={"status": "started", "worker_name": "w-rq1", "started_at": iso(ago(HOUR_S))},
    )
    redis_conn.zadd(f"rq:wip:{QUEUE}", {job.id: time.time() + 60})
    worker_key = "rq:worker:w-rq1"
    redis_conn.hset(
        worker_key,
        mapping={
            "birth": iso(ago(86400)),
            "last_heartbeat": iso(ago(0)),
            "version": version,
            "state": "busy",
            "current_job": job.id,
            "queues": QUEUE,
        },
    )
    redis_conn.expire(worker_key, 90)  # as RQ sets it at every heartbeat during a job
    redis_conn.sadd("rq:workers", worker_key)

    item = job_in(run(policy(tmp_path), redis_url, "--reconnect-grace", "0", "--dry-run"), job.id)

    assert item["worker_alive"] is alive
    assert item["state"] == ("overdue" if alive else "abandoned")
    if alive:
        assert "RQ 1 worker born before Redis last started" in item["worker_evidence"]


# --- 6. RQ's intermediate list ---------------------------------------------------------------


def stranded(conn: redis.Redis, first_seen_s: float | None) -> Job:
    """A job a worker moved to the intermediate list and died with before starting it."""
    job = Queue(QUEUE, connection=conn).enqueue("jobs.quick")
    with conn.pipeline() as pipe:  # what the worker's BLMOVE did
        pipe.lrem(f"rq:queue:{QUEUE}", 0, job.id)
        pipe.rpush(f"rq:queue:{QUEUE}:intermediate", job.id)
        pipe.execute()
    if first_seen_s is not None:
        key = f"rq:queue:{QUEUE}:intermediate:first_seen:{job.id}"
        conn.set(key, time.time() - first_seen_s, ex=86400)
        # RQ marks an id it finds in the list after the job was enqueued.
        conn.hset(job.key, "enqueued_at", iso(ago(first_seen_s + 60)))
    return job


def test_an_id_stranded_in_the_intermediate_list_is_failed_after_the_grace(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = stranded(redis_conn, first_seen_s=HOUR_S)

    item = job_in(run(policy(tmp_path, "delete"), redis_url), job.id)

    assert (item["state"], item["stranded"], item["action"], item["outcome"]) == (
        "stranded",
        True,
        "fail",
        "done",
    ), "failed as RQ's own cleanup does, whatever the policy's action"
    assert job_status(redis_conn, job.id) == "failed"
    assert redis_conn.llen(f"rq:queue:{QUEUE}:intermediate") == 0


def test_a_stranded_job_with_retries_left_is_queued_again(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = stranded(redis_conn, first_seen_s=HOUR_S)
    redis_conn.hset(job.key, "retries_left", "2")

    item = job_in(run(policy(tmp_path), redis_url), job.id)

    assert item["outcome"] == "done"
    assert job_status(redis_conn, job.id) == "queued"
    assert Queue(QUEUE, connection=redis_conn).get_job_ids() == [job.id]
    assert Job.fetch(job.id, connection=redis_conn).retries_left == 1


@pytest.mark.parametrize("first_seen_s", [None, 30.0], ids=["never-seen", "seen-recently"])
def test_a_recently_stranded_id_is_left_for_its_worker(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, first_seen_s: float | None
) -> None:
    job = stranded(redis_conn, first_seen_s=first_seen_s)

    item = job_in(run(policy(tmp_path), redis_url), job.id)

    assert (item["state"], item["action"], item["outcome"]) == ("stranded", "none", "kept")
    assert redis_conn.lrange(f"rq:queue:{QUEUE}:intermediate", 0, -1) == [job.id.encode()]


@pytest.mark.parametrize(
    ("first_seen_s", "enqueued_ago_s"),
    [
        # It waited an hour in its queue; a worker may have moved it to the list just now.
        pytest.param(None, HOUR_S, id="no-mark"),
        # RQ keeps its mark for a day: a job enqueued again under its id (a retry, a
        # periodic job) that a worker has just moved to the list is not an hour old there.
        pytest.param(HOUR_S, 1, id="mark-of-an-earlier-stay"),
    ],
)
def test_a_stranded_id_without_rqs_mark_of_this_stay_is_failed_once_lost_after_has_passed(
    redis_conn: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    first_seen_s: float | None,
    enqueued_ago_s: float,
) -> None:
    job = stranded(redis_conn, first_seen_s=first_seen_s)
    redis_conn.hset(job.key, "enqueued_at", iso(ago(enqueued_ago_s)))
    path = policy(tmp_path, extra="  lost_after: 4s\n")

    first = job_in(run(path, redis_url), job.id)
    time.sleep(4.5)
    later = job_in(run(path, redis_url), job.id)

    assert (first["state"], first["action"], first["outcome"]) == ("stranded", "none", "kept")
    assert "found there now (a worker may have just taken it)" in first["reason"]
    assert (later["state"], later["action"], later["outcome"]) == ("stranded", "fail", "done")
    assert job_status(redis_conn, job.id) == "failed"


def test_a_stranded_id_whose_job_is_gone_is_removed_from_the_list(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    redis_conn.rpush(f"rq:queue:{QUEUE}:intermediate", "vanished")
    redis_conn.sadd("rq:queues", f"rq:queue:{QUEUE}")

    item = job_in(run(policy(tmp_path), redis_url), "vanished")

    assert (item["state"], item["action"], item["outcome"]) == ("orphaned", "remove-entry", "done")
    assert redis_conn.llen(f"rq:queue:{QUEUE}:intermediate") == 0


def test_jobs_waiting_in_a_queue_named_like_an_intermediate_list_are_left_alone(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # The queue "<QUEUE>:intermediate" keeps its waiting jobs in the very key that is
    # also QUEUE's intermediate list; RQ does not forbid such a name.
    namesake = Queue(f"{QUEUE}:intermediate", connection=redis_conn)
    waiting = [namesake.enqueue("jobs.quick") for _ in range(2)]
    redis_conn.sadd("rq:queues", f"rq:queue:{QUEUE}")
    for job in waiting:  # as if RQ's own cleanup had seen them there an hour ago
        key = f"rq:queue:{QUEUE}:intermediate:first_seen:{job.id}"
        redis_conn.set(key, time.time() - HOUR_S, ex=86400)

    report = run(policy(tmp_path), redis_url)
    code, explained = explain(waiting[0].id, redis_url, "--policy", str(policy(tmp_path)))

    assert not [j for j in report["jobs"] if j["id"] in {job.id for job in waiting}], report
    # explain agrees: a queued job in its own queue, not one stranded from QUEUE.
    assert code == 0 and isinstance(explained, dict)
    assert explained["verdicts"] == [], explained["verdicts"]
    assert namesake.get_job_ids() == [job.id for job in waiting]
    assert {job_status(redis_conn, job.id) for job in waiting} == {"queued"}


def test_explain_of_a_stranded_job_shows_the_intermediate_list(
    redis_conn: redis.Redis, redis_url: str
) -> None:
    job = stranded(redis_conn, first_seen_s=HOUR_S)

    code, explained = explain(job.id, redis_url)

    assert code == 0 and isinstance(explained, dict)
    assert f"rq:queue:{QUEUE}:intermediate (list)" in explained["places"]
    [verdict] = explained["verdicts"]
    assert (verdict["state"], verdict["action"]) == ("stranded", "fail")


# --- every kind at once ---------------------------------------------------------------------

DELETE_QUEUE = "odd-delete"


def test_one_database_with_every_kind_of_odd_record_is_applied_correctly(
    rq_workers: WorkerFactory,
    redis_conn: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    live_worker: Any,
) -> None:
    queue = Queue(QUEUE, connection=redis_conn)
    # Normal jobs: one waiting, one finished, one a SimpleWorker runs past its lease.
    simple = rq_workers.start([QUEUE], simple=True)
    running = queue.enqueue("jobs.sleep_for", 60, job_timeout=600)
    assert wait_for_status(redis_conn, running.id, "started", timeout=20) == "started"
    lapse_simple_lease(redis_conn, simple.name, running.id)
    simple.process.send_signal(19)  # SIGSTOP: it keeps its connection, takes nothing new
    waiting = queue.enqueue("jobs.quick")
    finished = queue.enqueue("jobs.quick")
    redis_conn.lrem(queue.key, 0, finished.id)
    redis_conn.hset(finished.key, "status", "finished")

    abandoned = started_job(redis_conn)  # 1: plus a husk beside it
    redis_conn.hset("rq:job:husk", "last_heartbeat", iso(ago(5)))
    redis_conn.zadd(f"rq:wip:{QUEUE}", {"husk:e1": time.time()})
    offset = started_job(redis_conn, worker="busy")  # 2: offset timestamp, live worker
    live_worker("busy", {"state": "busy", "current_job": offset.id})
    plus_two = ago(1800).astimezone(timezone(timedelta(hours=2)))
    redis_conn.hset(offset.key, "started_at", iso(plus_two, "%Y-%m-%dT%H:%M:%S%z"))
    undecodable = started_job(redis_conn)  # 3
    redis_conn.hset(undecodable.key, "data", zlib.compress(_uninstalled_pickle()))
    infinite = started_job(redis_conn)  # 4
    redis_conn.zadd(f"rq:wip:{QUEUE}", {started_member(redis_conn, infinite.id): float("inf")})
    lost = lost_started(redis_conn)  # 5
    lost_waiting = lost_queued(redis_conn)
    stuck_in_list = stranded(redis_conn, first_seen_s=HOUR_S)  # 6
    elsewhere = started_job(redis_conn, queue=OTHER_QUEUE)  # 7
    member = started_member(redis_conn, elsewhere.id, OTHER_QUEUE)
    redis_conn.zrem(f"rq:wip:{OTHER_QUEUE}", member)
    redis_conn.zadd(f"rq:wip:{QUEUE}", {member: time.time()})
    partial = started_job(redis_conn, worker="partial")  # 8
    live_worker(
        "partial", {"last_heartbeat": ""}, [started_member(redis_conn, partial.id).decode()]
    )
    scheduled = started_job(redis_conn, queue=DELETE_QUEUE)  # 10
    redis_conn.zadd("rq:scheduler:scheduled_jobs", {scheduled.id: time.time() + HOUR_S})
    deleted = started_job(redis_conn, queue=DELETE_QUEUE)  # 12
    redis_conn.set(f"job_progress:{deleted.id}", "50%")
    limit = RateLimit(key="mix", concurrency=1)  # 11: a dead job's slot, a job waiting for it
    limited = queue.enqueue("jobs.quick", rate_limit=limit)
    redis_conn.lrem(queue.key, 0, limited.id)
    with redis_conn.pipeline() as pipe:
        Execution.create(limited, 600, pipe, worker_name=DEAD)
        limited.prepare_for_execution(DEAD, pipe)
        pipe.execute()
    held_back = queue.enqueue("jobs.quick", rate_limit=limit)
    assert job_status(redis_conn, held_back.id) == "rate_limited"

    path = tmp_path / "mixed.yaml"
    path.write_text(
        "version: 1\ndefaults:\n  action: fail\n  max_age: 1h\nqueues:\n"
        f"  - name: {QUEUE}\n  - name: {OTHER_QUEUE}\n  - name: {DELETE_QUEUE}\n"
        '    action: delete\n    related_keys: ["job_progress:{job_id}"]\n'
    )
    result = run_opsctl("apply", str(path), "--redis-url", redis_url, "--format", "json")
    simple.process.send_signal(18)  # SIGCONT

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    seen = {j["id"]: (j["state"], j["action"], j["outcome"]) for j in report["jobs"]}
    assert seen == {
        running.id: ("running", "none", "kept"),
        abandoned.id: ("abandoned", "fail", "done"),
        "husk": ("orphaned", "remove-entry", "done"),
        offset.id: ("running", "none", "kept"),
        undecodable.id: ("abandoned", "fail", "done"),
        infinite.id: ("abandoned", "fail", "done"),
        lost.id: ("lost", "fail", "done"),
        lost_waiting.id: ("lost", "fail", "done"),
        stuck_in_list.id: ("stranded", "fail", "done"),
        elsewhere.id: ("abandoned", "fail", "done"),
        partial.id: ("running", "none", "kept"),
        scheduled.id: ("abandoned", "delete", "skipped"),
        deleted.id: ("abandoned", "delete", "done"),
        limited.id: ("abandoned", "fail", "done"),
    }, json.dumps(report["jobs"], indent=1)
    assert job_in(report, undecodable.id)["function"] == "billing.charge"
    assert 1700 < job_in(report, offset.id)["age_seconds"] < 1900

    failed = FailedJobRegistry(QUEUE, connection=redis_conn).get_job_ids(cleanup=False)
    for job in (abandoned, undecodable, infinite, lost, lost_waiting, stuck_in_list, limited):
        assert job_status(redis_conn, job.id) == "failed", job.id
        assert job.id in failed
    assert elsewhere.id in FailedJobRegistry(OTHER_QUEUE, connection=redis_conn).get_job_ids(
        cleanup=False
    )
    for job in (running, partial, scheduled):
        assert job_status(redis_conn, job.id) == "started"
    assert redis_conn.hget(offset.key, "status") == b"started"  # RQ cannot parse its offset
    assert job_status(redis_conn, deleted.id) is None
    assert not redis_conn.exists(f"job_progress:{deleted.id}")
    assert job_status(redis_conn, finished.id) == "finished"
    assert job_status(redis_conn, held_back.id) == "queued", "the freed slot went to it"
    assert queue.get_job_ids() == [waiting.id, held_back.id]


# --- policy settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("rq:job:{job_id}", "would name a key under 'rq:', which belongs to RQ or opsctl"),
        ("opsctl:{job_id}", "would name a key under 'opsctl:', which belongs to RQ or opsctl"),
        ("{job_id}:progress", "must start with a fixed part before {job_id}"),
        ("progress:{id}", "must hold the placeholder {job_id} exactly once"),
        ("p:{job_id}:{job_id}", "must hold the placeholder {job_id} exactly once"),
        ("p:{job_id}:{queue}", "holds a placeholder other than {job_id}"),
    ],
)
def test_a_related_keys_template_that_could_name_other_keys_is_refused(
    tmp_path: Path, template: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f'version: 1\nqueues:\n  - name: a\n    related_keys: ["{template}"]\n')

    result = invoke_opsctl("validate", str(path))

    assert result.exit_code == 2
    assert f"4:20: queues[0].related_keys[0]: '{template}' {message}" in result.stdout


def test_lost_after_takes_a_duration_and_is_inherited_per_queue(tmp_path: Path) -> None:
    path = tmp_path / "lost.yaml"
    path.write_text(
        "version: 1\ndefaults:\n  lost_after: 2h\nqueues:\n  - name: a\n"
        "  - name: b\n    lost_after: 90s\n  - name: c\n    lost_after: soon\n"
    )

    result = invoke_opsctl("validate", str(path))

    assert result.exit_code == 2
    assert result.stdout.strip().endswith(
        "queues[2].lost_after: 'soon' is not a duration (use 90s, 10m, 2h or 1d)"
    )
    path.write_text(path.read_text().replace("soon", "1d"))
    policy = load_policy(path)
    assert [policy.rule_for(q).lost_after_seconds for q in "abc"] == [7200, 90, 86400]  # type: ignore[union-attr]


def test_a_reviewed_plan_fails_a_stranded_job_and_deletes_related_keys(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = stranded(redis_conn, first_seen_s=HOUR_S)
    doomed = started_job(redis_conn, queue=OTHER_QUEUE)
    redis_conn.set(f"job_progress:{doomed.id}", "1")
    path = tmp_path / "plan-policy.yaml"
    path.write_text(
        f"version: 1\nqueues:\n  - name: {QUEUE}\n  - name: {OTHER_QUEUE}\n    action: delete\n"
        '    related_keys: ["job_progress:{job_id}"]\n'
    )
    plan = tmp_path / "plan.json"
    assert (
        invoke_opsctl("plan", str(path), "--redis-url", redis_url, "-o", str(plan)).exit_code == 0
    )
    # Strict JSON, as a reviewer's tools read it: no NaN for the job that has no score.
    json.loads(plan.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the plan"))

    report = run(path, redis_url, "--plan", str(plan))

    assert job_in(report, job.id)["outcome"] == "done"
    assert job_status(redis_conn, job.id) == "failed"
    assert job_status(redis_conn, doomed.id) is None
    assert not redis_conn.exists(f"job_progress:{doomed.id}")


def test_a_started_job_in_an_uncovered_queues_registry_is_not_lost(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = started_job(redis_conn, queue="elsewhere")
    redis_conn.hset(job.key, mapping={"origin": QUEUE, "started_at": iso(ago(HOUR_S))})
    redis_conn.hset(job.key, "last_heartbeat", iso(ago(HOUR_S)))
    redis_conn.sadd("rq:queues", f"rq:queue:{QUEUE}")
    path = tmp_path / "only-odd.yaml"
    path.write_text(f"version: 1\nqueues:\n  - name: {QUEUE}\n")

    report = run(path, redis_url)

    assert report["jobs"] == [], "its entry in rq:wip:elsewhere holds it"
    assert job_status(redis_conn, job.id) == "started"


def hmget_calls(conn: redis.Redis) -> int:
    """HMGET commands the server has run (a script's own calls included)."""
    return int(conn.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


def sent_to_server(conn: redis.Redis) -> int:
    return int(conn.info("stats")["total_net_input_bytes"])


def test_the_walk_reads_the_status_only_of_jobs_no_registry_lists(
    redis_conn: redis.Redis,
) -> None:
    running = [started_job(redis_conn, worker=f"w{i}") for i in range(300)]
    lost = lost_started(redis_conn)
    listed = listed_in(redis_conn, f"rq:wip:{QUEUE}")
    redis_conn.config_resetstat()

    found = survey(redis_conn, Keys(), listed=listed)

    assert hmget_calls(redis_conn) == 1, "the lost job's status, and no running job's"
    assert found.started == {QUEUE: [lost.id]}
    assert len(running) + 1 <= found.scanned


def test_the_walk_reads_statuses_on_the_server_again_when_most_jobs_are_unlisted(
    redis_conn: redis.Redis,
) -> None:
    # A keyspace of finished jobs: sending each id back to have its status
    # read would cost more than reading every status where it is.
    finished = 20_000
    job_hashes(redis_conn, finished, QUEUE)
    running = started_job(redis_conn)
    lost = lost_started(redis_conn)
    listed = listed_in(redis_conn, f"rq:wip:{QUEUE}")
    assert running.id in listed.ids

    before = sent_to_server(redis_conn)
    found = survey(redis_conn, Keys(), listed=listed)
    sent = sent_to_server(redis_conn) - before

    # Once back to reading every status, a listed job may come back as a
    # candidate too (the lost-job search drops it as the run's own entry).
    assert lost.id in found.started[QUEUE]
    assert set(found.started[QUEUE]) <= {lost.id, running.id}
    assert found.scanned >= finished + 2
    # At most the first few pages' ids were sent back (each over 20 bytes).
    assert sent < finished // 4 * 20


def test_running_jobs_among_many_are_never_taken_for_lost(
    redis_conn: redis.Redis,
) -> None:
    running = [started_job(redis_conn, worker=f"w{i}") for i in range(300)]
    bare = started_job(redis_conn)  # an RQ 1 entry: the bare id
    member = started_member(redis_conn, bare.id)
    redis_conn.zrem(f"rq:wip:{QUEUE}", member)
    redis_conn.zadd(f"rq:wip:{QUEUE}", {bare.id: time.time()})
    lost = lost_started(redis_conn)
    snapshot = read_snapshot(redis_conn, Keys(), [QUEUE])

    found = find_lost(redis_conn, Keys(), [QUEUE], snapshot.entries)

    assert found.filtered_server_side
    assert [e.job_id for e in found.entries] == [lost.id]
    assert len(running) + 2 <= found.scanned


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_json_report_is_written_in_the_encoding_of_its_stream(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, encoding: str
) -> None:
    job = started_job(redis_conn, worker="wörker-1")
    env = opsctl_env({**clean_env(), "PYTHONIOENCODING": encoding})
    argv = [sys.executable, "-m", "opsctl", "apply", str(policy(tmp_path)), "--dry-run"]
    argv += ["--format", "json", "--redis-url", redis_url]

    done = subprocess.run(argv, capture_output=True, env=env, timeout=120, check=False)

    assert done.returncode == 0, done.stderr
    item = job_in(json.loads(done.stdout.decode(encoding)), job.id)
    assert item["worker"] == "wörker-1"
    assert "wörker-1 is dead" in item["reason"]


def test_a_connection_pool_of_one_is_enough_for_a_run(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # The keyspace walk runs on a thread of its own, beside the registry reads, and the
    # registries of many queues are listed on two threads at once: they wait for the
    # pool's one connection rather than take its refusal for an unreachable server.
    jobs = [started_job(redis_conn, queue=f"q{n}") for n in range(20) for _ in range(3)]

    report = run(policy(tmp_path), f"{redis_url}?max_connections=1", "--reconnect-grace", "0")

    assert {job_in(report, job.id)["outcome"] for job in jobs} == {"done"}
    assert {job_status(redis_conn, job.id) for job in jobs} == {"failed"}


def test_a_worker_key_holding_a_string_is_named_its_job_judged_and_registration_removed(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = started_job(redis_conn, worker="strange")
    redis_conn.set("rq:worker:strange", "written by something else")
    for registration in ("rq:workers", f"rq:workers:{QUEUE}"):
        redis_conn.sadd(registration, "rq:worker:strange")

    report = run(policy(tmp_path), redis_url)

    assert "worker strange: rq:worker:strange could not be read (WRONGTYPE" in "".join(
        report["problems"]
    )
    item = job_in(report, job.id)
    assert (item["state"], item["outcome"]) == ("abandoned", "done"), item
    assert item["worker_evidence"] == "worker holds no connection to Redis (still none 10s later)"
    assert job_status(redis_conn, job.id) == "failed"
    assert redis_conn.get("rq:worker:strange") == b"written by something else"
    [worker] = [w for w in report["workers"] if w["name"] == "strange"]
    assert worker["outcome"] == "done", worker
    assert "rq:worker:strange" not in Worker.all_keys(connection=redis_conn)
    queue = Queue(QUEUE, connection=redis_conn)
    assert "rq:worker:strange" not in Worker.all_keys(connection=redis_conn, queue=queue)


def test_a_plan_acts_on_neither_a_worker_live_again_nor_the_job_it_executes(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, live_worker: Any
) -> None:
    job = started_job(redis_conn, worker="back")
    redis_conn.hset("rq:worker:back", mapping={"state": "busy", "last_heartbeat": "x"})
    for registration in ("rq:workers", f"rq:workers:{QUEUE}"):
        redis_conn.sadd(registration, "rq:worker:back")
    plan = tmp_path / "plan.json"
    made = invoke_opsctl("plan", str(policy(tmp_path)), "-o", str(plan), "--redis-url", redis_url)
    assert made.exit_code == 0, made.output
    planned = json.loads(plan.read_text())
    assert [j["job_id"] for j in planned["jobs"]] == [job.id]
    assert [w["name"] for w in planned["workers"]] == ["back"]
    # The worker was only cut off for a while: it answers again and still runs the job.
    live_worker("back", {}, [started_member(redis_conn, job.id).decode()])

    result = invoke_opsctl(
        "apply", "--plan", str(plan), "--redis-url", redis_url, "--format", "json"
    )

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    [line] = report["jobs"]
    assert (line["outcome"], line["reason"]) == (
        "skipped",
        "not acted on: back is live now and executing it",
    )
    assert line["worker_alive"] is True  # as it is now; the plan had it dead
    assert line["worker_evidence"] == "worker is subscribed to its command channel"
    [worker] = report["workers"]
    assert worker["outcome"] == "skipped", worker
    assert worker["reason"].startswith("not removed: the worker is live now")
    assert worker["alive"] is True  # as it is now, as its jobs' columns say
    assert job_status(redis_conn, job.id) == "started"
    queue = Queue(QUEUE, connection=redis_conn)
    assert "rq:worker:back" in Worker.all_keys(connection=redis_conn, queue=queue)
    assert "rq:worker:back" in Worker.all_keys(connection=redis_conn)


def test_explain_finds_a_job_where_a_run_does_and_agrees_with_its_verdict(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # An RQ 1 id holding colons, stored bare; and a job whose origin is another queue.
    started = iso(ago(3600))
    for job_id, origin in (("report:2024:42", QUEUE), ("stray", "elsewhere")):
        redis_conn.hset(
            f"rq:job:{job_id}",
            mapping={
                "status": "started",
                "origin": origin,
                "created_at": started,
                "started_at": started,
                "worker_name": "ghost",
            },
        )
    redis_conn.zadd(f"rq:wip:{QUEUE}", {"report:2024:42": time.time() + 100})
    redis_conn.zadd(f"rq:wip:{QUEUE}", {"stray:e1": time.time() + 100})
    path = policy(tmp_path)
    ran = run(path, redis_url, "--dry-run")

    for job_id in ("report:2024:42", "stray"):
        code, explained = explain(job_id, redis_url, "--policy", str(path))
        assert code == 0, explained
        assert isinstance(explained, dict)
        [verdict] = explained["verdicts"]
        item = job_in(ran, job_id)
        assert (
            (verdict["state"], verdict["action"])
            == (item["state"], item["action"])
            == (
                "abandoned",
                "fail",
            )
        ), (verdict, item)
        assert any(place.startswith(f"rq:wip:{QUEUE} member") for place in explained["places"])


@pytest.mark.parametrize(
    ("entries", "action", "said"),
    [
        ("  - name: elsewhere\n    enabled: false\n", "none", "disables queue 'elsewhere'"),
        ("", "none", "left alone: this run does not cover queue 'elsewhere'"),
        ("  - name: elsewhere\n    dry_run: true\n", "fail", "only planned: queues[1]"),
        ("  - name: elsewhere\n    action: delete\n", "fail", None),
    ],
)
def test_explain_holds_a_job_to_its_origins_rule_as_a_run_does(
    redis_conn: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    entries: str,
    action: str,
    said: str | None,
) -> None:
    # The job sits in queue "odd"'s registry; its hash says it came from "elsewhere".
    started = iso(ago(3600))
    redis_conn.hset(
        "rq:job:stray",
        mapping={"status": "started", "origin": "elsewhere", "created_at": started,
                 "started_at": started, "worker_name": "ghost"},
    )  # fmt: skip
    redis_conn.zadd("rq:wip:odd", {"stray:e1": time.time() + 100})
    path = tmp_path / "policy.yaml"
    path.write_text(f"version: 1\nqueues:\n  - name: odd\n    action: fail\n{entries}")

    item = job_in(run(path, redis_url, "--dry-run"), "stray")
    code, explained = explain("stray", redis_url, "--policy", str(path))

    assert code == 0 and isinstance(explained, dict), explained
    [verdict] = explained["verdicts"]
    assert verdict["action"] == item["action"] == action, (verdict, item)
    assert verdict["reason"] == item["reason"]
    if said is not None:
        assert said in verdict["reason"]
    assert explained["rule"].startswith("queues[0] (odd); the job's origin, queue 'elsewhere': ")


def test_an_rq1_id_with_a_colon_beside_a_job_named_by_its_start_is_judged_as_itself(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # RQ 1: job "rep" finished long ago; job "rep:x1", stored bare, was abandoned.
    # Split at its colon, the member would name job "rep" and an execution "x1",
    # which no RQ release would write (they are 32 hex digits) and which has no record.
    started = iso(ago(3600))
    redis_conn.hset("rq:job:rep", mapping={"status": "finished", "origin": QUEUE})
    redis_conn.hset(
        "rq:job:rep:x1",
        mapping={
            "status": "started",
            "origin": QUEUE,
            "created_at": started,
            "started_at": started,
            "worker_name": "ghost",
        },
    )
    redis_conn.zadd(f"rq:wip:{QUEUE}", {"rep:x1": time.time() + 100})
    path = policy(tmp_path)

    planned = run(path, redis_url, "--dry-run")
    code, explained = explain("rep", redis_url, "--policy", str(path))
    applied = run(path, redis_url)

    assert [(j["id"], j["state"], j["action"]) for j in planned["jobs"]] == [
        ("rep:x1", "abandoned", "fail")
    ]
    assert code == 0 and isinstance(explained, dict)
    assert explained["verdicts"] == [], "rep:x1's entry is not rep's"
    assert job_in(applied, "rep:x1")["outcome"] == "done"
    # RQ 3 loads no id holding a colon: its registry and the hash show the end state.
    assert FailedJobRegistry(QUEUE, connection=redis_conn).get_job_ids(cleanup=False) == ["rep:x1"]
    assert redis_conn.hget("rq:job:rep:x1", "status") == b"failed"
    assert redis_conn.hget("rq:job:rep", "status") == b"finished", "rep was not touched"


def test_explain_of_a_job_key_that_holds_no_hash_says_so_and_judges_its_entry(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    redis_conn.set("rq:job:not-a-hash", "written by something else")
    redis_conn.zadd(f"rq:wip:{QUEUE}", {"not-a-hash": time.time() - 10})

    code, explained = explain("not-a-hash", redis_url)
    text = invoke_opsctl("explain", "not-a-hash", "--redis-url", redis_url)
    planned = run(policy(tmp_path), redis_url, "--dry-run")

    assert code == 0, explained
    assert isinstance(explained, dict)
    assert "rq:job:not-a-hash (holds a string)" in explained["places"]
    [verdict] = explained["verdicts"]
    assert (verdict["state"], verdict["action"]) == ("orphaned", "remove-entry")
    # As a run reads it: a record that holds no job, not a missing one.
    assert verdict["reason"] == job_in(planned, "not-a-hash")["reason"]
    assert "hash: none: rq:job:not-a-hash (holds a string)" in text.stdout
    assert redis_conn.get("rq:job:not-a-hash") == b"written by something else"


def test_explain_names_a_worker_key_that_holds_no_hash_as_a_run_does(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    job = started_job(redis_conn, worker="strange")
    redis_conn.set("rq:worker:strange", "written by something else")

    code, explained = explain(job.id, redis_url)
    text = invoke_opsctl("explain", job.id, "--redis-url", redis_url)
    planned = run(policy(tmp_path), redis_url, "--dry-run")

    assert code == 0 and isinstance(explained, dict), explained
    [problem] = explained["problems"]
    assert problem.startswith("worker strange: rq:worker:strange could not be read (WRONGTYPE")
    assert problem in planned["problems"]
    assert f"problem: {problem}" in text.stdout.splitlines()


def test_a_stale_entry_of_a_job_a_live_worker_runs_again_leaves_the_job_alone(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, live_worker: Any
) -> None:
    # The job ran as execution e1 on a worker that died, and was enqueued again by hand;
    # a live worker now runs it as a new execution while e1's entry lingers.
    job = started_job(redis_conn, worker="again")
    running = started_member(redis_conn, job.id).decode()
    live_worker("again", {"state": "busy", "birth": iso(ago(600))}, [running])
    stale = f"{job.id}:e1"
    redis_conn.zadd(f"rq:wip:{QUEUE}", {stale: time.time() - 3600})
    code, explained = explain(job.id, redis_url)
    assert code == 0, explained
    assert isinstance(explained, dict)
    verdicts = {v["entry"]: v["state"] for v in explained["verdicts"]}
    assert verdicts == {running: "running", stale: "leftover"}

    report = run(policy(tmp_path), redis_url)

    lines = {j["entry"]: j for j in report["jobs"]}
    assert lines[running]["state"] == "running", lines[running]
    assert lines[stale]["action"] == "remove-entry", lines[stale]
    assert job_status(redis_conn, job.id) == "started"
    registry = StartedJobRegistry(QUEUE, connection=redis_conn)
    assert registry.get_job_and_execution_ids(cleanup=False) == [(job.id, running.split(":")[1])]


def test_a_plan_leaves_alone_a_job_a_live_worker_took_again_since(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, live_worker: Any
) -> None:
    job = started_job(redis_conn, worker=DEAD)
    plan = tmp_path / "plan.json"
    made = invoke_opsctl("plan", str(policy(tmp_path)), "-o", str(plan), "--redis-url", redis_url)
    assert made.exit_code == 0, made.output
    assert [j["action"] for j in json.loads(plan.read_text())["jobs"]] == ["fail"]
    # Another worker runs the job now, under an execution of its own.
    redis_conn.hset(f"rq:execution:{job.id}:e2", "worker_name", "taker")  # as RQ writes it
    live_worker("taker", {"state": "busy", "birth": iso(ago(60))}, [f"{job.id}:e2"])

    result = invoke_opsctl(
        "apply", "--plan", str(plan), "--redis-url", redis_url, "--format", "json"
    )

    assert result.exit_code == 0, result.output
    [line] = json.loads(result.stdout)["jobs"]
    assert (line["outcome"], line["reason"]) == (
        "skipped",
        "not acted on: taker is live now and executing this job",
    )
    assert job_status(redis_conn, job.id) == "started"


def test_explain_and_apply_find_a_live_worker_running_the_job_that_no_record_names(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path, live_worker: Any
) -> None:
    job = started_job(redis_conn, worker=DEAD)
    earlier = started_member(redis_conn, job.id).decode()
    now_running = f"{job.id}:e2"
    redis_conn.zadd(f"rq:wip:{QUEUE}", {now_running: time.time() + 60})
    redis_conn.hset(f"rq:execution:{now_running}", "worker_name", "taker")  # as RQ writes it
    live_worker("taker", {"state": "busy", "birth": iso(ago(60))}, [now_running])

    code, explained = explain(job.id, redis_url)
    report = run(policy(tmp_path), redis_url)

    assert code == 0 and isinstance(explained, dict), explained
    verdicts = {v["entry"]: (v["state"], v["action"]) for v in explained["verdicts"]}
    assert verdicts == {earlier: ("leftover", "remove-entry"), now_running: ("running", "none")}
    assert {w["name"] for w in explained["workers"]} == {DEAD, "taker"}
    lines = {j["entry"]: (j["state"], j["outcome"]) for j in report["jobs"]}
    assert lines == {earlier: ("leftover", "done"), now_running: ("running", "kept")}
    assert job_status(redis_conn, job.id) == "started"
