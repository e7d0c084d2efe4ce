"""`opsctl watch` as a real background process against a private redis-server.

Jobs get stuck between rounds (real `rq worker` processes killed mid-job) and the loop
cleans them; policy edits, a Redis restart and SIGTERM are driven from outside, as an
operator or an orchestrator would. End states are read through RQ's API.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue
from rq.executions import Execution
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry

from conftest import (
    WorkerFactory,
    job_hashes,
    job_status,
    opsctl_env,
    start_opsctl,
    start_redis_server,
    terminate,
    wait_for_status,
    wait_until,
)

pytestmark = pytest.mark.redis_server

QUEUE = "watched"
#: Generous: a round on a loaded machine can take seconds.
ROUND_TIMEOUT_S = 60
#: How long a stopped watch may take to exit.
EXIT_TIMEOUT_S = 30


def write_policy(path: Path, action: str) -> None:
    path.write_text(f"version: 1\ndefaults:\n  action: {action}\nqueues:\n  - name: {QUEUE}\n")


def abandon(rq_workers: WorkerFactory, conn: redis.Redis, seconds: float = 60) -> Job:
    """A job whose worker and work horse were SIGKILLed while it ran."""
    worker = rq_workers.start([QUEUE])
    job = Queue(QUEUE, connection=conn).enqueue("jobs.sleep_for", seconds)
    assert wait_for_status(conn, job.id, "started") == "started"
    assert worker.kill(), "the worker had a work horse running the job"
    return job


def read_metrics(path: Path) -> dict[str, float]:
    """The run-level gauges of a metrics file, labelled only by the watch command
    ({} while it does not exist yet)."""
    if not path.exists():
        return {}
    found = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            if sample.labels == {"command": "watch"}:
                found[sample.name] = sample.value
    return found


def stop(process: subprocess.Popen[str], signum: int = signal.SIGTERM) -> int | None:
    """Signal the process and wait for it; its exit code (None if it did not exit)."""
    if process.poll() is None:
        process.send_signal(signum)
    try:
        return process.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        return None


def logs(tmp_path: Path) -> str:
    out = (tmp_path / "opsctl.out").read_text(errors="replace")
    err = (tmp_path / "opsctl.err").read_text(errors="replace")
    return f"stdout:\n{out}\nstderr:\n{err}"


@pytest.fixture
def watch(tmp_path: Path) -> Any:
    """Start `opsctl watch ARGS`; every process started is stopped at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        process = start_opsctl("watch", *args, log_dir=tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        stop(process, signal.SIGKILL)


def watching(
    tmp_path: Path, redis_url: str, watch: Any
) -> tuple[Path, Path, subprocess.Popen[str]]:
    """`opsctl watch` of a fail policy every second, once its first round is done: the
    policy file, the metrics file and the process."""
    policy = tmp_path / "policy.yaml"
    write_policy(policy, "fail")
    metrics = tmp_path / "opsctl.prom"
    process = watch(
        str(policy), "--every", "1s", "--redis-url", redis_url, "--metrics-file", str(metrics)
    )
    assert wait_until(lambda: read_metrics(metrics), timeout=ROUND_TIMEOUT_S), logs(tmp_path)
    return policy, metrics, process


def test_watch_cleans_jobs_stuck_between_rounds_and_follows_policy_edits(
    redis_url: str, redis_conn: redis.Redis, rq_workers: WorkerFactory, tmp_path: Path, watch: Any
) -> None:
    policy, metrics, process = watching(tmp_path, redis_url, watch)
    assert read_metrics(metrics)["opsctl_policy_file_rejected"] == 0

    failed = abandon(rq_workers, redis_conn)
    assert wait_for_status(redis_conn, failed.id, "failed", ROUND_TIMEOUT_S) == "failed"

    write_policy(policy, "cancel")  # a valid edit takes effect in the next round
    canceled = abandon(rq_workers, redis_conn)
    assert wait_for_status(redis_conn, canceled.id, "canceled", ROUND_TIMEOUT_S) == "canceled"

    policy.write_text("version: 1\nqueues:\n  - name: [unclosed\n")  # an invalid edit
    assert wait_until(
        lambda: "keeping the last good policy" in logs(tmp_path), timeout=ROUND_TIMEOUT_S
    ), logs(tmp_path)
    still_cancel = abandon(rq_workers, redis_conn)
    status = wait_for_status(redis_conn, still_cancel.id, "canceled", ROUND_TIMEOUT_S)
    assert status == "canceled", logs(tmp_path)
    assert process.poll() is None, logs(tmp_path)
    # The rounds succeed under the last good policy, and the metrics say the file is refused.
    assert read_metrics(metrics)["opsctl_last_run_exit_code"] == 0
    assert read_metrics(metrics)["opsctl_policy_file_rejected"] == 1

    write_policy(policy, "cancel")  # mended: the file's policy is in force again
    assert wait_until(
        lambda: read_metrics(metrics).get("opsctl_policy_file_rejected") == 0,
        timeout=ROUND_TIMEOUT_S,
    ), logs(tmp_path)

    assert stop(process) == 0, logs(tmp_path)
    assert redis_conn.exists("opsctl:lock") == 0
    assert FailedJobRegistry(QUEUE, connection=redis_conn).get_job_ids(cleanup=False) == [failed.id]


def test_a_policy_file_replaced_by_a_fifo_is_refused_and_watch_still_stops_on_sigterm(
    redis_url: str, redis_conn: redis.Redis, rq_workers: WorkerFactory, tmp_path: Path, watch: Any
) -> None:
    policy, metrics, process = watching(tmp_path, redis_url, watch)

    policy.unlink()
    os.mkfifo(policy)  # opening it would wait for a writer that never comes
    assert wait_until(
        lambda: "it is a FIFO, not a file" in logs(tmp_path), timeout=ROUND_TIMEOUT_S
    ), logs(tmp_path)
    failed = abandon(rq_workers, redis_conn)  # rounds go on with the last good policy
    assert wait_for_status(redis_conn, failed.id, "failed", ROUND_TIMEOUT_S) == "failed"
    assert wait_until(
        lambda: read_metrics(metrics).get("opsctl_policy_file_rejected") == 1,
        timeout=ROUND_TIMEOUT_S,
    ), logs(tmp_path)

    assert stop(process) == 0, logs(tmp_path)


def seed_abandoned(conn: redis.Redis, count: int) -> list[str]:
    """`count` jobs started by a worker that no longer exists, as RQ writes them."""
    queue = Queue(QUEUE, connection=conn)
    ids = []
    for _ in range(count):
        job = queue.enqueue("jobs.quick")
        with conn.pipeline() as pipe:
            Execution.create(job, 3600, pipe, worker_name="w-gone")
            job.prepare_for_execution("w-gone", pipe)
            pipe.lrem(queue.key, 0, job.id)
            pipe.execute()
        ids.append(job.id)
    return ids


def test_sigterm_mid_round_stops_between_changes_with_no_job_half_moved(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path, watch: Any
) -> None:
    ids = seed_abandoned(redis_conn, 1500)
    policy = tmp_path / "policy.yaml"
    write_policy(policy, "fail")
    process = watch(str(policy), "--every", "1h", "--redis-url", redis_url)

    # The first change of the round is recorded in the audit trail in the same script.
    assert wait_until(lambda: redis_conn.xlen("opsctl:audit") > 0, timeout=ROUND_TIMEOUT_S)
    assert stop(process) == 0, logs(tmp_path)

    assert redis_conn.exists("opsctl:lock") == 0
    assert redis_conn.exists(f"rq:clean_registries:{QUEUE}") == 0
    failed = set(FailedJobRegistry(QUEUE, connection=redis_conn).get_job_ids(cleanup=False))
    started = set(StartedJobRegistry(QUEUE, connection=redis_conn).get_job_ids(cleanup=False))
    statuses = {
        job.id: job.get_status(refresh=False).value
        for job in Job.fetch_many(ids, connection=redis_conn)
    }
    assert failed | started == set(ids) and not failed & started
    assert {statuses[i] for i in failed} <= {"failed"}
    assert {statuses[i] for i in started} <= {"started"}
    done = [e for _, e in redis_conn.xrange("opsctl:audit") if e[b"outcome"] == b"done"]
    assert len(done) == len(failed)


def test_a_round_cut_short_by_sigterm_leaves_the_metrics_of_the_last_finished_round(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path, watch: Any
) -> None:
    # Every round fails (exit 5: RQ's maintenance lock of the queue is held) after
    # looking again, for 3 s, at the job's worker, whose hash is there but which
    # holds no connection (and is in no registration set a round would clean).
    seed_abandoned(redis_conn, 1)
    redis_conn.set(f"rq:clean_registries:{QUEUE}", "stale", ex=600)
    heartbeat = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    worker = {"birth": heartbeat, "last_heartbeat": heartbeat, "queues": QUEUE, "state": "busy"}
    redis_conn.hset("rq:worker:w-gone", mapping=worker)
    policy = tmp_path / "policy.yaml"
    write_policy(policy, "fail")
    metrics = tmp_path / "opsctl.prom"
    process = watch(
        str(policy), "--every", "1s", "--redis-url", redis_url, "--reconnect-grace", "3",
        "--lock-timeout", "0", "--metrics-file", str(metrics),
    )  # fmt: skip
    assert wait_until(
        lambda: read_metrics(metrics).get("opsctl_last_run_exit_code") == 5,
        timeout=ROUND_TIMEOUT_S,
    ), logs(tmp_path)
    after_first = metrics.read_text()
    time.sleep(2)  # the next round is looking again at the worker

    assert stop(process) == 0, logs(tmp_path)

    assert "round stopped" in logs(tmp_path)
    # No success was recorded for the round the signal cut short.
    assert metrics.read_text() == after_first
    assert read_metrics(metrics)["opsctl_last_success_timestamp_seconds"] == 0


def test_watch_survives_a_redis_restart_and_shows_it_in_the_metrics(
    tmp_path: Path, watch: Any
) -> None:
    server = start_redis_server(tmp_path)
    policy = tmp_path / "policy.yaml"
    write_policy(policy, "fail")
    metrics = tmp_path / "opsctl.prom"
    process = watch(
        str(policy), "--every", "1s", "--redis-url", server.url, "--timeout", "2",
        "--metrics-file", str(metrics),
    )  # fmt: skip
    try:
        assert wait_until(
            lambda: read_metrics(metrics).get("opsctl_last_run_exit_code") == 0,
            timeout=ROUND_TIMEOUT_S,
        ), logs(tmp_path)
        first_success = read_metrics(metrics)["opsctl_last_success_timestamp_seconds"]

        terminate(server.process)
        assert wait_until(
            lambda: read_metrics(metrics).get("opsctl_last_run_exit_code") == 3,
            timeout=ROUND_TIMEOUT_S,
        ), logs(tmp_path)
        during = read_metrics(metrics)
        assert during["opsctl_last_success_timestamp_seconds"] >= first_success
        assert (
            during["opsctl_last_run_timestamp_seconds"]
            > (during["opsctl_last_success_timestamp_seconds"])
        )
        assert process.poll() is None, logs(tmp_path)

        server = start_redis_server(tmp_path, port=server.port)
        assert wait_until(
            lambda: read_metrics(metrics).get("opsctl_last_run_exit_code") == 0,
            timeout=ROUND_TIMEOUT_S,
        ), logs(tmp_path)
        conn = server.client()
        seed_abandoned(conn, 1)
        assert wait_until(
            lambda: FailedJobRegistry(QUEUE, connection=conn).get_job_ids(cleanup=False),
            timeout=ROUND_TIMEOUT_S,
        ), logs(tmp_path)
        conn.close()

        assert stop(process) == 0, logs(tmp_path)
        assert "round failed, exit_code=3" in logs(tmp_path)
    finally:
        terminate(server.process)


def test_watch_with_an_invalid_policy_or_interval_exits_2_at_once(
    redis_url: str, tmp_path: Path, watch: Any
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 2\n")
    good = tmp_path / "good.yaml"
    write_policy(good, "fail")

    for args in ((str(bad), "--every", "1s"), (str(good), "--every", "0s")):
        process = watch(*args, "--redis-url", redis_url)
        assert process.wait(timeout=EXIT_TIMEOUT_S) == 2, logs(tmp_path)
        assert "Traceback" not in logs(tmp_path)


def test_a_round_stopped_while_it_waits_for_the_run_lock_is_no_failure_in_the_metrics(
    tmp_path: Path, redis_url: str, watch: Any
) -> None:
    conn = redis.Redis.from_url(redis_url)
    conn.set("opsctl:lock", "another run", ex=300)
    policy = tmp_path / "policy.yaml"
    write_policy(policy, "fail")
    metrics = tmp_path / "opsctl.prom"
    process = watch(
        str(policy), "--every", "1h", "--redis-url", redis_url, "--lock-timeout", "600",
        "--metrics-file", str(metrics),
    )  # fmt: skip
    polling = wait_until(
        lambda: any(c.get("cmd") == "set" for c in conn.client_list()), timeout=ROUND_TIMEOUT_S
    )
    assert polling, logs(tmp_path)

    assert stop(process) == 0, logs(tmp_path)
    # A shutdown is not a lock held too long, nor a success: the round records nothing.
    assert read_metrics(metrics) == {}, logs(tmp_path)
    assert "round stopped: asked to stop while waiting for the run lock" in logs(tmp_path)
    assert conn.get("opsctl:lock") == b"another run"
    conn.close()


def test_a_round_stopped_while_it_reads_redis_is_no_failure_and_leaves_no_lock(
    tmp_path: Path, redis_url: str, redis_conn: redis.Redis, watch: Any
) -> None:
    ids = seed_abandoned(redis_conn, 3)
    job_hashes(redis_conn, 100_000, QUEUE)  # the walk for lost jobs takes many pages
    policy = tmp_path / "policy.yaml"
    write_policy(policy, "fail")
    metrics = tmp_path / "opsctl.prom"
    process = watch(str(policy), "--every", "1h", "--redis-url", redis_url,
                    "--metrics-file", str(metrics))  # fmt: skip
    # The run lock is taken just before the reads begin; Redis then answers
    # nobody for 3 s, so the signal comes while the round is still reading.
    assert wait_until(lambda: redis_conn.exists("opsctl:lock") == 1, timeout=ROUND_TIMEOUT_S)
    redis_conn.execute_command("CLIENT", "PAUSE", "3000", "ALL")

    assert stop(process) == 0, logs(tmp_path)
    assert read_metrics(metrics) == {}, logs(tmp_path)  # neither a failure nor a success
    assert "round stopped: asked to stop while reading Redis" in logs(tmp_path)
    assert redis_conn.exists("opsctl:lock", "opsctl:audit") == 0
    assert all(job_status(redis_conn, job_id) == "started" for job_id in ids)


def test_a_second_signal_stops_watch_at_once_while_redis_does_not_answer(
    tmp_path: Path, redis_url: str, redis_conn: redis.Redis, watch: Any
) -> None:
    seed_abandoned(redis_conn, 3)
    job_hashes(redis_conn, 100_000, QUEUE)  # the walk for lost jobs takes many pages
    policy = tmp_path / "policy.yaml"
    write_policy(policy, "fail")
    process = watch(str(policy), "--every", "1h", "--redis-url", redis_url, "--timeout", "60")
    assert wait_until(lambda: redis_conn.exists("opsctl:lock") == 1, timeout=ROUND_TIMEOUT_S)
    redis_conn.execute_command("CLIENT", "PAUSE", "15000", "ALL")  # answers nobody for 15s
    paused_until = time.monotonic() + 15
    try:
        process.send_signal(signal.SIGTERM)  # waits for the round, which waits for Redis
        time.sleep(1)
        asked = time.monotonic()
        code = stop(process)
        took = time.monotonic() - asked
    finally:
        # The pause outlasts the test: the next one's server must answer again.
        time.sleep(max(0.0, paused_until - time.monotonic()) + 0.5)

    assert code == 143, logs(tmp_path)
    assert "stopping at once" in logs(tmp_path)
    assert took < 10, f"took {took:.0f}s after the second signal"  # not the 15s pause


@pytest.mark.parametrize("output", ["text", "json"])
def test_watch_goes_on_cleaning_when_the_reader_of_its_reports_goes_away(
    tmp_path: Path, redis_url: str, redis_conn: redis.Redis, output: str
) -> None:
    # `opsctl watch ... | head -1`: the reports go nowhere after, the cleaning goes on.
    policy = tmp_path / "policy.yaml"
    write_policy(policy, "fail")
    metrics = tmp_path / "opsctl.prom"
    argv = [str(policy), "--every", "1s", "--redis-url", redis_url, "--format", output]
    with (tmp_path / "opsctl.err").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "opsctl", "watch", *argv, "--metrics-file", str(metrics)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
            env=opsctl_env(),
        )  # fmt: skip
    try:
        assert process.stdout is not None
        process.stdout.readline()
        process.stdout.close()  # the reader goes away
        ids = seed_abandoned(redis_conn, 3)  # stuck after the reader left

        cleaned = wait_until(
            lambda: all(job_status(redis_conn, i) == "failed" for i in ids),
            timeout=ROUND_TIMEOUT_S,
        )
        alive = process.poll() is None
    finally:
        code = stop(process)

    err = (tmp_path / "opsctl.err").read_text()
    assert cleaned and alive, err
    assert code == 0, err
    assert err.count("the output's reader went away") == 1
    assert "Traceback" not in err


def test_watch_takes_back_the_locks_it_left_when_redis_did_not_answer(
    tmp_path: Path, redis_url: str, redis_conn: redis.Redis, watch: Any
) -> None:
    # A round that met a server answering nobody leaves its locks to expire (60s);
    # the next round, in the same process, takes them back instead of waiting.
    job_hashes(redis_conn, 100_000, QUEUE)  # each round's walk takes many pages
    policy = tmp_path / "policy.yaml"
    write_policy(policy, "fail")
    process = watch(str(policy), "--every", "1s", "--redis-url", redis_url, "--timeout", "1",
                    "--lock-timeout", "1")  # fmt: skip
    assert wait_until(lambda: redis_conn.exists("opsctl:lock") == 1, timeout=ROUND_TIMEOUT_S)
    redis_conn.execute_command("CLIENT", "PAUSE", "3000", "ALL")
    assert wait_until(lambda: "left to expire" in logs(tmp_path), timeout=ROUND_TIMEOUT_S)
    ids = seed_abandoned(redis_conn, 3)  # answered once the pause is over

    cleaned = wait_until(
        lambda: all(job_status(redis_conn, i) == "failed" for i in ids), timeout=30
    )

    assert cleaned, logs(tmp_path)  # well before the 60s the locks were left for
    assert stop(process) == 0, logs(tmp_path)
