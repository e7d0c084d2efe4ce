"""Fixtures: a private redis-server, real `rq worker` processes and a fakeredis TCP server.

Every server these fixtures talk to is one they started themselves, on 127.0.0.1 and a
free port. The machine's shared Redis on port 6379 is never contacted, and nothing here
falls back to it: workers always get an explicit `--url`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from click.testing import Result
from rq.exceptions import NoSuchJobError
from rq.job import Job
from typer.testing import CliRunner

from opsctl.state import ListedIds, split_member

TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"

# The machine's shared Redis. The suite must never connect to it, flush it or change it.
SHARED_REDIS_PORT = 6379

# How long a freshly started redis-server or rq worker may take to become ready, in seconds.
STARTUP_TIMEOUT_S = 20.0

# How long a worker may take to exit after SIGTERM before it is killed, in seconds.
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    assert port != SHARED_REDIS_PORT
    return port


def wait_until(
    predicate: Callable[[], object], timeout: float = 20, interval: float = 0.05
) -> bool:
    """Poll `predicate` until it returns something truthy; False if `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_until_watched(conn: redis.Redis, job_id: str, timeout: float = 20) -> None:
    """Wait until the worker running ``job_id`` has heartbeated since the job started, as
    a worker watching its work horse does every job monitoring interval: opsctl sends a
    stop to no worker before then (a SimpleWorker never heartbeats while it runs a job)."""
    from opsctl.model import parse_timestamp

    def watched() -> bool:
        job = conn.hmget(f"rq:job:{job_id}", ["started_at", "worker_name"])
        started, name = (None if v is None else v.decode() for v in job)
        beat = conn.hget(f"rq:worker:{name}", "last_heartbeat") if name else None
        started_at = parse_timestamp(started)
        beat_at = parse_timestamp(beat.decode() if beat else None)
        return started_at is not None and beat_at is not None and beat_at > started_at

    assert wait_until(watched, timeout), f"the worker of {job_id} never heartbeated since its start"


def job_status(conn: redis.Redis, job_id: str) -> str | None:
    """The job's status through RQ's API, or None when the job no longer exists."""
    try:
        status = Job.fetch(job_id, connection=conn).get_status()
    except NoSuchJobError:
        return None
    return str(getattr(status, "value", status))


def wait_for_status(conn: redis.Redis, job_id: str, status: str, timeout: float = 20) -> str | None:
    """Wait until the job has `status`; return the last status seen (None: job gone).

    Compare the result with the wanted status, so a failure shows what was seen instead:
    `assert wait_for_status(conn, job.id, "started", 10) == "started"`.
    """
    seen: list[str | None] = [None]

    def reached() -> bool:
        seen[0] = job_status(conn, job_id)
        return seen[0] == str(getattr(status, "value", status))

    wait_until(reached, timeout=timeout)
    return seen[0]


def numsub(conn: redis.Redis, worker_name: str) -> int:
    """How many clients listen on the worker's command channel (0 for a dead worker).

    The channel is the server's: a worker of the same name on another database
    counts too."""
    channel = f"rq:pubsub:{worker_name}"
    counts = dict(conn.pubsub_numsub(channel))
    return int(counts.get(channel.encode(), 0))


def job_hashes(
    conn: redis.Redis, count: int, origin: str, status: str = "finished", prefix: str = "rq"
) -> None:
    """``count`` job hashes of ``status`` on ``origin`` (ids ``<status>-N``): a large
    keyspace for the walk for lost jobs, written in one pipeline."""
    with conn.pipeline(transaction=False) as pipe:
        for i in range(count):
            pipe.hset(f"{prefix}:job:{status}-{i}", mapping={"status": status, "origin": origin})
        pipe.execute()


def listed_in(conn: redis.Redis, *registries: str) -> ListedIds:
    """The job ids of ``registries``, all listed, as a run hands them to its walk."""
    listed = ListedIds({})
    for registry in registries:
        for member in conn.zrange(registry, 0, -1):
            split_member(member, listed.ids)
    listed.expect([])
    return listed


# --- redis-server -------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A redis-server process the suite started for itself."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        """The server's URL, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A new client with the raw bytes replies that RQ needs."""
        return redis.Redis.from_url(self.url, decode_responses=False)


def _redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is not None:
        return binary
    if os.environ.get("CI") == "true":
        pytest.fail("CI must run the real-Redis tests: install redis-server", pytrace=False)
    pytest.skip("redis-server is not installed; the real-Redis tests need it")


def _answers_ping(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def start_redis_server(data_dir: Path, port: int | None = None) -> RedisServer:
    """Start one more private redis-server (on `port`, e.g. to restart one); stop it with
    `terminate(server.process)`."""
    return _start_redis_server(_redis_server_binary(), data_dir, port)


def _start_redis_server(binary: str, data_dir: Path, port: int | None = None) -> RedisServer:
    port = port or free_port()
    assert port != SHARED_REDIS_PORT
    log_path = data_dir / f"redis-{port}.log"
    command = [binary, "--bind", "127.0.0.1", "--port", str(port)]
    command += ["--save", "", "--appendonly", "no", "--dir", str(data_dir)]
    command += ["--logfile", str(log_path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port=port, process=process, log_path=log_path)

    ready = wait_until(
        lambda: process.poll() is not None or _answers_ping(port), timeout=STARTUP_TIMEOUT_S
    )
    if ready and process.poll() is None:
        return server

    terminate(process)
    log = log_path.read_text(errors="replace") if log_path.exists() else "(no log)"
    raise RuntimeError(f"redis-server on port {port} did not start:\n{log}")


def terminate(process: subprocess.Popen[bytes]) -> None:
    """Stop a server process: politely first, then by force."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a free port, with persistence off, for the whole session."""
    binary = _redis_server_binary()
    data_dir = tmp_path_factory.mktemp("redis-server")

    # A port picked as free can be taken before redis-server binds it; try a few.
    error: RuntimeError | None = None
    for _ in range(3):
        try:
            server = _start_redis_server(binary, data_dir)
            break
        except RuntimeError as exc:
            error = exc
    else:
        raise RuntimeError("could not start a private redis-server") from error

    yield server
    terminate(server.process)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The private server's URL, emptied before the test."""
    # FLUSHALL is allowed only because this server was started by the suite, on its own
    # port, for its own use; the shared Redis on 6379 must never be flushed.
    assert redis_server.port != SHARED_REDIS_PORT
    client = redis_server.client()
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[redis.Redis]:
    """A client (bytes replies, as RQ needs) of the private server, emptied before the test."""
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    yield client
    client.close()


# --- rq worker processes ------------------------------------------------------------------


def _child_pids(pid: int) -> list[int]:
    """The pids of a process's direct children, read from /proc."""
    children: list[int] = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            children += [int(text) for text in path.read_text().split()]
    if children:
        return children

    # Kernels without CONFIG_PROC_CHILDREN: scan every process for its parent pid.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[-1].split()
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _is_gone(pid: int) -> bool:
    """True once the process has exited (a zombie counts as exited)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def _kill_horse(horse: int) -> None:
    """SIGKILL a work horse and, as it calls setpgrp(), anything the job itself started."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(horse) == horse:
            os.killpg(horse, signal.SIGKILL)
        else:
            os.kill(horse, signal.SIGKILL)


@dataclass
class WorkerProcess:
    """A real `rq worker` process started by the `rq_workers` fixture."""

    name: str
    queues: list[str]
    process: subprocess.Popen[bytes]
    log_path: Path
    conn: redis.Redis

    @property
    def pid(self) -> int:
        """The worker's (parent) process id."""
        return self.process.pid

    def running(self) -> bool:
        """True while the worker process has not exited."""
        return self.process.poll() is None

    def log(self) -> str:
        """Everything the worker wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def kill(self) -> list[int]:
        """SIGKILL the worker and its work horse, as a crash or the OOM killer would.

        The worker is frozen first, so it cannot fork a new horse in between. Returns the
        horse pids killed, once worker and horses have exited and the server no longer
        counts the worker among its command channel's listeners.
        """
        if not self.running():
            return []
        listeners = numsub(self.conn, self.name)  # a namesake on another database counts too
        os.kill(self.pid, signal.SIGSTOP)
        horses = _child_pids(self.pid)
        for horse in horses:
            _kill_horse(horse)
        os.kill(self.pid, signal.SIGKILL)

        self.process.wait(timeout=10)
        assert wait_until(lambda: all(_is_gone(horse) for horse in horses), timeout=10)
        assert wait_until(lambda: numsub(self.conn, self.name) < max(listeners, 1), timeout=10)
        return horses

    def stop(self) -> None:
        """SIGTERM (RQ's warm shutdown); SIGKILL worker and horse after 10 s."""
        if not self.running():
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class WorkerFactory:
    """Starts real `rq worker` processes against one private server; kills them at teardown."""

    redis_url: str
    log_dir: Path
    started: list[WorkerProcess] = field(default_factory=list)

    def start(
        self,
        queues: list[str],
        *,
        name: str | None = None,
        simple: bool = False,
        job_monitoring_interval: int = 2,
        extra: list[str] | tuple[str, ...] = (),
        rq_command: list[str] | None = None,
    ) -> WorkerProcess:
        """Start a worker on `queues`; return once it is registered, subscribed to its
        command channel and waiting for jobs (or already running one).

        `rq_command` runs another RQ release's `rq` script instead of this environment's.
        """
        name = name or f"w-{uuid.uuid4().hex[:10]}"
        command = [*(rq_command or _rq_command()), "worker", *queues, "--url", self.redis_url]
        command += ["--name", name, "--path", str(TESTS_DIR)]
        command += ["--job-monitoring-interval", str(job_monitoring_interval)]
        if simple:
            command += ["-w", "rq.worker.SimpleWorker"]
        command += list(extra)

        log_path = self.log_dir / f"worker-{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_env(),
                start_new_session=True,
            )
        conn = redis.Redis.from_url(self.redis_url, decode_responses=False)
        worker = WorkerProcess(name, list(queues), process, log_path, conn)
        self.started.append(worker)

        self._wait_until_listening(worker, own_release=rq_command is None)
        return worker

    def _wait_until_listening(self, worker: WorkerProcess, own_release: bool = True) -> None:
        key = f"rq:worker:{worker.name}"

        # "idle" is set once the start-up maintenance is over, right before the worker
        # blocks on its queues. A SIGTERM that lands during that maintenance can leave an
        # RQ 3.0 worker hanging in its pub/sub teardown, so tests only act after it.
        def listening() -> bool:
            if not worker.running():
                return True  # reported below
            state = worker.conn.hget(key, "state")
            subscribed = numsub(worker.conn, worker.name) >= 1
            return state in (b"idle", b"busy") and subscribed

        ready = wait_until(listening, timeout=STARTUP_TIMEOUT_S)
        if ready and worker.running():
            if not own_release:
                return  # other releases log no such line
            # RQ 3 reports "idle" before its start-up maintenance pass; its last
            # step logs this line, after which a signal is handled cleanly.
            wait_until(lambda: "cleaning group registries" in worker.log(), timeout=5)
            return
        worker.kill()
        pytest.fail(
            f"rq worker {worker.name!r} did not start listening "
            f"(exit code {worker.process.poll()}); its log:\n{worker.log()}",
            pytrace=False,
        )

    def close(self) -> None:
        """Kill every worker that is still running and close their connections."""
        for worker in self.started:
            try:
                worker.kill()
            finally:
                worker.conn.close()


def _rq_command() -> list[str]:
    """The `rq` console script of the running interpreter's environment."""
    script = Path(sys.executable).parent / "rq"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "rq.cli"]


def clean_env() -> dict[str, str]:
    """The environment for child processes, without settings that could redirect them.

    RQ reads RQ_REDIS_URL, RQ_CONFIG, RQ_KEY_PREFIX and friends, policies may read
    REDIS_URL, and opsctl reads OPSCTL_REDIS_URL and every other OPSCTL_* option: none of
    them may point a child at a server the suite did not start.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RQ_", "REDIS_", "OPSCTL_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def opsctl_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for an opsctl child process: this checkout's code, no Redis settings."""
    env = env or clean_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC_DIR), env.get("PYTHONPATH")]))
    return env


def start_opsctl(*args: str, log_dir: Path) -> subprocess.Popen[str]:
    """Start ``python -m opsctl ARGS`` in the background (e.g. ``opsctl watch``).

    Its stdout and stderr go to ``log_dir/opsctl.out`` and ``log_dir/opsctl.err``, so a
    long-running process can never block on a full pipe. Stop it and wait for it.
    """
    out = (log_dir / "opsctl.out").open("w")
    err = (log_dir / "opsctl.err").open("w")
    with out, err:
        return subprocess.Popen(
            [sys.executable, "-m", "opsctl", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            text=True,
            env=opsctl_env(),
        )


def run_opsctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m opsctl ARGS`` with this checkout's code; capture its output."""
    env = opsctl_env(env)
    return subprocess.run(
        [sys.executable, "-m", "opsctl", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def invoke_opsctl(*args: str) -> Result:
    """Run the CLI in-process; a crash (anything but an exit) fails the test with its traceback."""
    from opsctl.cli import app

    result = CliRunner().invoke(app, list(args))
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not crashed, "".join(traceback.format_exception(*result.exc_info))
    return result


@pytest.fixture(autouse=True)
def _no_opsctl_settings_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep OPSCTL_* variables of the shell that runs the suite out of in-process CLI runs."""
    for name in list(os.environ):
        if name.startswith("OPSCTL_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _collector_free_after_each_test() -> Iterator[None]:
    """An in-process CLI run keeps its records from the cycle collector as if its
    process ended with it; the suite's process goes on, so give them back."""
    yield
    gc.unfreeze()


@pytest.fixture
def rq_workers(redis_url: str, tmp_path: Path) -> Iterator[WorkerFactory]:
    """A factory of real `rq worker` processes: `rq_workers.start(["queue"])`."""
    factory = WorkerFactory(redis_url=redis_url, log_dir=tmp_path)
    yield factory
    factory.close()


# --- fakeredis over TCP -------------------------------------------------------------------


@contextmanager
def serve_fake_redis() -> Iterator[str]:
    """Serve a fresh fakeredis over TCP from a background thread; its URL."""
    from fakeredis import TcpFakeServer

    # Port 0 lets the kernel pick a free port at bind time, so no other process can race us.
    server = TcpFakeServer(("127.0.0.1", 0))
    # fakeredis keeps a connection's handler thread inside a blocking command (an idle rq
    # worker's BLPOP waits 405 s) even after shutdown() and after its client is gone, and
    # server_close() would join it. Daemon handler threads are left to die with the process.
    server.daemon_threads = True
    port = server.server_address[1]
    assert port != SHARED_REDIS_PORT
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def fake_redis_url() -> Iterator[str]:
    """The URL of a fresh fakeredis server, served over TCP from a background thread."""
    with serve_fake_redis() as url:
        yield url
