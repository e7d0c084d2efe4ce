"""The ``opsctl`` command line: the one place that turns errors into exit codes."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, NoReturn, TypeVar
from urllib.parse import urlsplit

import redis
import typer
from rich.console import Console

from opsctl import __version__, audit, planfile, report, status
from opsctl.apply import Executor
from opsctl.audit import AuditContext
from opsctl.connection import DEFAULT_TIMEOUT_S, connect, mask_url, redact
from opsctl.errors import (
    ExitCode,
    LimitTripped,
    OpsctlError,
    PolicyError,
    Problem,
    RedisUnavailable,
    UsageError,
)
from opsctl.keys import DEFAULT_PREFIX, Keys
from opsctl.lock import Lock, run_lock
from opsctl.policy import (
    UNCHECKED_SUFFIX,
    Policy,
    load_policy,
    load_policy_schema,
    parse_duration,
    validate_files,
)
from opsctl.progress import ScanProgress
from opsctl.run import Overrides, Run, new_run_id, plan
from opsctl.state import server_time, with_retries

log = logging.getLogger("opsctl")

app = typer.Typer(
    name="opsctl",
    help="Find RQ jobs stuck in the started state and clean them up from a YAML policy.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
)

T = TypeVar("T")


class Format(str, Enum):
    text = "text"
    json = "json"


def _version(value: bool) -> None:
    if value:
        print(f"opsctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Find RQ jobs stuck in the started state and clean them up from a YAML policy."""


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if quiet:
        level = logging.ERROR
    elif verbose == 1:
        level = logging.INFO
    elif verbose > 1:
        level = logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )


#: Exit codes --best-effort turns into 0: what went wrong at run time, never a mistake
#: in the policy or the command line (2).
BEST_EFFORT_CODES = (
    ExitCode.ACTION_FAILED,
    ExitCode.REDIS_UNAVAILABLE,
    ExitCode.LIMIT_TRIPPED,
    ExitCode.LOCKED,
)


def _fail(error: OpsctlError, best_effort: bool = False, url: str | None = None) -> NoReturn:
    message = redact(str(error), url)
    print(f"opsctl: error: {message}", file=sys.stderr)
    code = error.exit_code
    if best_effort and code in BEST_EFFORT_CODES:
        print("opsctl: --best-effort: exiting 0 despite the error above", file=sys.stderr)
        raise typer.Exit(ExitCode.OK)
    raise typer.Exit(code)


def _redis_user(url: str | None) -> str:
    """How a message names the Redis user of ``url`` (never its password)."""
    try:
        name = urlsplit(url).username if url else None
    except ValueError:
        name = None
    return f"Redis user {name!r}" if name else "the default Redis user"


def _guard(body: Callable[[], T], best_effort: bool = False, url: str | None = None) -> T:
    """Run ``body``; report opsctl's errors, and Redis errors mid-run, as exit codes."""
    try:
        return body()
    except OpsctlError as exc:
        _fail(exc, best_effort, url)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        _fail(RedisUnavailable(f"lost the connection to Redis: {exc}"), best_effort, url)
    except redis.exceptions.NoPermissionError as exc:
        user = _redis_user(url)
        message = (
            f"Redis refused a command: {user} lacks a permission ({exc}); nothing was "
            "changed by the refused command. Grant the rights listed in the README's ACL table"
        )
        _fail(RedisUnavailable(message), best_effort, url)
    except redis.RedisError as exc:
        _fail(OpsctlError(f"Redis error: {exc}"), best_effort, url)
    except Exception as exc:  # the last line of defence: a message, never a traceback
        log.debug("unexpected error", exc_info=True)
        message = f"unexpected {exc.__class__.__name__}: {exc} (run with -vv for details)"
        _fail(OpsctlError(message), best_effort, url)


def _load_for_apply(path: str, url_given: bool) -> Policy:
    """Load a policy; an unset variable is an error unless --redis-url replaces its use."""
    policy = load_policy(path, strict_env=False)
    fatal = [
        Problem(n.file, n.line, n.column, n.path, n.message.removesuffix(UNCHECKED_SUFFIX))
        for n in policy.notes
        if "environment variable" in n.message and not (url_given and n.path == "redis.url")
    ]
    if fatal:
        raise PolicyError(fatal)
    return policy


def _resolve_url(flag: str | None, policy: Policy | None) -> str:
    url = flag or (policy.redis_url if policy else None) or os.environ.get("REDIS_URL")
    if not url:
        raise UsageError(
            "no Redis URL: pass --redis-url, set redis.url in the policy, or set REDIS_URL"
        )
    return url


def _parse_duration_option(option: str, value: str) -> int:
    try:
        return parse_duration(int(value) if value.isdigit() else value)
    except ValueError:
        raise UsageError(
            f"{option}: {value!r} is not a duration (use 90s, 10m, 2h or 1d)"
        ) from None


def _overrides(
    dry_run: bool | None,
    force: bool | None,
    max_age: str | None,
    queue: list[str] | None,
    max_actions: int | None,
    stop_timeout_s: float = Overrides.stop_timeout_s,
) -> Overrides:
    """The policy overrides that apply and plan share, checked."""
    return Overrides(
        dry_run=dry_run,
        force=force,
        max_age_seconds=_guard(lambda: _parse_max_age(max_age)),
        queues=tuple(queue or ()),
        stop_timeout_s=stop_timeout_s,
        max_actions=max_actions,
    )


def _parse_max_age(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_duration(int(value) if value.isdigit() else value)
    except ValueError:
        raise UsageError(
            f"--max-age: {value!r} is not a duration (use 90s, 10m, 2h or 1d)"
        ) from None


def _console() -> Console:
    terminal = sys.stdout.isatty()
    return Console(
        file=sys.stdout,
        width=None if terminal else 200,
        no_color=not terminal or "NO_COLOR" in os.environ,
        highlight=False,
        soft_wrap=not terminal,
    )


RedisUrl = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        help="Redis URL (redis://, rediss:// or unix://). Default: the policy's "
        "redis.url, then $REDIS_URL.",
        show_default=False,
    ),
]
StatusRedisUrl = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        help="Redis URL (redis://, rediss:// or unix://). Default: $REDIS_URL.",
        show_default=False,
    ),
]
FormatOpt = Annotated[Format, typer.Option("--format", help="Report format.")]
Verbose = Annotated[
    int, typer.Option("-v", "--verbose", count=True, help="More logs (-vv: debug).")
]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Only errors in the logs.")]


def _seconds(value: float) -> float:
    """Accept a finite, non-negative number of seconds (the options that wait)."""
    if not math.isfinite(value) or value < 0:
        raise typer.BadParameter(f"{value!r} is not a number of seconds (use 0 or more)")
    return value


def _positive_seconds(value: float) -> float:
    if _seconds(value) == 0:
        raise typer.BadParameter("0 seconds would never let Redis answer; use more than 0")
    return value


Timeout = Annotated[
    float,
    typer.Option(
        "--timeout",
        help="Seconds to wait for Redis to connect or answer.",
        callback=_positive_seconds,
    ),
]


ForceOpt = Annotated[
    bool | None,
    typer.Option(
        "--force/--no-force", help="Treat every running job as overdue.", show_default=False
    ),
]
MaxAgeOpt = Annotated[
    str | None,
    typer.Option("--max-age", help="Override max_age for every queue (90s, 10m, 2h, 1d)."),
]
QueueOpt = Annotated[
    list[str] | None, typer.Option("--queue", help="Only this queue (repeatable).")
]
MaxActionsOpt = Annotated[
    int | None,
    typer.Option("--max-actions", min=0, help="Cap on the jobs one run may act on."),
]
LockTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--lock-timeout",
        help="Seconds to wait for another opsctl run to finish.",
        callback=_seconds,
    ),
]


@app.command()
def apply(
    policy_file: Annotated[
        str | None,
        typer.Argument(metavar="[POLICY]", help="Policy file (YAML); optional with --plan."),
    ] = None,
    dry_run: Annotated[
        bool | None,
        typer.Option(
            "--dry-run/--no-dry-run", help="Only report what would be done.", show_default=False
        ),
    ] = None,
    force: ForceOpt = None,
    max_age: MaxAgeOpt = None,
    queue: QueueOpt = None,
    max_actions: MaxActionsOpt = None,
    plan_file: Annotated[
        str | None,
        typer.Option("--plan", help="Act on exactly the jobs of this plan file (opsctl plan)."),
    ] = None,
    max_plan_age: Annotated[
        str, typer.Option("--max-plan-age", help="Refuse plans older than this.")
    ] = "15m",
    redis_url: RedisUrl = None,
    output: FormatOpt = Format.text,
    best_effort: Annotated[
        bool,
        typer.Option(
            "--best-effort",
            help="Exit 0 (after printing the problem) when an action failed, Redis is down, "
            "a limit tripped or another run holds the lock.",
        ),
    ] = False,
    stop_timeout: Annotated[
        float,
        typer.Option(
            "--stop-timeout", help="Seconds to wait for workers to stop jobs.", callback=_seconds
        ),
    ] = 15.0,
    lock_timeout: LockTimeoutOpt = 5.0,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Apply a policy: classify every started job and act on the stuck ones."""
    _setup_logging(verbose, quiet)
    if policy_file is None and plan_file is None:
        _fail(UsageError("give a POLICY file, or --plan with a plan file"))
    policy = None
    if policy_file is not None:
        policy = _guard(lambda: _load_for_apply(policy_file, redis_url is not None))
    url = _guard(lambda: _resolve_url(redis_url, policy))
    overrides = _overrides(dry_run, force, max_age, queue, max_actions, stop_timeout)
    job = Job(url, timeout, lock_timeout, overrides, progress=output is Format.text)
    if plan_file is not None:
        plan_age = _guard(lambda: _parse_duration_option("--max-plan-age", max_plan_age))
        digest = policy.digest if policy else None
        run, plan_digest = _guard(
            lambda: job.apply_plan(plan_file, plan_age, digest), best_effort, url
        )
        where = (policy.path if policy else plan_file, plan_digest)
    else:
        assert policy is not None
        run = _guard(lambda: job.apply_policy(policy), best_effort, url)
        where = (policy.path, policy.digest)
    _print_run(run, output, url, where)
    _exit_for(run, best_effort, url)


@dataclass
class Job:
    """One apply or plan against one Redis, with this invocation's settings."""

    url: str
    timeout_s: float
    lock_timeout_s: float
    overrides: Overrides
    progress: bool = False  # a progress bar on a terminal's stderr for long scans

    def apply_policy(self, policy: Policy) -> Run:
        conn = connect(self.url, self.timeout_s)
        keys = Keys(policy.key_prefix)
        run_id = new_run_id()
        dry = self.overrides.dry_run
        if dry if dry is not None else policy.defaults.dry_run:
            return self._plan(conn, keys, policy, run_id)
        with run_lock(conn, run_id, self.lock_timeout_s) as lock:
            run = self._plan(conn, keys, policy, run_id)
            self._execute(conn, keys, run, policy.digest, lock)
        return run

    def apply_plan(self, path: str, max_age_s: int, digest: str | None) -> tuple[Run, str]:
        conn = connect(self.url, self.timeout_s)
        identity = planfile.server_identity(conn, self.url)
        if self.overrides.dry_run:
            plan_read = planfile.read(path, identity, server_time(conn), max_age_s, digest)
            plan_read.run.dry_run = True
            return plan_read.run, plan_read.policy_digest
        with run_lock(conn, new_run_id(), self.lock_timeout_s) as lock:
            plan_read = planfile.read(path, identity, server_time(conn), max_age_s, digest)
            run = plan_read.run
            keys = Keys(plan_read.key_prefix)
            self._execute(conn, keys, run, plan_read.policy_digest, lock)
        return run, plan_read.policy_digest

    def write_plan(self, policy: Policy, path: str) -> tuple[Run, int]:
        conn = connect(self.url, self.timeout_s)
        run = self._plan(conn, Keys(policy.key_prefix), policy, None)
        identity = planfile.server_identity(conn, self.url)
        where = (policy.path, policy.digest)
        count = planfile.write(path, run, identity, mask_url(self.url), where, policy.key_prefix)
        return run, count

    def _plan(self, conn: redis.Redis, keys: Keys, policy: Policy, run_id: str | None) -> Run:
        with ScanProgress(self.progress) as progress:
            return with_retries(
                lambda: plan(conn, keys, policy, self.overrides, progress, run_id=run_id)
            )

    def _execute(self, conn: redis.Redis, keys: Keys, run: Run, digest: str, lock: Lock) -> None:
        context = AuditContext(run.run_id, digest)
        Executor(
            conn,
            keys,
            run,
            context,
            stop_timeout_s=self.overrides.stop_timeout_s,
            lock_timeout_s=self.lock_timeout_s,
            run_lock=lock,
        ).execute()


def _print_run(run: Run, output: Format, url: str, where: tuple[str, str]) -> None:
    shown = mask_url(url)
    if output is Format.json:
        report.write_run_json(run, shown, where[0], where[1], sys.stdout)
    else:
        report.print_text(run, _console(), shown)


def _exit_for(run: Run, best_effort: bool, url: str) -> None:
    """Exit with the code the outcome calls for (the report is already printed)."""
    if run.redis_lost:
        _fail(RedisUnavailable("lost the connection to Redis; see the report"), best_effort, url)
    if run.refused:
        why = f"Redis refused a command mid-run ({run.refused}); see the report for what was done"
        _fail(RedisUnavailable(why), best_effort, url)
    if run.failed:
        count = report.summary(run)["errors"]
        _fail(OpsctlError(f"{count} action(s) failed; see the report"), best_effort, url)
    if run.limits_tripped and not run.dry_run:
        _fail(LimitTripped("; ".join(run.limits_tripped) + "; nothing was done"), best_effort, url)


@app.command("plan")
def plan_command(
    policy_file: Annotated[str, typer.Argument(metavar="POLICY", help="Policy file (YAML).")],
    output_file: Annotated[
        str, typer.Option("--output", "-o", help="Where to write the plan (JSON).")
    ],
    force: ForceOpt = None,
    max_age: MaxAgeOpt = None,
    queue: QueueOpt = None,
    max_actions: MaxActionsOpt = None,
    redis_url: RedisUrl = None,
    output: FormatOpt = Format.text,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Write the exact actions a policy would take to a file, for review and apply --plan."""
    _setup_logging(verbose, quiet)
    policy = _guard(lambda: _load_for_apply(policy_file, redis_url is not None))
    url = _guard(lambda: _resolve_url(redis_url, policy))
    overrides = _overrides(True, force, max_age, queue, max_actions)
    job = Job(url, timeout, 0, overrides, progress=output is Format.text)
    run, count = _guard(lambda: job.write_plan(policy, output_file), url=url)
    _print_run(run, output, url, (policy.path, policy.digest))
    print(f"opsctl: wrote {count} planned action(s) to {output_file}", file=sys.stderr)


@app.command()
def history(
    redis_url: StatusRedisUrl = None,
    run_id: Annotated[str | None, typer.Option("--run", help="Only this run id.")] = None,
    job_id: Annotated[str | None, typer.Option("--job", help="Only this job id.")] = None,
    output: FormatOpt = Format.text,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
) -> None:
    """Show the audit trail of actions opsctl has taken."""
    _setup_logging(0, False)
    url = _guard(lambda: _resolve_url(redis_url, None))
    entries = _guard(lambda: audit.history(connect(url, timeout), run_id, job_id), url=url)
    if output is Format.json:
        report.print_json({"redis": mask_url(url), "entries": entries})
    else:
        report.print_history(entries, _console())


@app.command()
def validate(
    files: Annotated[list[str], typer.Argument(metavar="FILE...", help="Policy files to check.")],
    strict_env: Annotated[
        bool,
        typer.Option("--strict-env", help="Treat unset environment variables as errors."),
    ] = False,
) -> None:
    """Check policy files: one line per problem (FILE:LINE:COL: path: message)."""
    problems = _guard(lambda: validate_files(files, strict_env=strict_env))
    for problem in problems:
        print(problem)
    failed = {p.file for p in problems if p.severity == "error"}
    for name in files:
        if name not in failed:
            print(f"{name}: ok", file=sys.stderr)
    if failed:
        raise typer.Exit(ExitCode.INVALID)


@app.command("status")
def status_command(
    redis_url: StatusRedisUrl = None,
    output: FormatOpt = Format.text,
    key_prefix: Annotated[
        str, typer.Option("--key-prefix", help="RQ key prefix.")
    ] = DEFAULT_PREFIX,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
) -> None:
    """Per queue: counts of jobs by state, oldest started job, workers alive and dead."""
    _setup_logging(0, False)
    url = _guard(lambda: _resolve_url(redis_url, None))
    now, statuses = _guard(lambda: status.collect(connect(url, timeout), Keys(key_prefix)), url=url)
    if output is Format.json:
        report.print_json(status.to_json(now, mask_url(url), statuses))
    else:
        status.print_text(statuses, _console())


@app.command("explain")
def explain_command(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id.")],
    policy_file: Annotated[
        str | None,
        typer.Option("--policy", help="Policy whose rule to apply (default: built-in rule)."),
    ] = None,
    redis_url: RedisUrl = None,
    output: FormatOpt = Format.text,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
) -> None:
    """Everything known about one job, and what the policy would do with it and why."""
    from opsctl import explain

    _setup_logging(0, False)
    policy = None
    if policy_file is not None:
        path = policy_file
        policy = _guard(lambda: _load_for_apply(path, redis_url is not None))
    url = _guard(lambda: _resolve_url(redis_url, policy))
    keys = Keys(policy.key_prefix if policy else DEFAULT_PREFIX)
    found = _guard(lambda: explain.explain(connect(url, timeout), keys, job_id, policy), url=url)
    if output is Format.json:
        report.print_json(explain.to_json(found, mask_url(url)))
    else:
        explain.print_text(found, _console())


@app.command()
def schema() -> None:
    """Print the policy file's JSON Schema."""
    print(json.dumps(load_policy_schema(), indent=2))


def main() -> None:
    """Console-script entry point."""
    app()
