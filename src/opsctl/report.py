"""Reports: a table for people, one JSON document for programs.

Text from Redis (queue names, job ids, worker names, reasons) is data: it is
escaped so that it can never be taken for markup or a terminal control sequence.
"""

from __future__ import annotations

import codecs
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO, TextIO, cast

import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from opsctl.engine import State
from opsctl.model import format_timestamp
from opsctl.run import DONE, ERROR, KEPT, PLANNED, SKIPPED, JobOutcome, Run, WorkerOutcome
from opsctl.shown import bytes_shown, printable

#: Widest job column of the text table (longer ids fold onto more lines).
JOB_ID_WIDTH_MAX = 64
#: Above this many jobs the text report prints plain aligned lines instead of a
#: table: a table of that size is slow to lay out and no easier to read.
TABLE_ROWS_MAX = 1000


#: ``value`` with control characters shown as escapes (see opsctl.logs.printable).
safe = printable


def duration(seconds: float | None) -> str:
    """A compact age: 42s, 7m12s, 3h05m, 2d04h; '-' when unknown."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def summary(run: Run) -> dict[str, int]:
    """Counts for the summary line and the JSON report."""
    outcomes = Counter(j.outcome for j in run.jobs)
    return {
        "inspected": len(run.jobs),
        "stuck": sum(1 for j in run.jobs if j.verdict.state is not State.RUNNING),
        "acted": outcomes[DONE],
        "planned": outcomes[PLANNED],
        "kept": outcomes[KEPT],
        "skipped": outcomes[SKIPPED],
        "errors": outcomes[ERROR] + sum(1 for w in run.workers if w.outcome == ERROR),
        "workers_removed": sum(1 for w in run.workers if w.outcome == DONE),
    }


def to_json(run: Run, redis_url: str, policy_path: str, policy_digest: str) -> dict[str, Any]:
    """The JSON report (described by schemas/report.schema.json)."""
    document = _head(run, redis_url, policy_path, policy_digest)
    document["jobs"] = [_job_json(j) for j in run.jobs]
    return cast("dict[str, Any]", json_text(document))


def write_run_json(
    run: Run, redis_url: str, policy_path: str, policy_digest: str, out: TextIO
) -> None:
    """Write the JSON report job by job, so a large run never sits in memory twice.

    Job lines go out in chunks of encoded bytes, straight to the stream's
    binary buffer where it has one: a large run writes tens of megabytes, and
    one write per line (each encoded again by the text layer) costs more than
    building the lines.
    """
    head = _head(run, redis_url, policy_path, policy_digest)
    out.write("{\n")
    for key, value in head.items():
        out.write(f"  {json.dumps(key)}: {json.dumps(json_text(value))},\n")
    out.write('  "jobs": [')
    binary = _utf8_buffer(out)
    if binary is not None:
        out.flush()

    def write(chunk: bytearray) -> None:
        if binary is not None:
            binary.write(chunk)
        else:
            out.write(chunk.decode())
        chunk.clear()

    chunk = bytearray()
    for i, job in enumerate(run.jobs):
        # Copied into the chunk at once: each encoded line holds a few
        # kilobytes of spare room until it is freed.
        chunk += b",\n    " if i else b"\n    "
        chunk += _dumps(_job_json(job))
        if len(chunk) >= JSON_CHUNK_BYTES:
            write(chunk)
    write(chunk)
    if binary is not None:
        binary.flush()
    out.write("\n  ]\n}\n")


def _utf8_buffer(out: TextIO) -> BinaryIO | None:
    """The stream's binary buffer, when writing UTF-8 there is what its text
    layer would do (it encodes UTF-8 and does not translate newlines)."""
    buffer: BinaryIO | None = getattr(out, "buffer", None)
    encoding = getattr(out, "encoding", None)
    if buffer is None or not encoding or os.linesep != "\n":
        return None
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        return None
    return buffer if name == "utf-8" else None


#: Bytes of job lines written to the report stream at once.
JSON_CHUNK_BYTES = 1 << 20


def _dumps(value: dict[str, Any]) -> bytes:
    """One job's JSON, written fast; ids that are not valid Unicode take the slow path."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        # Bytes from Redis that are not UTF-8 reach here as lone surrogates.
        return orjson.dumps(json_text(value))


def json_text(value: Any) -> Any:
    """``value`` with every byte that was not UTF-8 (a lone surrogate) written as
    ``\\xNN``, as the text report shows it: JSON text must be valid Unicode."""
    if isinstance(value, str):
        return bytes_shown(value)
    if isinstance(value, dict):
        return {json_text(k): json_text(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_text(v) for v in value]
    return value


def _head(run: Run, redis_url: str, policy_path: str, policy_digest: str) -> dict[str, Any]:
    """Every part of the JSON report but its jobs, in report order."""
    return {
        "run_id": run.run_id,
        "dry_run": run.dry_run,
        "now": format_timestamp(run.now),
        "redis": redis_url,
        "policy": {"path": policy_path, "sha256": policy_digest},
        "summary": summary(run),
        "queues": [
            {
                "name": q.name,
                "rule": q.rule.source,
                "max_age_seconds": q.rule.max_age_seconds,
                "action": q.rule.action,
                "force": q.rule.force,
                # A dry run holds back every queue, whatever the queue's own setting.
                "dry_run": run.dry_run or q.rule.dry_run,
                "inspected": q.inspected,
            }
            for q in run.queues
        ],
        "workers": [_worker_json(w) for w in run.workers],
        "problems": run.problems,
        "unmatched_queues": run.unmatched,
        "disabled_queues": run.disabled,
        "limits_tripped": run.limits_tripped,
        "redis_lost": run.redis_lost,
        "refused": run.refused,
        "server_version": run.server_version,
        "warnings": run.warnings,
    }


def _job_json(j: JobOutcome) -> dict[str, Any]:
    s = j.verdict.signals
    return {
        "id": j.entry.job_id,
        "queue": j.entry.queue,
        "entry": j.entry.member_text,
        "execution_id": j.entry.execution_id,
        "state": j.verdict.state.value,
        "status": s.status,
        "action": j.action,
        "outcome": j.outcome,
        "reason": j.reason,
        "age_seconds": None if s.age_s is None else round(s.age_s, 3),
        "heartbeat_age_seconds": None if s.heartbeat_age_s is None else round(s.heartbeat_age_s, 3),
        "worker": s.worker or None,
        "worker_alive": s.worker_alive,
        "worker_evidence": s.worker_evidence if s.worker else None,
        "timeout_seconds": s.timeout_s,
        "stop_confirmed": j.stop_confirmed,
        "rule": j.rule.source,
        "lost": j.entry.lost,
        "stranded": j.entry.stranded,
        "function": j.function or None,
    }


def _worker_json(w: WorkerOutcome) -> dict[str, Any]:
    return {
        "name": w.worker.name,
        "alive": w.alive,
        "queues": list(w.worker.queues),
        "registered_in": sorted(w.worker.registered_in),
        "action": w.action,
        "outcome": w.outcome,
        "reason": w.reason,
    }


def print_json(document: dict[str, Any]) -> None:
    print(json.dumps(json_text(document), indent=2, sort_keys=False))


def print_text(run: Run, console: Console, redis_url: str) -> None:
    """The table of jobs, the table of dead workers, problems and a summary."""
    mode = "dry run: nothing will be changed" if run.dry_run else "applying"
    version = f", Redis {run.server_version}" if run.server_version else ""
    console.print(Text(f"opsctl run {run.run_id} against {safe(redis_url)}{version} ({mode})"))
    for warning in run.warnings:
        console.print(Text(f"warning: {safe(warning)}", style="yellow"))
    for name in run.unmatched:
        console.print(Text(f"note: queue {safe(name)!r} is matched by no policy entry; skipped"))
    for name in run.disabled:
        console.print(Text(f"note: queue {safe(name)!r} is disabled by the policy; skipped"))
    if len(run.jobs) > TABLE_ROWS_MAX:
        # One pass at fixed widths, each line written as its job is met.
        rows = ((_job_cells(j), safe(_reason(j))) for j in run.jobs)
        print_lines(console, _JOB_COLUMNS, _LINE_WIDTHS, rows)
    elif run.jobs:
        cells = [_job_cells(j) for j in run.jobs]
        widths = column_widths(_JOB_COLUMNS, cells)
        if fits_as_table(widths, console.width):
            console.print(_jobs_table(run.jobs, cells))
        else:
            reasons = (safe(_reason(j)) for j in run.jobs)
            print_lines(console, _JOB_COLUMNS, widths, zip(cells, reasons, strict=True))
    elif run.from_plan:
        console.print(Text("the plan lists no job to act on"))
    else:
        console.print(Text("no started jobs in the queues this policy covers"))
    if run.workers:
        console.print(_workers_table(run.workers))
    for problem in run.problems:
        console.print(Text(f"problem: {safe(problem)}"))
    for limit in run.limits_tripped:
        console.print(Text(f"limit tripped, nothing done: {safe(limit)}", style="bold red"))
    console.print(Text(_summary_line(run)))


_JOB_COLUMNS = ("queue", "job", "state", "age", "beat", "timeout", "worker", "action", "outcome")
#: Column widths of the lines printed above TABLE_ROWS_MAX jobs (a job id in full:
#: RQ's are 36 characters).
_LINE_WIDTHS = (20, 36, 9, 7, 7, 7, 27, 12, 7)
#: Narrowest reason column of a table; a terminal too narrow for it and every
#: other column whole gets plain lines, which it wraps, instead.
REASON_WIDTH_MIN = 24


def _job_cells(j: JobOutcome) -> tuple[str, ...]:
    """The cells of a job's row before its reason, every name whole."""
    s = j.verdict.signals
    worker = safe(s.worker) + (" (dead)" if s.worker and s.worker_alive is False else "")
    return (
        safe(j.entry.queue),
        safe(j.entry.job_id),
        j.verdict.state.value,
        duration(s.age_s),
        duration(s.heartbeat_age_s),
        _timeout(s.timeout_s),
        worker or "-",
        j.action,
        j.outcome,
    )


def column_widths(headers: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> list[int]:
    """The widest cell of each column, its header included."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    return widths


def fits_as_table(widths: Sequence[int], width: int, last: int = REASON_WIDTH_MIN) -> bool:
    """Whether columns this wide, and a last column (a reason) at least ``last``
    wide, fit ``width`` as a table (each column adds its padding and a border)."""
    return sum(w + 3 for w in widths) + last + 4 <= width


def print_lines(
    console: Console,
    headers: tuple[str, ...],
    widths: Sequence[int],
    rows: Iterable[tuple[tuple[str, ...], str]],
    last: str = "reason",
) -> None:
    """Rows of cells, then a last one of any length (a reason), as aligned plain
    lines: what a table becomes when it is too large to lay out or too wide for the
    terminal. A cell wider than its column pushes the rest of its line along;
    nothing is cut."""
    out = console.file
    out.write(f"{_aligned(headers, widths)} {last}\n")
    for cells, reason in rows:
        out.write(f"{_aligned(cells, widths)} {reason}\n")


def _aligned(cells: tuple[str, ...], widths: Sequence[int]) -> str:
    return " ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))


def _jobs_table(jobs: list[JobOutcome], cells: list[tuple[str, ...]]) -> Table:
    table = Table(title="started jobs", title_justify="left", expand=False)
    # Job ids stay whole and on one line, to be pasted into `opsctl explain`.
    id_width = min(max((len(c[1]) for c in cells), default=3), JOB_ID_WIDTH_MAX)
    for column in (*_JOB_COLUMNS, "reason"):
        table.add_column(column, overflow="fold", min_width=id_width if column == "job" else None)
    for j, row in zip(jobs, cells, strict=True):
        styles = {2: _STATE_STYLE[j.verdict.state], 8: _OUTCOME_STYLE.get(j.outcome, "")}
        table.add_row(
            *(Text(c, style=styles.get(i, "")) for i, c in enumerate(row)),
            Text(safe(_reason(j))),
        )
    return table


def _reason(j: JobOutcome) -> str:
    """The reason column: the reason, then the job's function when it was read."""
    return f"{j.reason} [function {j.function}]" if j.function else j.reason


def _timeout(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    return "none" if seconds < 0 else f"{seconds}s"


def _workers_table(workers: list[WorkerOutcome]) -> Table:
    table = Table(title="dead worker registrations", title_justify="left")
    for column in ("worker", "queues", "action", "outcome", "reason"):
        table.add_column(column, overflow="fold")
    for w in workers:
        table.add_row(
            Text(safe(w.worker.name)),
            Text(safe(",".join(w.worker.queues)) or "-"),
            Text(w.action),
            Text(w.outcome, style=_OUTCOME_STYLE.get(w.outcome, "")),
            Text(safe(w.reason)),
        )
    return table


def _count(number: int, noun: str) -> str:
    """'1 error', '2 errors'."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _summary_line(run: Run) -> str:
    c = summary(run)
    line = (
        f"run {run.run_id}: {c['inspected']} inspected, {c['stuck']} stuck, "
        f"{c['acted']} acted, {c['planned']} planned, {c['skipped']} skipped, "
        f"{_count(c['errors'], 'error')}; "
        f"{_count(c['workers_removed'], 'dead worker registration')} removed"
    )
    planned = sum(1 for w in run.workers if w.outcome == PLANNED)
    if planned:
        line += f", {planned} planned"
    if run.dry_run:
        line += " (dry run: nothing was changed)"
    return line


_STATE_STYLE = {
    State.ORPHANED: "yellow",
    State.LEFTOVER: "yellow",
    State.ABANDONED: "red",
    State.OVERDUE: "magenta",
    State.RUNNING: "green",
    State.LOST: "red",
    State.STRANDED: "red",
}
_OUTCOME_STYLE = {DONE: "green", ERROR: "bold red", SKIPPED: "yellow", PLANNED: "cyan"}


def print_history(entries: list[dict[str, str]], console: Console) -> None:
    """The audit trail as a table, oldest first."""
    if not entries:
        console.print("no audit entries")
        return
    columns = ("time", "run", "queue", "job", "state", "action", "outcome")
    fields = ("time", "run_id", "queue", "job", "state", "action", "outcome")
    rows = [tuple(safe(e.get(key, "")) for key in fields) for e in entries]
    reasons = [safe(e.get("reason", "")) for e in entries]
    widths = column_widths(columns, rows)
    if len(entries) > TABLE_ROWS_MAX or not fits_as_table(widths, console.width):
        # Too many rows for a table (which lays out every row before printing one),
        # or too narrow for one that keeps ids whole: aligned lines the terminal wraps.
        print_lines(console, columns, widths, zip(rows, reasons, strict=True))
        return
    table = Table(title="audit trail", title_justify="left")
    for column in (*columns, "reason"):
        table.add_column(column, overflow="fold")
    for row, reason in zip(rows, reasons, strict=True):
        table.add_row(*(Text(c) for c in row), Text(reason))
    console.print(table)
