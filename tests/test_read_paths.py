"""Both ways of reading job and execution hashes, and of surveying the keyspace, agree.

The read script is used where the server and the user allow it; pipelined HMGETs
otherwise. Whatever the records hold, the two must not tell different stories.
"""

from __future__ import annotations

import pickle
import random
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fakeredis
import pytest
import redis

from conftest import job_hashes, listed_in
from opsctl import state
from opsctl.keys import Keys
from opsctl.keyspace import SURVEY_COUNT, Survey, function_names, survey
from opsctl.records import function_name
from opsctl.state import (
    _READ_SCRIPTS,
    EXTRA_BYTES,
    HashReader,
    ListedIds,
    as_bytes,
    known_queues,
    read_snapshot,
    server_notes,
)

QUEUE = "paths"


@pytest.fixture
def conn() -> fakeredis.FakeRedis:
    server = fakeredis.FakeRedis()
    wip = f"rq:wip:{QUEUE}"
    # A normal job, one whose fields are all empty strings, one holding only a
    # heartbeat, one whose hash is gone, one stored as the wrong type, and an
    # RQ 1 entry without an execution.
    server.hset("rq:job:normal", mapping={"status": "started", "origin": QUEUE, "timeout": "180"})
    server.hset("rq:execution:normal:e1", mapping={"worker_name": "w1", "created_at": "1.5"})
    server.hset("rq:job:blank", mapping={"status": "", "origin": "", "started_at": ""})
    server.hset("rq:job:beat", mapping={"last_heartbeat": "2026-01-01T00:00:00Z"})
    server.set("rq:job:wrongtype", "not a hash")
    server.hset("rq:job:bare", mapping={"status": "started"})
    for member in ("normal:e1", "blank:e2", "beat:e3", "gone:e4", "wrongtype:e5", "bare"):
        server.zadd(wip, {member: 100.0})
    return server


def snapshot_with(conn: fakeredis.FakeRedis, mode: int) -> list[tuple[object, ...]]:
    original = HashReader.__init__

    def forced(self: HashReader, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        self.mode = mode

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HashReader, "__init__", forced)
        snapshot = read_snapshot(conn, Keys(), [QUEUE])
    return sorted(
        (
            e.job_id,
            e.execution_id,
            None if e.job is None else dict(e.job),
            None if e.execution is None else dict(e.execution),
        )
        for e in snapshot.entries
    ) + [(p,) for p in sorted(snapshot.problems)]


def test_the_read_script_and_plain_reads_agree_on_every_kind_of_record(
    conn: fakeredis.FakeRedis,
) -> None:
    scripted = snapshot_with(conn, mode=1)  # plain EVAL: fakeredis has no EVAL_RO
    plain = snapshot_with(conn, mode=len(_READ_SCRIPTS))

    assert scripted == plain
    by_id = {row[0]: row for row in scripted if len(row) == 4}
    assert by_id["normal"][2] == {"status": "started", "origin": QUEUE, "timeout": "180"}
    assert by_id["blank"][2] == {"status": "", "origin": "", "started_at": ""}
    assert by_id["beat"][2] == {"last_heartbeat": "2026-01-01T00:00:00Z"}
    assert by_id["gone"][2] is None
    assert by_id["wrongtype"][2] == {}
    assert by_id["bare"][1] is None
    assert any("wrongtype" in row[0] for row in scripted if len(row) == 1)


@contextmanager
def scripts_refused() -> Iterator[None]:
    """Every client (the readers' own included) as on a server that knows no scripts."""
    send = redis.Redis.execute_command

    def no_scripts(self: redis.Redis, command: str, *args: object, **options: object) -> object:
        if command in ("EVAL_RO", "EVAL"):
            raise redis.ResponseError(f"unknown command '{command}'")
        return send(self, command, *args, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(redis.Redis, "execute_command", no_scripts)
        yield


def surveyed(conn: fakeredis.FakeRedis, keys: Keys, scripts: bool) -> Survey:
    if scripts:
        return survey(conn, keys)
    with scripts_refused():
        return survey(conn, keys)


def test_the_survey_script_and_plain_reads_find_the_same_queues_and_candidates() -> None:
    conn = fakeredis.FakeRedis()
    keys = Keys("app")
    # More job hashes than one page holds, so the walk must follow the cursor.
    job_hashes(conn, SURVEY_COUNT + 500, "a", prefix="app")
    conn.hset("app:job:run", mapping={"status": "started", "origin": "a"})
    conn.hset("app:job:wait", mapping={"status": "queued", "origin": "b"})
    conn.hset(b"app:job:caf\xe9", mapping={"status": "started", "origin": "a"})
    # RQ 1 job ids may hold colons: a hash is a job whatever its id ends with,
    # while RQ's dependents set under the job prefix is passed over.
    conn.hset("app:job:odd:dependents", mapping={"status": "started", "origin": "a"})
    conn.sadd("app:job:run:dependents", "x")
    conn.hset("app:execution:run:e1", mapping={"status": "started"})  # not a job
    conn.hset("rq:job:other-prefix", mapping={"status": "started", "origin": "a"})
    conn.zadd("app:wip:a", {"run:e1": 1.0})
    conn.sadd("app:workers:c", "app:worker:w1")

    found = [surveyed(conn, keys, scripts) for scripts in (True, False)]

    for each in found:
        assert sorted(each.listed) == ["app:wip:a", "app:workers:c"]
        assert sorted(each.started["a"]) == ["caf\udce9", "odd:dependents", "run"]
        assert each.queued == {"b": ["wait"]}
        assert each.scanned >= SURVEY_COUNT + 504
    assert found[0].filtered_server_side and not found[1].filtered_server_side
    assert known_queues(conn, keys, found[0].listed) == ["a", "c"]
    # Jobs of queues a run leaves alone are no candidates, on either path.
    for scripts in (True, False):
        if scripts:
            left_alone = survey(conn, keys, skipped=["b"])
        else:
            with scripts_refused():
                left_alone = survey(conn, keys, skipped=["b"])
        assert left_alone.queued == {} and len(left_alone.started["a"]) == 3


def test_the_walk_passes_over_the_jobs_the_registries_list_on_either_path() -> None:
    conn = fakeredis.FakeRedis()
    keys = Keys("app")
    # Started jobs their registry lists: more than a page holds.
    job_hashes(conn, SURVEY_COUNT + 500, "a", status="started", prefix="app")
    conn.zadd("app:wip:a", {f"started-{i}:e{i}": 1.0 for i in range(SURVEY_COUNT + 500)})
    # A worker took this one and entered it (as RQ 2+ does) before marking it started.
    conn.hset("app:job:taken", mapping={"status": "queued", "origin": "a"})
    conn.zadd("app:wip:a", {"taken:e1": 1.0})
    # An RQ 1 entry: the bare id.
    conn.hset("app:job:bare", mapping={"status": "started", "origin": "a"})
    conn.zadd("app:wip:a", {"bare": 1.0})
    # What no registry lists: a started job, a queued one, and one of a queue left alone.
    conn.hset("app:job:unlisted", mapping={"status": "started", "origin": "a"})
    conn.hset("app:job:waiting", mapping={"status": "queued", "origin": "b"})
    conn.hset("app:job:elsewhere", mapping={"status": "started", "origin": "c"})
    for scripts in (True, False):
        listed = listed_in(conn, "app:wip:a")
        if scripts:
            found = survey(conn, keys, skipped=["c"], listed=listed)
        else:
            with scripts_refused():
                found = survey(conn, keys, skipped=["c"], listed=listed)

        assert found.started == {"a": ["unlisted"]}, scripts
        assert found.queued == {"b": ["waiting"]}, scripts
        assert sorted(found.listed) == ["app:wip:a"]
        assert found.scanned >= SURVEY_COUNT + 506
        assert found.filtered_server_side is scripts


def test_registries_too_large_to_list_at_once_are_listed_one_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn = fakeredis.FakeRedis()
    expected = []
    for queue in ("a", "b"):
        for i in range(3):
            job_id = f"{queue}{i}"
            conn.hset(f"rq:job:{job_id}", mapping={"status": "started", "origin": queue})
            conn.hset(f"rq:execution:{job_id}:e", mapping={"worker_name": "w"})
            conn.zadd(f"rq:wip:{queue}", {f"{job_id}:e": float(i)})
            expected.append(job_id)

    def read(most: int) -> tuple[list[str], ListedIds]:
        monkeypatch.setattr(state, "LISTED_AHEAD_MAX", most)
        listed = ListedIds({})
        snapshot = read_snapshot(conn, Keys(), ["a", "b"], listed=listed)
        return [e.job_id for e in snapshot.entries], listed

    # Six members fit: all are listed first, and the walk may pass over them.
    entries, listed = read(6)
    assert entries == expected
    assert listed.done.is_set() and sorted(listed.ids) == expected
    # They do not: held back to one registry ahead, and the walk reads every status.
    entries, listed = read(5)
    assert entries == expected
    assert not listed.done.is_set()


def function_fields(conn: fakeredis.FakeRedis, key: bytes) -> list[Any]:
    """A job's description and data, as the reader sends them to name its function."""
    reader = HashReader(conn, (), (), with_function=True)
    try:
        [reply] = reader.read([key], [False])
    finally:
        reader.close()
    return reply


def test_binary_fields_read_through_a_strictly_decoding_client_come_back_as_stored() -> None:
    # A client made with redis-py's defaults fails on bytes that are not
    # UTF-8; the reader's own decoding must not.
    conn = fakeredis.FakeRedis()
    data = zlib.compress(pickle.dumps(("billing.charge", None, (), {}), protocol=5))
    conn.hset("rq:job:j", mapping={"description": "billing.charge()", "data": data})
    reply = function_fields(conn, b"rq:job:j")
    assert as_bytes(reply[1]) == data
    assert function_name(as_bytes(reply[1])) == "billing.charge"


def test_only_the_start_of_a_large_pickled_call_is_read_to_name_its_function() -> None:
    conn = fakeredis.FakeRedis()
    arguments = random.Random(5).randbytes(1_000_000)  # does not compress
    data = zlib.compress(pickle.dumps(("billing.charge", None, (arguments,), {}), protocol=5))
    conn.hset("rq:job:big", mapping={"description": "nightly run", "data": data})

    reply = function_fields(conn, b"rq:job:big")

    assert len(as_bytes(reply[1]) or b"") == EXTRA_BYTES
    assert function_names(conn, Keys(), ["big"]) == ["billing.charge"]
    # Without scripts Redis cannot send part of a field: the description names it.
    with scripts_refused():
        assert function_names(conn, Keys(), ["big"]) == ["nightly run"]


# --- notes on the server --------------------------------------------------------------------


class _Reporting:
    """A server as INFO describes it (all that server_notes reads)."""

    def __init__(self, **info: Any) -> None:
        self.fields = {"redis_version": "7.0.15", "uptime_in_seconds": 30, **info}

    def info(self) -> dict[str, Any]:
        return self.fields


@pytest.mark.parametrize(
    ("info", "warned"),
    [
        ({"rdb_last_load_keys_loaded": 0, "aof_enabled": 0}, False),
        ({"rdb_last_load_keys_loaded": 1200, "aof_enabled": 0}, True),
        ({"rdb_last_load_keys_loaded": 0, "aof_enabled": 1}, True),
        ({}, True),  # before Redis 7: INFO does not say what was loaded
        ({"rdb_last_load_keys_loaded": 1200, "uptime_in_seconds": 3600}, False),
    ],
    ids=["nothing-loaded", "snapshot-loaded", "append-only", "not-said", "long-up"],
)
def test_a_recent_restart_is_warned_about_only_when_data_may_have_been_restored(
    info: dict[str, Any], warned: bool
) -> None:
    version, warnings = server_notes(_Reporting(**info))  # type: ignore[arg-type]

    assert version == "7.0.15"
    assert any("may have been restored" in w for w in warnings) is warned


def test_registries_read_ahead_of_one_another_keep_each_entry_with_its_own_queue() -> None:
    # More batches than are read at once, and registries that end mid-batch, so
    # reads of one registry are in flight while the one before is decoded; one
    # registry in the middle cannot be read at all.
    server = fakeredis.FakeRedis()
    sizes = {"alpha": 2500, "beta": 1, "broken": 0, "gamma": 4100}
    for queue, size in sizes.items():
        for n in range(size):
            job_id = f"{queue}-{n}"
            server.hset(f"rq:job:{job_id}", mapping={"status": "started", "origin": queue})
            server.zadd(f"rq:wip:{queue}", {f"{job_id}:e{n}": float(n)})
    server.set("rq:wip:broken", "not a sorted set")

    snapshot = read_snapshot(server, Keys(), list(sizes))

    read = [(e.queue, e.job_id) for e in snapshot.entries]
    expected = [(q, f"{q}-{n}") for q, size in sizes.items() for n in range(size)]
    assert read == expected  # each registry whole, in order, with its own queue's name
    assert all(e.job is not None and e.job["origin"] == e.queue for e in snapshot.entries)
    assert [p for p in snapshot.problems if "rq:wip:broken" in p]


@pytest.mark.parametrize("scripts", [True, False])
def test_a_workers_runs_without_a_record_are_left_out_on_either_path(scripts: bool) -> None:
    conn = fakeredis.FakeRedis()
    conn.hset("rq:worker:w1", mapping={"state": "busy", "last_heartbeat": "2026-01-01T00:00:00Z"})
    conn.sadd("rq:workers", "rq:worker:w1")
    conn.hset("rq:execution:now:e2", "worker_name", "w1")
    conn.sadd("rq:worker:w1:executions", "now:e2", "ended:e1", b"odd-\xff:e3")

    if scripts:
        workers = state.read_workers(conn, Keys(), ["w1"])
    else:
        with scripts_refused():
            workers = state.read_workers(conn, Keys(), ["w1"])

    assert workers["w1"].executions == frozenset({"now:e2"})


def test_a_member_of_the_queue_set_that_is_no_queue_key_names_no_queue(
    conn: fakeredis.FakeRedis,
) -> None:
    conn.sadd("rq:queues", "rq:queue:emails", "notaqueuekey", "rq:worker:w1")

    assert state.known_queues(conn, Keys(), listed=[]) == ["emails"]
