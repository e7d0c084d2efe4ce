"""Record fuzzing: damaged, random and wrong-typed RQ records never break opsctl.

Each example empties the suite's private redis-server, builds two normal abandoned jobs
with RQ's own API (queue ``normal``, dead worker ``dead``), then writes a random mix of
damaged records beside them: job, execution and worker hashes with odd, binary or huge
values; started-registry members of every shape and score; keys of the wrong type where
opsctl expects a zset, set, hash or list; registration sets holding things that are not
worker keys. opsctl must report such records, never stop on them: a dry run prints a JSON
report and changes no key, ``status`` answers, and a real ``apply`` still fails the two
normal jobs.

The CLI runs in-process (typer's CliRunner) so that a fixed budget of examples fits in a
few seconds; one test runs the real process over one state that holds every kind of
damage. Values that once broke a run are pinned by their own tests at the end of the file.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rq import Queue
from rq.executions import Execution

from conftest import SHARED_REDIS_PORT, RedisServer, invoke_opsctl, job_status, run_opsctl

pytestmark = pytest.mark.redis_server


#: The queue and dead worker of the normal abandoned jobs; random damage never
#: changes the type of this queue's keys or of the dead worker's keys.
NORMAL_QUEUE = "normal"
DEAD_WORKER = "dead"
NORMAL_JOBS = 2

#: Policy actions a dry run is tried with.
ACTIONS = ("fail", "requeue", "cancel", "delete")

#: Examples per property; with derandomize the same examples run every time.
DRY_RUN_EXAMPLES = 200
STATUS_EXAMPLES = 100
APPLY_EXAMPLES = 200

FUZZ = settings(
    max_examples=DRY_RUN_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- values --------------------------------------------------------------------------------

#: Stand-ins for 100 KB values, expanded only when written, so that hypothesis never
#: prints them when it shows a failing example.
HUGE_BINARY = b"<huge binary>"
HUGE_TEXT = b"<huge text>"
HUGE_VALUES = {
    HUGE_BINARY: b"\x00\xff\x80huge" * 15_000,  # 105 KB, not UTF-8
    HUGE_TEXT: "é".encode() * 50_000,  # 100 KB of valid UTF-8
}

ODD_TIMESTAMPS = (
    "",
    " ",
    "0",
    "-1",
    "nan",
    "inf",
    "-inf",
    "1e308",
    "1e20",
    "1700000000",
    "1700000000.25",
    "2024-01-01T00:00:00Z",
    "2024-01-01T00:00:00.123456Z",
    "2024-01-01 00:00:00",
    "2024-01-01T00:00:00+05:30",
    "2024-W01-1",
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00",
    "2024-13-45T99:99:99Z",
    "T",
    "-",
    "yesterday",
)
STATUSES = (
    "started",
    "queued",
    "finished",
    "failed",
    "stopped",
    "canceled",
    "deferred",
    "scheduled",
    "",
    "STARTED",
    "started ",
    "started\x00",
)
COUNTS = ("0", "1", "3", "-2", "180", "abc", "1.5", " 2 ", "", "99999999999")
RETRY_INTERVALS = ("[]", "[1]", "[0, 5]", "[-5]", "[1.5]", '["a"]', "{}", "[", "null", "[[1]]")
FAILURE_TTLS = ("0", "-1", "60", "abc", "1.5", "", "31536000")
WORKER_STATES = ("idle", "busy", "started", "suspended", "", "BUSY")

# Values that once broke a run (see the tests at the end of the file); only the dry run
# and status properties draw them at random.
BUG_RETRIES_LEFT = ("1_0",)  # Python reads 10, Lua cannot: the fail script dies midway
BUG_RETRY_INTERVALS = ("[1e400]", "[NaN]", "[Infinity]")  # int() of inf/nan aborts the run
BUG_FAILURE_TTLS = ("99999999999999999999", "100000000000000000")  # EXPIRE refuses them

#: Job ids of damaged records; never the id of a normal job (those are uuids).
JOB_IDS = ("fa", "fb", "f:c", "f:c:d", "fé", "", "f\x1b[2J")
BINARY_JOB_IDS = (b"f\xff\xfe",)
EXECUTION_IDS = ("e1", "e2", "", "x:y")
WORKER_NAMES = ("w1", "w2", "wünï", "w:x", "", "w" * 300)
#: Queues whose keys random damage may give the wrong type.
DAMAGED_QUEUES = ("fq", "f:q", "fq-ünï", "*", "")
#: Queues started-registry members and job origins are drawn from.
QUEUES = (NORMAL_QUEUE, *DAMAGED_QUEUES)
SCORES = (float("inf"), float("-inf"), 1e308, -1e308, 0.0, 1.5, 1.7e9, 4e9)


def raw(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def expand(value: bytes) -> bytes:
    return HUGE_VALUES.get(value, value)


generic_values = st.one_of(
    st.binary(max_size=12),
    st.text(max_size=12).map(raw),
    st.sampled_from([b"", HUGE_BINARY, HUGE_TEXT, b"\xff\xfe", b"\x1b[31mred", b"[bold]x"]),
)


def field_values(*pools: tuple[str | bytes, ...]) -> st.SearchStrategy[bytes]:
    """A field's interesting values, or any generic (binary, text, huge) one."""
    specific = [raw(v) for pool in pools for v in pool]
    return st.one_of(st.sampled_from(specific), generic_values)


job_ids = st.sampled_from([*map(raw, JOB_IDS), *BINARY_JOB_IDS])
queue_names = st.sampled_from(QUEUES).map(raw)
worker_names = st.sampled_from(WORKER_NAMES).map(raw)
members = st.one_of(
    job_ids,
    st.builds(lambda j, e: j + b":" + raw(e), job_ids, st.sampled_from(EXECUTION_IDS)),
    st.sampled_from([b"", b":", b"::", b"a:b:c:d:e:f", b"fa:e1:", b":e1"]),
    st.binary(max_size=10),
)

# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """One Redis key, written with one type; a later write of another type replaces it."""

    kind: str  # hash, string, list, set or zset
    key: bytes
    value: Any

    def apply(self, conn: redis.Redis) -> None:
        if self.kind == "hash" and not self.value:
            return
        found = conn.type(self.key)
        if found not in (b"none", self.kind.encode()):
            conn.delete(self.key)
        if self.kind == "hash":
            conn.hset(self.key, mapping={k: expand(v) for k, v in self.value.items()})
        elif self.kind == "string":
            conn.set(self.key, expand(self.value))
        elif self.kind == "list":
            conn.rpush(self.key, *self.value)
        elif self.kind == "set":
            conn.sadd(self.key, *self.value)
        else:
            conn.zadd(self.key, self.value)


def hashes(key: bytes, fields: dict[str, st.SearchStrategy[bytes]]) -> st.SearchStrategy[Write]:
    """A hash at ``key`` holding any subset of ``fields`` and maybe some stray ones."""
    known = st.fixed_dictionaries({}, optional={raw(k): v for k, v in fields.items()})
    stray = st.dictionaries(st.binary(min_size=1, max_size=6), generic_values, max_size=2)
    return st.builds(lambda a, b: Write("hash", key, {**b, **a}), known, stray)


def job_fields(apply_safe: bool) -> dict[str, st.SearchStrategy[bytes]]:
    """Every job hash field opsctl reads, and some it must never read, each damaged."""
    retries = COUNTS if apply_safe else COUNTS + BUG_RETRIES_LEFT
    intervals = RETRY_INTERVALS if apply_safe else RETRY_INTERVALS + BUG_RETRY_INTERVALS
    ttls = FAILURE_TTLS if apply_safe else FAILURE_TTLS + BUG_FAILURE_TTLS
    return {
        "status": field_values(STATUSES),
        "origin": field_values(QUEUES),
        "created_at": field_values(ODD_TIMESTAMPS),
        "started_at": field_values(ODD_TIMESTAMPS),
        "enqueued_at": field_values(ODD_TIMESTAMPS),
        "last_heartbeat": field_values(ODD_TIMESTAMPS),
        "timeout": field_values(COUNTS),
        "worker_name": field_values(WORKER_NAMES),
        "retries_left": field_values(retries),
        "retry_intervals": field_values(intervals),
        "enqueue_at_front_on_retry": field_values(("0", "1", "true")),
        "failure_ttl": field_values(ttls),
        "data": field_values((HUGE_BINARY,)),
        "meta": field_values((b"\x80\x04not a pickle",)),
    }


def execution_fields() -> dict[str, st.SearchStrategy[bytes]]:
    return {
        "id": field_values(EXECUTION_IDS),
        "job_id": field_values(JOB_IDS),
        "worker_name": field_values(WORKER_NAMES),
        "created_at": field_values(ODD_TIMESTAMPS),
        "last_heartbeat": field_values(ODD_TIMESTAMPS),
    }


def job_hashes(apply_safe: bool) -> st.SearchStrategy[Write]:
    fields = job_fields(apply_safe)
    return job_ids.flatmap(lambda job: hashes(b"rq:job:" + job, fields))


def execution_hashes() -> st.SearchStrategy[Write]:
    keys = st.builds(
        lambda j, e: b"rq:execution:" + j + b":" + raw(e), job_ids, st.sampled_from(EXECUTION_IDS)
    )
    return keys.flatmap(lambda key: hashes(key, execution_fields()))


def started_jobs(apply_safe: bool) -> st.SearchStrategy[list[Write]]:
    """A job left started by a dead worker, whole enough for opsctl to act on, with any of
    its fields damaged: the registry entry, the job hash and maybe the execution hash."""
    fields = job_fields(apply_safe)
    status = st.one_of(st.just(b"started"), fields.pop("status"))
    job_hash = st.builds(
        lambda first, rest: {b"status": first, **rest},
        status,
        st.fixed_dictionaries({}, optional={raw(k): v for k, v in fields.items()}),
    )
    execution_hash = st.fixed_dictionaries(
        {}, optional={raw(k): v for k, v in execution_fields().items()}
    )

    def build(
        job: bytes,
        execution: bytes,
        queue: bytes,
        score: float,
        job_fields: dict[bytes, bytes],
        execution_fields: dict[bytes, bytes],
    ) -> list[Write]:
        member = job + b":" + execution if execution else job
        writes = [
            Write("zset", b"rq:wip:" + queue, {member: score}),
            Write("hash", b"rq:job:" + job, job_fields),
        ]
        if execution:
            key = b"rq:execution:" + job + b":" + execution
            writes.append(Write("hash", key, execution_fields))
        return writes

    return st.builds(
        build,
        job_ids,
        st.sampled_from([b"e1", b"e2", b""]),
        queue_names,
        st.sampled_from(SCORES),
        job_hash,
        execution_hash,
    )


def worker_hashes() -> st.SearchStrategy[Write]:
    fields = {
        "birth": field_values(ODD_TIMESTAMPS),
        "death": field_values(ODD_TIMESTAMPS),
        "last_heartbeat": field_values(ODD_TIMESTAMPS),
        "state": field_values(WORKER_STATES),
        "current_job": field_values(JOB_IDS),
        "queues": field_values(("normal,fq", ",,,", "fq", "")),
        "pid": field_values(COUNTS),
        "hostname": field_values(("", "host")),
        "version": field_values(("3.0.0", "")),
    }
    return worker_names.flatmap(lambda name: hashes(b"rq:worker:" + name, fields))


def worker_executions() -> st.SearchStrategy[Write]:
    return st.builds(
        lambda name, items: Write("set", b"rq:worker:" + name + b":executions", items),
        worker_names,
        st.lists(members.filter(bool), min_size=1, max_size=3),
    )


def registry_members() -> st.SearchStrategy[Write]:
    return st.builds(
        lambda queue, member, score: Write("zset", b"rq:wip:" + queue, {member: score}),
        queue_names,
        members,
        st.sampled_from(SCORES),
    )


def registrations() -> st.SearchStrategy[Write]:
    """Members of the registration sets and of rq:queues, worker keys or not."""
    worker_keys = st.one_of(
        worker_names.map(lambda n: b"rq:worker:" + n),
        st.sampled_from([b"rq:worker:dead", b"garbage", b"\xff", b"rq:worker:", b""]),
    )
    queue_keys = st.one_of(
        queue_names.map(lambda q: b"rq:queue:" + q),
        st.sampled_from([b"garbage", b"rq:queue:\xff", b"rq:queue:", b""]),
    )
    sets = st.one_of(st.just(b"rq:workers"), queue_names.map(lambda q: b"rq:workers:" + q)).flatmap(
        lambda key: st.builds(
            lambda ms: Write("set", key, ms), st.lists(worker_keys, min_size=1, max_size=3)
        )
    )
    queues = st.builds(
        lambda ms: Write("set", b"rq:queues", ms), st.lists(queue_keys, min_size=1, max_size=3)
    )
    return st.one_of(sets, queues)


def wrong_typed_keys(apply_safe: bool, rescue_damage: bool) -> st.SearchStrategy[Write]:
    """A key holding a type other than the one RQ (and opsctl) expects there."""
    damaged_queue = st.sampled_from(DAMAGED_QUEUES).map(raw)
    other = st.sampled_from(WORKER_NAMES[1:]).map(raw)  # never the dead worker
    targets: list[st.SearchStrategy[tuple[bytes, tuple[str, ...]]]] = [
        damaged_queue.map(lambda q: (b"rq:wip:" + q, ("string", "hash", "list", "set"))),
        st.just((b"rq:workers", ("hash", "string", "list", "zset"))),
        damaged_queue.map(lambda q: (b"rq:workers:" + q, ("string", "hash"))),
        damaged_queue.map(lambda q: (b"rq:queue:" + q, ("hash", "string"))),
        damaged_queue.map(lambda q: (b"rq:failed:" + q, ("string", "set"))),
        job_ids.map(lambda j: (b"rq:job:" + j, ("string", "list", "set", "zset"))),
        job_ids.map(lambda j: (b"rq:executions:" + j, ("string",))),
        job_ids.map(lambda j: (b"rq:results:" + j, ("string", "hash"))),
        job_ids.map(lambda j: (b"rq:job:" + j + b":dependents", ("string",))),
        job_ids.map(lambda j: (b"rq:execution:" + j + b":e1", ("string",))),
        other.map(lambda n: (b"rq:worker:" + n, ("string", "list"))),
        other.map(lambda n: (b"rq:worker:" + n + b":executions", ("string",))),
    ]
    if not apply_safe:
        targets.append(st.just((b"rq:queues", ("list", "string", "hash", "zset"))))
    if rescue_damage:
        targets.append(job_ids.map(lambda j: (b"opsctl:rescues:rq:" + j, ("hash",))))
    return st.one_of(targets).flatmap(
        lambda target: st.sampled_from(target[1]).map(lambda kind: of_kind(kind, target[0]))
    )


def of_kind(kind: str, key: bytes) -> Write:
    values = {
        "string": b"not what you expect",
        "hash": {b"status": b"started"},
        "list": [b"rq:queue:normal"],
        "set": [b"rq:worker:w1"],
        "zset": {b"fa": 1.0},
    }
    return Write(kind, key, values[kind])


def damage(apply_safe: bool, rescue_damage: bool = True) -> st.SearchStrategy[list[Write]]:
    """A list of damaged records.

    ``apply_safe`` leaves out the damage that trips a known bug of a real apply;
    ``rescue_damage`` allows a wrong-typed requeue counter (a known bug when requeueing).
    """
    single = st.one_of(
        job_hashes(apply_safe),
        execution_hashes(),
        worker_hashes(),
        worker_executions(),
        registry_members(),
        registrations(),
        wrong_typed_keys(apply_safe, rescue_damage),
    )
    record = st.one_of(started_jobs(apply_safe), single.map(lambda write: [write]))
    # At least one damaged job opsctl will act on, with other damage before and after it.
    groups = st.tuples(
        st.lists(record, max_size=8),
        st.lists(started_jobs(apply_safe), min_size=1, max_size=4),
        st.lists(record, max_size=4),
    )
    return groups.map(lambda parts: [write for part in parts for group in part for write in group])


# --- the Redis state -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def conn(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the suite's private server (never the shared 6379), for every example."""
    assert redis_server.port != SHARED_REDIS_PORT
    client = redis_server.client()
    yield client
    client.close()


def abandoned_jobs(conn: redis.Redis, count: int = NORMAL_JOBS) -> list[str]:
    """Jobs a worker started and then died with, built with RQ's own API."""
    queue = Queue(NORMAL_QUEUE, connection=conn)
    ids = []
    for _ in range(count):
        job = queue.enqueue("jobs.quick")
        with conn.pipeline() as pipe:
            Execution.create(job, 600, pipe, worker_name=DEAD_WORKER)
            job.prepare_for_execution(DEAD_WORKER, pipe)
            pipe.lrem(queue.key, 0, job.id)
            pipe.execute()
        ids.append(job.id)
    return ids


def build_state(conn: redis.Redis, writes: list[Write]) -> list[str]:
    """An emptied server with two normal abandoned jobs, then ``writes``; the jobs' ids."""
    conn.flushall()  # the suite's own server, started for its tests
    ids = abandoned_jobs(conn)
    for write in writes:
        write.apply(conn)
    return ids


def every_key(conn: redis.Redis) -> dict[bytes, tuple[bytes, Any, int]]:
    """Every key's type, content and time to live in milliseconds (-1: forever).

    Contents are compared rather than DUMPs: a read can advance the incremental rehash
    of a large hash or set, which reorders its DUMP without changing anything in it.
    """
    keys = list(conn.scan_iter(count=1000))
    pipe = conn.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
        pipe.pttl(key)
    replies = pipe.execute()
    found = {}
    for i, key in enumerate(keys):
        kind = replies[2 * i]
        found[key] = (kind, content(conn, key, kind), replies[2 * i + 1])
    return found


def assert_unchanged(before: dict[bytes, tuple[bytes, Any, int]], conn: redis.Redis) -> None:
    """Same keys, types and contents; no expiry set, removed or pushed back."""
    after = every_key(conn)
    assert sorted(after) == sorted(before), "a dry run added or removed keys"
    for key, (kind, value, ttl_ms) in before.items():
        kind_after, value_after, ttl_after_ms = after[key]
        assert (kind_after, value_after) == (kind, value), f"a dry run changed {key!r}"
        assert (ttl_after_ms == -1) == (ttl_ms == -1), f"a dry run changed the expiry of {key!r}"
        assert ttl_after_ms <= ttl_ms, f"a dry run pushed back the expiry of {key!r}"


def content(conn: redis.Redis, key: bytes, kind: bytes) -> Any:
    if kind == b"string":
        return conn.get(key)
    if kind == b"hash":
        return conn.hgetall(key)
    if kind == b"list":
        return conn.lrange(key, 0, -1)
    if kind == b"set":
        return conn.smembers(key)
    if kind == b"zset":
        return conn.zrange(key, 0, -1, withscores=True)
    if kind == b"stream":
        return conn.xrange(key)
    return conn.dump(key)


def started_members(conn: redis.Redis) -> set[tuple[bytes, bytes]]:
    """(registry key, member) of every started-registry entry."""
    found = set()
    for key in conn.scan_iter(match="rq:wip:*", count=1000):
        if conn.type(key) == b"zset":
            found.update((key, member) for member in conn.zrange(key, 0, -1))
    return found


# --- running opsctl ------------------------------------------------------------------------


def policy_file(tmp_dir: Path, action: str = "fail") -> Path:
    path = tmp_dir / f"policy-{action}.yaml"
    if not path.exists():
        path.write_text(f'version: 1\ndefaults:\n  action: {action}\nqueues:\n  - name: "*"\n')
    return path


def shown(result: Result) -> str:
    return f"exit {result.exit_code}\nstdout:\n{result.stdout[:4000]}\nstderr:\n{result.stderr}"


def assert_clean(result: Result, codes: tuple[int, ...]) -> dict[str, Any]:
    """The JSON report of a run that exited with one of ``codes`` and printed no traceback."""
    assert result.exit_code in codes, shown(result)
    for stream in (result.stdout, result.stderr):
        assert "Traceback" not in stream, shown(result)
        assert "error: unexpected" not in stream, shown(result)
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("policies")


def is_readable(text: str) -> bool:
    return all(c.isprintable() or c in "\n\t" for c in text)


# --- properties ----------------------------------------------------------------------------


@FUZZ
@given(
    scenario=st.sampled_from(ACTIONS).flatmap(
        lambda a: st.tuples(st.just(a), damage(apply_safe=False, rescue_damage=a != "requeue"))
    )
)
def test_dry_run_over_damaged_records_reports_json_and_changes_no_key(
    redis_server: RedisServer, conn: redis.Redis, policies: Path, scenario: tuple[str, list[Write]]
) -> None:
    action, writes = scenario
    normal = build_state(conn, writes)
    before = every_key(conn)

    result = invoke_opsctl(
        "apply", str(policy_file(policies, action)), "--dry-run", "--format", "json",
        "--redis-url", redis_server.url,
    )  # fmt: skip

    report = assert_clean(result, (0,))
    assert_unchanged(before, conn)
    reported = {line["id"]: line for line in report["jobs"]}
    for job_id in normal:
        assert reported[job_id]["state"] == "abandoned", json.dumps(reported[job_id])
        assert reported[job_id]["outcome"] == "planned", json.dumps(reported[job_id])


@settings(FUZZ, max_examples=STATUS_EXAMPLES)
@given(writes=damage(apply_safe=False))
def test_status_over_damaged_records_exits_0_with_a_json_count_of_each_queue(
    redis_server: RedisServer, conn: redis.Redis, writes: list[Write]
) -> None:
    build_state(conn, writes)

    result = invoke_opsctl("status", "--format", "json", "--redis-url", redis_server.url)

    assert result.exit_code == 0, shown(result)
    document = json.loads(result.stdout)
    normal = [q for q in document["queues"] if q["name"] == NORMAL_QUEUE]
    assert len(normal) == 1, result.stdout[:4000]
    assert normal[0]["started"] >= NORMAL_JOBS, json.dumps(normal[0])


@settings(FUZZ, max_examples=APPLY_EXAMPLES)
@given(writes=damage(apply_safe=True))
def test_apply_over_damaged_records_still_fails_the_abandoned_jobs_and_reports_the_rest(
    redis_server: RedisServer, conn: redis.Redis, policies: Path, writes: list[Write]
) -> None:
    normal = build_state(conn, writes)
    entries_before = started_members(conn)

    result = invoke_opsctl(
        "apply", str(policy_file(policies)), "--format", "json", "--redis-url", redis_server.url
    )

    report = assert_clean(result, (0, 1))
    for job_id in normal:
        assert job_status(conn, job_id) == "failed", shown(result)
    # A change is all or nothing: an entry that left its registry belongs to a job
    # the report says was done.
    removed = entries_before - started_members(conn)
    done = {
        (f"rq:wip:{line['queue']}", line["entry"])
        for line in report["jobs"]
        if line["outcome"] == "done"
    }
    shown_removed = {(k.decode(errors="backslashreplace"), m.decode(errors="backslashreplace"))
                     for k, m in removed}  # fmt: skip
    assert shown_removed <= done, shown(result)


# --- the real process, over every kind of damage at once -----------------------------------


def every_kind_of_damage() -> list[Write]:
    """One state with each kind of damage a real apply is expected to survive."""
    started_job = {
        b"status": b"started",
        b"origin": b"fq",
        b"worker_name": b"w1",
        b"started_at": b"0001-01-01T00:00:00+14:00",
        b"last_heartbeat": b"nan",
        b"retries_left": b"2",
        b"retry_intervals": b'["a"]',
        b"data": HUGE_BINARY,
    }
    return [
        Write("hash", b"rq:job:fa", started_job),
        Write("hash", b"rq:job:fb", {b"status": b"\xff\xfe", b"created_at": b"yesterday"}),
        Write("hash", b"rq:job:f:c", {b"timeout": HUGE_TEXT, b"status": b"queued"}),
        Write("string", "rq:job:fé".encode(), b"not a hash"),
        Write("hash", b"rq:execution:fa:e1", {b"worker_name": b"", b"created_at": b"1e308"}),
        Write("string", b"rq:execution:fb:e2", b"not a hash"),
        Write("hash", b"rq:worker:w1", {b"state": b"busy", b"current_job": b"fa"}),
        Write("string", b"rq:worker:w2", b"not a hash"),
        Write("hash", b"rq:worker:" + b"w" * 300, {b"death": b""}),
        Write("string", b"rq:worker:w1:executions", b"not a set"),
        Write("zset", b"rq:wip:normal", {b"fa:e1": float("inf"), b"": float("-inf")}),
        Write("zset", b"rq:wip:normal", {b"a:b:c:d:e:f": 1e308, b"\xff\x00garbage": 0}),
        Write("zset", b"rq:wip:normal", {b"fb:e2": 1.5, b"f:c": 4e9, "fé:e1".encode(): 1}),
        Write("string", b"rq:wip:fq", b"not a zset"),
        Write("hash", b"rq:wip:f:q", {b"a": b"b"}),
        Write("hash", b"rq:workers", {b"rq:worker:w1": b"1"}),
        Write("set", b"rq:workers:normal", [b"garbage", b"\xff", b"rq:worker:", b"rq:worker:w1"]),
        Write("string", b"rq:workers:fq", b"not a set"),
        Write("set", b"rq:queues", [b"garbage", b"rq:queue:", b"rq:queue:\xff"]),
        Write("hash", b"rq:queue:fq", {b"a": b"b"}),
        Write("string", b"rq:failed:fq", b"not a zset"),
    ]


def process_output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[:4000]}\nstderr:\n{result.stderr}"


@pytest.fixture
def damaged(redis_url: str, redis_conn: redis.Redis) -> Iterator[tuple[redis.Redis, list[str]]]:
    """The private server holding two normal abandoned jobs and every kind of damage."""
    normal = build_state(redis_conn, every_kind_of_damage())
    yield redis_conn, normal


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("--dry-run", "--format", "json"), id="dry-run-json"),
        pytest.param(("--dry-run",), id="dry-run-text"),
        pytest.param(("--dry-run", "-vv"), id="dry-run-debug-log"),
    ],
)
def test_a_dry_run_process_over_every_kind_of_damage_prints_no_traceback_and_changes_nothing(
    damaged: tuple[redis.Redis, list[str]], redis_url: str, tmp_path: Path, args: tuple[str, ...]
) -> None:
    conn, normal = damaged
    before = every_key(conn)

    result = run_opsctl("apply", str(policy_file(tmp_path)), "--redis-url", redis_url, *args)

    assert result.returncode == 0, process_output(result)
    assert "Traceback" not in result.stdout + result.stderr, process_output(result)
    assert_unchanged(before, conn)
    for job_id in normal:
        assert job_id[:15] in result.stdout, process_output(result)
    assert is_readable(result.stdout), "the report holds raw control characters"


@pytest.mark.parametrize("output", ["json", "text"])
def test_status_process_over_every_kind_of_damage_answers(
    damaged: tuple[redis.Redis, list[str]], redis_url: str, output: str
) -> None:
    result = run_opsctl("status", "--format", output, "--redis-url", redis_url)

    assert result.returncode == 0, process_output(result)
    assert "Traceback" not in result.stderr, process_output(result)
    assert NORMAL_QUEUE in result.stdout, process_output(result)


def test_a_reviewed_plan_over_every_kind_of_damage_fails_the_abandoned_jobs(
    damaged: tuple[redis.Redis, list[str]], redis_url: str, tmp_path: Path
) -> None:
    conn, normal = damaged
    plan = tmp_path / "plan.json"
    made = run_opsctl(
        "plan", str(policy_file(tmp_path)), "--output", str(plan), "--redis-url", redis_url
    )
    assert made.returncode == 0, process_output(made)

    result = run_opsctl("apply", "--plan", str(plan), "--redis-url", redis_url, "-vv")

    assert result.returncode in (0, 1), process_output(result)
    assert "Traceback" not in result.stdout + result.stderr, process_output(result)
    assert [job_status(conn, job_id) for job_id in normal] == ["failed"] * NORMAL_JOBS


def test_an_apply_process_over_every_kind_of_damage_fails_the_abandoned_jobs(
    damaged: tuple[redis.Redis, list[str]], redis_url: str, tmp_path: Path
) -> None:
    conn, normal = damaged

    result = run_opsctl(
        "apply", str(policy_file(tmp_path)), "--format", "json", "--redis-url", redis_url, "-vv"
    )

    assert result.returncode in (0, 1), process_output(result)
    assert "Traceback" not in result.stdout + result.stderr, process_output(result)
    report = json.loads(result.stdout)
    assert report["problems"], "the unreadable registries were not reported"
    assert [job_status(conn, job_id) for job_id in normal] == ["failed"] * NORMAL_JOBS


# --- known bugs, each pinned by one example ------------------------------------------------


def apply_json(policy: Path, url: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    result = run_opsctl("apply", str(policy), "--format", "json", "--redis-url", url, *extra)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        report = None
    return result, report


def test_one_job_with_an_infinite_retry_interval_does_not_stop_the_others_being_failed(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    normal = abandoned_jobs(redis_conn, 3)
    redis_conn.hset(
        f"rq:job:{normal[2]}", mapping={"retries_left": "1", "retry_intervals": "[1e400]"}
    )

    result, report = apply_json(policy_file(tmp_path), redis_url)

    assert result.returncode in (0, 1), process_output(result)
    assert report is not None, process_output(result)
    assert [job_status(redis_conn, job_id) for job_id in normal[:2]] == ["failed", "failed"]


def test_a_job_reported_as_not_failed_is_still_in_its_started_registry(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    (job_id,) = abandoned_jobs(redis_conn, 1)
    redis_conn.hset(f"rq:job:{job_id}", "failure_ttl", "100000000000000000")

    result, report = apply_json(policy_file(tmp_path), redis_url)

    (line,) = report["jobs"]
    changed = job_status(redis_conn, job_id) != "started"
    assert (line["outcome"] == "done") == changed, process_output(result)


def test_a_retry_count_lua_cannot_read_never_leaves_a_started_job_outside_every_registry(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    (job_id,) = abandoned_jobs(redis_conn, 1)
    redis_conn.hset(f"rq:job:{job_id}", "retries_left", "1_0")

    apply_json(policy_file(tmp_path), redis_url)

    still_started = redis_conn.hget(f"rq:job:{job_id}", "status") == b"started"
    in_registry = any(
        m.startswith(job_id.encode()) for m in redis_conn.zrange("rq:wip:normal", 0, -1)
    )
    assert in_registry or not still_started


def test_a_wrong_typed_rq_queues_key_does_not_stop_abandoned_jobs_being_failed(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    normal = abandoned_jobs(redis_conn)
    redis_conn.delete("rq:queues")
    redis_conn.rpush("rq:queues", "rq:queue:normal")

    result, _ = apply_json(policy_file(tmp_path), redis_url)

    assert [job_status(redis_conn, j) for j in normal] == ["failed"] * 2, process_output(result)


def test_a_damaged_requeue_counter_does_not_stop_a_requeue_dry_run(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    normal = abandoned_jobs(redis_conn)
    redis_conn.hset(f"opsctl:rescues:rq:{normal[0]}", "count", "1")

    result, report = apply_json(policy_file(tmp_path, "requeue"), redis_url, "--dry-run")

    assert result.returncode == 0, process_output(result)
    assert report is not None and len(report["jobs"]) == 2, process_output(result)


def test_an_abandoned_job_with_a_non_utf8_heartbeat_is_failed(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    (job_id,) = abandoned_jobs(redis_conn, 1)
    redis_conn.hset(f"rq:job:{job_id}", "last_heartbeat", b"\xff\xfe")

    result, _ = apply_json(policy_file(tmp_path), redis_url)

    # RQ itself cannot load this job (Job.fetch decodes the heartbeat): read the hash.
    assert redis_conn.hget(f"rq:job:{job_id}", "status") == b"failed", process_output(result)


def test_a_dead_worker_named_opsctl_is_seen_dead(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    queue = Queue(NORMAL_QUEUE, connection=redis_conn)
    job = queue.enqueue("jobs.quick")
    with redis_conn.pipeline() as pipe:
        Execution.create(job, 600, pipe, worker_name="opsctl")
        job.prepare_for_execution("opsctl", pipe)
        pipe.lrem(queue.key, 0, job.id)
        pipe.execute()
    redis_conn.hset("rq:worker:opsctl", mapping={"state": "busy", "birth": "2020-01-01T00:00:00Z"})

    result, report = apply_json(policy_file(tmp_path), redis_url, "--dry-run")

    (line,) = report["jobs"]
    assert line["state"] == "abandoned", process_output(result)
