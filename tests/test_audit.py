"""The audit trail is searched in full, page by page, however many entries it holds."""

from __future__ import annotations

import json

import fakeredis
import pytest
import redis
from typer.testing import CliRunner

from conftest import invoke_opsctl
from opsctl import audit
from opsctl.actions import ChangeResult, JobChange
from opsctl.apply import Executor
from opsctl.audit import AUDIT_STREAM, AuditContext
from opsctl.cli import app
from opsctl.errors import ForeignKey
from opsctl.keys import Keys
from opsctl.run import Run


@pytest.fixture
def conn(monkeypatch: pytest.MonkeyPatch) -> fakeredis.FakeRedis:
    # Small pages, so a few hundred entries span many of them.
    monkeypatch.setattr(audit, "HISTORY_PAGE", 7)
    return fakeredis.FakeRedis()


def add(conn: fakeredis.FakeRedis, entry_id: str, run_id: str, job: str) -> None:
    conn.xadd(AUDIT_STREAM, {"run_id": run_id, "job": job, "outcome": "done"}, id=entry_id)


def test_an_old_run_is_found_behind_more_than_a_page_of_newer_entries() -> None:
    conn = fakeredis.FakeRedis()  # the real page size: a run older than 10,000 entries
    for i in range(5):
        add(conn, f"1000-{i}", "old", f"old-{i}")
    pipe = conn.pipeline(transaction=False)
    for i in range(audit.HISTORY_PAGE + 500):  # several per millisecond, as a busy run writes
        pipe.xadd(AUDIT_STREAM, {"run_id": "new", "job": f"new-{i}"}, id=f"{2000 + i // 3}-{i % 3}")
    pipe.execute()

    found = audit.history(conn, run_id="old")

    assert [e["job"] for e in found] == [f"old-{i}" for i in range(5)]
    assert [e["id"] for e in found] == [f"1000-{i}" for i in range(5)]


def test_every_entry_of_a_large_run_is_returned_oldest_first(conn: fakeredis.FakeRedis) -> None:
    for i in range(100):
        add(conn, f"{3000 + i // 4}-{i % 4}", "big", f"job-{i}")

    found = audit.history(conn, run_id="big", limit=None)

    assert [e["job"] for e in found] == [f"job-{i}" for i in range(100)]


def test_a_limit_keeps_the_newest_matching_entries(conn: fakeredis.FakeRedis) -> None:
    for i in range(40):
        add(conn, f"{4000 + i}-0", "run", f"job-{i}")

    found = audit.history(conn, job_id="job-3", limit=None)
    newest = audit.history(conn, run_id="run", limit=5)

    assert [e["job"] for e in found] == ["job-3"]
    assert [e["job"] for e in newest] == [f"job-{i}" for i in range(35, 40)]


def test_an_audit_key_of_another_type_is_named_not_shown_as_a_raw_redis_error() -> None:
    conn = fakeredis.FakeRedis()
    conn.set(AUDIT_STREAM, "someone else's value")

    with pytest.raises(ForeignKey, match="not opsctl's audit stream; rename or remove it"):
        audit.history(conn, run_id="any")
    assert conn.get(AUDIT_STREAM) == b"someone else's value"


@pytest.mark.parametrize("command", [["history"], ["requeue", "--run", "0123456789ab"]])
def test_history_and_requeue_exit_2_on_an_audit_key_of_another_type(
    fake_redis_url: str, command: list[str]
) -> None:
    # A setup mistake, as for apply: --best-effort must not hide it, so not 1.
    redis.Redis.from_url(fake_redis_url).set(AUDIT_STREAM, "someone else's value")

    result = invoke_opsctl(*command, "--redis-url", fake_redis_url)

    assert result.exit_code == 2, result.output
    assert "not opsctl's audit stream" in result.output


def test_history_shows_every_entry_of_a_run_larger_than_a_page(fake_redis_url: str) -> None:
    conn = redis.Redis.from_url(fake_redis_url)
    count = audit.HISTORY_PAGE + 50
    pipe = conn.pipeline(transaction=False)
    for i in range(count):
        pipe.xadd(AUDIT_STREAM, {"run_id": "0123456789ab", "job": f"job-{i}", "outcome": "done"})
    pipe.execute()

    result = invoke_opsctl(
        "history", "--run", "0123456789ab", "--redis-url", fake_redis_url, "--format", "json"
    )

    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)["entries"]
    assert [e["job"] for e in entries] == [f"job-{i}" for i in range(count)]


@pytest.mark.parametrize(("count", "as_table"), [(5, True), (1001, False)])
def test_history_prints_a_table_up_to_a_thousand_entries_and_plain_lines_beyond(
    fake_redis_url: str, count: int, as_table: bool
) -> None:
    # Laying out a table holds every row first: a long trail prints line by line.
    conn = redis.Redis.from_url(fake_redis_url)
    pipe = conn.pipeline(transaction=False)
    for i in range(count):
        pipe.xadd(AUDIT_STREAM, {"run_id": "0123456789ab", "job": f"job-{i}", "outcome": "done"})
    pipe.execute()

    result = CliRunner().invoke(
        app,
        ["history", "--run", "0123456789ab", "--redis-url", fake_redis_url],
        env={"COLUMNS": "200", "REDIS_URL": None},
    )

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert ("audit trail" in result.stdout) is as_table
    if not as_table:
        header = ["time", "run", "queue", "job", "state", "action", "outcome", "reason"]
        assert lines[0].split() == header
        assert len(lines) == count + 1
        assert lines[-1].split() == ["0123456789ab", f"job-{count - 1}", "done"]


def test_a_change_whose_reply_was_lost_is_confirmed_only_by_its_own_audit_entry(
    conn: fakeredis.FakeRedis,
) -> None:
    # One job, two changes in one run: its left-over entry removed (done, and audited)
    # and its abandoned run failed (refused by its re-check: no entry). Both replies
    # were lost; the trail confirms the first alone.
    context = AuditContext(run_id="r1", policy_digest="d")
    run = Run(run_id="r1", dry_run=False, now=0.0, queues=[])
    executor = Executor(conn, Keys(), run, context)

    def change(action: str, state: str) -> JobChange:
        fields = audit.entry_fields(context, "t", "j1", "q", state, action, "why")
        return JobChange(action, "q", "j1", b"j1:e", "e", "rq:wip:q", {}, "", audit=fields)

    removed, failed = change("remove-entry", "leftover"), change("fail", "abandoned")
    audit.append(conn, [(removed.audit, "done", "removed")])
    results: list[ChangeResult | None] = [None, None]

    executor._settle_from_audit([removed, failed], results)

    assert results[0] is not None and results[0].done
    assert results[1] is None  # unknown still: the next round or run decides
