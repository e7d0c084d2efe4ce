"""Which RQ release opsctl takes a started job's data to be from, decided per job."""

from __future__ import annotations

import fakeredis
import pytest

from opsctl.compat import owner_major
from opsctl.keys import Keys
from opsctl.model import StartedEntry


def entry(member: bytes, execution_id: str | None, worker: str) -> StartedEntry:
    job = {"status": "started", "worker_name": worker}
    job_id = member.decode().rsplit(":", 1)[0] if execution_id else member.decode()
    made = StartedEntry("q", job_id, execution_id, 0.0, job, None)
    assert made.member == member
    return made


@pytest.mark.parametrize(
    ("member", "execution_id", "worker_version", "expected"),
    [
        (b"j1", None, "1.16.2", 1),  # a bare id is RQ 1's, whatever the worker says
        (b"j1", None, None, 1),
        (b"j1:e1", "e1", "2.12.0", 2),
        (b"j1:e1", "e1", "3.0.0", 3),
        (b"j1:e1", "e1", None, 3),  # worker hash gone: RQ 3, whose code handles 2.x data too
        (b"j1:e1", "e1", "not a version", 3),
        (b"j1:e1", "e1", "9.0", 3),
    ],
)
def test_release_is_told_from_the_member_and_the_workers_version(
    member: bytes, execution_id: str | None, worker_version: str | None, expected: int
) -> None:
    conn = fakeredis.FakeRedis()
    if worker_version is not None:
        conn.hset("rq:worker:w1", mapping={"version": worker_version, "state": "busy"})
    assert owner_major(conn, Keys(), entry(member, execution_id, "w1")) == expected
