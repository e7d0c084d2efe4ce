"""Reviewed plans: the exact actions of a run, written to a file and applied later.

``opsctl plan`` writes every intended action with the state each job was in
when it was read. ``opsctl apply --plan`` acts on exactly those jobs and no
others; each change's atomic re-check compares against the state recorded in
the plan, so a job that changed in between (finished, heartbeat, retried) is
skipped. A plan names the Redis it was made for and when, and is refused
elsewhere or once it is older than the allowed age.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, cast, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import redis

from opsctl import files
from opsctl.engine import ACTION_REMOVE_ENTRY, ACTION_STOP, Signals, State, Verdict
from opsctl.errors import ExitCode, OpsctlError, UsageError
from opsctl.files import NotReadable, TooLarge, check_file, read_file
from opsctl.keys import DEFAULT_PREFIX
from opsctl.model import StartedEntry, WorkerRecord, format_timestamp
from opsctl.policy import ACTIONS, Limits, Rule
from opsctl.run import PLANNED, JobOutcome, QueuePlan, Run, WorkerOutcome, new_run_id
from opsctl.shown import quoted

FORMAT = "opsctl-plan"
VERSION = 1
#: Plan files larger than this are refused unread.
MAX_PLAN_BYTES = 256 * 1024 * 1024


class PlanError(OpsctlError):
    """Raised when a plan file cannot be read, or does not fit this Redis or this time."""

    exit_code = ExitCode.INVALID


def server_identity(conn: redis.Redis, url: str) -> str:
    """What tells this Redis database from another: the server's run id (else its
    address) and the database number."""
    db = conn.connection_pool.connection_kwargs.get("db", 0)
    try:
        info = conn.info("server")
        return f"run_id={info['run_id']} db={db}"
    except (redis.ResponseError, KeyError):
        parts = urlsplit(url)
        return f"address={parts.hostname or parts.path}:{parts.port or ''}{parts.path} db={db}"


def write(
    path: str,
    run: Run,
    identity: str,
    redis_url: str,
    policy: tuple[str, str],
    key_prefix: str,
    dry_run: bool = False,
) -> int:
    """Write the planned actions of ``run`` to ``path`` atomically; how many jobs it holds.

    ``dry_run``: the policy makes every run a dry run, so applying the plan changes nothing.
    """
    jobs = [_job(j) for j in run.jobs if j.outcome == PLANNED]
    document = {
        "format": FORMAT,
        "version": VERSION,
        "run_id": run.run_id,
        "created_at": format_timestamp(run.now),
        "created_at_epoch": run.now,
        "dry_run": dry_run,
        "redis": {"url": redis_url, "identity": identity},
        "key_prefix": key_prefix,
        "policy": {"path": policy[0], "sha256": policy[1]},
        "limits_tripped": run.limits_tripped,
        # What the plan's read could not read: a run applying it reports them, and
        # writes no job counts for those queues, as the run that read them would.
        "problems": run.problems,
        "unread_queues": sorted(run.unread),
        "queues": [
            {"name": q.name, "rule": _rule(q.rule), "inspected": q.inspected} for q in run.queues
        ],
        "jobs": jobs,
        "workers": [_worker(w) for w in run.workers if not w.dry_run],
    }
    _write_atomically(path, json.dumps(document, indent=2))
    return len(jobs)


def unfit_output(path: str) -> str | None:
    """Why ``--output`` may not write a plan to ``path``, or None: it names nothing
    yet, or a regular file that is empty or holds an opsctl plan."""
    if not path:
        return "--output is empty; give the path of the plan file to write"
    kept = files.kept_from_replacing(path, MAX_PLAN_BYTES, _is_a_plan)
    if kept is None:
        return None
    why, detail = kept
    given = f"--output {quoted(path)}"
    if why == files.NOT_A_FILE:
        return f"{given} exists and is not a regular file; refusing to replace it"
    refusing = "refusing to replace it (remove it, or give another path)"
    if why == files.UNREADABLE:
        return f"{given} exists and cannot be read ({detail}); {refusing}"
    # Never quoted: a key, an env file or a policy named by mistake may hold secrets.
    return f"{given} exists and holds something other than an opsctl plan; {refusing}"


def _is_a_plan(raw: bytes) -> bool:
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return isinstance(document, dict) and document.get("format") == FORMAT


def _write_atomically(path: str, text: str) -> None:
    unfit = unfit_output(path)
    if unfit is not None:
        raise UsageError(unfit)
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, temp = tempfile.mkstemp(prefix=".opsctl-plan-", dir=directory)
    except OSError as exc:
        raise UsageError(f"--output {quoted(path)}: cannot write there: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
        os.replace(temp, target)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise UsageError(f"--output {quoted(path)}: cannot write there: {exc.strerror}") from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Plan:
    """A plan file read back: the run to carry out, and what it was made from."""

    run: Run
    policy_path: str
    policy_digest: str
    key_prefix: str


#: Seconds a plan may seem to come from the future (clocks of two hosts differ).
FUTURE_SKEW_S = 60


def read(
    path: str,
    identity: str,
    now: float,
    max_age_s: int,
    digest: str | None,
    rule_for: Callable[[str], Rule | None] | None = None,
) -> Plan:
    """The run a plan file describes, checked against this Redis and this moment.

    With ``rule_for`` (the policy the plan was made from), each job's rule must
    be that policy's rule for its queue, in every setting no option overrides.
    """
    document = _load(path)
    try:
        run = _checked_run(path, document, identity, now, max_age_s, digest)
        for job in run.jobs:
            _check_action(job, rule_for)
        prefix = document.get("key_prefix") or DEFAULT_PREFIX
        if not isinstance(prefix, str):
            raise TypeError("key_prefix is not a string")
        made_from = document["policy"]
        return Plan(run, str(made_from["path"]), str(made_from["sha256"]), prefix)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PlanError(f"plan {quoted(path)} is damaged: {_damage(exc)}; make a new one") from None


class _Damaged(ValueError):
    """A plan value of the wrong kind; its message names the field."""


def _damage(exc: Exception) -> str:
    """What is wrong with a plan file, in words rather than in Python's."""
    if isinstance(exc, _Damaged):
        return str(exc)
    if isinstance(exc, KeyError):
        return f"it has no {exc.args[0]!r} field where one belongs"
    if isinstance(exc, ValueError):
        return f"a value it holds is not one opsctl writes ({exc})"
    return "a field is missing or holds the wrong kind of value"


def _checked_run(
    path: str,
    document: dict[str, Any],
    identity: str,
    now: float,
    max_age_s: int,
    digest: str | None,
) -> Run:
    recorded = document["redis"]["identity"]
    if recorded != identity:
        raise PlanError(
            f"plan {quoted(path)} was made for another Redis ({recorded}); this one is {identity}"
        )
    created = document["created_at_epoch"]
    if not isinstance(created, int | float) or isinstance(created, bool):
        raise TypeError("created_at_epoch is not a number")
    age = now - float(created)
    if not math.isfinite(age) or age < -FUTURE_SKEW_S:
        raise PlanError(
            f"plan {quoted(path)} says it was made at {document.get('created_at')!r}, which is not "
            "a moment in the past of this Redis; make a new one"
        )
    if age > max_age_s:
        raise PlanError(
            f"plan {quoted(path)} is {age:.0f}s old, over --max-plan-age {max_age_s}s; "
            "make a new one"
        )
    if digest is not None and digest != document["policy"]["sha256"]:
        raise PlanError(f"plan {quoted(path)} was made from another version of the policy file")
    for name in ("queues", "jobs", "workers", "limits_tripped"):
        _expect(document, name, list if name != "limits_tripped" else list[str], "the plan")
    queues = [
        QueuePlan(_expect(q, "name", str, "a queue"), _unrule(q["rule"]), q["inspected"])
        for q in document["queues"]
    ]
    # Each application of a plan is a run of its own, with its own id.
    dry_run = document.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise TypeError("dry_run is not true or false")
    run = Run(run_id=new_run_id(), dry_run=dry_run, now=now, queues=queues, from_plan=True)
    run.jobs = [_unjob(j) for j in document["jobs"]]
    run.workers = [_unworker(w) for w in document["workers"]]
    run.limits_tripped = list(document["limits_tripped"])
    for name in ("problems", "unread_queues"):  # plans written before these lack them
        document.setdefault(name, [])
        _expect(document, name, list[str], "the plan")
    run.problems = list(document["problems"])
    run.unread = set(document["unread_queues"])
    return run


def check_plan_file(path: str) -> None:
    """Refuse at once a plan path that names no readable file (before Redis is
    looked for); its content is read and checked when the plan is applied."""
    try:
        check_file(path)
    except NotReadable as exc:
        raise PlanError(f"cannot read plan {quoted(path)}: {exc.reason}") from None


def _load(path: str) -> dict[str, Any]:
    try:
        document = json.loads(read_file(path, MAX_PLAN_BYTES))
    except NotReadable as exc:
        raise PlanError(f"cannot read plan {quoted(path)}: {exc.reason}") from None
    except TooLarge:
        raise PlanError(f"plan {quoted(path)} is larger than any plan opsctl writes") from None
    except ValueError as exc:
        raise PlanError(f"plan {quoted(path)} is not valid JSON: {exc}") from None
    except RecursionError:
        deep = "nests values deeper than any plan opsctl writes"
        raise PlanError(f"plan {quoted(path)} {deep}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise PlanError(f"{quoted(path)} is not an opsctl plan file")
    if document.get("version") != VERSION:
        raise PlanError(
            f"plan {quoted(path)} has version {document.get('version')!r}; "
            f"this opsctl reads {VERSION}"
        )
    return document


#: Rule settings that no command-line option changes (--force, --max-age and
#: --no-dry-run change the others): a plan's must match its policy's.
_POLICY_ONLY = (
    "action",
    "enabled",
    "max_requeues",
    "lost_after_seconds",
    "related_keys",
)


def _check_action(job: JobOutcome, rule_for: Callable[[str], Rule | None] | None) -> None:
    """Refuse a job whose planned action its rule could not have chosen (the plan
    was edited), or whose rule is not the policy's."""
    rule, queue = job.rule, job.entry.queue
    if rule.action not in ACTIONS:
        raise ValueError(f"queue {queue!r} has the action {rule.action!r}")
    allowed = {rule.action, "fail", ACTION_STOP, ACTION_REMOVE_ENTRY}
    # A stop is followed by the rule's action, or by fail once requeues ran out.
    if job.action not in allowed or job.verdict.follow_up not in (None, rule.action, "fail"):
        raise ValueError(f"job {job.entry.job_id!r} has the action {job.action!r}")
    if rule_for is None:
        return
    policy_rule = rule_for(queue)
    if policy_rule is None:
        what = "its rule"
    else:
        what = ", ".join(n for n in _POLICY_ONLY if getattr(policy_rule, n) != getattr(rule, n))
    if what:
        raise PlanError(
            f"the plan's rule for queue {queue!r} differs from the policy's ({what}); "
            "make a new plan from the policy"
        )


def _rule(rule: Rule) -> dict[str, Any]:
    return asdict(rule)


#: What a kind of value is called in a message about a damaged plan.
_KIND_WORDS = {
    str: "text",
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    dict: "a mapping",
    list: "a list",
    NoneType: "null",
}


def _fits(value: Any, kind: Any) -> bool:
    """Whether a JSON ``value`` can stand for a field annotated ``kind``."""
    if get_origin(kind) is UnionType:
        return any(_fits(value, k) for k in get_args(kind))
    if get_origin(kind) in (tuple, list):  # tuple[str, ...], list[str]: a JSON list of them
        return isinstance(value, list) and all(_fits(v, get_args(kind)[0]) for v in value)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in (Limits, dict):
        return isinstance(value, dict)
    return isinstance(value, kind)


def _words(kind: Any) -> str:
    if get_origin(kind) is UnionType:
        return " or ".join(_words(k) for k in get_args(kind))
    if get_origin(kind) in (tuple, list):
        return f"a list of {_words(get_args(kind)[0])}"
    return _KIND_WORDS.get(kind, "a mapping")


def _expect(data: Any, name: str, kind: Any, where: str) -> Any:
    """``data[name]``, refused unless it is of ``kind``."""
    if not isinstance(data, dict):
        raise _Damaged(f"{where} is not a mapping")
    value = data[name]
    if not _fits(value, kind):
        raise _Damaged(f"in {where}, {name!r} is not {_words(kind)}")
    return value


def _record(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data`` checked field by field against the dataclass ``cls`` it describes."""
    if not isinstance(data, dict):
        raise _Damaged(f"{where} is not a mapping")
    hints = get_type_hints(cls)
    for name in data:
        if name not in hints:
            raise _Damaged(f"{where} has a field opsctl does not write, {name!r}")
        _expect(data, name, hints[name], where)
    return data


def _unrule(data: Any) -> Rule:
    data = dict(_record(Rule, data, "a rule"))
    limits = data.pop("limits", None)
    related = tuple(data.pop("related_keys", ()))
    if limits:
        limits = Limits(**_record(Limits, limits, "a rule's limits"))
    return Rule(**data, related_keys=related, limits=limits or None)


def _member_text(member: bytes) -> str:
    return member.decode("utf-8", "surrogateescape")


def _job(j: JobOutcome) -> dict[str, Any]:
    e, v = j.entry, j.verdict
    return {
        "queue": e.queue,
        "member": _member_text(e.member),
        "job_id": e.job_id,
        "execution_id": e.execution_id,
        # JSON has no infinity or NaN (a lost or stranded job has no score): as text.
        "score": e.score if math.isfinite(e.score) else str(e.score),
        "job": None if e.job is None else dict(e.job),
        "execution": None if e.execution is None else dict(e.execution),
        "state": v.state.value,
        "action": j.action,
        "follow_up": v.follow_up,
        "reason": j.reason,
        "signals": asdict(v.signals),
        "rule": _rule(j.rule),
        # Where a job found outside the started registries sits (absent in older plans).
        "lost": e.lost,
        "stranded": e.stranded,
        "first_lost": e.first_lost,
        "function": j.function,
    }


def _text_fields(data: Any, name: str, where: str) -> dict[str, str] | None:
    """``data[name]``: a hash's fields as recorded (None: the hash was gone)."""
    value = _expect(data, name, dict | None, where)
    if value is not None and not all(isinstance(v, str) for v in value.values()):
        raise _Damaged(f"in {where}, {name!r} is not a mapping of text fields")
    return cast("dict[str, str] | None", value)


def _unjob(data: dict[str, Any]) -> JobOutcome:
    job = _text_fields(data, "job", "a job")
    execution = _text_fields(data, "execution", "a job")
    score = _expect(data, "score", float | str, "a job")
    entry = StartedEntry(
        queue=_expect(data, "queue", str, "a job"),
        job_id=_expect(data, "job_id", str, "a job"),
        execution_id=_expect(data, "execution_id", str | None, "a job"),
        score=float(score),
        job=job,
        execution=execution,
        lost=data.get("lost") is True,
        stranded=data.get("stranded") is True,
        first_lost=_expect(data, "first_lost", float | None, "a job")
        if "first_lost" in data
        else None,
    )
    if entry.member_text != data["member"]:
        raise TypeError("a job's member does not match its job and execution ids")
    verdict = Verdict(
        state=State(data["state"]),
        action=_expect(data, "action", str, "a job"),
        reason=_expect(data, "reason", str, "a job"),
        signals=Signals(**_record(Signals, data["signals"], "a job's signals")),
        follow_up=_expect(data, "follow_up", str | None, "a job"),
    )
    function = data.get("function")
    return JobOutcome(
        entry,
        verdict,
        _unrule(data["rule"]),
        data["action"],
        PLANNED,
        data["reason"],
        function=function if isinstance(function, str) else "",
    )


def _worker(w: WorkerOutcome) -> dict[str, Any]:
    r = w.worker
    return {
        "name": r.name,
        "exists": r.exists,
        "fields": r.fields,
        "registered_in": sorted(r.registered_in),
        "evidence": w.evidence,
    }


def _unworker(data: dict[str, Any]) -> WorkerOutcome:
    fields = _text_fields(data, "fields", "a worker")
    if fields is None:
        raise _Damaged("in a worker, 'fields' is null")
    record = WorkerRecord(
        name=_expect(data, "name", str, "a worker"),
        exists=_expect(data, "exists", bool, "a worker"),
        fields=fields,
        registered_in=frozenset(_expect(data, "registered_in", list[str], "a worker")),
    )
    evidence = _expect(data, "evidence", str, "a worker")
    return WorkerOutcome(record, evidence, PLANNED, evidence)
