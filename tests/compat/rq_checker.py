"""Enqueue jobs and report what one RQ release sees, through that release's own API.

The compatibility matrix runs this script with the interpreter of each RQ release it
covers (1.16 to 3.x), so it uses only API those releases share, and imports nothing
from the test suite or from opsctl. It reads registries without RQ's cleanup, which
would itself change what is checked. Every command prints one JSON document.

    python rq_checker.py enqueue URL QUEUE FUNC [ARG_JSON ...] [--depends-on ID] ...
    python rq_checker.py state URL JOB_ID
    python rq_checker.py wait URL JOB_ID STATUS --timeout SECONDS
    python rq_checker.py retry-failed URL JOB_ID
    python rq_checker.py serve      # the same commands, one JSON argument list per line
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Any

import redis
import rq
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Dependency, Job
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

REGISTRIES = {
    "started": StartedJobRegistry,
    "failed": FailedJobRegistry,
    "canceled": CanceledJobRegistry,
    "finished": FinishedJobRegistry,
    "deferred": DeferredJobRegistry,
    "scheduled": ScheduledJobRegistry,
}


def _text(value: Any) -> Any:
    """An enum (RQ 2+) or plain string (RQ 1) as its plain value."""
    return getattr(value, "value", value)


def enqueue(conn: redis.Redis, args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"job_timeout": args.timeout}
    if args.job_id:
        options["job_id"] = args.job_id
    if args.depends_on:
        options["depends_on"] = Dependency(jobs=args.depends_on, allow_failure=args.allow_failure)
    if args.retry:
        options["retry"] = Retry(max=args.retry)
    values = [json.loads(a) for a in args.args]
    job = Queue(args.queue, connection=conn).enqueue(args.func, *values, **options)
    return {"id": job.id, "rq": rq.__version__}


def _in_started(conn: redis.Redis, queue: str, job_id: str) -> bool:
    registry = StartedJobRegistry(queue, connection=conn)
    if hasattr(registry, "get_job_and_execution_ids"):  # RQ 2+: job_id:execution_id
        return job_id in [j for j, _ in registry.get_job_and_execution_ids(cleanup=False)]
    return job_id in registry  # RQ 1: the bare job id


def state(conn: redis.Redis, job_id: str, queue: str | None = None) -> dict[str, Any]:
    """The job as this release sees it; ``queue`` is used when the job is gone."""
    seen: dict[str, Any] = {"rq": rq.__version__, "id": job_id, "exists": True}
    try:
        job = Job.fetch(job_id, connection=conn)
    except NoSuchJobError:
        seen["exists"] = False
        job = None
    origin = job.origin if job is not None else queue
    if job is not None:
        seen["status"] = _text(job.get_status())
        seen["origin"] = job.origin
        seen["retries_left"] = job.retries_left
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            seen["exc_info"] = job.exc_info
        result = job.latest_result()
        seen["latest_result"] = None
        if result is not None:
            seen["latest_result"] = {
                "type": int(_text(result.type)),
                "exc_string": result.exc_string,
                "return_value": result.return_value,
            }
    if origin:
        registries = {}
        for name, registry_class in REGISTRIES.items():
            if name == "started":
                registries[name] = _in_started(conn, origin, job_id)
            else:
                registries[name] = job_id in registry_class(origin, connection=conn)
        seen["registries"] = [name for name, held in registries.items() if held]
        seen["in_queue"] = job_id in Queue(origin, connection=conn).get_job_ids()
    return seen


def retry_failed(conn: redis.Redis, job_id: str) -> dict[str, Any]:
    """Requeue a failed job from its FailedJobRegistry, as a user retries one."""
    job = Job.fetch(job_id, connection=conn)
    FailedJobRegistry(job.origin, connection=conn).requeue(job_id)
    return state(conn, job_id)


def wait(conn: redis.Redis, args: argparse.Namespace) -> dict[str, Any]:
    """Poll until the job has ``status``; the last state seen either way."""
    deadline = time.monotonic() + args.timeout
    while True:
        seen = state(conn, args.job_id)
        if seen.get("status") == args.status or time.monotonic() >= deadline:
            return seen
        time.sleep(0.1)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("enqueue")
    p.add_argument("url")
    p.add_argument("queue")
    p.add_argument("func")
    p.add_argument("args", nargs="*")
    p.add_argument("--depends-on", action="append")
    p.add_argument("--allow-failure", action="store_true")
    p.add_argument("--retry", type=int, default=0)
    p.add_argument("--timeout", type=int, default=180)
    p.add_argument("--job-id")
    p = commands.add_parser("state")
    p.add_argument("url")
    p.add_argument("job_id")
    p.add_argument("--queue")
    p = commands.add_parser("retry-failed")
    p.add_argument("url")
    p.add_argument("job_id")
    p = commands.add_parser("wait")
    p.add_argument("url")
    p.add_argument("job_id")
    p.add_argument("status")
    p.add_argument("--timeout", type=float, default=20)
    return parser


def run(argv: list[str]) -> dict[str, Any]:
    args = parser().parse_args(argv)
    conn = redis.Redis.from_url(args.url)
    try:
        if args.command == "enqueue":
            return enqueue(conn, args)
        if args.command == "state":
            return state(conn, args.job_id, args.queue)
        if args.command == "retry-failed":
            return retry_failed(conn, args.job_id)
        return wait(conn, args)
    finally:
        conn.close()


def serve() -> int:
    """Answer commands until stdin closes: one JSON list of arguments per line in, one
    JSON document per line out (``{"error": ...}`` when the command failed)."""
    for line in sys.stdin:
        try:
            out = run(json.loads(line))
        except BaseException as exc:  # report it; the next command still gets an answer
            out = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(out, default=str) + "\n")
        sys.stdout.flush()
    return 0


def main() -> int:
    if sys.argv[1:] == ["serve"]:
        return serve()
    json.dump(run(sys.argv[1:]), sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
