"""Everything opsctl knows about one job, and what a policy would do with it.

``opsctl explain JOB_ID`` reads the job's hash (showing only the size of the
pickled ``data`` and ``meta``, and the function name read from ``data``
without unpickling), every list and registry of its queue that holds it (and
the started registry of any other queue that holds it, where a run meets it too), its
executions, the workers named for it with each liveness signal, and the
verdict of :func:`opsctl.engine.classify` for each place the engine would look
at it. The decision is the engine's own; nothing here decides anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from rich.console import Console
from rich.text import Text

from opsctl import engine
from opsctl.errors import ExitCode, OpsctlError
from opsctl.keys import EXECUTION_FIELDS, JOB_FIELDS, Keys
from opsctl.keyspace import LOST_FIELDS, lost_entry, lost_notes, scheduler_references
from opsctl.model import StartedEntry, WorkerRecord, format_timestamp, parse_int, retry_interval
from opsctl.policy import Policy, Rule
from opsctl.records import function_name
from opsctl.report import safe
from opsctl.run import origin_hold, retries_left
from opsctl.shown import quoted
from opsctl.state import (
    RQ_EXECUTION_ID,
    known_queues,
    read_registered_workers,
    server_time,
    split_member,
    text,
)

#: Hash fields that hold serialized user objects: only their size is shown.
OPAQUE_FIELDS = ("data", "meta", "result", "exc_info")
#: Registries of a queue, by the name a report shows.
_REGISTRIES = ("started", "failed", "finished", "canceled", "deferred", "scheduled")


class JobNotFound(OpsctlError):
    """Raised when the job to explain has no hash and no list or registry names it."""

    exit_code = ExitCode.INVALID


@dataclass
class Explanation:
    """What ``opsctl explain`` shows about one job."""

    job_id: str
    now: float
    exists: bool
    fields: dict[str, str]
    function: str
    places: list[str] = field(default_factory=list)
    executions: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    rule: str = ""
    #: The job's key and the type it holds, when that is not a hash.
    foreign: str = ""
    #: Records read along the way that could not be read as RQ writes them.
    problems: list[str] = field(default_factory=list)


def explain(conn: redis.Redis, keys: Keys, job_id: str, policy: Policy | None) -> Explanation:
    """Read everything about ``job_id`` and ask the engine what it would do."""
    now = server_time(conn)
    foreign = None
    try:
        raw = cast("dict[bytes, bytes]", conn.hgetall(keys.job(job_id)))
    except redis.exceptions.NoPermissionError:
        raise
    except redis.ResponseError:
        # Not a hash: something else wrote the key; a run never reads or writes it.
        raw, foreign = {}, f"{keys.job(job_id)} (holds a {text(conn.type(keys.job(job_id)))})"
    fields = _shown_fields(raw)
    description = fields.get("description")
    found = Explanation(
        job_id, now, bool(raw), fields, function_name(raw.get(b"data"), description)
    )
    if foreign:
        found.places.append(foreign)
        found.foreign = foreign

    origin = fields.get("origin", "")
    queues = [origin] if origin else known_queues(conn, keys)
    members = _places(conn, keys, job_id, queues, found)
    if origin:
        # A run meets a job in any queue's started registry, whatever its origin says.
        others = [q for q in known_queues(conn, keys) if q != origin]
        members += _started_elsewhere(conn, keys, job_id, others, found)
    if not raw and not found.places:
        raise JobNotFound(
            f"job {quoted(job_id)} does not exist: no hash, list or registry names it"
        )

    executions = _executions(conn, keys, job_id, members)
    found.executions = executions
    workers = _workers(conn, keys, job_id, (fields, executions), queues, found.problems)
    found.workers = [_worker_view(w) for w in workers.values()]
    # Lost and stranded jobs are judged by their origin's rule; an entry by its
    # registry's queue's (the first entry's is named).
    rule, found.rule = _rule(policy, origin or (members[0][0] if members else ""))
    if members and members[0][0] != origin:
        found.rule = _rule(policy, members[0][0])[1]
        if origin:
            found.rule += f"; the job's origin, queue {quoted(origin)}: {_rule(policy, origin)[1]}"
    job = {k: v for k, v in fields.items() if k in JOB_FIELDS or k in LOST_FIELDS}
    first_seen = conn.get(keys.intermediate_first_seen(origin, job_id)) if origin else None
    if first_seen:
        job["first_seen"] = text(first_seen)
    # A user who may not read the notes sees the job as a run of theirs would.
    noted = lost_notes(conn, keys, {job_id: job}, []) if raw else {}
    first_lost = noted.get(job_id)
    # A key of another type holds no job, as a run reads it: not a missing hash.
    held = job if raw or foreign else None
    entries = _entries(job_id, held, members, executions, found.places, first_lost)
    for entry in entries:
        # An entry in a registry is judged by that queue's rule, as a run judges it.
        if entry.lost or entry.stranded:
            found.verdicts.append(_verdict(conn, keys, entry, workers, (rule, found.rule), now))
        else:
            judged_by = _rule(policy, entry.queue)
            verdict = _verdict(conn, keys, entry, workers, judged_by, now)
            found.verdicts.append(_held_to_origin(verdict, entry, policy, judged_by[0]))
    return found


def _shown_fields(raw: dict[bytes, bytes]) -> dict[str, str]:
    shown = {}
    for name, value in sorted(raw.items()):
        key = text(name)
        shown[key] = f"<{len(value)} bytes>" if key in OPAQUE_FIELDS else text(value)
    return shown


def _places(
    conn: redis.Redis, keys: Keys, job_id: str, queues: list[str], found: Explanation
) -> list[tuple[str, bytes, float]]:
    """Fill ``found.places``; return the job's started-registry members."""
    members: list[tuple[str, bytes, float]] = []
    for queue in queues:
        for key in (keys.queue(queue), keys.intermediate(queue)):
            if _position(conn, key, job_id) is not None:
                found.places.append(f"{key} (list)")
        for registry in _REGISTRIES:
            hits = _found_in(conn, keys, getattr(keys, registry)(queue), job_id, found)
            members += [(queue, m, s) for m, s in hits] if registry == "started" else []
    why = scheduler_references(conn, keys, [(job_id, queues[0] if queues else "")])
    if why and why[0] and "rq-scheduler" in why[0]:
        found.places.append(f"{keys.scheduler_jobs} (rq-scheduler)")
    return members


def _started_elsewhere(
    conn: redis.Redis, keys: Keys, job_id: str, queues: list[str], found: Explanation
) -> list[tuple[str, bytes, float]]:
    """The job's members in the started registries of ``queues`` (not its origin)."""
    return [
        (queue, member, score)
        for queue in queues
        for member, score in _found_in(conn, keys, keys.started(queue), job_id, found)
    ]


def _found_in(
    conn: redis.Redis, keys: Keys, key: str, job_id: str, found: Explanation
) -> list[tuple[bytes, float]]:
    """The members of registry ``key`` that name ``job_id``, each noted in ``found.places``."""
    hits = _registry_hits(conn, keys, key, job_id)
    for member, score in hits:
        found.places.append(f"{key} member {quoted(text(member))} score {_score(score)}")
    return hits


def _position(conn: redis.Redis, key: str, job_id: str) -> int | None:
    try:
        position = conn.lpos(key, job_id)
    except redis.exceptions.NoPermissionError:
        raise
    except redis.ResponseError:
        return None  # not a list
    return position if isinstance(position, int) else None


def _registry_hits(
    conn: redis.Redis, keys: Keys, key: str, job_id: str
) -> list[tuple[bytes, float]]:
    """Members of a registry that name ``job_id``: the bare id or ``id:execution``."""
    try:
        members = cast("list[tuple[bytes, float]]", conn.zrange(key, 0, -1, withscores=True))
    except redis.exceptions.NoPermissionError:
        raise
    except redis.ResponseError:
        return []
    # An RQ 1 id may hold colons itself: the whole member is then the id.
    hits = [(m, s) for m, s in members if job_id in (split_member(m)[0], text(m))]
    return [(m, s) for m, s in hits if not _another_rq1_id(conn, keys, m, job_id)]


def _another_rq1_id(conn: redis.Redis, keys: Keys, member: bytes, job_id: str) -> bool:
    """Whether ``member``, split into ``job_id`` and an execution, is rather the bare
    id of another RQ 1 job, as a run reads it (see opsctl.state.may_be_read_again)."""
    whole, (_, execution) = text(member), split_member(member)
    if whole == job_id or execution is None or RQ_EXECUTION_ID.fullmatch(execution):
        return False
    return bool(conn.exists(keys.job(whole))) and not conn.exists(keys.execution(job_id, execution))


def _execution_of(member: bytes, job_id: str) -> str | None:
    """The execution id a registry member of ``job_id`` names; None for a bare (RQ 1) id."""
    return None if text(member) == job_id else split_member(member)[1]


def _score(score: float) -> str:
    if math.isinf(score):
        return "+inf" if score > 0 else "-inf"
    return f"{score:.0f} ({format_timestamp(score)})" if score > 0 else f"{score:g}"


def _executions(
    conn: redis.Redis, keys: Keys, job_id: str, members: list[tuple[str, bytes, float]]
) -> list[dict[str, Any]]:
    ids = {text(e) for e in _zrange(conn, keys.executions(job_id))}
    ids |= {e for _q, m, _s in members if (e := _execution_of(m, job_id))}
    found = []
    for execution_id in sorted(ids):
        key = keys.execution(job_id, execution_id)
        values = conn.hmget(key, list(EXECUTION_FIELDS))
        record = {n: text(v) for n, v in zip(EXECUTION_FIELDS, values, strict=True) if v}
        found.append({"id": execution_id, "exists": bool(conn.exists(key)), "fields": record})
    return found


def _zrange(conn: redis.Redis, key: str) -> list[bytes]:
    try:
        return cast("list[bytes]", conn.zrange(key, 0, -1))
    except redis.exceptions.NoPermissionError:
        raise
    except redis.ResponseError:
        return []


def _workers(
    conn: redis.Redis,
    keys: Keys,
    job_id: str,
    records: tuple[dict[str, str], list[dict[str, Any]]],
    queues: list[str],
    problems: list[str],
) -> dict[str, WorkerRecord]:
    """The workers the job's records name, and any live worker that says it is
    executing the job (a run looks at every registered worker, and so does this).
    A worker record that cannot be read is named in ``problems``, as a run names it."""
    fields, executions = records
    names = {fields.get("worker_name", "")}
    names |= {e["fields"].get("worker_name", "") for e in executions}
    named = {n for n in names if n}
    found, _ = read_registered_workers(conn, keys, queues, problems, also=named)
    holder = engine.jobs_in_hand(found).get(job_id)
    return {n: w for n, w in found.items() if n in named or n == holder}


def _worker_view(worker: WorkerRecord) -> dict[str, Any]:
    liveness = engine.worker_liveness(worker)
    evidence = liveness.evidence
    if engine.disconnected_only(worker):
        evidence += "; apply looks at it again --reconnect-grace seconds later before acting"
    return {
        "name": worker.name,
        "alive": liveness.alive,
        "evidence": evidence,
        "hash_exists": worker.exists,
        "ttl_seconds": worker.ttl_s,
        "subscribers": worker.subscribers,
        "connected": worker.connected,
        "fields": dict(worker.fields),
        "executions": sorted(worker.executions),
        "registered_in": sorted(worker.registered_in),
    }


def _rule(policy: Policy | None, queue: str) -> tuple[Rule | None, str]:
    if policy is None:
        return Rule(source="built-in defaults"), "built-in defaults (no --policy given)"
    rule = policy.rule_for(queue)
    if rule is None:
        return None, f"no entry of {policy.path} matches queue {quoted(queue)}: never touched"
    if not rule.enabled:
        return None, f"{rule.source} matches queue {quoted(queue)} but is disabled: never touched"
    return rule, rule.source


def _entries(
    job_id: str,
    job: dict[str, str] | None,
    members: list[tuple[str, bytes, float]],
    executions: list[dict[str, Any]],
    places: list[str],
    first_lost: float | None = None,
) -> list[StartedEntry]:
    """What the engine would look at: each started entry, or the job as a lost one."""
    records = {e["id"]: e["fields"] or None for e in executions if e["exists"]}
    entries = [
        StartedEntry(queue, job_id, execution, score, job, records.get(execution or ""))
        for queue, member, score in members
        for execution in [_execution_of(member, job_id)]
    ]
    queue = (job or {}).get("origin", "")
    # Only the intermediate list of the job's own queue: a list named so may also be
    # the queue "<name>:intermediate", where that queue's jobs wait.
    own = f":queue:{queue}:intermediate (list)" if queue else ":intermediate (list)"
    intermediate = [p for p in places if p.endswith(own)]
    if not entries and intermediate:
        record = dict(job or {})
        return [
            StartedEntry(
                queue,
                job_id,
                None,
                math.nan,
                record or None,
                None,
                stranded=True,
                first_lost=first_lost,
            )
        ]
    if not entries and job and job.get("status") in ("started", "queued"):
        lost = job.get("status") == "started" or not places
        if lost:
            origin = job.get("origin", "")
            entries.append(lost_entry(origin, job_id, job, first_lost))
    return entries


def _verdict(
    conn: redis.Redis,
    keys: Keys,
    entry: StartedEntry,
    workers: dict[str, WorkerRecord],
    judged_by: tuple[Rule | None, str],
    now: float,
) -> dict[str, Any]:
    where = "lost (in no registry or list)" if entry.lost else text(entry.member)
    if entry.stranded:
        where = "stranded (in the intermediate list only)"
    rule, words = judged_by
    if rule is None:
        return {
            "entry": where,
            "state": None,
            "action": engine.ACTION_NONE,
            "follow_up": None,
            "reason": f"no rule applies: {words}",
            "age_seconds": None,
            "heartbeat_age_seconds": None,
        }
    verdict = engine.classify(entry, workers, rule, now)
    reason = verdict.reason + _retried_instead(entry, verdict)
    acts_by_delete = "delete" in (verdict.action, verdict.follow_up)
    if acts_by_delete and verdict.action != engine.ACTION_NONE:
        origin = (entry.job or {}).get("origin") or entry.queue
        [why] = scheduler_references(conn, keys, [(entry.job_id, origin)])
        if why:
            reason += f"; not deleted: a scheduler still refers to it ({why})"
        note = rule.kept_related_keys_note(entry.job_id, keys.prefix)
        if note:
            reason += f"; {note}"
    return {
        "entry": where,
        "state": verdict.state.value,
        "action": verdict.action,
        "follow_up": verdict.follow_up,
        "reason": reason,
        "age_seconds": verdict.signals.age_s,
        "heartbeat_age_seconds": verdict.signals.heartbeat_age_s,
    }


def _held_to_origin(
    verdict: dict[str, Any], entry: StartedEntry, policy: Policy | None, rule: Rule | None
) -> dict[str, Any]:
    """``verdict`` as a run holds it to the rule of the job's origin queue, when the
    job sits in another queue's registry (see :func:`opsctl.run.origin_hold`)."""
    if policy is None:
        return verdict
    dry_run = rule is not None and rule.dry_run
    held = origin_hold(verdict["action"], entry, dry_run, policy.rule_for)
    if held is None:
        return verdict
    planned_only, words = held
    changed: dict[str, Any] = {"reason": f"{verdict['reason']}; {words}"}
    if not planned_only:
        changed.update(action=engine.ACTION_NONE, follow_up=None)
    return {**verdict, **changed}


def _retried_instead(entry: StartedEntry, verdict: engine.Verdict) -> str:
    """How failing the job would retry it instead, as RQ does; '' when it would not."""
    # Not after a stop: the worker files a stopped job, which RQ never retries.
    if verdict.action != "fail" or entry.job is None:
        return ""
    left = parse_int(entry.job.get("retries_left"))
    interval = retry_interval(entry.job, left)
    if interval is None or left is None:
        return ""
    when = "back on its queue" if interval == 0 else f"scheduled {interval}s later"
    return f"; it has {retries_left(left)}, so failing it retries it ({when})"


#: Characters of a field's value the text shows; JSON has it whole.
SHOWN_CHARS = 2000


def _cut(value: str) -> str:
    """A field's value for one line of text: its start, and how long it is, when long
    (a description can hold megabytes of arguments)."""
    if len(value) <= SHOWN_CHARS:
        return value
    return f"{value[:SHOWN_CHARS]}… ({len(value):,} characters in all; --format json has it whole)"


#: Items of a long list the text shows; JSON has them all.
SHOWN_ITEMS = 5


def _some(items: list[str]) -> str:
    """A list for one line of text: its first few items, and how many there are."""
    if not items:
        return "-"
    shown = ", ".join(items[:SHOWN_ITEMS])
    return shown if len(items) <= SHOWN_ITEMS else f"{shown}, … ({len(items):,} in all)"


def to_json(found: Explanation, redis_url: str) -> dict[str, Any]:
    """The JSON document ``opsctl explain --format json`` prints."""
    return {
        "job": found.job_id,
        "redis": redis_url,
        "now": format_timestamp(found.now),
        "exists": found.exists,
        "function": found.function,
        "fields": found.fields,
        "places": found.places,
        "executions": found.executions,
        "workers": found.workers,
        "rule": found.rule,
        "verdicts": found.verdicts,
        "problems": found.problems,
    }


def print_text(found: Explanation, console: Console, where: str = "") -> None:
    """The explanation as plain sections, one fact per line (``where``: the server
    and key prefix it was read from)."""
    out: list[str] = [f"job {found.job_id}"]
    if where:
        out.append(f"  read from: {where}")
    out.append(f"  function: {found.function}")
    if not found.exists:
        out.append(f"  hash: none: {found.foreign}" if found.foreign else "  hash: gone")
    out.append("fields:")
    out += [f"  {name}: {_cut(value)}" for name, value in found.fields.items()] or ["  (none)"]
    out.append("in:")
    out += [f"  {place}" for place in found.places] or ["  no list or registry"]
    out.append("executions:")
    for e in found.executions:
        state = "" if e["exists"] else " (hash gone)"
        details = ", ".join(f"{k}={v}" for k, v in e["fields"].items())
        out.append(f"  {e['id']}{state} {details}".rstrip())
    if not found.executions:
        out.append("  none")
    out.append("workers:")
    for w in found.workers:
        alive = "live" if w["alive"] else "dead"
        out.append(f"  {w['name']}: {alive} ({w['evidence']})")
        out.append(
            f"    hash exists: {w['hash_exists']}, ttl: {w['ttl_seconds']}, subscribers: "
            f"{w['subscribers']}, connected: {w['connected']}, "
            f"current_job: {w['fields'].get('current_job', '-') or '-'}, "
            f"executions: {_some(w['executions'])}"
        )
    if not found.workers:
        out.append("  none named")
    out.append(f"policy: {found.rule}")
    for v in found.verdicts:
        follow = f" then {v['follow_up']}" if v.get("follow_up") else ""
        state = v["state"] or "not judged"  # no rule covers the queue
        out.append(f"  {v['entry']}: {state} -> {v['action']}{follow}: {v['reason']}")
    if not found.verdicts:
        out.append("  not in a started registry and not lost: opsctl does not act on it")
    out += [f"problem: {problem}" for problem in found.problems]
    for line in out:
        console.print(Text(safe(line)))
