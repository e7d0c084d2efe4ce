"""The fixtures reproduce what the end-to-end tests rely on: real workers, real crashes."""

from __future__ import annotations

from pathlib import Path

import redis
from rq import Queue
from rq.registry import StartedJobRegistry

from conftest import WorkerFactory, numsub, wait_for_status, wait_until


def test_killed_worker_leaves_its_job_started_with_a_registry_entry(
    rq_workers: WorkerFactory, redis_conn: redis.Redis
) -> None:
    worker = rq_workers.start(["fixtures"])
    job = Queue("fixtures", connection=redis_conn).enqueue("jobs.sleep_for", 30)
    assert wait_for_status(redis_conn, job.id, "started", timeout=10) == "started"

    horses = worker.kill()

    assert len(horses) == 1, "the work horse was found and killed with its worker"
    assert not worker.running()
    assert numsub(redis_conn, worker.name) == 0
    assert redis_conn.exists(f"rq:worker:{worker.name}"), "the dead worker's hash lingers"
    assert wait_for_status(redis_conn, job.id, "started", timeout=0) == "started"
    registry = StartedJobRegistry("fixtures", connection=redis_conn)
    assert [pair[0] for pair in registry.get_job_and_execution_ids(cleanup=False)] == [job.id]


def test_worker_runs_jobs_from_the_tests_module_to_the_end(
    rq_workers: WorkerFactory, redis_conn: redis.Redis
) -> None:
    rq_workers.start(["fixtures"])
    queue = Queue("fixtures", connection=redis_conn)
    done = queue.enqueue("jobs.quick")
    failing = queue.enqueue("jobs.boom")

    assert wait_for_status(redis_conn, done.id, "finished", timeout=10) == "finished"
    assert wait_for_status(redis_conn, failing.id, "failed", timeout=10) == "failed"
    result = failing.latest_result()
    assert result is not None and "boom" in (result.exc_string or "")


def test_forking_worker_works_against_fakeredis_over_tcp(
    fake_redis_url: str, tmp_path: Path
) -> None:
    conn = redis.Redis.from_url(fake_redis_url)
    factory = WorkerFactory(redis_url=fake_redis_url, log_dir=tmp_path)
    try:
        factory.start(["fake"])
        job = Queue("fake", connection=conn).enqueue("jobs.sleep_for", 0.2)
        assert wait_for_status(conn, job.id, "finished", timeout=10) == "finished"
        result = job.latest_result()
        assert result is not None and result.return_value == "slept 0.2s"
    finally:
        factory.close()
        conn.close()


def test_wait_until_gives_up_after_the_timeout() -> None:
    assert wait_until(lambda: False, timeout=0.1) is False
    assert wait_until(lambda: True, timeout=0) is True
