"""`make demo`: opsctl cleaning up after real RQ workers, with no Redis server installed.

The demo serves an in-process fakeredis over TCP on 127.0.0.1 and a free port, and points
real `rq worker` processes at it. It builds one example of each kind of started job:

* demo-reports: a worker is SIGKILLed (worker and work horse) mid-job, so its job is
  abandoned; the policy requeues reports.
* demo-default: a live worker runs a job longer than the queue's max_age (5s), so it is
  overdue; opsctl asks the worker to stop it, and the policy fails it.
* demo-reports: a live worker started a job a second ago; reports may run for an hour,
  so it is running and left alone.
* demo-default: a started-registry entry whose job hash does not exist, so it is orphaned.

Then it runs, each under a one-line heading:

1. `opsctl apply demo/policy.yaml --redis-url URL --dry-run` (the preview),
2. `opsctl apply demo/policy.yaml --redis-url URL` (the changes),
3. `opsctl status --redis-url URL`,

and stops every worker and the server. Every step is expected to exit 0: a dry run always
does, every change in this scene can succeed, and status only reads. The demo exits 1 if any
step exited otherwise, or if the scene could not be built, and 0 when all went as expected.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import redis
from fakeredis import TcpFakeServer
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job

DEMO_DIR = Path(__file__).resolve().parent
POLICY = DEMO_DIR / "policy.yaml"

DEFAULT_QUEUE = "demo-default"
REPORTS_QUEUE = "demo-reports"

# demo-default's max_age in policy.yaml, in seconds; the overdue job must outlive it.
DEFAULT_MAX_AGE_S = 5

# How long each demo job would sleep if nobody intervened, in seconds.
LONG_JOB_S = 60

# Seconds a worker or job may take to reach the state the demo waits for.
WAIT_S = 20.0

# The exit codes each opsctl step may return without failing the demo.
EXPECTED_EXIT_CODES = {"dry run": {0}, "apply": {0}, "status": {0}}


def heading(text: str) -> None:
    """Print a one-line step heading."""
    print(f"\n=== {text}", flush=True)


def wait_until(predicate: Callable[[], object], timeout_s: float = WAIT_S) -> bool:
    """Poll `predicate` every 50 ms; False if it is still falsy after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def child_env(redis_url: str) -> dict[str, str]:
    """The environment for workers and opsctl: only the demo's own server is named in it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RQ_", "REDIS_"))}
    env["REDIS_URL"] = redis_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextmanager
def fake_redis_server() -> Iterator[str]:
    """Serve a fresh fakeredis on 127.0.0.1 and a port the kernel picks; yield its URL."""
    server = TcpFakeServer(("127.0.0.1", 0))
    # A connection blocked in BLPOP (every idle rq worker has one) keeps its handler thread
    # in fakeredis until the BLPOP times out, minutes later, even after shutdown() and even
    # once its client is gone. Daemon handler threads let the demo exit without waiting.
    server.daemon_threads = True
    port = server.server_address[1]
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


@dataclass
class Worker:
    """A real `rq worker` process of the demo."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self) -> str:
        """The last lines the worker logged."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-20:])


class Scene:
    """Starts workers and jobs against one server and tears all of them down."""

    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.conn = redis.Redis.from_url(redis_url)
        self.workers: list[Worker] = []

    def start_worker(self, name: str, queues: list[str]) -> Worker:
        """Start `rq worker` on `queues` and wait until it listens for commands."""
        rq_script = Path(sys.executable).parent / "rq"
        rq = [str(rq_script)] if rq_script.exists() else [sys.executable, "-m", "rq.cli"]
        command = [*rq, "worker", *queues, "--url", self.redis_url, "--name", name]
        command += ["--job-monitoring-interval", "2"]
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(self.redis_url),
                start_new_session=True,
            )
        worker = Worker(name, process, log_path)
        self.workers.append(worker)

        if not wait_until(lambda: process.poll() is not None or self.listening(name)):
            raise DemoError(f"worker {name} did not start:\n{worker.log_tail()}")
        if process.poll() is not None:
            raise DemoError(f"worker {name} exited at start:\n{worker.log_tail()}")
        return worker

    def listening(self, worker_name: str) -> bool:
        """Whether the worker is registered and subscribed to its command channel."""
        channel = f"rq:pubsub:{worker_name}"
        subscribers = dict(self.conn.pubsub_numsub(channel)).get(channel.encode(), 0)
        return bool(self.conn.exists(f"rq:worker:{worker_name}")) and int(subscribers) > 0

    def start_job(self, queue: str, seconds: int) -> Job:
        """Enqueue a `time.sleep(seconds)` job and wait until a worker has started it."""
        job = Queue(queue, connection=self.conn).enqueue("time.sleep", seconds)
        if not wait_until(lambda: self.status(job.id) == "started"):
            raise DemoError(f"job {job.id} on {queue} never started")
        return job

    def status(self, job_id: str) -> str | None:
        """A job's status through RQ's API; None once the job is gone."""
        try:
            status = Job.fetch(job_id, connection=self.conn).get_status()
        except NoSuchJobError:
            return None
        return str(getattr(status, "value", status))

    def crash(self, worker: Worker) -> None:
        """SIGKILL a worker and its work horse, as the OOM killer would."""
        pid = worker.process.pid
        os.kill(pid, signal.SIGSTOP)  # so it cannot fork another horse meanwhile
        for horse in child_pids(pid):
            # The horse leads its own process group (it calls setpgrp).
            with suppress(ProcessLookupError):
                os.killpg(horse, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        worker.process.wait(timeout=10)
        wait_until(lambda: not self.listening(worker.name))

    def add_orphan_entry(self, queue: str) -> str:
        """Add a started-registry entry naming a job that does not exist; return its job id."""
        job_id, execution_id = str(uuid.uuid4()), uuid.uuid4().hex
        lease_ends = int(time.time()) + 60
        self.conn.zadd(f"rq:wip:{queue}", {f"{job_id}:{execution_id}": lease_ends})
        return job_id

    def close(self) -> None:
        """Stop every worker still running, then close the connection.

        A first SIGTERM asks for RQ's warm shutdown, which waits for the current job; a
        second one, sent more than a second later (RQ ignores repeats within a second), is
        RQ's cold shutdown: the worker kills its work horse and exits.
        """
        running = [w for w in self.workers if w.process.poll() is None]
        for worker in running:
            worker.process.terminate()
        time.sleep(1.2)
        for worker in running:
            if worker.process.poll() is None:
                worker.process.terminate()
        for worker in running:
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.crash(worker)
        self.conn.close()


class DemoError(Exception):
    """Raised when the demo cannot build its scene."""


def child_pids(pid: int) -> list[int]:
    """The direct children of a process, from /proc."""
    children: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def build_scene(scene: Scene) -> None:
    """Leave one abandoned, one overdue, one running and one orphaned entry behind."""
    heading("Building the scene with real rq workers")
    crashed = scene.start_worker("worker-crashed", [REPORTS_QUEUE])
    slow = scene.start_worker("worker-slow", [DEFAULT_QUEUE])
    abandoned = scene.start_job(REPORTS_QUEUE, LONG_JOB_S)
    overdue = scene.start_job(DEFAULT_QUEUE, LONG_JOB_S)
    overdue_started = time.monotonic()
    scene.crash(crashed)
    print(f"{REPORTS_QUEUE}: job {abandoned.id} lost its worker (SIGKILL): abandoned")
    orphan = scene.add_orphan_entry(DEFAULT_QUEUE)
    print(f"{DEFAULT_QUEUE}: entry for job {orphan}, whose hash does not exist: orphaned")

    scene.start_worker("worker-reports", [REPORTS_QUEUE])
    remaining_s = overdue_started + DEFAULT_MAX_AGE_S + 1.5 - time.monotonic()
    print(f"waiting {max(remaining_s, 0):.0f}s for {slow.name}'s job to pass max_age ...")
    time.sleep(max(remaining_s, 0))
    print(f"{DEFAULT_QUEUE}: job {overdue.id} on {slow.name} is past max_age: overdue")

    running = scene.start_job(REPORTS_QUEUE, LONG_JOB_S)
    time.sleep(1)
    print(f"{REPORTS_QUEUE}: job {running.id} started a second ago on worker-reports: running")


def run_opsctl(step: str, args: list[str], redis_url: str) -> bool:
    """Run one opsctl step under a heading; True when it exited as expected."""
    command = [sys.executable, "-m", "opsctl", *args]
    heading(f"{step}: {' '.join(['opsctl', *args])}")
    result = subprocess.run(command, env=child_env(redis_url), timeout=300, check=False)
    if result.returncode in EXPECTED_EXIT_CODES[step]:
        return True
    print(
        f"demo: {step} exited {result.returncode}, expected one of "
        f"{sorted(EXPECTED_EXIT_CODES[step])}",
        file=sys.stderr,
    )
    return False


def main() -> int:
    """Build the scene, run opsctl three times, tear everything down; the exit code."""
    with tempfile.TemporaryDirectory(prefix="opsctl-demo-") as tmp, fake_redis_server() as url:
        heading(f"In-process Redis (fakeredis over TCP) at {url}")
        scene = Scene(url, Path(tmp))
        try:
            build_scene(scene)
            policy = os.path.relpath(POLICY)
            steps = [
                ("dry run", ["apply", policy, "--redis-url", url, "--dry-run"]),
                ("apply", ["apply", policy, "--redis-url", url]),
                ("status", ["status", "--redis-url", url]),
            ]
            ok = [run_opsctl(step, args, url) for step, args in steps]
        except DemoError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            for worker in scene.workers:
                print(f"--- log of {worker.name}:\n{worker.log_tail()}", file=sys.stderr)
            return 1
        finally:
            heading("Stopping the workers and the server")
            scene.close()

    print("\ndemo: done" if all(ok) else "\ndemo: an opsctl step failed", flush=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
