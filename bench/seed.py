"""A private redis-server for the benchmark, and RQ 3 state seeded into it quickly.

Each queue gets one job built through RQ's own API (``Queue.enqueue``, then
``Execution.create`` and ``Job.prepare_for_execution``, as a worker does), so the
hashes carry exactly the fields RQ 3 writes. Every other job is a clone of its
queue's template: the same field set written with one pipelined HSET, under a new
id, with its own execution hash, ``rq:executions:<job>`` entry and started-registry
member ``job_id:execution_id``.

Workers: the first half of the names are live (a worker hash registered by RQ's
``Worker.register_birth``, state ``busy``, an executions set listing its jobs, and a
real subscription on ``rq:pubsub:<name>`` held by this process); the second half are
dead (jobs and registration sets name them, but there is no hash and no subscriber).
"""

from __future__ import annotations

import os

# The benchmark always uses RQ's default key prefix; RQ reads this at import time.
os.environ.pop("RQ_KEY_PREFIX", None)

import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

import redis
from rq import Queue, Worker
from rq.executions import Execution

#: The machine's shared Redis: never contacted.
SHARED_REDIS_PORT = 6379
#: Seconds every seeded key lives: longer than any benchmark run, so nothing expires mid-run.
SEED_TTL_S = 86_400
#: Jobs written per pipeline round trip while seeding.
SEED_BATCH = 500
#: Seconds ago that jobs of dead workers started (their lease expired long since).
DEAD_STARTED_AGO_S = 3_600
#: Seconds ago that jobs of live workers started, and last heartbeat.
LIVE_STARTED_AGO_S, LIVE_BEAT_AGO_S = 60, 10
#: Lease RQ gives an execution with the default monitoring interval.
LEASE_S = 90


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class RedisServer:
    """A redis-server this process started, on 127.0.0.1 and a free port."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=False)

    def flush(self) -> None:
        """Empty the private server (never any other)."""
        assert self.port != SHARED_REDIS_PORT
        self.client().flushall()


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@contextmanager
def private_redis() -> Iterator[RedisServer]:
    """Start a throwaway redis-server (no persistence, temp dir) and stop it afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench: redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="opsctl-bench-redis-") as data_dir:
        port = free_port()
        assert port != SHARED_REDIS_PORT
        command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
        command += ["--appendonly", "no", "--dir", data_dir, "--logfile", "redis.log"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not _answers(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"bench: redis-server on port {port} did not start")
                time.sleep(0.05)
            yield RedisServer(port, process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class Layout:
    """Who is who: queue names and worker names, live and dead."""

    queues: list[str]
    live: list[str]
    dead: list[str]
    queue_of: dict[str, str] = field(default_factory=dict)  # worker → the queue it serves

    @classmethod
    def make(cls, queues: int, workers: int) -> Layout:
        names = [f"bench-w{i:03d}" for i in range(workers)]
        layout = cls([f"bench-q{i:02d}" for i in range(queues)], [], [])
        half = workers // 2
        layout.live, layout.dead = names[: workers - half], names[workers - half :]
        layout.queue_of = {name: layout.queues[i % queues] for i, name in enumerate(names)}
        return layout


@dataclass
class Seeded:
    """What was written: every job id, and how many jobs name a dead worker."""

    jobs: int
    abandoned: int
    ids: list[str]


def iso(epoch_s: float) -> str:
    """A timestamp the way RQ writes it in job hashes."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def register_workers(server: RedisServer, layout: Layout) -> None:
    """Live workers as RQ registers them, and dead ones left in the registration sets."""
    conn = server.client()  # RQ names this connection after each worker; closed below
    for name in layout.live:
        worker = Worker([Queue(layout.queue_of[name], connection=conn)], name=name, connection=conn)
        worker.register_birth()
        worker.set_state("busy")
        conn.expire(worker.key, SEED_TTL_S)
    pipe = conn.pipeline(transaction=False)
    for name in layout.dead:
        pipe.sadd("rq:workers", f"rq:worker:{name}")
        pipe.sadd(f"rq:workers:{layout.queue_of[name]}", f"rq:worker:{name}")
    pipe.execute()
    conn.close()


def subscribe_live(server: RedisServer, layout: Layout) -> redis.client.PubSub:
    """One pub/sub connection subscribed to every live worker's command channel."""
    pubsub = server.client().pubsub()
    pubsub.subscribe(*[f"rq:pubsub:{name}" for name in layout.live])
    deadline = time.monotonic() + 10
    confirmed = 0
    while confirmed < len(layout.live) and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        if message and message["type"] == "subscribe":
            confirmed += 1
    if confirmed < len(layout.live):
        raise SystemExit(f"bench: only {confirmed} of {len(layout.live)} subscriptions confirmed")
    return pubsub


def _template(conn: redis.Redis, queue: str, worker: str) -> tuple[str, str, dict[bytes, bytes]]:
    """One started job built by RQ itself: its id, execution id and job hash."""
    q = Queue(queue, connection=conn)
    job = q.enqueue(
        "app.tasks.process_document",
        "s3://bench-bucket/documents/2024/11/report-000001.pdf",
        options={"ocr": True, "language": "en", "pages": list(range(20))},
        job_timeout=1800,
        result_ttl=500,
        description=f"process_document for {queue}",
    )
    conn.lrem(q.key, 0, job.id)  # the worker popped it
    pipe = conn.pipeline()
    execution = Execution.create(job, LEASE_S, pipe, worker_name=worker)
    job.prepare_for_execution(worker, pipe)
    pipe.execute()
    return job.id, execution.id, conn.hgetall(job.key)


def seed(
    server: RedisServer, layout: Layout, jobs: int, *, all_dead: bool = False, seed_value: int = 7
) -> Seeded:
    """Write ``jobs`` started jobs over the layout's queues; deterministic for one seed_value.

    With ``all_dead`` every job names a dead worker and has a lease that expired
    long ago (the input of the fail contest); otherwise jobs alternate over all
    workers, so half are held by live workers and half are abandoned.
    """
    conn = server.client()
    rng = random.Random(seed_value)
    register_workers(server, layout)
    # Job i belongs to worker i mod W and to the queue that worker serves, so
    # exactly half the jobs are held by live workers unless all_dead is set.
    owners = sorted(layout.dead if all_dead else layout.live + layout.dead)
    live = set(layout.live)
    templates: dict[str, tuple[str, str, dict[bytes, bytes]]] = {}
    ids: list[str] = []
    abandoned = 0
    now = time.time()

    pipe = conn.pipeline(transaction=False)
    for i in range(jobs):
        worker = owners[i % len(owners)]
        queue = layout.queue_of[worker]
        if queue not in templates:
            templates[queue] = _template(conn, queue, worker)
            job_id, exec_id, fields = templates[queue]
        else:
            job_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            exec_id = uuid.UUID(int=rng.getrandbits(128), version=4).hex
            fields = templates[queue][2]
        is_live = worker in live
        abandoned += not is_live
        started = now - (LIVE_STARTED_AGO_S if is_live else DEAD_STARTED_AGO_S)
        beat = now - LIVE_BEAT_AGO_S if is_live else started
        _write_job(pipe, queue, job_id, exec_id, worker, fields, started, beat, is_live)
        ids.append(job_id)
        if len(pipe) >= SEED_BATCH * 8:
            pipe.execute()
    pipe.execute()

    # A dead worker's executions set expired with its heartbeat; a live one's is kept.
    for name in layout.dead:
        conn.delete(f"rq:worker:{name}:executions")
    for name in layout.live:
        conn.expire(f"rq:worker:{name}:executions", SEED_TTL_S)
    conn.close()
    return Seeded(jobs, abandoned, ids)


def _write_job(
    pipe: redis.client.Pipeline,
    queue: str,
    job_id: str,
    exec_id: str,
    worker: str,
    fields: dict[bytes, bytes],
    started: float,
    beat: float,
    is_live: bool,
) -> None:
    job_key, member = f"rq:job:{job_id}", f"{job_id}:{exec_id}"
    mapping = dict(fields)
    mapping.update(
        {
            b"created_at": iso(started - 5).encode(),
            b"enqueued_at": iso(started - 5).encode(),
            b"started_at": iso(started).encode(),
            b"last_heartbeat": iso(beat).encode(),
            b"worker_name": worker.encode(),
        }
    )
    pipe.hset(job_key, mapping=mapping)
    execution = {
        "id": exec_id,
        "job_id": job_id,
        "created_at": started,
        "last_heartbeat": beat,
        "worker_name": worker,
    }
    pipe.hset(f"rq:execution:{member}", mapping=execution)
    pipe.expire(f"rq:execution:{member}", SEED_TTL_S)
    pipe.zadd(f"rq:executions:{job_id}", {exec_id: int(beat) + LEASE_S + 60})
    pipe.expire(f"rq:executions:{job_id}", SEED_TTL_S)
    # The lease: renewed by a live worker, long expired for a dead one.
    pipe.zadd(f"rq:wip:{queue}", {member: int(beat) + LEASE_S})
    if is_live:
        pipe.sadd(f"rq:worker:{worker}:executions", member)
