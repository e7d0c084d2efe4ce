"""No command ever shows a Redis password: not in a report, a log, a plan file or Redis.

A module fixture starts a redis-server of our own on 127.0.0.1 and a free port, with
``--requirepass`` and two ACL users, one of them with a password full of URL syntax. Each
test runs the real ``python -m opsctl`` once with the password in the URL (``--redis-url``,
or ``$REDIS_URL`` read by the policy's ``${REDIS_URL}``) and then searches everything the
run produced for it: stdout, stderr, every file it wrote, and every value stored in Redis,
the audit stream ``opsctl:audit`` included. Each command, output format and error path is
its own test id.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from rq import Queue
from rq.executions import Execution

from conftest import SHARED_REDIS_PORT, STARTUP_TIMEOUT_S, clean_env, free_port, wait_until

pytestmark = pytest.mark.redis_server

SRC_DIR = Path(__file__).resolve().parents[1] / "src"

PASSWORD = "S3cr3t-Pa55w0rd"
USER, USER_PASSWORD = "opsctl-user", "Us3r-S3cr3t-Pa55"
#: A password that must be percent-encoded in a URL; both forms are secret.
SPECIAL_USER, SPECIAL_PASSWORD = "special", "Sp3c!al@pa:ss/w0rd%"
WRONG_PASSWORD = "Wr0ng-S3cr3t-Pa55"
SECRETS = (
    PASSWORD,
    USER_PASSWORD,
    SPECIAL_PASSWORD,
    quote(SPECIAL_PASSWORD, safe=""),
    WRONG_PASSWORD,
)

#: Queues of the state every test starts from.
CLEAN_QUEUE = "secrets"  # two abandoned jobs, failed without trouble
BROKEN_QUEUE = "broken"  # one abandoned job whose fail is refused (a failing action)
SLOW_QUEUE = "slow"  # one job a live worker has run for an hour (overdue)
LIVE_WORKER = "w-live"
DEAD_WORKER = "w-dead"


# --- a password-protected redis-server of our own -----------------------------------------


@dataclass
class SecureServer:
    port: int
    process: subprocess.Popen[bytes]

    def url(self, userinfo: str = f":{PASSWORD}") -> str:
        return f"redis://{userinfo}@127.0.0.1:{self.port}/0"

    def client(self, **options: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD, **options)


def _answers(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureServer]:
    """A redis-server with requirepass and ACL users, on a free port, for this module."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the real-Redis tests: install redis-server", pytrace=False)
        pytest.skip("redis-server is not installed")
    data_dir = tmp_path_factory.mktemp("secure-redis")
    port = free_port()
    assert port != SHARED_REDIS_PORT
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    command += ["--appendonly", "no", "--dir", str(data_dir), "--requirepass", PASSWORD]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = wait_until(
            lambda: process.poll() is not None or _answers(port), timeout=STARTUP_TIMEOUT_S
        )
        assert ready and process.poll() is None, f"redis-server on port {port} did not start"
        secure = SecureServer(port, process)
        admin = secure.client()
        for user, password in ((USER, USER_PASSWORD), (SPECIAL_USER, SPECIAL_PASSWORD)):
            admin.acl_setuser(
                user, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
                commands=["+@all"],
            )  # fmt: skip
        admin.close()
        yield secure
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# --- the state every test starts from ------------------------------------------------------


def start_job(conn: redis.Redis, queue_name: str, worker: str) -> str:
    """A job of ``queue_name`` that ``worker`` has started, built with RQ's API."""
    queue = Queue(queue_name, connection=conn)
    job = queue.enqueue("jobs.quick")
    with conn.pipeline() as pipe:
        Execution.create(job, 600, pipe, worker_name=worker)
        job.prepare_for_execution(worker, pipe)
        pipe.lrem(queue.key, 0, job.id)
        pipe.execute()
    return str(job.id)


@pytest.fixture
def conn(server: SecureServer) -> Iterator[redis.Redis]:
    """An emptied server holding abandoned, unfailable and overdue jobs and a dead worker.

    The live worker is a client connection named after it, with a busy worker hash; it
    stays connected until the test ends.
    """
    client = server.client()
    client.flushall()
    for _ in range(2):
        start_job(client, CLEAN_QUEUE, DEAD_WORKER)
    client.sadd("rq:workers", f"rq:worker:{DEAD_WORKER}")
    client.sadd(f"rq:workers:{CLEAN_QUEUE}", f"rq:worker:{DEAD_WORKER}")

    start_job(client, BROKEN_QUEUE, DEAD_WORKER)
    client.set(f"rq:failed:{BROKEN_QUEUE}", "not a registry")  # the fail script refuses it

    overdue = start_job(client, SLOW_QUEUE, LIVE_WORKER)
    an_hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    client.hset(f"rq:job:{overdue}", "started_at", an_hour_ago.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    # Subscribed to its command channel under its name, heartbeating as it watches its
    # work horse: it hears the stop, and nothing stops the job.
    live = server.client(client_name=LIVE_WORKER).pubsub()
    live.subscribe(f"rq:pubsub:{LIVE_WORKER}")
    assert live.get_message(timeout=5) is not None
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    worker = {"state": "busy", "current_job": overdue, "last_heartbeat": now}
    client.hset(f"rq:worker:{LIVE_WORKER}", mapping=worker)
    client.sadd("rq:workers", f"rq:worker:{LIVE_WORKER}")

    yield client
    live.close()
    client.close()


def stored_text(conn: redis.Redis) -> bytes:
    """Every key and value in Redis, failure texts of RQ results decoded."""
    parts: list[bytes] = []
    for key in conn.scan_iter(count=1000):
        parts.append(key)
        kind = conn.type(key)
        if kind == b"string":
            parts.append(conn.get(key) or b"")
        elif kind == b"hash":
            parts += [b for kv in conn.hgetall(key).items() for b in kv]
        elif kind == b"list":
            parts += conn.lrange(key, 0, -1)
        elif kind == b"set":
            parts += list(conn.smembers(key))
        elif kind == b"zset":
            parts += conn.zrange(key, 0, -1)
        elif kind == b"stream":
            for _, entry in conn.xrange(key):
                for name, value in entry.items():
                    parts += [name, value]
                    if name == b"exc_string":
                        with contextlib.suppress(ValueError, zlib.error):
                            parts.append(zlib.decompress(base64.b64decode(value)))
    return b"\n".join(parts)


# --- running opsctl ------------------------------------------------------------------------


@dataclass
class Run:
    """One opsctl process and everything it left behind."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    files: dict[str, str] = field(default_factory=dict)

    def shown(self) -> str:
        return (
            f"opsctl {' '.join(self.args)}\nexit {self.returncode}\n"
            f"stdout:\n{self.stdout[:3000]}\nstderr:\n{self.stderr[:3000]}"
        )


def run_opsctl(args: list[str], out_dir: Path, redis_url: str | None = None) -> Run:
    """``python -m opsctl ARGS`` in ``out_dir``, with ``$REDIS_URL`` set only if given."""
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC_DIR), env.get("PYTHONPATH")]))
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    process = subprocess.run(
        [sys.executable, "-m", "opsctl", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=out_dir,
        timeout=120,
        check=False,
    )
    files = {
        str(path): path.read_text(errors="replace")
        for path in sorted(out_dir.rglob("*"))
        if path.is_file()
    }
    return Run(args, process.returncode, process.stdout, process.stderr, files)


def assert_no_secret(run: Run, conn: redis.Redis | None, *extra: str) -> None:
    """No password, right or wrong, encoded or not, in anything the run produced."""
    secrets = (*SECRETS, *extra)
    for secret in secrets:
        assert secret not in run.stdout, f"{secret!r} in stdout\n{run.shown()}"
        assert secret not in run.stderr, f"{secret!r} in stderr\n{run.shown()}"
        for path, content in run.files.items():
            assert secret not in content, f"{secret!r} in {path}\n{content[:3000]}"
    if conn is not None:
        stored = stored_text(conn)
        for secret in secrets:
            assert secret.encode() not in stored, f"{secret!r} stored in Redis\n{run.shown()}"


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    """A policy that reads its Redis URL from ``${REDIS_URL}``."""
    directory = tmp_path / "policy"
    directory.mkdir()
    path = directory / "policy.yaml"
    path.write_text(
        "version: 1\nredis:\n  url: ${REDIS_URL}\ndefaults:\n  max_age: 10m\n"
        '  action: fail\nqueues:\n  - name: "*"\n'
    )
    return path


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


# --- every command and format, with the password in the URL --------------------------------

#: Credentials: the URL (its port left as {port}) and whether it is given as --redis-url
#: (otherwise $REDIS_URL, which the policy reads as ${REDIS_URL}).
CREDENTIALS = {
    "password-flag": (f"redis://:{PASSWORD}@127.0.0.1:{{port}}/0", True),
    "acl-user-flag": (f"redis://{USER}:{USER_PASSWORD}@127.0.0.1:{{port}}/0", True),
    "encoded-password-flag": (
        f"redis://{SPECIAL_USER}:{quote(SPECIAL_PASSWORD, safe='')}@127.0.0.1:{{port}}/0",
        True,
    ),
    "query-password-flag": (f"redis://127.0.0.1:{{port}}/0?password={PASSWORD}", True),
    "password-env": (f"redis://:{PASSWORD}@127.0.0.1:{{port}}/0", False),
}


@dataclass(frozen=True)
class Command:
    """One invocation: its arguments, the exit code it must give, and what it must show."""

    args: tuple[str, ...]
    code: int
    shows: str  # a piece of output proving the command did its work
    before: tuple[str, ...] = ()  # a command run first (a plan to apply, an apply to audit)
    url_option: bool = True  # whether the command takes --redis-url


POLICY, PLAN = "{policy}", "plan.json"
QUIET = ("--stop-timeout", "0.1")

COMMANDS = {
    "apply-text": Command(("apply", POLICY, "--queue", CLEAN_QUEUE), 0, "2 acted"),
    "apply-json": Command(
        ("apply", POLICY, "--queue", CLEAN_QUEUE, "--format", "json"), 0, '"acted": 2'
    ),
    "apply-dry-run-text": Command(("apply", POLICY, "--dry-run"), 0, "dry run"),
    "apply-dry-run-json": Command(
        ("apply", POLICY, "--dry-run", "--format", "json"), 0, '"dry_run": true'
    ),
    "apply-verbose": Command(("apply", POLICY, "--queue", CLEAN_QUEUE, "-v"), 0, "outcome=done"),
    "apply-debug": Command(("apply", POLICY, "-vv", *QUIET), 1, "did not stop it within 0.1s"),
    "apply-quiet": Command(("apply", POLICY, "-q", *QUIET), 1, "action(s) failed"),
    "apply-failing-action-json": Command(
        ("apply", POLICY, "--queue", BROKEN_QUEUE, "--format", "json"), 1, '"outcome":"error"'
    ),
    "apply-failing-action-best-effort": Command(
        ("apply", POLICY, "--queue", BROKEN_QUEUE, "--best-effort"), 0, "--best-effort"
    ),
    "apply-overdue-json": Command(
        ("apply", POLICY, "--queue", SLOW_QUEUE, "--format", "json", *QUIET), 1, '"overdue"'
    ),
    "plan-text": Command(("plan", POLICY, "--output", PLAN), 0, "planned action(s)"),
    "plan-json": Command(
        ("plan", POLICY, "--output", PLAN, "--format", "json", "-vv"), 0, '"planned": '
    ),
    "apply-plan-text": Command(
        ("apply", "--plan", PLAN),
        0,
        "2 acted",
        ("plan", POLICY, "--output", PLAN, "--queue", CLEAN_QUEUE),
    ),
    "apply-plan-json-debug": Command(
        ("apply", "--plan", PLAN, "--format", "json", "-vv", *QUIET),
        1,
        '"outcome":"error"',
        ("plan", POLICY, "--output", PLAN),
    ),
    "apply-plan-dry-run": Command(
        ("apply", "--plan", PLAN, "--dry-run"), 0, "dry run", ("plan", POLICY, "--output", PLAN)
    ),
    "status-text": Command(("status",), 0, CLEAN_QUEUE),
    "status-json": Command(("status", "--format", "json"), 0, '"queues"'),
    "history-text": Command(("history",), 0, "audit trail", ("apply", POLICY, *QUIET)),
    "history-json": Command(
        ("history", "--format", "json"), 0, '"entries"', ("apply", POLICY, *QUIET)
    ),
    "status-prometheus-metrics-file": Command(
        ("status", "--format", "prometheus", "--metrics-file", "status.prom"),
        0,
        "opsctl_started_jobs",
    ),
    "apply-metrics-file": Command(
        ("apply", POLICY, "--queue", CLEAN_QUEUE, "--metrics-file", "apply.prom"), 0, "2 acted"
    ),
    "requeue-unknown-run": Command(("requeue", "--run", "0123456789ab"), 2, "no audit entries"),
    "validate": Command(("validate", POLICY), 0, "ok", url_option=False),
    "validate-strict-env": Command(("validate", "--strict-env", POLICY), 0, "ok", url_option=False),
    "schema": Command(("schema",), 0, '"properties"', url_option=False),
}


def argv(args: tuple[str, ...], policy: Path, url: str | None) -> list[str]:
    filled = [str(policy) if a == POLICY else a for a in args]
    return [*filled, "--redis-url", url] if url is not None else filled


def run_command(
    command: Command, policy: Path, out_dir: Path, url: str, as_flag: bool
) -> tuple[Run, Run | None]:
    """Run ``command`` (and the one it needs first) with ``url`` as a flag or in $REDIS_URL."""
    flag = url if as_flag and command.url_option else None
    env_url = None if flag is not None else url
    first = None
    if command.before:
        first = run_opsctl(argv(command.before, policy, flag), out_dir, env_url)
        assert first.returncode in (0, 1), first.shown()
    return run_opsctl(argv(command.args, policy, flag), out_dir, env_url), first


@pytest.mark.parametrize("credentials", CREDENTIALS)
@pytest.mark.parametrize("name", COMMANDS)
def test_no_command_shows_or_stores_the_password_of_its_redis_url(
    server: SecureServer,
    conn: redis.Redis,
    policy: Path,
    out_dir: Path,
    name: str,
    credentials: str,
) -> None:
    url, as_flag = CREDENTIALS[credentials]
    command = COMMANDS[name]

    run, first = run_command(command, policy, out_dir, url.format(port=server.port), as_flag)

    assert run.returncode == command.code, run.shown()
    assert command.shows in run.stdout + run.stderr, run.shown()
    if first is not None:
        assert_no_secret(first, None)
    assert_no_secret(run, conn)


def test_a_plan_file_names_its_redis_without_the_password(
    server: SecureServer, conn: redis.Redis, policy: Path, out_dir: Path
) -> None:
    run = run_opsctl(argv(("plan", POLICY, "--output", PLAN), policy, server.url()), out_dir)

    assert run.returncode == 0, run.shown()
    plan = (out_dir / PLAN).read_text()
    assert f"redis://:***@127.0.0.1:{server.port}/0" in plan, plan[:2000]
    assert_no_secret(run, conn)


def test_the_audit_trail_records_actions_but_no_password(
    server: SecureServer, conn: redis.Redis, policy: Path, out_dir: Path
) -> None:
    run = run_opsctl(argv(("apply", POLICY, *QUIET), policy, server.url()), out_dir)

    entries = conn.xrange("opsctl:audit")
    # Two jobs failed, one fail refused, one overdue job not stopped, one dead worker.
    assert len(entries) >= 5, run.shown()
    text = b"\n".join(v for _, entry in entries for v in entry.values())
    for secret in SECRETS:
        assert secret.encode() not in text


# --- error paths ---------------------------------------------------------------------------


def closed_port() -> int:
    port = free_port()
    assert port != SHARED_REDIS_PORT
    return port


@dataclass(frozen=True)
class BadUrl:
    """A URL opsctl cannot use, the exit code that says so, and the secret it holds."""

    url: str
    code: int
    secret: str = PASSWORD
    extra: tuple[str, ...] = ()  # further options


BAD_URLS = {
    "wrong-password": BadUrl("redis://:{wrong}@127.0.0.1:{port}/0", 3, WRONG_PASSWORD),
    "wrong-acl-password": BadUrl(f"redis://{USER}:{{wrong}}@127.0.0.1:{{port}}/0", 3),
    "closed-port": BadUrl("redis://:{pw}@127.0.0.1:{closed}/0", 3),
    "closed-port-best-effort": BadUrl(
        "redis://:{pw}@127.0.0.1:{closed}/0", 0, extra=("--best-effort",)
    ),
    "at-sign-in-password": BadUrl("redis://:P@ss-S3cr3t@127.0.0.1:{port}/0", 3, "P@ss-S3cr3t"),
    "no-host": BadUrl("redis://:{pw}@/0", 2),
    "password-without-colon": BadUrl("redis://{pw}@host:1/0", 3),
    "http-scheme": BadUrl("http://:{pw}@x", 2),
    "port-not-a-number": BadUrl("redis://:{pw}@127.0.0.1:notaport/0", 2),
    "unknown-query-argument": BadUrl("redis://:{pw}@127.0.0.1:1/0?bad=1", 2),
    "database-not-a-number": BadUrl("redis://:{pw}@127.0.0.1:{port}/x", 2),
    "bracket-in-password": BadUrl("redis://:[{pw}@127.0.0.1:{port}/0", 2),
    "unix-socket-missing": BadUrl("unix://:{pw}@/nonexistent/opsctl.sock", 3),
    "hash-in-password": BadUrl("redis://:Fr4g#Pa55w0rd@127.0.0.1:{port}/0", 2, "Fr4g#Pa55w0rd"),
    "question-mark-in-password": BadUrl(
        "redis://:Qu3ry?Pa55w0rd@127.0.0.1:{port}/0", 2, "Qu3ry?Pa55w0rd"
    ),
    "slash-in-password": BadUrl("redis://:Sl4sh/Pa55w0rd@127.0.0.1:{port}/0", 2, "Sl4sh/Pa55w0rd"),
}

#: Commands a bad URL is tried with; best-effort exists only for apply.
URL_COMMANDS = {
    "apply-json": ("apply", POLICY, "--format", "json"),
    "plan": ("plan", POLICY, "--output", PLAN),
    "status": ("status", "--format", "json"),
    "history": ("history",),
}


def bad_url_cases() -> list[object]:
    cases = []
    for url_name, bad in BAD_URLS.items():
        for command_name in URL_COMMANDS:
            if bad.extra and command_name != "apply-json":
                continue
            cases.append(pytest.param(url_name, command_name, id=f"{url_name}-{command_name}"))
    return cases


@pytest.mark.parametrize(("url_name", "command_name"), bad_url_cases())
def test_an_unusable_redis_url_is_reported_without_its_password(
    server: SecureServer,
    conn: redis.Redis,
    policy: Path,
    out_dir: Path,
    url_name: str,
    command_name: str,
) -> None:
    bad = BAD_URLS[url_name]
    url = bad.url.format(pw=PASSWORD, wrong=WRONG_PASSWORD, port=server.port, closed=closed_port())
    args = (*URL_COMMANDS[command_name], *bad.extra, "--timeout", "2")

    run = run_opsctl(argv(args, policy, url), out_dir)

    assert run.returncode == bad.code, run.shown()
    assert "opsctl: error:" in run.stderr, run.shown()
    assert "Traceback" not in run.stderr, run.shown()
    assert_no_secret(run, conn, bad.secret)


def test_a_wrong_password_in_redis_url_env_is_reported_without_it(
    server: SecureServer, conn: redis.Redis, policy: Path, out_dir: Path
) -> None:
    run = run_opsctl(["apply", str(policy)], out_dir, server.url(f":{WRONG_PASSWORD}"))

    assert run.returncode == 3, run.shown()
    assert "refused the login" in run.stderr, run.shown()
    assert_no_secret(run, conn)


# --- passwords written into the policy file ------------------------------------------------


def write_policy(directory: Path, redis_section: str) -> Path:
    path = directory / "literal.yaml"
    path.write_text(f'version: 1\n{redis_section}\nqueues:\n  - name: "*"\n')
    return path


@pytest.mark.parametrize(
    "args", [("validate", "{file}"), ("apply", "{file}", "--dry-run")], ids=["validate", "apply"]
)
def test_a_policy_with_its_url_written_in_the_file_never_echoes_the_password(
    server: SecureServer, conn: redis.Redis, policy: Path, out_dir: Path, args: tuple[str, ...]
) -> None:
    path = write_policy(policy.parent, f'redis:\n  url: "{server.url()}"')

    run = run_opsctl([str(path) if a == "{file}" else a for a in args], out_dir)

    assert run.returncode == 0, run.shown()
    assert_no_secret(run, conn)


@pytest.mark.parametrize(
    "args", [("validate", "{file}"), ("apply", "{file}", "--dry-run")], ids=["validate", "apply"]
)
def test_a_policy_with_a_url_in_place_of_the_redis_mapping_never_echoes_the_password(
    server: SecureServer, conn: redis.Redis, policy: Path, out_dir: Path, args: tuple[str, ...]
) -> None:
    path = write_policy(policy.parent, f'redis: "{server.url()}"')

    run = run_opsctl([str(path) if a == "{file}" else a for a in args], out_dir)

    assert run.returncode == 2, run.shown()
    assert "is not a mapping" in run.stderr + run.stdout, run.shown()
    assert_no_secret(run, conn)
