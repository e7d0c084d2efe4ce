"""`opsctl requeue --run`: undoing a real run against a private redis-server.

Real `rq worker` processes are killed mid-job, `opsctl apply` fails or cancels the jobs,
then `opsctl requeue --run` puts them back, and real workers finish them. End states are
read through RQ's API.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue, Retry
from rq.executions import Execution
from rq.job import Job
from rq.registry import CanceledJobRegistry, FailedJobRegistry

from conftest import WorkerFactory, job_status, opsctl_env, run_opsctl, wait_for_status, wait_until
from opsctl import audit
from opsctl.audit import AuditContext

pytestmark = pytest.mark.redis_server

FAIL_QUEUE = "undo-fail"
CANCEL_QUEUE = "undo-cancel"
POLICY = f"""version: 1
defaults:
  action: fail
queues:
  - name: {FAIL_QUEUE}
  - name: {CANCEL_QUEUE}
    action: cancel
"""
#: Seconds each job sleeps: long enough to be killed mid-job, short enough to rerun.
JOB_S = 6
FINISH_TIMEOUT_S = 90


def abandon(rq_workers: WorkerFactory, conn: redis.Redis, queue: str) -> Job:
    """A job whose worker and work horse were SIGKILLed while it ran."""
    worker = rq_workers.start([queue])
    job = Queue(queue, connection=conn).enqueue("jobs.sleep_for", JOB_S)
    assert wait_for_status(conn, job.id, "started") == "started"
    assert worker.kill(), "the worker had a work horse running the job"
    return job


def opsctl_json(*args: str, exit_code: int = 0) -> dict[str, Any]:
    result = run_opsctl(*args, "--format", "json")
    assert result.returncode == exit_code, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def outcomes(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {j["id"]: (j["outcome"], j["reason"]) for j in report["jobs"]}


def queued_ids(conn: redis.Redis, queue: str) -> list[str]:
    return Queue(queue, connection=conn).get_job_ids()


def test_requeue_run_puts_back_what_the_run_failed_or_canceled_and_workers_finish_them(
    redis_url: str, redis_conn: redis.Redis, rq_workers: WorkerFactory, tmp_path: Path
) -> None:
    to_fail = abandon(rq_workers, redis_conn, FAIL_QUEUE)
    retried = abandon(rq_workers, redis_conn, FAIL_QUEUE)
    deleted = abandon(rq_workers, redis_conn, FAIL_QUEUE)
    to_cancel = abandon(rq_workers, redis_conn, CANCEL_QUEUE)
    waiting = Queue(FAIL_QUEUE, connection=redis_conn).enqueue("jobs.quick", depends_on=to_fail)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run = opsctl_json("apply", str(policy), "--redis-url", redis_url)
    assert job_status(redis_conn, to_fail.id) == "failed"
    assert job_status(redis_conn, waiting.id) == "deferred"
    assert job_status(redis_conn, to_cancel.id) == "canceled"
    # Someone changes two of them in between: a retry with RQ's own tool, a deletion.
    FailedJobRegistry(FAIL_QUEUE, connection=redis_conn).requeue(retried.id)
    Job.fetch(deleted.id, connection=redis_conn).delete()
    audit_before = redis_conn.xlen("opsctl:audit")

    dry = opsctl_json("requeue", "--run", run["run_id"], "--redis-url", redis_url, "--dry-run")

    assert {k: v[0] for k, v in outcomes(dry).items()} == {
        to_fail.id: "planned",
        retried.id: "skipped",
        deleted.id: "skipped",
        to_cancel.id: "planned",
    }
    assert job_status(redis_conn, to_fail.id) == "failed"
    assert queued_ids(redis_conn, FAIL_QUEUE) == [retried.id]
    assert redis_conn.xlen("opsctl:audit") == audit_before

    undo = opsctl_json("requeue", "--run", run["run_id"], "--redis-url", redis_url)

    found = outcomes(undo)
    assert found[to_fail.id][0] == found[to_cancel.id][0] == "done", found
    assert found[retried.id] == (
        "skipped",
        f"changed since run {run['run_id']}: status is now queued",
    )
    assert found[deleted.id] == ("skipped", "the job no longer exists (deleted, or expired)")
    assert undo["undo_of"] == run["run_id"]
    assert queued_ids(redis_conn, FAIL_QUEUE) == [retried.id, to_fail.id]
    assert queued_ids(redis_conn, CANCEL_QUEUE) == [to_cancel.id]
    assert FailedJobRegistry(FAIL_QUEUE, connection=redis_conn).get_job_ids(cleanup=False) == []
    canceled = CanceledJobRegistry(CANCEL_QUEUE, connection=redis_conn)
    assert canceled.get_job_ids(cleanup=False) == []
    job = Job.fetch(to_fail.id, connection=redis_conn)
    assert (job.get_status().value, job.started_at, job.ended_at) == ("queued", None, None)
    assert redis_conn.ttl(job.key) == -1  # no leftover failure expiry while it waits
    assert redis_conn.ttl(job.dependents_key) == -1  # nor on the set of what waits for it
    history = run_opsctl("history", "--run", undo["run_id"], "--redis-url", redis_url)
    assert to_fail.id in history.stdout and to_cancel.id in history.stdout

    rq_workers.start([FAIL_QUEUE, CANCEL_QUEUE])
    rq_workers.start([FAIL_QUEUE, CANCEL_QUEUE])
    for job_id in (to_fail.id, retried.id, to_cancel.id, waiting.id):
        status = wait_for_status(redis_conn, job_id, "finished", FINISH_TIMEOUT_S)
        assert status == "finished", job_id
    assert Job.fetch(to_fail.id, connection=redis_conn).return_value() == f"slept {JOB_S}s"


def started_again(conn: redis.Redis, job: Job) -> None:
    """A worker takes the job off its queue and starts it (then dies), as RQ writes it."""
    with conn.pipeline() as pipe:
        Execution.create(job, 3600, pipe, worker_name="w-gone-too")
        job.prepare_for_execution("w-gone-too", pipe)
        pipe.lrem(Queue(job.origin, connection=conn).key, 0, job.id)
        pipe.execute()


def test_job_that_ran_and_was_failed_again_since_is_left_failed(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    queue = Queue(FAIL_QUEUE, connection=redis_conn)
    job = queue.enqueue("jobs.quick")
    started_again(redis_conn, job)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    first = opsctl_json("apply", str(policy), "--redis-url", redis_url)
    FailedJobRegistry(FAIL_QUEUE, connection=redis_conn).requeue(job.id)
    started_again(redis_conn, Job.fetch(job.id, connection=redis_conn))
    opsctl_json("apply", str(policy), "--redis-url", redis_url)
    assert job_status(redis_conn, job.id) == "failed"

    undo = opsctl_json("requeue", "--run", first["run_id"], "--redis-url", redis_url)

    outcome, reason = outcomes(undo)[job.id]
    assert outcome == "skipped" and "ran again" in reason, reason
    assert job_status(redis_conn, job.id) == "failed"
    assert queued_ids(redis_conn, FAIL_QUEUE) == []


def test_unknown_run_id_exits_2_and_writes_nothing(redis_url: str, redis_conn: redis.Redis) -> None:
    result = run_opsctl("requeue", "--run", "0123456789ab", "--redis-url", redis_url)

    assert result.returncode == 2, result.stderr
    assert "no audit entries for run '0123456789ab'" in result.stderr
    assert "Traceback" not in result.stderr
    assert redis_conn.keys("*") == []


def failed_by_a_run(redis_url: str, conn: redis.Redis, tmp_path: Path) -> tuple[Job, str]:
    """A job an `opsctl apply` failed, and that run's id."""
    job = Queue(FAIL_QUEUE, connection=conn).enqueue("jobs.quick")
    started_again(conn, job)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run = opsctl_json("apply", str(policy), "--redis-url", redis_url)
    return job, str(run["run_id"])


def test_an_undo_of_a_run_that_deleted_jobs_says_they_cannot_be_put_back(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    job = Queue(FAIL_QUEUE, connection=redis_conn).enqueue("jobs.quick")
    started_again(redis_conn, job)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace("action: fail", "action: delete"))
    run = opsctl_json("apply", str(policy), "--redis-url", redis_url)

    undo = opsctl_json("requeue", "--run", run["run_id"], "--redis-url", redis_url)
    text = run_opsctl("requeue", "--run", run["run_id"], "--redis-url", redis_url)

    assert (undo["jobs"], undo["deleted_not_undoable"]) == ([], 1)
    assert "1 job(s) the run deleted cannot be put back" in text.stdout
    assert job_status(redis_conn, job.id) is None


def test_an_undo_of_a_run_whose_fail_retried_the_job_says_it_is_queued_again(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    job = Queue(FAIL_QUEUE, connection=redis_conn).enqueue("jobs.quick", retry=Retry(max=1))
    started_again(redis_conn, job)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run = opsctl_json("apply", str(policy), "--redis-url", redis_url)
    assert job_status(redis_conn, job.id) == "queued"  # retried, not failed for good

    undo = opsctl_json("requeue", "--run", run["run_id"], "--redis-url", redis_url)
    text = run_opsctl("requeue", "--run", run["run_id"], "--redis-url", redis_url)

    assert (undo["jobs"], undo["retried_already"]) == ([], 1)
    assert (
        "1 job(s) the run failed were retried: they are queued or scheduled again already"
        in text.stdout
    )
    assert Queue(FAIL_QUEUE, connection=redis_conn).get_job_ids() == [job.id]


def test_requeue_under_another_key_prefix_than_the_runs_is_refused(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    # Under another prefix none of its jobs are found: all would be reported gone.
    job, run_id = failed_by_a_run(redis_url, redis_conn, tmp_path)

    result = run_opsctl(
        "requeue", "--run", run_id, "--redis-url", redis_url, "--key-prefix", "other"
    )

    assert result.returncode == 2, result.stderr
    assert f"run {run_id} acted on jobs under the key prefix 'rq'" in result.stderr
    assert job_status(redis_conn, job.id) == "failed"


def test_requeue_waits_for_a_running_apply_and_gives_up_with_exit_5(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    job, run_id = failed_by_a_run(redis_url, redis_conn, tmp_path)
    redis_conn.set("opsctl:lock", "opsctl run=other host=elsewhere pid=1", ex=60)

    result = run_opsctl("requeue", "--run", run_id, "--redis-url", redis_url, "--lock-timeout", "0")

    assert result.returncode == 5, result.stderr
    assert "another opsctl run holds the lock" in result.stderr
    assert job_status(redis_conn, job.id) == "failed"


def test_a_signal_while_requeue_waits_for_the_lock_stops_it_at_once_with_nothing_done(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    job, run_id = failed_by_a_run(redis_url, redis_conn, tmp_path)
    redis_conn.set("opsctl:lock", "opsctl run=other host=elsewhere pid=1", ex=120)
    argv = ["requeue", "--run", run_id, "--redis-url", redis_url, "--lock-timeout", "60"]

    requeue = subprocess.Popen(
        [sys.executable, "-m", "opsctl", *argv], stderr=subprocess.PIPE, text=True, env=opsctl_env()
    )
    try:
        polling = wait_until(
            lambda: any(c.get("cmd") == "set" for c in redis_conn.client_list()), timeout=20
        )
        assert polling, "requeue never tried to take the lock"
        asked = time.monotonic()
        requeue.send_signal(signal.SIGTERM)
        _, stderr = requeue.communicate(timeout=50)
        took = time.monotonic() - asked
    finally:
        if requeue.poll() is None:
            requeue.kill()

    assert requeue.returncode == 143, stderr
    assert took < 30, f"waited {took:.0f}s of the 60s lock timeout after the signal"
    assert "stopped by signal 15: nothing was done" in stderr
    assert job_status(redis_conn, job.id) == "failed"


def test_entry_written_before_ended_at_was_recorded_is_skipped_not_guessed(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    job, run_id = failed_by_a_run(redis_url, redis_conn, tmp_path)
    # An entry as an earlier opsctl wrote it: the same fields, without ended_at.
    (_, entry), *_ = redis_conn.xrange("opsctl:audit")
    older = {k: v for k, v in entry.items() if k != b"ended_at"}
    older[b"run_id"] = b"0ld0ld0ld0ld"
    redis_conn.xadd("opsctl:audit", older)

    undo = opsctl_json("requeue", "--run", "0ld0ld0ld0ld", "--redis-url", redis_url)

    outcome, reason = outcomes(undo)[job.id]
    assert outcome == "skipped" and "predates" in reason, reason
    assert job_status(redis_conn, job.id) == "failed"
    assert run_id != "0ld0ld0ld0ld"


def test_job_taken_out_of_its_registry_since_is_left_as_it_is(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    job, run_id = failed_by_a_run(redis_url, redis_conn, tmp_path)
    FailedJobRegistry(FAIL_QUEUE, connection=redis_conn).remove(job.id)

    undo = opsctl_json("requeue", "--run", run_id, "--redis-url", redis_url)

    outcome, reason = outcomes(undo)[job.id]
    assert (outcome, reason.endswith("no longer in FailedJobRegistry")) == ("skipped", True)
    assert job_status(redis_conn, job.id) == "failed"
    assert queued_ids(redis_conn, FAIL_QUEUE) == []


def test_a_job_found_in_another_queues_registry_goes_back_on_its_origin_queue_as_reported(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    # Its entry sits in FAIL_QUEUE's registry; its hash says it came from "undo-origin",
    # whose registries and queue RQ (and every action) use.
    job = Queue("undo-origin", connection=redis_conn).enqueue("jobs.quick")
    started_again(redis_conn, job)
    [member] = redis_conn.zrange("rq:wip:undo-origin", 0, -1, withscores=True)
    redis_conn.zrem("rq:wip:undo-origin", member[0])
    redis_conn.zadd(f"rq:wip:{FAIL_QUEUE}", {member[0]: member[1]})
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + "  - name: undo-origin\n")
    run = opsctl_json("apply", str(policy), "--redis-url", redis_url)
    assert job.id in FailedJobRegistry("undo-origin", connection=redis_conn).get_job_ids()

    undo = opsctl_json("requeue", "--run", str(run["run_id"]), "--redis-url", redis_url)
    history = opsctl_json("history", "--job", job.id, "--redis-url", redis_url)

    [line] = undo["jobs"]
    assert (line["queue"], line["outcome"]) == ("undo-origin", "done")
    assert queued_ids(redis_conn, "undo-origin") == [job.id]
    assert queued_ids(redis_conn, FAIL_QUEUE) == []
    assert [e["queue"] for e in history["entries"] if e["action"] == "requeue"] == ["undo-origin"]


def test_a_job_whose_hash_names_no_origin_is_skipped_as_such_not_as_deleted(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    job, run_id = failed_by_a_run(redis_url, redis_conn, tmp_path)
    redis_conn.hdel(job.key, "origin")

    undo = opsctl_json("requeue", "--run", run_id, "--redis-url", redis_url)

    assert outcomes(undo)[job.id] == ("skipped", "its hash names no origin queue to requeue it to")
    assert job_status(redis_conn, job.id) == "failed"
    assert queued_ids(redis_conn, FAIL_QUEUE) == []


def test_a_job_id_that_is_not_utf8_is_followed_by_history_and_requeue(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    # RQ 1 accepted any job id; move a real job under one holding bytes that are not UTF-8.
    raw_id = b"legacy-\xff\xfe-7"
    job_id = raw_id.decode("utf-8", "surrogateescape")
    job = Queue(FAIL_QUEUE, connection=redis_conn).enqueue("jobs.quick")
    started_again(redis_conn, job)
    redis_conn.rename(job.key, b"rq:job:" + raw_id)
    wip = f"rq:wip:{FAIL_QUEUE}"
    (member, score), *_ = redis_conn.zrange(wip, 0, -1, withscores=True)
    redis_conn.zrem(wip, member)
    redis_conn.zadd(wip, {raw_id: score})  # the bare id, as RQ 1 stored it
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run = opsctl_json("apply", str(policy), "--redis-url", redis_url)
    # RQ 3's API refuses such an id, so the job's hash is read directly.
    assert redis_conn.hget(b"rq:job:" + raw_id, "status") == b"failed"

    history = opsctl_json("history", "--job", job_id, "--redis-url", redis_url)
    undo = opsctl_json("requeue", "--run", run["run_id"], "--redis-url", redis_url)

    shown = raw_id.decode("utf-8", "backslashreplace")  # JSON text is valid Unicode: \xNN
    assert [(e["job"], e["outcome"]) for e in history["entries"]] == [(shown, "done")]
    assert outcomes(undo)[shown] == ("done", "back on its queue")
    assert redis_conn.hget(b"rq:job:" + raw_id, "status") == b"queued"
    assert redis_conn.lrange(f"rq:queue:{FAIL_QUEUE}", 0, -1) == [raw_id]


@pytest.mark.parametrize("where", ["queue", "job"])
def test_a_key_of_another_type_is_an_error_of_its_job_and_a_dry_run_still_exits_0(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path, where: str
) -> None:
    jobs = [Queue(FAIL_QUEUE, connection=redis_conn).enqueue("jobs.quick") for _ in range(2)]
    for job in jobs:
        started_again(redis_conn, job)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run = opsctl_json("apply", str(policy), "--redis-url", redis_url)
    broken, other = jobs
    foreign = f"rq:queue:{FAIL_QUEUE}" if where == "queue" else broken.key
    redis_conn.delete(foreign)
    redis_conn.set(foreign, "someone else's value")

    dry = opsctl_json("requeue", "--run", run["run_id"], "--redis-url", redis_url, "--dry-run")
    undo = opsctl_json("requeue", "--run", run["run_id"], "--redis-url", redis_url, exit_code=1)

    # Both jobs go back on the one queue key; only the one hash is foreign.
    hit = jobs if where == "queue" else [broken]
    for report in (dry, undo):
        for job in hit:
            outcome, reason = outcomes(report)[job.id]
            assert outcome == "error" and f"{foreign} holds a string, not a" in reason, reason
    assert outcomes(dry)[broken.id][1].startswith("would fail: ")
    assert redis_conn.get(foreign) == b"someone else's value"
    if where == "job":  # the other job is not held back by one broken record
        assert outcomes(dry)[other.id][0] == "planned"
        assert outcomes(undo)[other.id][0] == "done"
        assert queued_ids(redis_conn, FAIL_QUEUE) == [other.id]
    else:
        assert job_status(redis_conn, other.id) == "failed"


def test_a_stopped_job_counts_as_left_to_rq_requeue_whatever_else_the_run_did_to_its_entries(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    # The run removed a leftover entry of the job, then had its worker stop it.
    context = AuditContext("0123456789ab", "digest")
    now = "2026-01-01T00:00:00.000000Z"
    audit.append(
        redis_conn,
        [
            (
                audit.entry_fields(context, now, "j1", "q", "leftover", "remove-entry", ""),
                "done",
                "",
            ),
            (audit.entry_fields(context, now, "j1", "q", "overdue", "stop", ""), "done", "stopped"),
        ],
    )

    undo = json.loads(
        run_opsctl(
            "requeue", "--run", "0123456789ab", "--redis-url", redis_url, "--format", "json"
        ).stdout
    )

    assert (undo["jobs"], undo["stopped_not_undone"]) == ([], 1)
