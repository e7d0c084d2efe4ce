"""opsctl against real workers of every RQ release it supports: 1.16, the latest 2.x, 3.x.

For each release, real `rq worker` processes of that release (from its own cached
virtual environment, see rq_versions.py) run jobs against a private redis-server and
are made to leave stuck jobs behind. opsctl, from the main environment, cleans up. The
outcome is then read by that release's own API (rq_checker.py run by its interpreter):
the job's status, its registries, its failure result, and a worker of that release
running a requeued or released job to the end.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq_versions import COMPAT_DIR, VERSIONS, RQEnv, rq_env

from conftest import WorkerFactory, WorkerProcess, clean_env, run_opsctl, wait_until_watched

pytestmark = pytest.mark.redis_server

CHECKER = COMPAT_DIR / "rq_checker.py"

#: Seconds a job may take to reach the status a test waits for.
STATUS_TIMEOUT_S = 20

#: Result.Type.FAILED in every release.
RESULT_FAILED = 2


@pytest.fixture(scope="module", params=VERSIONS, ids=lambda v: f"rq{v}")
def release(request: pytest.FixtureRequest) -> RQEnv:
    """One RQ release's environment; tests run grouped by release."""
    return rq_env(request.param)


# --- talking to a release ----------------------------------------------------------------


#: One checker process per release, serving the whole session (starting Python and
#: importing RQ for every question would take most of the matrix's time).
_checkers: dict[str, subprocess.Popen[str]] = {}


@pytest.fixture(scope="session", autouse=True)
def _stop_checkers() -> Iterator[None]:
    yield
    for process in _checkers.values():
        if process.stdin:
            process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def check(release: RQEnv, *args: str) -> dict[str, Any]:
    """Ask the checker running under ``release``'s interpreter; its JSON answer."""
    process = _checkers.get(release.version)
    if process is None or process.poll() is not None:
        process = subprocess.Popen(
            [str(release.python), str(CHECKER), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        _checkers[release.version] = process
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(json.dumps(list(args)) + "\n")
    process.stdin.flush()
    reply = process.stdout.readline()
    assert reply, f"the rq {release.version} checker exited ({process.poll()})"
    answer: dict[str, Any] = json.loads(reply)
    assert "error" not in answer, f"rq {release.version} checker: {answer['error']}"
    assert answer["rq"] == release.version
    return answer


def enqueue(release: RQEnv, url: str, queue: str, func: str, *values: Any, **opts: Any) -> str:
    """Enqueue ``jobs.<func>(*values)`` with ``release``'s API; the job id."""
    args = [url, queue, f"jobs.{func}", *(json.dumps(v) for v in values)]
    for name, value in opts.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        else:
            for one in value if isinstance(value, list) else [value]:
                args += [flag, str(one)]
    return str(check(release, "enqueue", *args)["id"])


def state(release: RQEnv, url: str, job_id: str, queue: str | None = None) -> dict[str, Any]:
    return check(release, "state", url, job_id, *(["--queue", queue] if queue else []))


def wait_status(release: RQEnv, url: str, job_id: str, status: str) -> dict[str, Any]:
    """Wait until ``release`` sees the job with ``status``; the last state it saw."""
    return check(release, "wait", url, job_id, status, "--timeout", str(STATUS_TIMEOUT_S))


def start_worker(
    rq_workers: WorkerFactory, release: RQEnv, queues: list[str], *extra: str
) -> WorkerProcess:
    return rq_workers.start(queues, rq_command=release.rq_command, extra=list(extra))


#: The job a test starts unless it names another: ``jobs.sleep_for(60)``.
SLEEP = ("sleep_for", 60)


def started_job(
    rq_workers: WorkerFactory,
    release: RQEnv,
    url: str,
    queue: str,
    *extra: str,
    call: tuple[Any, ...] = SLEEP,
    **opts: Any,
) -> tuple[WorkerProcess, str]:
    """A worker of ``release`` (started with ``extra``) running ``jobs.<call>`` on ``queue``;
    ``opts`` are enqueue options."""
    worker = start_worker(rq_workers, release, [queue], *extra)
    job_id = enqueue(release, url, queue, *call, **opts)
    seen = wait_status(release, url, job_id, "started")
    assert seen["status"] == "started", seen
    return worker, job_id


def abandoned_job(
    rq_workers: WorkerFactory,
    release: RQEnv,
    url: str,
    queue: str,
    call: tuple[Any, ...] = SLEEP,
    **opts: Any,
) -> str:
    """A job whose worker and work horse of ``release`` were SIGKILLed while it ran."""
    worker, job_id = started_job(rq_workers, release, url, queue, call=call, **opts)
    assert worker.kill(), "the worker had a work horse running the job"
    return job_id


# --- running opsctl ----------------------------------------------------------------------


def write_policy(tmp_path: Path, actions: dict[str, str], max_age: str = "10m") -> Path:
    """A policy giving each queue in ``actions`` its action."""
    lines = ["version: 1", "defaults:", f"  max_age: {max_age}", "queues:"]
    for queue, action in actions.items():
        lines += [f"  - name: {queue}", f"    action: {action}"]
    path = tmp_path / f"policy-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def apply(policy: Path, url: str) -> dict[str, Any]:
    result = run_opsctl("apply", str(policy), "--redis-url", url, "--format", "json")
    assert result.returncode == 0, f"opsctl exited {result.returncode}\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def line_of(report: dict[str, Any], job_id: str) -> dict[str, Any]:
    lines = [line for line in report["jobs"] if line["id"] == job_id]
    assert len(lines) == 1, json.dumps(report, indent=2)
    return lines[0]


def assert_done(report: dict[str, Any], job_id: str, state_: str, action: str) -> None:
    line = line_of(report, job_id)
    got = (line["state"], line["action"], line["outcome"])
    assert got == (state_, action, "done"), json.dumps(line, indent=2)


# --- abandoned: worker and work horse SIGKILLed mid-job ----------------------------------


def test_failed_abandoned_job_reads_as_failed_with_opsctls_reason_and_releases_dependents(
    release: RQEnv, rq_workers: WorkerFactory, redis_url: str, tmp_path: Path
) -> None:
    queue = "compat-fail"
    first_time = ("sleep_first_time", str(tmp_path / "ran-once"), 60)
    job_id = abandoned_job(rq_workers, release, redis_url, queue, first_time)
    tolerant = enqueue(release, redis_url, queue, "quick", depends_on=job_id, allow_failure=True)
    strict = enqueue(release, redis_url, queue, "quick", depends_on=job_id)
    # A second parent that no worker has run yet keeps this one deferred.
    waiting = enqueue(release, redis_url, "compat-idle", "quick")
    two_parents = enqueue(
        release, redis_url, queue, "quick", depends_on=[job_id, waiting], allow_failure=True
    )

    report = apply(write_policy(tmp_path, {queue: "fail"}), redis_url)

    assert_done(report, job_id, "abandoned", "fail")
    seen = state(release, redis_url, job_id)
    assert seen["status"] == "failed", seen
    assert seen["registries"] == ["failed"], seen
    assert "Failed by opsctl" in (seen["exc_info"] or ""), seen
    result = seen["latest_result"]
    assert result is not None and result["type"] == RESULT_FAILED, seen
    assert "Failed by opsctl" in (result["exc_string"] or ""), seen

    # The dependent that allows its parent to fail is released, in a form this
    # release's worker runs; the other stays deferred.
    assert state(release, redis_url, strict)["registries"] == ["deferred"]
    assert state(release, redis_url, two_parents)["registries"] == ["deferred"]
    seen = state(release, redis_url, tolerant)
    assert (seen["status"], seen["in_queue"]) == ("queued", True), seen
    start_worker(rq_workers, release, [queue])
    seen = wait_status(release, redis_url, tolerant, "finished")
    assert seen["status"] == "finished", seen
    assert seen["latest_result"]["return_value"] == "done", seen
    assert state(release, redis_url, strict)["status"] == "deferred"
    assert state(release, redis_url, two_parents)["status"] == "deferred"

    # The failed job is retried the way this release's users retry one (the running
    # worker takes it at once), and runs to the end.
    check(release, "retry-failed", redis_url, job_id)
    seen = wait_status(release, redis_url, job_id, "finished")
    assert (seen["status"], seen["registries"]) == ("finished", ["finished"]), seen
    assert seen["latest_result"]["return_value"] == "ran again", seen


def test_requeued_abandoned_job_is_run_to_the_end_by_a_worker_of_the_same_release(
    release: RQEnv, rq_workers: WorkerFactory, redis_url: str, tmp_path: Path
) -> None:
    queue = "compat-requeue"
    job_id = abandoned_job(rq_workers, release, redis_url, queue, ("sleep_for", 1.5))

    report = apply(write_policy(tmp_path, {queue: "requeue"}), redis_url)

    assert_done(report, job_id, "abandoned", "requeue")
    seen = state(release, redis_url, job_id)
    assert (seen["status"], seen["in_queue"], seen["registries"]) == ("queued", True, []), seen
    start_worker(rq_workers, release, [queue])
    seen = wait_status(release, redis_url, job_id, "finished")
    assert seen["status"] == "finished", seen
    assert seen["latest_result"]["return_value"] == "slept 1.5s", seen
    assert seen["registries"] == ["finished"], seen


def test_canceled_abandoned_job_reads_as_canceled(
    release: RQEnv, rq_workers: WorkerFactory, redis_url: str, tmp_path: Path
) -> None:
    queue = "compat-cancel"
    job_id = abandoned_job(rq_workers, release, redis_url, queue)

    report = apply(write_policy(tmp_path, {queue: "cancel"}), redis_url)

    assert_done(report, job_id, "abandoned", "cancel")
    seen = state(release, redis_url, job_id)
    assert (seen["status"], seen["registries"], seen["in_queue"]) == (
        "canceled",
        ["canceled"],
        False,
    )


def test_deleted_abandoned_job_is_gone_for_its_release(
    release: RQEnv,
    rq_workers: WorkerFactory,
    redis_url: str,
    redis_conn: redis.Redis,
    tmp_path: Path,
) -> None:
    queue = "compat-delete"
    job_id = abandoned_job(rq_workers, release, redis_url, queue)

    report = apply(write_policy(tmp_path, {queue: "delete"}), redis_url)

    assert_done(report, job_id, "abandoned", "delete")
    seen = state(release, redis_url, job_id, queue=queue)
    assert (seen["exists"], seen["registries"], seen["in_queue"]) == (False, [], False), seen
    leftovers = [k for k in redis_conn.scan_iter(count=1000) if job_id.encode() in k]
    assert leftovers == [], "no key names the deleted job"


# --- leftover and orphaned entries -------------------------------------------------------


def stale_member(release: RQEnv, job_id: str) -> str:
    """A started-registry member in the form ``release`` writes."""
    return job_id if release.major < 2 else f"{job_id}:{uuid.uuid4().hex}"


def test_entries_of_ended_and_missing_jobs_are_removed_and_ended_jobs_keep_their_results(
    release: RQEnv,
    rq_workers: WorkerFactory,
    redis_url: str,
    redis_conn: redis.Redis,
    tmp_path: Path,
) -> None:
    queue = "compat-leftover"
    start_worker(rq_workers, release, [queue])
    finished = enqueue(release, redis_url, queue, "quick")
    failed = enqueue(release, redis_url, queue, "boom")
    assert wait_status(release, redis_url, finished, "finished")["status"] == "finished"
    assert wait_status(release, redis_url, failed, "failed")["status"] == "failed"
    missing = str(uuid.uuid4())
    # What a worker that died between its bookkeeping steps leaves: entries whose job
    # ended, or whose hash is gone, with a lease that has not run out yet.
    lease_end = time.time() + 600
    for job_id in (finished, failed, missing):
        redis_conn.zadd(f"rq:wip:{queue}", {stale_member(release, job_id): lease_end})
    assert state(release, redis_url, finished)["registries"] == ["started", "finished"]

    report = apply(write_policy(tmp_path, {queue: "fail"}), redis_url)

    assert_done(report, finished, "leftover", "remove-entry")
    assert_done(report, failed, "leftover", "remove-entry")
    assert_done(report, missing, "orphaned", "remove-entry")
    seen = state(release, redis_url, finished)
    assert (seen["status"], seen["registries"]) == ("finished", ["finished"]), seen
    assert seen["latest_result"]["return_value"] == "done", seen
    seen = state(release, redis_url, failed)
    assert (seen["status"], seen["registries"]) == ("failed", ["failed"]), seen
    assert "boom" in seen["latest_result"]["exc_string"], seen
    assert "opsctl" not in seen["latest_result"]["exc_string"], seen
    assert state(release, redis_url, missing, queue=queue)["registries"] == []


# --- overdue: a live worker runs a job past max_age --------------------------------------


@pytest.mark.parametrize("action", ["fail", "requeue", "cancel", "delete"])
def test_overdue_job_is_stopped_by_its_live_worker_of_any_release(
    action: str, release: RQEnv, rq_workers: WorkerFactory, redis_url: str, tmp_path: Path
) -> None:
    queue = f"compat-overdue-{action}"
    # After a requeue the worker would take the job again; one job and it exits instead.
    extra = ["--max-jobs", "1"] if action == "requeue" else []
    worker, job_id = started_job(rq_workers, release, redis_url, queue, *extra)
    with redis.Redis.from_url(redis_url) as conn:
        wait_until_watched(conn, job_id)  # and so past max_age 1s

    report = apply(write_policy(tmp_path, {queue: action}, max_age="1s"), redis_url)

    line = line_of(report, job_id)
    assert (line["state"], line["outcome"], line["stop_confirmed"]) == ("overdue", "done", True), (
        json.dumps(line, indent=2)
    )
    seen = state(release, redis_url, job_id, queue=queue)
    if action != "requeue":
        assert worker.running(), "stopping a job leaves its worker running"
    expected = {
        # RQ files a stopped job as failed itself; opsctl adds nothing.
        "fail": {"status": "stopped", "registries": ["failed"], "in_queue": False},
        "requeue": {"status": "queued", "registries": [], "in_queue": True},
        "cancel": {"status": "canceled", "registries": ["canceled"], "in_queue": False},
        "delete": {"exists": False, "registries": [], "in_queue": False},
    }[action]
    assert {k: seen.get(k) for k in expected} == expected, seen


# --- retries ------------------------------------------------------------------------------


def test_failed_abandoned_job_with_retries_left_is_retried_by_a_worker_of_its_release(
    release: RQEnv, rq_workers: WorkerFactory, redis_url: str, tmp_path: Path
) -> None:
    queue = "compat-retry"
    first_time = ("sleep_first_time", str(tmp_path / "ran-once"), 60)
    job_id = abandoned_job(rq_workers, release, redis_url, queue, first_time, retry=2)

    report = apply(write_policy(tmp_path, {queue: "fail"}), redis_url)

    assert_done(report, job_id, "abandoned", "fail")
    seen = state(release, redis_url, job_id)
    assert (seen["status"], seen["in_queue"], seen["retries_left"]) == ("queued", True, 1), seen
    start_worker(rq_workers, release, [queue])
    seen = wait_status(release, redis_url, job_id, "finished")
    assert seen["status"] == "finished", seen
    assert seen["latest_result"]["return_value"] == "ran again", seen


# --- RQ 1 job ids ------------------------------------------------------------------------


def test_rq1_job_id_with_colons_is_one_id_not_an_execution(
    rq_workers: WorkerFactory, redis_url: str, tmp_path: Path
) -> None:
    # RQ 1 accepts any job id, so its bare-id registry members can hold colons; RQ 2+
    # refuses such ids, and its members are job_id:execution_id.
    release = rq_env(VERSIONS[0])
    queue = "compat-colon"
    job_id = f"report:{uuid.uuid4().hex[:8]}:42"
    assert abandoned_job(rq_workers, release, redis_url, queue, job_id=job_id) == job_id
    tolerant = enqueue(release, redis_url, queue, "quick", depends_on=job_id, allow_failure=True)

    report = apply(write_policy(tmp_path, {queue: "fail"}), redis_url)

    line = line_of(report, job_id)
    assert (line["state"], line["execution_id"], line["outcome"]) == ("abandoned", None, "done")
    assert "dependents not enqueued" not in line["reason"], line
    seen = state(release, redis_url, job_id)
    assert (seen["status"], seen["registries"]) == ("failed", ["failed"]), seen
    seen = state(release, redis_url, tolerant)
    assert (seen["status"], seen["in_queue"], seen["registries"]) == ("queued", True, []), seen


# --- a job run again by an RQ 2 worker ---------------------------------------------------


def test_dead_run_of_a_job_an_rq2_worker_runs_again_is_removed_and_the_new_run_kept(
    rq_workers: WorkerFactory, redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # An RQ 2 worker names only the job it runs (current_job), not the execution: the
    # dead run's entry is told apart by its own execution record, which names its worker.
    release = rq_env(VERSIONS[1])
    queue = "compat-rerun"
    job_id = abandoned_job(rq_workers, release, redis_url, queue)
    [dead_entry] = redis_conn.zrange(f"rq:wip:{queue}", 0, -1)
    # Enqueued again under the same id (as a scheduler does) and taken by a new worker.
    assert enqueue(release, redis_url, queue, *SLEEP, job_id=job_id) == job_id
    start_worker(rq_workers, release, [queue])
    assert wait_status(release, redis_url, job_id, "started")["status"] == "started"
    assert redis_conn.zcard(f"rq:wip:{queue}") == 2

    report = apply(write_policy(tmp_path, {queue: "fail"}), redis_url)

    lines = {line["entry"]: line for line in report["jobs"] if line["id"] == job_id}
    dead = lines.pop(dead_entry.decode())
    assert (dead["state"], dead["action"], dead["outcome"]) == (
        "leftover",
        "remove-entry",
        "done",
    ), dead["reason"]
    [(new_entry, new_run)] = lines.items()
    assert (new_run["state"], new_run["outcome"]) == ("running", "kept"), new_run
    seen = state(release, redis_url, job_id)
    assert (seen["status"], seen["registries"]) == ("started", ["started"]), seen
    assert redis_conn.zrange(f"rq:wip:{queue}", 0, -1) == [new_entry.encode()]


# --- all three releases on one Redis ------------------------------------------------------


def test_one_run_cleans_a_database_that_workers_of_all_three_releases_share(
    rq_workers: WorkerFactory, redis_url: str, tmp_path: Path
) -> None:
    """A rolling upgrade: each release has a queue of its own, and all share one queue."""
    releases = [rq_env(v) for v in VERSIONS]
    shared = "mixed-shared"
    own: dict[str, str] = {}
    for r in releases:
        own[r.version] = abandoned_job(rq_workers, r, redis_url, f"mixed-{r.major}")
    shared_workers = [start_worker(rq_workers, r, [shared]) for r in releases]
    enqueued: dict[str, str] = {}
    for r in releases:
        marker = str(tmp_path / f"ran-{r.major}")
        enqueued[r.version] = enqueue(r, redis_url, shared, "sleep_first_time", marker, 60)
    for r in releases:
        assert wait_status(r, redis_url, enqueued[r.version], "started")["status"] == "started"
    for worker in shared_workers:
        assert worker.kill()

    actions = {f"mixed-{r.major}": "fail" for r in releases} | {shared: "requeue"}
    report = apply(write_policy(tmp_path, actions), redis_url)

    # Each worker on the shared queue ran one job: one RQ 1 bare-id entry, two RQ 2/3 ones.
    shared_lines = [line for line in report["jobs"] if line["queue"] == shared]
    forms = sorted(line["execution_id"] is None for line in shared_lines)
    assert forms == [False, False, True], json.dumps(shared_lines, indent=2)
    for r in releases:
        assert_done(report, own[r.version], "abandoned", "fail")
        seen = state(r, redis_url, own[r.version])
        assert (seen["status"], seen["registries"]) == ("failed", ["failed"]), seen
        assert "Failed by opsctl" in seen["latest_result"]["exc_string"], seen
        assert_done(report, enqueued[r.version], "abandoned", "requeue")
        seen = state(r, redis_url, enqueued[r.version])
        assert (seen["status"], seen["in_queue"], seen["registries"]) == ("queued", True, []), seen
    # A worker of each release serves the shared queue again; whichever takes a job runs
    # it to the end, and the release that enqueued it sees it finished.
    for r in releases:
        start_worker(rq_workers, r, [shared])
    for r in releases:
        seen = wait_status(r, redis_url, enqueued[r.version], "finished")
        assert seen["status"] == "finished", seen
        assert seen["latest_result"]["return_value"] == "ran again", seen
