"""The floor: only the Redis reads an `opsctl apply --dry-run` needs, and nothing else.

Run as its own process (like opsctl) so interpreter start-up counts for both:

    python bench/floor.py redis://127.0.0.1:PORT/0 [--scripted]

By default the job and execution hashes are read as two pipelined HMGETs per
entry. With ``--scripted`` they are read the way opsctl reads them, through its
read-only script (500 entries a call), and the replies are kept as they come.

It reads what opsctl's state reader reads, with the same batch sizes, and keeps
only the raw replies (plus the worker names it must pull out of them to know
which workers to read). Prints one JSON line: the counts read and the seconds
spent inside the script.
"""

from __future__ import annotations

import json
import sys
import time

import redis

from opsctl.keys import EXECUTION_FIELDS, JOB_FIELDS, WORKER_FIELDS
from opsctl.state import HashReader

PREFIX = "rq"
#: Commands per pipeline round trip, and members per ZRANGE: opsctl's own sizes.
BATCH, RANGE_CHUNK = 1000, 10_000
WORKER_NAME_AT = JOB_FIELDS.index("worker_name")


def registries(conn: redis.Redis) -> list[bytes]:
    """Queue names from rq:queues and from the started-registry keys."""
    names = {m[len(PREFIX) + 7 :] for m in conn.smembers(f"{PREFIX}:queues")}
    cut = len(PREFIX) + 5
    names.update(k[cut:] for k in conn.scan_iter(match=f"{PREFIX}:wip:*", count=1000))
    return sorted(names)


def members(conn: redis.Redis, queue: bytes) -> list[tuple[bytes, float]]:
    key = b"%s:wip:%s" % (PREFIX.encode(), queue)
    found: list[tuple[bytes, float]] = []
    while True:
        chunk = conn.zrange(key, len(found), len(found) + RANGE_CHUNK - 1, withscores=True)
        found += chunk
        if len(chunk) < RANGE_CHUNK:
            return found


def job_replies(conn: redis.Redis, entries: list[tuple[bytes, float]]) -> list[object]:
    """HMGET of the job and execution fields opsctl reads, two commands per entry."""
    replies: list[object] = []
    prefix = PREFIX.encode()
    for start in range(0, len(entries), BATCH // 2):
        pipe = conn.pipeline(transaction=False)
        for member, _score in entries[start : start + BATCH // 2]:
            job_id = member.rpartition(b":")[0]
            pipe.hmget(b"%s:job:%s" % (prefix, job_id), JOB_FIELDS)
            pipe.hmget(b"%s:execution:%s" % (prefix, member), EXECUTION_FIELDS)
        replies += pipe.execute()
    return replies


def scripted_replies(conn: redis.Redis, entries: list[tuple[bytes, float]]) -> list[object]:
    """The same fields through opsctl's read script: replies only, no records."""
    reader = HashReader(conn)
    prefix = PREFIX.encode()
    keys: list[bytes] = []
    for member, _score in entries:
        keys.append(b"%s:job:%s" % (prefix, member.rpartition(b":")[0]))
        keys.append(b"%s:execution:%s" % (prefix, member))
    replies = reader.read(keys, [True] * len(entries))
    reader.close()
    return replies


def worker_names(conn: redis.Redis, queues: list[bytes], replies: list[object]) -> set[bytes]:
    pipe = conn.pipeline(transaction=False)
    pipe.smembers(f"{PREFIX}:workers")
    for queue in queues:
        pipe.smembers(b"%s:workers:%s" % (PREFIX.encode(), queue))
    cut = len(PREFIX) + 8
    names = {m[cut:] for reply in pipe.execute() for m in reply}
    for i in range(0, len(replies), 2):
        job, execution = replies[i], replies[i + 1]
        name = execution[0] or job[WORKER_NAME_AT]  # type: ignore[index]
        if name:
            names.add(name if isinstance(name, bytes) else name.encode())
    return names


def worker_replies(conn: redis.Redis, names: list[bytes]) -> list[object]:
    replies: list[object] = []
    prefix = PREFIX.encode()
    for start in range(0, len(names), BATCH // 4):
        pipe = conn.pipeline(transaction=False)
        for name in names[start : start + BATCH // 4]:
            pipe.hmget(b"%s:worker:%s" % (prefix, name), WORKER_FIELDS)
            pipe.ttl(b"%s:worker:%s" % (prefix, name))
            pipe.smembers(b"%s:worker:%s:executions" % (prefix, name))
        replies += pipe.execute()
    for start in range(0, len(names), 500):
        channels = [b"%s:pubsub:%s" % (prefix, n) for n in names[start : start + 500]]
        replies.append(conn.pubsub_numsub(*channels))
    replies.append(conn.client_list())
    return replies


def main(url: str, scripted: bool) -> None:
    started = time.perf_counter()
    conn = redis.Redis.from_url(url, decode_responses=False)
    conn.time()
    queues = registries(conn)
    replies: list[object] = []
    for queue in queues:
        read = scripted_replies if scripted else job_replies
        replies += read(conn, members(conn, queue))
    names = sorted(worker_names(conn, queues, replies))
    workers = worker_replies(conn, names)
    elapsed = time.perf_counter() - started
    report = {"entries": len(replies) // 2, "workers": len(names), "replies": len(workers)}
    print(json.dumps({**report, "seconds": elapsed}))


if __name__ == "__main__":
    main(sys.argv[1], "--scripted" in sys.argv[2:])
