"""The audit trail: every action a run takes, in a capped Redis stream.

Each entry of ``opsctl:audit`` holds the run id, time, host, policy hash,
job, queue, state, action, outcome and reason. A successful change writes its
entry in the same atomic script as the change itself, so the trail never
misses an action that happened; skipped and failed attempts are appended
after. Dry runs write nothing.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import redis

from opsctl.errors import ForeignKey
from opsctl.keys import DEFAULT_PREFIX
from opsctl.state import text

AUDIT_STREAM = "opsctl:audit"
#: Approximate number of entries kept; older ones are trimmed.
AUDIT_MAXLEN = 100_000


@dataclass(frozen=True)
class AuditContext:
    """What every entry of one run shares."""

    run_id: str
    policy_digest: str
    #: RQ's key prefix of the run, so that an undo finds its jobs.
    key_prefix: str = DEFAULT_PREFIX
    host: str = socket.gethostname()


def entry_fields(
    context: AuditContext, time_iso: str, job: str, queue: str, state: str, action: str, reason: str
) -> tuple[tuple[str, str], ...]:
    """The fields of one audit entry, before its outcome is known."""
    return (
        ("run_id", context.run_id),
        ("time", time_iso),
        ("host", context.host),
        ("policy", context.policy_digest),
        ("key_prefix", context.key_prefix),
        ("job", job),
        ("queue", queue),
        ("state", state),
        ("action", action),
        ("reason", reason),
    )


def append(conn: redis.Redis, entries: list[tuple[tuple[tuple[str, str], ...], str, str]]) -> None:
    """Append (fields, outcome, detail) entries in one round trip."""
    if not entries:
        return
    pipe = conn.pipeline(transaction=False)
    for fields, outcome, detail in entries:
        data: dict[Any, Any] = dict(fields)
        data["outcome"], data["detail"] = outcome, detail
        pipe.xadd(AUDIT_STREAM, data, maxlen=AUDIT_MAXLEN, approximate=True)
    pipe.execute()


#: Stream entries read per XREVRANGE while searching the audit trail.
HISTORY_PAGE = 10_000


def history(
    conn: redis.Redis,
    run_id: str | None = None,
    job_id: str | None = None,
    limit: int | None = None,
) -> list[dict[str, str]]:
    """Audit entries, oldest first, filtered by run and job; each with its stream id.

    The whole stream is searched, newest first, one page at a time (it is
    capped, so this is bounded); every matching entry is kept, or the newest
    ``limit`` of them.
    """
    found = []
    newest = "+"
    while True:
        try:
            page: list[tuple[bytes, dict[bytes, bytes]]] = conn.xrevrange(  # type: ignore[assignment]
                AUDIT_STREAM, max=newest, count=HISTORY_PAGE
            )
        except redis.ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            raise ForeignKey(
                f"{AUDIT_STREAM} holds another type of value, not opsctl's audit stream; "
                "rename or remove it (opsctl apply will not run until then either)"
            ) from None
        for entry_id, fields in page:
            # Job ids that are not UTF-8 (RQ 1 allowed any bytes) come back as
            # the text the rest of opsctl uses for them, so --job and requeue
            # can follow them; reports escape them for display.
            entry = {text(k): text(v) for k, v in fields.items()}
            if run_id and entry.get("run_id") != run_id:
                continue
            if job_id and entry.get("job") != job_id:
                continue
            entry["id"] = entry_id.decode()
            found.append(entry)
            if limit is not None and len(found) >= limit:
                found.reverse()
                return found
        if len(page) < HISTORY_PAGE:
            break
        newest = _before(page[-1][0].decode())
    found.reverse()
    return found


def _before(entry_id: str) -> str:
    """The greatest stream id below ``entry_id`` (exclusive ranges need Redis 6.2)."""
    millis, _, seq = entry_id.partition("-")
    if int(seq) > 0:
        return f"{millis}-{int(seq) - 1}"
    return f"{max(int(millis) - 1, 0)}-{2**64 - 1}"
