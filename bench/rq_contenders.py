"""What opsctl is compared with: RQ's own ways of reading and cleaning started jobs.

    python bench/rq_contenders.py URL fetch SAMPLE   # Job.fetch per job (the old approach)
    python bench/rq_contenders.py URL fetch_many     # Job.fetch_many, 1000 ids a call
    python bench/rq_contenders.py URL cleanup        # StartedJobRegistry.cleanup per queue

Each mode lists the started jobs the way RQ's API does
(``StartedJobRegistry.get_job_ids(cleanup=False)`` per queue in ``Queue.all``) and
prints one JSON line with the seconds of each phase, measured inside the script.
"""

from __future__ import annotations

import os

os.environ.pop("RQ_KEY_PREFIX", None)

import json
import sys
import time

import redis
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry

#: Ids per Job.fetch_many call.
FETCH_MANY_BATCH = 1000
#: A cutoff after every lease: RQ's cleanup then handles every entry.
FAR_FUTURE = 4_102_444_800  # 2100-01-01


def started_ids(conn: redis.Redis) -> list[str]:
    ids: list[str] = []
    for queue in Queue.all(connection=conn):
        ids += StartedJobRegistry(queue=queue).get_job_ids(cleanup=False)
    return ids


def fetch(conn: redis.Redis, sample: int) -> dict[str, float]:
    """Job.fetch one by one over an evenly spread sample of the ids."""
    t0 = time.perf_counter()
    ids = started_ids(conn)
    t1 = time.perf_counter()
    step = max(1, len(ids) // sample)
    chosen = ids[::step][:sample]
    for job_id in chosen:
        Job.fetch(job_id, connection=conn)
    t2 = time.perf_counter()
    return {"ids": len(ids), "sample": len(chosen), "list_s": t1 - t0, "fetch_s": t2 - t1}


def fetch_many(conn: redis.Redis) -> dict[str, float]:
    t0 = time.perf_counter()
    ids = started_ids(conn)
    t1 = time.perf_counter()
    jobs = 0
    for start in range(0, len(ids), FETCH_MANY_BATCH):
        found = Job.fetch_many(ids[start : start + FETCH_MANY_BATCH], connection=conn)
        jobs += sum(1 for job in found if job is not None)
    t2 = time.perf_counter()
    return {"ids": len(ids), "jobs": jobs, "list_s": t1 - t0, "fetch_s": t2 - t1}


def cleanup(conn: redis.Redis) -> dict[str, float]:
    """RQ's own handling of abandoned jobs, one call per queue."""
    t0 = time.perf_counter()
    queues = Queue.all(connection=conn)
    for queue in queues:
        StartedJobRegistry(queue=queue).cleanup(timestamp=FAR_FUTURE)
    return {"queues": len(queues), "cleanup_s": time.perf_counter() - t0}


def main() -> None:
    started = time.perf_counter()
    url, mode = sys.argv[1], sys.argv[2]
    conn = redis.Redis.from_url(url, decode_responses=False)
    if mode == "fetch":
        result = fetch(conn, int(sys.argv[3]))
    elif mode == "fetch_many":
        result = fetch_many(conn)
    elif mode == "cleanup":
        result = cleanup(conn)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps({**result, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
