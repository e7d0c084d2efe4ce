"""opsctl under least privilege: each command with only the Redis ACL rules the docs give it.

This module starts its own redis-server (7.0 or later: `%R~` needs it) on 127.0.0.1 and a
free port, with persistence off. It creates an admin user for the tests' own setup, turns
the `default` user off, and creates `opsctl-status`, `opsctl-dryrun` and `opsctl-apply` by
running the exact `ACL SETUSER` lines of the README's "Least privilege: Redis ACLs" section.
Abandoned jobs are made with RQ's own API, in the name of a worker
that has no hash. Each test runs the real CLI with one user's URL, then checks the outcome
through RQ's API and the server's `ACL LOG`: an empty log proves that no command was
refused, not even one that opsctl would have shrugged off with a warning.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis
from rq import Queue, Retry, Worker
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Dependency, Job
from rq.registry import CanceledJobRegistry, FailedJobRegistry, StartedJobRegistry

from conftest import (
    SHARED_REDIS_PORT,
    STARTUP_TIMEOUT_S,
    WorkerFactory,
    free_port,
    job_status,
    run_opsctl,
    terminate,
    wait_for_status,
    wait_until,
    wait_until_watched,
)
from opsctl.errors import ExitCode

pytestmark = pytest.mark.redis_server

ROOT = Path(__file__).resolve().parents[1]

#: The password placeholder of the documented lines; each test run uses random ones.
PLACEHOLDER = ">CHANGE_ME"

#: The documented ACL lines, verbatim. Each user can also run what the users above it run.
ACL_LINES = {
    "opsctl-status": (
        "ACL SETUSER opsctl-status reset on >CHANGE_ME resetchannels %R~rq:* "
        "+ping +client|setname +time +scan +smembers +zrange +zcard +hmget +exists +ttl "
        "+llen +pubsub|numsub +client|list +eval_ro +evalsha_ro +info"
    ),
    "opsctl-dryrun": (
        "ACL SETUSER opsctl-dryrun reset on >CHANGE_ME resetchannels "
        "%R~rq:* %R~opsctl:rescues:* %R~opsctl:lost:* "
        "+ping +client|setname +time +scan +smembers +zrange +zcard +hmget +exists +ttl "
        "+llen +pubsub|numsub +client|list +eval_ro +evalsha_ro +get +info "
        "+lrange +lpos +zscore +hgetall"
    ),
    "opsctl-apply": (
        "ACL SETUSER opsctl-apply reset on >CHANGE_ME resetchannels "
        "~rq:* ~opsctl:* &rq:pubsub:* "
        "+ping +client|setname +time +scan +smembers +zrange +zcard +hmget +exists +ttl "
        "+llen +pubsub|numsub +client|list +eval_ro +evalsha_ro +get +info "
        "+lrange +lpos +zscore +hgetall "
        "+type +hget +hgetall +xrevrange +set +evalsha +script|load +script|exists "
        "+publish +xadd +del +zrem +zadd +zscore +srem +sadd +scard +hset +hexists "
        "+lpush +rpush +lrem +expire +persist +incr +watch +unwatch +multi +exec"
    ),
}
STATUS_USER, DRYRUN_USER, APPLY_USER = ACL_LINES

#: The tests' own user, for building and checking Redis state; opsctl never gets it.
ADMIN_USER = "opsctl-test-admin"

QUEUE = "acl"
#: A worker name with no worker hash: RQ and opsctl both count it as dead.
DEAD_WORKER = "dead-worker"
#: Seconds an abandoned job's execution lease lasts.
LEASE_S = 600

#: Every exit code opsctl documents.
DOCUMENTED_EXIT_CODES = {int(code) for code in ExitCode}


# --- the server and its users -------------------------------------------------------------


@dataclass
class AclServer:
    """A redis-server this module started, with the documented opsctl users."""

    port: int
    process: subprocess.Popen[bytes]
    passwords: dict[str, str]

    def url(self, user: str) -> str:
        """The URL that logs in as `user` (the password goes in the URL, as documented)."""
        return f"redis://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/0"

    def opsctl(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`opsctl ARGS`, logged in as `user`."""
        return run_opsctl(*args, "--redis-url", self.url(user))

    def add_user(self, user: str, line: str) -> None:
        """Create `user` from an `ACL SETUSER` line with the placeholder password."""
        self.passwords[user] = secrets.token_hex(16)
        args = line.replace(PLACEHOLDER, f">{self.passwords[user]}").split()
        assert args[:3] == ["ACL", "SETUSER", user], line
        with redis.Redis.from_url(self.url(ADMIN_USER)) as admin:
            admin.execute_command(*args)


def _cannot_run(why: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the ACL tests: {why}", pytrace=False)
    pytest.skip(why)


def _redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        _cannot_run("redis-server is not installed; the real-Redis tests need it")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    major = re.search(r"v=(\d+)\.", version)
    if major is None or int(major.group(1)) < 7:
        _cannot_run(f"the ACL rules need redis-server 7 or later, not {version.strip()!r}")
    return binary


def _start(binary: str, data_dir: Path) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    assert port != SHARED_REDIS_PORT
    command = [binary, "--bind", "127.0.0.1", "--port", str(port)]
    command += ["--save", "", "--appendonly", "no", "--dir", str(data_dir)]
    command += ["--logfile", str(data_dir / f"redis-{port}.log")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        if process.poll() is not None:
            return True
        try:
            with redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5) as probe:
                return bool(probe.ping())
        except redis.RedisError:
            return False

    if wait_until(answers, timeout=STARTUP_TIMEOUT_S) and process.poll() is None:
        return port, process
    terminate(process)
    raise RuntimeError(f"redis-server on port {port} did not start")


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    """A private redis-server whose only users are the tests' admin and opsctl's three."""
    binary = _redis_server_binary()
    data_dir = tmp_path_factory.mktemp("acl-redis")
    for _ in range(3):  # a port picked as free can be taken before redis-server binds it
        try:
            port, process = _start(binary, data_dir)
            break
        except RuntimeError:
            continue
    else:
        raise RuntimeError("could not start a private redis-server")

    server = AclServer(port, process, {ADMIN_USER: secrets.token_hex(16)})
    try:
        with redis.Redis(host="127.0.0.1", port=port) as first:
            first.execute_command(
                "ACL", "SETUSER", ADMIN_USER, "reset", "on", f">{server.passwords[ADMIN_USER]}"
            )
            first.execute_command("ACL", "SETUSER", ADMIN_USER, "~*", "&*", "+@all")
        with redis.Redis.from_url(server.url(ADMIN_USER)) as admin:
            # Nothing may log in without naming a user: not opsctl, not a test.
            admin.execute_command("ACL", "SETUSER", "default", "off")
        for user, line in ACL_LINES.items():
            server.add_user(user, line)
        yield server
    finally:
        terminate(process)


@pytest.fixture
def admin(acl_server: AclServer) -> Iterator[redis.Redis]:
    """The admin's client (bytes replies, as RQ needs); the server emptied, its ACL LOG too."""
    assert acl_server.port != SHARED_REDIS_PORT
    client = redis.Redis.from_url(acl_server.url(ADMIN_USER), decode_responses=False)
    client.flushall()
    client.execute_command("ACL", "LOG", "RESET")
    yield client
    client.close()


def refusals(admin: redis.Redis) -> list[str]:
    """What the server refused since the test began, as `user: reason object` lines."""
    lines = []
    for entry in admin.execute_command("ACL", "LOG"):
        fields = {k.decode(): v for k, v in entry.items()}
        lines.append(
            f"{fields['username'].decode()}: {fields['reason'].decode()} "
            f"{fields['object'].decode()}"
        )
    return lines


def redis_state(conn: redis.Redis) -> dict[bytes, tuple[bytes | None, bool]]:
    """Every key with its DUMP and whether it has a TTL: equal states mean no change."""
    return {key: (conn.dump(key), conn.pttl(key) >= 0) for key in conn.scan_iter(count=1000)}


# --- running opsctl -----------------------------------------------------------------------


def shown(result: subprocess.CompletedProcess[str]) -> str:
    """Everything opsctl printed, for assertion messages."""
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def succeeded(result: subprocess.CompletedProcess[str], admin: redis.Redis) -> None:
    """Exit 0, no refused command (not even a tolerated one), no traceback."""
    assert result.returncode == ExitCode.OK, shown(result)
    assert refusals(admin) == [], shown(result)
    assert "unavailable" not in result.stderr, shown(result)
    assert "Traceback" not in result.stderr, shown(result)


def json_report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def outcomes(report: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """Job id to (state, action, outcome), from a report."""
    return {line["id"]: (line["state"], line["action"], line["outcome"]) for line in report["jobs"]}


def write_policy(tmp_path: Path, action: str = "fail", max_age: str = "10m") -> Path:
    path = tmp_path / f"policy-{action}.yaml"
    lines = ["version: 1", "defaults:", f"  action: {action}", f"  max_age: {max_age}"]
    path.write_text("\n".join([*lines, "queues:", f"  - name: {QUEUE}", ""]))
    return path


# --- building situations with RQ's API ----------------------------------------------------


def abandon(conn: redis.Redis, jobs: list[Job]) -> None:
    """Take `jobs` off their queue and mark them started by a worker that is dead."""
    queue_key = Queue(QUEUE, connection=conn).key
    with conn.pipeline() as pipe:
        for job in jobs:
            Execution.create(job, LEASE_S, pipe, worker_name=DEAD_WORKER)
            job.prepare_for_execution(DEAD_WORKER, pipe)
            pipe.lrem(queue_key, 0, job.id)
        pipe.execute()


def abandoned_jobs(conn: redis.Redis, count: int = 2, **options: Any) -> list[Job]:
    """`count` new `jobs.quick` jobs, each abandoned by a dead worker."""
    queue = Queue(QUEUE, connection=conn)
    jobs = [queue.enqueue("jobs.quick", **options) for _ in range(count)]
    abandon(conn, jobs)
    return jobs


def dependent_of(conn: redis.Redis, parent: Job) -> Job:
    """A job deferred until `parent` ends, which may run even if `parent` fails."""
    dependency = Dependency(jobs=[parent], allow_failure=True)
    return Queue(QUEUE, connection=conn).enqueue("jobs.quick", depends_on=dependency)


def registered_dead_worker(acl_server: AclServer) -> str:
    """A worker registered by RQ that holds no connection, as a killed one leaves it."""
    # RQ names the connection it is given after the worker: closing it is the "kill".
    with redis.Redis.from_url(acl_server.url(ADMIN_USER)) as own:
        worker = Worker([QUEUE], name=f"gone-{secrets.token_hex(4)}", connection=own)
        worker.register_birth()
    return worker.name


def failed_ids(conn: redis.Redis) -> list[str]:
    return FailedJobRegistry(QUEUE, connection=conn).get_job_ids(cleanup=False)


def started_ids(conn: redis.Redis) -> list[str]:
    registry = StartedJobRegistry(QUEUE, connection=conn)
    return [job_id for job_id, _ in registry.get_job_and_execution_ids(cleanup=False)]


def worker_names(conn: redis.Redis) -> set[str]:
    return {w.name for w in Worker.all(connection=conn)}


# --- the documentation --------------------------------------------------------------------


def test_the_docs_give_exactly_the_acl_lines_these_tests_run() -> None:
    texts = [(ROOT / "README.md").read_text()]
    documented = "\n".join(texts)

    missing = [user for user, line in ACL_LINES.items() if line not in documented]

    assert missing == [], f"README.md lacks the ACL SETUSER line of {missing}"


# --- each command works with its own user -------------------------------------------------


def test_a_login_without_a_password_where_the_server_needs_one_says_so(
    acl_server: AclServer,
) -> None:
    result = run_opsctl("status", "--redis-url", f"redis://127.0.0.1:{acl_server.port}/0")

    assert result.returncode == ExitCode.REDIS_UNAVAILABLE, result.stderr
    assert "refused the login: the server requires a password and none was given" in (result.stderr)
    assert "Traceback" not in result.stderr


def test_status_user_runs_opsctl_status_and_changes_nothing(
    acl_server: AclServer, admin: redis.Redis
) -> None:
    abandoned_jobs(admin, count=2)
    registered_dead_worker(acl_server)
    before = redis_state(admin)

    result = acl_server.opsctl(STATUS_USER, "status", "--format", "json")

    succeeded(result, admin)
    queues = {q["name"]: q for q in json_report(result)["queues"]}
    assert (queues[QUEUE]["started"], queues[QUEUE]["workers_dead"]) == (2, 1), shown(result)
    assert redis_state(admin) == before


def test_dryrun_user_runs_a_dry_run_that_plans_and_changes_nothing(
    acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> None:
    jobs = abandoned_jobs(admin, count=2)
    dead = registered_dead_worker(acl_server)
    policy = str(write_policy(tmp_path, action="requeue"))  # a requeue reads opsctl's counters
    before = redis_state(admin)

    result = acl_server.opsctl(DRYRUN_USER, "apply", policy, "--dry-run", "--format", "json")

    succeeded(result, admin)
    report = json_report(result)
    assert outcomes(report) == {j.id: ("abandoned", "requeue", "planned") for j in jobs}
    assert [(w["name"], w["outcome"]) for w in report["workers"]] == [(dead, "planned")]
    assert redis_state(admin) == before


def test_a_user_without_script_rights_gets_the_same_dry_run_from_plain_reads(
    acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> None:
    # Older ACL setups grant no EVAL_RO: opsctl falls back to one HMGET per hash.
    no_scripts = dryrun_user_without(acl_server, "opsctl-noscript", " +eval_ro +evalsha_ro")
    jobs = abandoned_jobs(admin, count=3)
    policy = str(write_policy(tmp_path))
    before = redis_state(admin)

    plain = acl_server.opsctl(no_scripts, "apply", policy, "--dry-run", "--format", "json")
    scripted = acl_server.opsctl(DRYRUN_USER, "apply", policy, "--dry-run", "--format", "json")

    assert plain.returncode == scripted.returncode == ExitCode.OK, shown(plain)
    expected = {j.id: ("abandoned", "fail", "planned") for j in jobs}
    assert outcomes(json_report(plain)) == outcomes(json_report(scripted)) == expected
    assert {r.split(":")[0] for r in refusals(admin)} == {no_scripts}
    assert redis_state(admin) == before


def test_a_user_set_up_before_the_lost_job_notes_still_finds_lost_jobs(
    acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> None:
    # The dry-run user's line as it was before opsctl kept notes of lost queued jobs.
    older = dryrun_user_without(acl_server, "opsctl-older", " %R~opsctl:lost:*")
    started, queued = lost_jobs(admin)

    result = acl_server.opsctl(
        older, "apply", str(write_policy(tmp_path)), "--dry-run", "--format", "json"
    )

    assert result.returncode == ExitCode.OK, shown(result)
    report = json_report(result)
    assert outcomes(report) == {
        started.id: ("lost", "fail", "planned"),
        queued.id: ("lost", "none", "kept"),
    }
    assert any("opsctl:lost:*" in p and "not acted on" in p for p in report["problems"])


def test_dryrun_user_writes_a_plan_that_the_apply_user_carries_out(
    acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> None:
    jobs = abandoned_jobs(admin, count=2)
    policy, plan = str(write_policy(tmp_path)), str(tmp_path / "plan.json")
    before = redis_state(admin)

    made = acl_server.opsctl(DRYRUN_USER, "plan", policy, "--output", plan)
    succeeded(made, admin)
    assert redis_state(admin) == before

    # The plan names the server by INFO's run_id; both users may read it, so the plan fits.
    applied = acl_server.opsctl(APPLY_USER, "apply", "--plan", plan, "--format", "json")

    succeeded(applied, admin)
    assert outcomes(json_report(applied)) == {j.id: ("abandoned", "fail", "done") for j in jobs}
    assert {job_status(admin, j.id) for j in jobs} == {"failed"}


def test_apply_user_fails_abandoned_jobs_releases_dependents_and_removes_dead_workers(
    acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> None:
    jobs = abandoned_jobs(admin, count=2)
    dependent = dependent_of(admin, jobs[0])
    dead = registered_dead_worker(acl_server)
    policy = str(write_policy(tmp_path))

    result = acl_server.opsctl(APPLY_USER, "apply", policy, "--format", "json")

    succeeded(result, admin)
    report = json_report(result)
    assert outcomes(report) == {j.id: ("abandoned", "fail", "done") for j in jobs}
    assert [(w["name"], w["outcome"]) for w in report["workers"]] == [(dead, "done")]
    for job in jobs:
        assert job_status(admin, job.id) == "failed"
        failure = Job.fetch(job.id, connection=admin).latest_result()
        assert failure is not None and "opsctl" in (failure.exc_string or "")
    assert set(failed_ids(admin)) == {j.id for j in jobs}
    assert started_ids(admin) == []
    # RQ's own enqueue_dependents ran as the apply user.
    assert job_status(admin, dependent.id) == "queued"
    assert dependent.id in Queue(QUEUE, connection=admin).get_job_ids()
    assert dead not in worker_names(admin)


def requeued(conn: redis.Redis, job: Job) -> None:
    assert job_status(conn, job.id) == "queued"
    assert job.id in Queue(QUEUE, connection=conn).get_job_ids()


def canceled(conn: redis.Redis, job: Job) -> None:
    assert job_status(conn, job.id) == "canceled"
    assert job.id in CanceledJobRegistry(QUEUE, connection=conn).get_job_ids(cleanup=False)


def deleted(conn: redis.Redis, job: Job) -> None:
    with pytest.raises(NoSuchJobError):
        Job.fetch(job.id, connection=conn)


def retried_at_front(conn: redis.Redis, job: Job) -> None:
    assert job_status(conn, job.id) == "queued"
    assert Queue(QUEUE, connection=conn).get_job_ids()[:1] == [job.id]
    assert Job.fetch(job.id, connection=conn).retries_left == 1


def failed_for_good(conn: redis.Redis, job: Job) -> None:
    assert job_status(conn, job.id) == "failed"
    assert conn.ttl(job.key) == -1, "failure_ttl -1 keeps the failed job forever"


@pytest.mark.parametrize(
    ("action", "options", "check_end_state"),
    [
        ("requeue", {}, requeued),
        ("cancel", {}, canceled),
        ("delete", {}, deleted),
        ("fail", {"retry": Retry(max=2)}, retried_at_front),
        ("fail", {"failure_ttl": -1}, failed_for_good),
    ],
    ids=["requeue", "cancel", "delete", "fail-with-retries-left", "fail-kept-forever"],
)
def test_apply_user_can_take_every_policy_action(
    action: str,
    options: dict[str, Any],
    check_end_state: Any,
    acl_server: AclServer,
    admin: redis.Redis,
    tmp_path: Path,
) -> None:
    Queue(QUEUE, connection=admin).enqueue("jobs.quick")  # so a push to the front shows
    (job,) = abandoned_jobs(admin, count=1, **options)
    if "retry" in options:
        admin.hset(job.key, "enqueue_at_front_on_retry", "1")
    policy = str(write_policy(tmp_path, action))

    result = acl_server.opsctl(APPLY_USER, "apply", policy, "--format", "json")

    succeeded(result, admin)
    assert outcomes(json_report(result))[job.id][2] == "done", shown(result)
    check_end_state(admin, job)


@pytest.fixture
def acl_workers(
    acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> Iterator[WorkerFactory]:
    """Real `rq worker` processes, logged in as the admin; killed at teardown."""
    factory = WorkerFactory(redis_url=acl_server.url(ADMIN_USER), log_dir=tmp_path)
    yield factory
    factory.close()


def running_job(acl_workers: WorkerFactory, conn: redis.Redis, queue: str = QUEUE) -> Job:
    """A live worker on `queue` running `sleep_for(30)`."""
    acl_workers.start([queue])
    job = Queue(queue, connection=conn).enqueue("jobs.sleep_for", 30)
    assert wait_for_status(conn, job.id, "started", 10) == "started"
    return job


def test_apply_user_stops_an_overdue_job_through_its_live_worker(
    acl_server: AclServer, admin: redis.Redis, acl_workers: WorkerFactory, tmp_path: Path
) -> None:
    job = running_job(acl_workers, admin)
    wait_until_watched(admin, job.id)  # and so past max_age 1s
    policy = str(write_policy(tmp_path, max_age="1s"))
    admin.execute_command("ACL", "LOG", "RESET")

    result = acl_server.opsctl(APPLY_USER, "apply", policy, "--format", "json")

    succeeded(result, admin)
    (line,) = json_report(result)["jobs"]
    assert (line["state"], line["outcome"]) == ("overdue", "done"), shown(result)
    assert line["stop_confirmed"] is True, shown(result)
    assert job_status(admin, job.id) == "stopped"
    assert job.id in failed_ids(admin)
    assert all(w.running() for w in acl_workers.started), "a stop leaves the worker running"


def test_apply_user_reads_the_audit_trail_with_opsctl_history(
    acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> None:
    jobs = abandoned_jobs(admin, count=2)
    applied = acl_server.opsctl(APPLY_USER, "apply", str(write_policy(tmp_path)))
    assert applied.returncode == ExitCode.OK, shown(applied)

    result = acl_server.opsctl(APPLY_USER, "history", "--format", "json")

    succeeded(result, admin)
    entries = json.loads(result.stdout)["entries"]
    assert {(e["job"], e["action"], e["outcome"]) for e in entries} == {
        (j.id, "fail", "done") for j in jobs
    }


def failed_by_the_apply_user(
    acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> tuple[list[Job], str]:
    """Two abandoned jobs an apply as the documented apply user failed, and its run id."""
    jobs = abandoned_jobs(admin, count=2)
    applied = acl_server.opsctl(
        APPLY_USER, "apply", str(write_policy(tmp_path)), "--format", "json"
    )
    assert applied.returncode == ExitCode.OK, shown(applied)
    return jobs, str(json_report(applied)["run_id"])


def test_apply_user_undoes_a_run_with_opsctl_requeue(
    acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> None:
    jobs, run_id = failed_by_the_apply_user(acl_server, admin, tmp_path)

    result = acl_server.opsctl(APPLY_USER, "requeue", "--run", run_id, "--format", "json")

    succeeded(result, admin)
    assert {j["id"]: j["outcome"] for j in json.loads(result.stdout)["jobs"]} == {
        j.id: "done" for j in jobs
    }
    assert all(job_status(admin, j.id) == "queued" for j in jobs)
    assert failed_ids(admin) == []


def test_an_undo_its_user_may_not_make_exits_3_and_leaves_the_jobs_failed(
    acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> None:
    jobs, run_id = failed_by_the_apply_user(acl_server, admin, tmp_path)
    weak = add_user_without(acl_server, APPLY_USER, "+lpush", "+rpush")

    result = acl_server.opsctl(weak, "requeue", "--run", run_id, "--format", "json")

    assert result.returncode == ExitCode.REDIS_UNAVAILABLE, shown(result)
    report = json.loads(result.stdout)
    assert "may not run" in report["refused"], report
    assert {j["outcome"] for j in report["jobs"]} == {"error"}
    assert {job_status(admin, j.id) for j in jobs} == {"failed"}
    assert sorted(failed_ids(admin)) == sorted(j.id for j in jobs)


def test_status_user_writes_metrics_with_opsctl_status(
    acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> None:
    abandoned_jobs(admin, count=2)
    target = tmp_path / "status.prom"

    result = acl_server.opsctl(STATUS_USER, "status", "--metrics-file", str(target))

    succeeded(result, admin)
    assert (
        f'opsctl_started_jobs{{command="status",queue="{QUEUE}",state="abandoned"}} 2.0'
        in target.read_text()
    )


# --- a user too weak for `opsctl apply` ---------------------------------------------------


@pytest.fixture
def stuck_scene(acl_server: AclServer, admin: redis.Redis) -> list[Job]:
    """Abandoned jobs, one with a dependent, and a registered dead worker."""
    jobs = abandoned_jobs(admin, count=2)
    dependent_of(admin, jobs[0])
    registered_dead_worker(acl_server)
    return jobs


@pytest.mark.parametrize("user", [STATUS_USER, DRYRUN_USER])
def test_a_read_only_user_cannot_apply_and_changes_nothing(
    user: str, acl_server: AclServer, admin: redis.Redis, stuck_scene: list[Job], tmp_path: Path
) -> None:
    before = redis_state(admin)

    result = acl_server.opsctl(user, "apply", str(write_policy(tmp_path)))

    assert result.returncode != ExitCode.OK, shown(result)
    assert result.returncode in DOCUMENTED_EXIT_CODES, shown(result)
    assert "Traceback" not in result.stderr, shown(result)
    assert redis_state(admin) == before
    assert refusals(admin), "Redis refused a command: that, and nothing else, stopped the run"
    assert {job_status(admin, j.id) for j in stuck_scene} == {"started"}


@pytest.mark.parametrize("user", [STATUS_USER, DRYRUN_USER])
def test_a_refused_apply_says_a_permission_is_missing_and_exits_3(
    user: str, acl_server: AclServer, admin: redis.Redis, stuck_scene: list[Job], tmp_path: Path
) -> None:
    result = acl_server.opsctl(user, "apply", str(write_policy(tmp_path)))

    assert result.returncode == ExitCode.REDIS_UNAVAILABLE, shown(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("opsctl: error:")]
    assert len(errors) == 1, shown(result)
    assert "permission" in errors[0] and "ACL" in errors[0], shown(result)
    assert "'set'" in errors[0], f"it names the refused command (taking opsctl:lock)\n{errors}"
    assert acl_server.passwords[user] not in result.stdout + result.stderr


def test_a_refused_apply_names_the_redis_user_and_says_nothing_was_changed(
    acl_server: AclServer, admin: redis.Redis, stuck_scene: list[Job], tmp_path: Path
) -> None:
    result = acl_server.opsctl(STATUS_USER, "apply", str(write_policy(tmp_path)))

    assert STATUS_USER in result.stderr, shown(result)
    assert "nothing was changed" in result.stderr, shown(result)


# --- rights missing in part ---------------------------------------------------------------


def add_user_without(acl_server: AclServer, user: str, *dropped: str) -> str:
    """A new user with `user`'s documented rules but the `dropped` ones; its name."""
    name = f"{user}-partial"
    rules = [part for part in ACL_LINES[user].split()[3:] if part not in dropped]
    acl_server.add_user(name, " ".join(["ACL", "SETUSER", name, *rules]))
    return name


@pytest.mark.parametrize(
    "command", [("status",), ("apply", "--dry-run")], ids=["status", "dry-run"]
)
def test_a_user_that_cannot_read_rq_keys_gets_an_error_not_an_empty_answer(
    command: tuple[str, ...], acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> None:
    abandoned_jobs(admin, count=2)
    user = add_user_without(acl_server, DRYRUN_USER, "%R~rq:*")
    args = [*command, str(write_policy(tmp_path))] if command[0] == "apply" else [*command]

    result = acl_server.opsctl(user, *args)

    assert result.returncode == ExitCode.REDIS_UNAVAILABLE, shown(result)


def test_a_live_workers_job_is_never_failed_when_the_user_cannot_check_worker_hashes(
    acl_server: AclServer, admin: redis.Redis, acl_workers: WorkerFactory, tmp_path: Path
) -> None:
    user = add_user_without(acl_server, APPLY_USER, "+exists")
    job = running_job(acl_workers, admin)

    result = acl_server.opsctl(user, "apply", str(write_policy(tmp_path)))

    assert job_status(admin, job.id) == "started", shown(result)


def test_a_permission_refused_mid_run_still_reports_what_was_done(
    acl_server: AclServer, admin: redis.Redis, acl_workers: WorkerFactory, tmp_path: Path
) -> None:
    user = add_user_without(acl_server, APPLY_USER, "&rq:pubsub:*")
    # Queue "acl" (an abandoned job) is worked before "acl-slow" (an overdue one to stop).
    (abandoned,) = abandoned_jobs(admin, count=1)
    overdue = running_job(acl_workers, admin, queue="acl-slow")
    wait_until_watched(admin, overdue.id)  # and so past max_age 1s
    policy = write_policy(tmp_path, max_age="1s")
    policy.write_text(policy.read_text() + "  - name: acl-slow\n")

    result = acl_server.opsctl(user, "apply", str(policy), "--format", "json")

    assert job_status(admin, abandoned.id) == "failed", "the first queue was worked"
    assert result.stdout.strip(), f"no report of the change made\n{shown(result)}"
    lines = outcomes(json_report(result))
    assert (lines[abandoned.id][2], lines[overdue.id][2]) == ("done", "error"), shown(result)
    # The refusal names what is missing, not a script's hash.
    assert "may not run PUBLISH on rq:pubsub:" in result.stderr, shown(result)
    assert job_status(admin, overdue.id) == "started"


def test_a_user_that_may_not_write_the_audit_trail_changes_nothing_unaudited_and_exits_3(
    acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> None:
    user = add_user_without(acl_server, APPLY_USER, "+xadd")
    (abandoned,) = abandoned_jobs(admin, count=1)
    dead = registered_dead_worker(acl_server)

    result = acl_server.opsctl(user, "apply", str(write_policy(tmp_path)), "--format", "json")

    assert result.returncode == ExitCode.REDIS_UNAVAILABLE, shown(result)
    report = json_report(result)
    assert "may not run XADD" in (report["refused"] or ""), shown(result)
    assert outcomes(report)[abandoned.id][2] == "error"
    assert [(w["name"], w["outcome"]) for w in report["workers"]] == [(dead, "error")]
    assert job_status(admin, abandoned.id) == "started"
    assert dead in worker_names(admin), "a registration is never removed without its audit"


def lost_jobs(admin: redis.Redis) -> tuple[Job, Job]:
    """A job started and one queued, long ago, that have both dropped out of every registry."""
    [started, queued] = abandoned_jobs(admin, count=2)
    for member in admin.zrange(f"rq:wip:{QUEUE}", 0, -1):
        admin.zrem(f"rq:wip:{QUEUE}", member)
    old = {"started_at": "2020-01-01T00:00:00Z", "last_heartbeat": "2020-01-01T00:00:00Z"}
    admin.hset(started.key, mapping=old)
    admin.hset(queued.key, mapping={"status": "queued", "enqueued_at": "2020-01-01T00:00:00Z"})
    return started, queued


def dryrun_user_without(acl_server: AclServer, user: str, rules: str) -> str:
    """A user made from the documented dry-run line, less ``rules``: an older setup."""
    line = ACL_LINES[DRYRUN_USER].replace(DRYRUN_USER, user)
    assert rules in line
    acl_server.add_user(user, line.replace(rules, ""))
    return user


def test_dryrun_user_finds_lost_jobs_and_explains_them_without_a_refused_command(
    acl_server: AclServer, admin: redis.Redis, tmp_path: Path
) -> None:
    started, queued = lost_jobs(admin)
    policy = str(write_policy(tmp_path))
    before = redis_state(admin)

    result = acl_server.opsctl(DRYRUN_USER, "apply", policy, "--dry-run", "--format", "json")
    explained = acl_server.opsctl(DRYRUN_USER, "explain", queued.id, "--format", "json")

    succeeded(result, admin)
    assert outcomes(json_report(result)) == {
        started.id: ("lost", "fail", "planned"),
        queued.id: ("lost", "none", "kept"),  # found lost now: its grace starts
    }
    succeeded(explained, admin)
    assert [v["state"] for v in json_report(explained)["verdicts"]] == ["lost"]
    assert redis_state(admin) == before
