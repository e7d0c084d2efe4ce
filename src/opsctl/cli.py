"""The ``opsctl`` command line: the one place that turns errors into exit codes."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import redis
import typer
from rich.console import Console

from opsctl import (
    __version__,
    audit,
    logs,
    metrics,
    planfile,
    report,
    status,
    terminal,
    undo,
    watch,
)
from opsctl.apply import Executor, recheck_plan
from opsctl.audit import AuditContext
from opsctl.connection import (
    DEFAULT_TIMEOUT_S,
    TLS_VERIFY_MODES,
    ConnectionOptions,
    Tls,
    check_settings,
    connect,
    mask_url,
    redact,
    sentinel_url,
)
from opsctl.errors import (
    ExitCode,
    LimitTripped,
    OpsctlError,
    PolicyError,
    Problem,
    RedisUnavailable,
    StoppedEarly,
    UsageError,
)
from opsctl.keys import DEFAULT_PREFIX, Keys
from opsctl.lock import LockTimeout, run_lock
from opsctl.policy import (
    UNCHECKED_SUFFIX,
    ZERO_MAX_AGE,
    Policy,
    Rule,
    load_policy,
    load_policy_schema,
    parse_duration,
    validate_files,
)
from opsctl.progress import ScanProgress
from opsctl.run import Overrides, Run, collector_paused, new_run_id, plan
from opsctl.shown import printable, quoted
from opsctl.state import server_notes, server_time, with_retries

log = logging.getLogger("opsctl")

app = typer.Typer(
    name="opsctl",
    help="Find RQ jobs stuck in the started state and clean them up from a YAML policy.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=True,
)

T = TypeVar("T")

#: Every option of every command can also be set by an environment variable named after
#: it: --redis-url is OPSCTL_REDIS_URL, --dry-run/--no-dry-run is OPSCTL_DRY_RUN.
ENV_PREFIX = "OPSCTL_"


#: How the current command's options were given, by long name: the long name
#: itself, or the OPSCTL_* variable that set it (see :func:`_given_as`).
_GIVEN_AS: dict[str, str] = {}

#: How a set but blank variable is refused, after "OPSCTL_X is set but ".
_BLANK = "empty (is a variable unset?); give it a value, or unset it"


def _option(
    *names: str, callback: Callable[..., Any] | None = None, if_blank: str = _BLANK, **settings: Any
) -> Any:
    """typer.Option with the OPSCTL_* environment variable named after the first long name.

    A variable that is set but blank is refused (``if_blank`` says how), unless the
    command line gives the option: read as "not given", OPSCTL_PLAN=$PLAN or
    OPSCTL_MAX_ACTIONS=$CAP with the variable unset would run without the plan or the
    cap the script meant to set.
    """
    long_name = next(n for n in names if n.startswith("--")).split("/")[0]
    envvar = ENV_PREFIX + long_name.removeprefix("--").replace("-", "_").upper()

    def checked(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        given = ctx.get_parameter_source(param.name) if param.name else None
        # Compared by name: some typer releases carry a click of their own.
        from_command_line = getattr(given, "name", "") == "COMMANDLINE"
        from_env = getattr(given, "name", "") == "ENVIRONMENT"
        _GIVEN_AS[long_name] = envvar if from_env else long_name
        if not from_command_line and not os.environ.get(envvar, "x").strip():
            raise typer.BadParameter(f"{envvar} is set but {if_blank}")
        if callback is None:
            return value
        # The checks below take the value alone, or the parameter and the value.
        wanted = len(inspect.signature(callback).parameters)
        return callback(*(param, value)[2 - wanted :])

    return typer.Option(*names, envvar=envvar, callback=checked, **settings)


def _given_as(long_name: str) -> str:
    """The name to quote in an error about an option: its OPSCTL_* variable when
    the value came from there (the command line names no such option then)."""
    return _GIVEN_AS.get(long_name, long_name)


def _flag(*names: str, **settings: Any) -> Any:
    """An on/off option (see :func:`_option`) whose variable, when set, must say which:
    OPSCTL_DRY_RUN=$PREVIEW with PREVIEW unset must not make a real run of a preview."""
    blank = "empty (is a variable unset?); set it to true or false, or unset it"
    return _option(*names, if_blank=blank, **settings)


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


def _setup_logging(
    verbose: int,
    quiet: bool,
    log_format: logs.LogFormat = logs.LogFormat.text,
    url: str | None = None,
) -> None:
    logs.setup(verbose, quiet, log_format, url)


#: Exit codes --best-effort turns into 0: what went wrong at run time, never a mistake
#: in the policy or the command line (2).
BEST_EFFORT_CODES = (
    ExitCode.ACTION_FAILED,
    ExitCode.REDIS_UNAVAILABLE,
    ExitCode.LIMIT_TRIPPED,
    ExitCode.LOCKED,
)


def _say(message: str, level: int = logging.INFO) -> None:
    """Tell the reader of stderr: "opsctl: MESSAGE", or a JSON log line under --log-format json
    (at any verbosity), so that a log shipper reads nothing but JSON there."""
    if logs.json_lines():
        logger = logging.getLogger(logs.ROOT)
        logger.handle(logger.makeRecord(logs.ROOT, level, "cli", 0, message, (), None))
    else:
        terminal.say_on_stderr(f"opsctl: {message}")


#: The command, metrics file and start of a run whose mistakes (exit 2) are to be
#: written to its metrics: the exit-code gauge must not go on showing the last run's.
_metrics_if_invalid: ContextVar[tuple[str, str, float] | None] = ContextVar(
    "opsctl_metrics_if_invalid", default=None
)


def _fail(error: OpsctlError, best_effort: bool = False, url: str | None = None) -> NoReturn:
    message = redact(str(error), url)
    _say(f"error: {message}", logging.ERROR)
    code = error.exit_code
    target = _metrics_if_invalid.get()
    if target is not None and code == ExitCode.INVALID:
        _metrics_if_invalid.set(None)
        command, path, began = target
        # A watch that cannot start on its policy file refuses that file, as its rounds
        # say; of another mistake nothing is known of the file (it may not be read yet).
        rejected = True if command == "watch" and isinstance(error, PolicyError) else None
        _, write_error = _attempt(
            lambda: _write_metrics(path, command, None, code, began, rejected), url
        )
        if write_error is not None:
            _say(f"error: {redact(str(write_error), url)}", logging.ERROR)
    if best_effort and code in BEST_EFFORT_CODES:
        _say("--best-effort: exiting 0 despite the error above", logging.WARNING)
        raise typer.Exit(ExitCode.OK)
    raise typer.Exit(code)


#: The user that --redis-username or redis.username names, once a command has resolved it.
_option_user: ContextVar[str | None] = ContextVar("opsctl_option_user", default=None)


def _redis_user(url: str | None) -> str:
    """How a message names the Redis user of ``url`` (never its password)."""
    try:
        name = urlsplit(url).username if url else None
    except ValueError:
        name = None
    name = name or _option_user.get()
    return f"Redis user {name!r}" if name else "the default Redis user"


def _guard(body: Callable[[], T], best_effort: bool = False, url: str | None = None) -> T:
    """Run ``body``; report opsctl's errors, and Redis errors mid-run, as exit codes."""
    try:
        return body()
    except Exception as exc:
        _fail(_as_error(exc, url), best_effort, url)


def _attempt(body: Callable[[], T], url: str | None = None) -> tuple[T | None, OpsctlError | None]:
    """Run ``body``; its result, or the error ``_guard`` would report (without exiting)."""
    try:
        return body(), None
    except Exception as exc:
        return None, _as_error(exc, url)


def _as_error(exc: Exception, url: str | None) -> OpsctlError:
    """The user-facing error for ``exc``: opsctl's own, Redis's, or anything else."""
    if isinstance(exc, OpsctlError):
        return exc
    if isinstance(exc, redis.exceptions.InvalidResponse):
        return RedisUnavailable(f"the server stopped answering as Redis does: {exc}")
    if isinstance(exc, redis.TimeoutError):
        return RedisUnavailable(f"Redis did not answer within --timeout: {exc}")
    if isinstance(exc, redis.ConnectionError):
        return RedisUnavailable(f"lost the connection to Redis: {exc}")
    if isinstance(exc, redis.exceptions.NoPermissionError):
        user = _redis_user(url)
        message = (
            f"Redis refused a command: {user} lacks a permission ({exc}); nothing was "
            "changed by the refused command. Grant the rights listed in the README's ACL table"
        )
        return RedisUnavailable(message)
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        where = f" at {mask_url(url)}" if url else ""
        return RedisUnavailable(
            f"Redis{where} refused a write: the server is a read-only replica ({exc}); "
            "nothing was changed by the refused command. Give opsctl the primary's URL (a "
            "--dry-run reads from a replica, judging workers by their hashes alone)"
        )
    if isinstance(exc, redis.RedisError):
        return OpsctlError(f"Redis error: {exc}")
    # The last line of defence: a message, never a traceback.
    log.debug("unexpected error", exc_info=True)
    return OpsctlError(f"unexpected {exc.__class__.__name__}: {exc} (run with -vv for details)")


def _load_for_apply(path: str, url_given: bool, raw: bytes | None = None) -> Policy:
    """Load a policy (from ``raw``, its bytes, when read already); an unset variable is
    an error unless --redis-url replaces its use."""
    policy = load_policy(path, strict_env=False, raw=raw)
    fatal = [
        Problem(n.file, n.line, n.column, n.path, n.message.removesuffix(UNCHECKED_SUFFIX))
        for n in policy.notes
        if "environment variable" in n.message and not (url_given and _names_server(n.path))
    ]
    if fatal:
        raise PolicyError(fatal)
    return policy


def _names_server(path: str) -> bool:
    """Whether a policy value at ``path`` only says where Redis is (--redis-url replaces it)."""
    return path == "redis.url" or path.startswith("redis.sentinel.hosts")


def _resolve_url(flag: str | None, policy: Policy | None) -> str:
    url = flag or (policy.redis_url if policy else None) or os.environ.get("REDIS_URL")
    if not url:
        # A command that reads no policy (status, history, ...) cannot take it from one.
        in_policy = "set redis.url or redis.sentinel in the policy, " if policy else ""
        raise UsageError(
            "no Redis URL: pass --redis-url (or set OPSCTL_REDIS_URL) or --sentinel, "
            f"{in_policy}or set REDIS_URL"
        )
    return url


@dataclass(frozen=True)
class Connection:
    """Where to connect and how, as the options and OPSCTL_* variables of one command say.

    A setting given here beats the policy's, which beats REDIS_URL (for the URL alone).
    """

    url: str | None = None
    username: str | None = None
    sentinels: tuple[str, ...] = ()
    sentinel_service: str | None = None
    sentinel_db: int | None = None
    tls: Tls = field(default_factory=Tls)

    def given_url(self) -> str | None:
        """The URL these options name (--redis-url or --sentinel), or None."""
        if self.sentinels and self.url:
            raise UsageError("give --redis-url or --sentinel, not both")
        if not self.sentinels:
            if self.sentinel_service or self.sentinel_db is not None:
                raise UsageError("--sentinel-service and --sentinel-db need --sentinel HOST:PORT")
            return self.url
        if not self.sentinel_service:
            raise UsageError("--sentinel needs --sentinel-service NAME (the master's name)")
        return sentinel_url(list(self.sentinels), self.sentinel_service, self.sentinel_db or 0)

    def resolve(self, policy: Policy | None) -> tuple[str, ConnectionOptions]:
        """The URL and connection options to use, each setting from the first source that
        gives it: these options, then the policy (then REDIS_URL for the URL)."""
        url = _resolve_url(self.given_url(), policy)
        base = policy.redis_options if policy else ConnectionOptions()
        tls = Tls(
            self.tls.ca_cert or base.tls.ca_cert,
            self.tls.cert or base.tls.cert,
            self.tls.key or base.tls.key,
            self.tls.verify or base.tls.verify,
        )
        username = self.username or base.username
        _option_user.set(username)
        return url, replace(base, username=username, tls=tls)


#: Longest pause between two rounds of opsctl watch.
MAX_WATCH_EVERY_S = 7 * 86400


def _parse_duration_option(option: str, value: str) -> int:
    try:
        # isdigit() alone accepts other scripts' digits (full-width...); a policy does not.
        return parse_duration(int(value) if value.isascii() and value.isdigit() else value)
    except ValueError as exc:
        raise UsageError(f"{_given_as(option)}: {exc}") from None


def _overrides(
    dry_run: bool | None,
    force: bool | None,
    max_age: str | None,
    queue: list[str] | None,
    max_actions: int | None,
    stop_timeout_s: float = Overrides.stop_timeout_s,
    reconnect_grace_s: float = Overrides.reconnect_grace_s,
) -> Overrides:
    """The policy overrides that apply and plan share, checked."""
    return Overrides(
        dry_run=dry_run,
        force=force,
        max_age_seconds=_guard(lambda: _parse_max_age(max_age)),
        queues=tuple(queue or ()),
        stop_timeout_s=stop_timeout_s,
        max_actions=max_actions,
        reconnect_grace_s=reconnect_grace_s,
    )


def _parse_max_age(value: str | None) -> int | None:
    if value is None:
        return None
    seconds = _parse_duration_option("--max-age", value)
    if seconds == 0:
        zero = ZERO_MAX_AGE.format(force="--force")
        raise UsageError(f"{_given_as('--max-age')}: {quoted(value)} {zero}")
    return seconds


def _console() -> Console:
    return terminal.console()


def _url_given(value: str | None) -> str | None:
    """Refuse an empty --redis-url: read as "not given", it would send the run to the
    policy's URL or $REDIS_URL, which may be another server (in a deploy script, most
    often a variable that is not set). A blank OPSCTL_REDIS_URL is refused the same way."""
    if value is not None and not value.strip():
        raise typer.BadParameter("the URL is empty (is a variable unset?); give a URL")
    return value


_BLANK_URL = "empty (is a variable unset?); set it to a URL, or unset it"


RedisUrl = Annotated[
    str | None,
    _option(
        "--redis-url",
        help="Redis URL (redis://, rediss://, unix:// or redis+sentinel://). Default: the "
        "policy's redis.url or redis.sentinel, then $REDIS_URL.",
        show_default=False,
        callback=_url_given,
        if_blank=_BLANK_URL,
    ),
]
StatusRedisUrl = Annotated[
    str | None,
    _option(
        "--redis-url",
        help="Redis URL (redis://, rediss://, unix:// or redis+sentinel://). Default: $REDIS_URL.",
        show_default=False,
        callback=_url_given,
        if_blank=_BLANK_URL,
    ),
]
FormatOpt = Annotated[Format, _option("--format", help="Report format.")]
Verbose = Annotated[int, _option("-v", "--verbose", count=True, help="More logs (-vv: debug).")]
Quiet = Annotated[bool, _flag("-q", "--quiet", help="Only errors in the logs.")]
LogFormatOpt = Annotated[
    logs.LogFormat,
    _option(
        "--log-format",
        help="Log lines on stderr as text, or as one JSON object per line for log shippers.",
    ),
]
RedisUsername = Annotated[
    str | None,
    _option("--redis-username", help="Redis ACL user name, when the URL names none."),
]


def _sentinels_given(values: list[str] | None) -> list[str] | None:
    """Refuse an empty --sentinel (and a blank OPSCTL_SENTINEL), as an empty URL is."""
    if values and any(not v.strip() for v in values):
        raise typer.BadParameter("an empty sentinel address (is a variable unset?)")
    return values


SentinelOpt = Annotated[
    list[str] | None,
    _option(
        "--sentinel",
        metavar="HOST:PORT",
        help="Ask this Redis Sentinel for the master (repeatable; with --sentinel-service).",
        callback=_sentinels_given,
        if_blank="names no sentinel (is a variable unset?); unset it",
    ),
]
SentinelService = Annotated[
    str | None,
    _option("--sentinel-service", help="The master's name at the sentinels."),
]
SentinelDb = Annotated[
    int | None,
    _option("--sentinel-db", min=0, help="Database on the master found by the sentinels [0]."),
]
TlsCaCert = Annotated[
    str | None,
    _option("--tls-ca-cert", help="CA certificate (PEM) to check a rediss:// server with."),
]
TlsCert = Annotated[
    str | None,
    _option("--tls-cert", help="Client certificate (PEM) for a rediss:// server; needs --tls-key."),
]
TlsKey = Annotated[
    str | None,
    _option("--tls-key", help="Private key (PEM) of --tls-cert."),
]


class TlsVerify(str, Enum):
    full = "full"
    certificate = "certificate"
    none = "none"


assert tuple(m.value for m in TlsVerify) == TLS_VERIFY_MODES
TlsVerifyOpt = Annotated[
    TlsVerify | None,
    _option(
        "--tls-verify",
        help="full: check the certificate and host name (default); certificate: not the host "
        "name; none: check nothing.",
        show_default=False,
    ),
]


def _connection(
    url: str | None,
    username: str | None,
    sentinels: list[str] | None,
    service: str | None,
    db: int | None,
    tls: tuple[str | None, str | None, str | None, TlsVerify | None],
) -> Connection:
    ca_cert, cert, key, verify = tls
    settings = Tls(ca_cert, cert, key, verify.value if verify else None)
    return Connection(url, username, tuple(sentinels or ()), service, db, settings)


#: The longest any option makes opsctl wait, in seconds (a day). Far longer
#: waits are typing mistakes, and the platform's clocks cannot hold some of them.
MAX_WAIT_S = 86_400


def _seconds(value: float) -> float:
    """Accept a finite, non-negative number of seconds (the options that wait)."""
    if not math.isfinite(value) or value < 0:
        raise typer.BadParameter(f"{value!r} is not a number of seconds (use 0 or more)")
    return _at_most_a_day(value)


def _positive_seconds(value: float) -> float:
    """Accept a finite number of seconds above 0 (the time Redis has to answer)."""
    if not math.isfinite(value) or value <= 0:
        raise typer.BadParameter(f"{value!r} is not a number of seconds above 0")
    return _at_most_a_day(value)


def _at_most_a_day(value: float) -> float:
    if value > MAX_WAIT_S:
        raise typer.BadParameter(f"{value:g} seconds is longer than the most allowed, {MAX_WAIT_S}")
    return value


Timeout = Annotated[
    float,
    _option(
        "--timeout",
        help="Seconds to wait for Redis to connect or answer.",
        callback=_positive_seconds,
    ),
]


ForceOpt = Annotated[
    bool | None,
    _flag("--force/--no-force", help="Treat every running job as overdue.", show_default=False),
]
MaxAgeOpt = Annotated[
    str | None,
    _option("--max-age", help="Override max_age for every queue (90s, 10m, 2h, 1d)."),
]


def _queue_names(values: list[str] | None) -> list[str] | None:
    """Refuse an empty queue name: it matches no queue, so the run would quietly do
    nothing (in a deploy script, most often a variable that is not set). A blank
    OPSCTL_QUEUE is refused too: read as "no --queue", it would widen the run to
    every queue the policy covers."""
    if values and any(not v.strip() for v in values):
        raise typer.BadParameter("an empty name matches no queue (is a variable unset?)")
    return values


QueueOpt = Annotated[
    list[str] | None,
    _option(
        "--queue",
        help="Only this queue (repeatable).",
        callback=_queue_names,
        if_blank="names no queue (is a variable unset?); "
        "unset it to cover every queue of the policy",
    ),
]
MaxActionsOpt = Annotated[
    int | None,
    _option("--max-actions", min=0, help="Cap on the jobs one run may act on."),
]


def _metrics_path(value: str | None) -> str | None:
    """Refuse, before anything is done, a metrics path that can never be written."""
    if value is None:
        return None
    if not value.strip():
        raise typer.BadParameter(
            "give a file path (for example /var/lib/node_exporter/opsctl.prom)"
        )
    if os.path.isdir(value) and not os.path.islink(value):
        raise typer.BadParameter(f"{quoted(value)} is a directory; give a file path inside it")
    unfit = metrics.unfit_target(value)
    if unfit is not None:
        raise typer.BadParameter(f"{quoted(value)}: {unfit}")
    return value


#: What a policy's redis.key_prefix may hold (the schema's pattern).
_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.:{}-]+")


def _key_prefix(value: str | None) -> str | None:
    """Refuse a key prefix a policy would refuse (a glob or an empty one finds nothing)."""
    if value is not None and not _KEY_PREFIX.fullmatch(value):
        raise typer.BadParameter(
            f"{quoted(value)} is not a key prefix "
            "(letters, digits and _ . : { } - only; RQ's is rq)"
        )
    return value


def _an_id(value: str | None) -> str | None:
    """Refuse an empty id: it would match nothing, or (as a filter) everything."""
    if value is not None and not value.strip():
        raise typer.BadParameter("an empty id names nothing; give the id")
    return value


MetricsFileOpt = Annotated[
    str | None,
    _option(
        "--metrics-file",
        help="Also write Prometheus metrics to this file, atomically (for node_exporter's "
        "textfile collector; name it *.prom).",
        show_default=False,
        callback=_metrics_path,
    ),
]
ReconnectGraceOpt = Annotated[
    float,
    _option(
        "--reconnect-grace",
        help="Seconds for which a worker found without a connection to Redis (its hash "
        "left, no death recorded) is looked at again, every second; only if it is never "
        "back is it dead, and its jobs acted on. 0: at once.",
        callback=_seconds,
    ),
]
LockTimeoutOpt = Annotated[
    float,
    _option(
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
        _flag("--dry-run/--no-dry-run", help="Only report what would be done.", show_default=False),
    ] = None,
    force: ForceOpt = None,
    max_age: MaxAgeOpt = None,
    queue: QueueOpt = None,
    max_actions: MaxActionsOpt = None,
    plan_file: Annotated[
        str | None,
        _option("--plan", help="Act on exactly the jobs of this plan file (opsctl plan)."),
    ] = None,
    max_plan_age: Annotated[
        str | None,
        _option("--max-plan-age", help="With --plan: refuse plans older than this [default: 15m]."),
    ] = None,
    redis_url: RedisUrl = None,
    output: FormatOpt = Format.text,
    best_effort: Annotated[
        bool,
        _flag(
            "--best-effort",
            help="Exit 0 (after printing the problem) when an action failed, Redis is down, "
            "a limit tripped or another run holds the lock.",
        ),
    ] = False,
    stop_timeout: Annotated[
        float,
        _option(
            "--stop-timeout",
            help="Seconds to wait for workers to stop jobs (above 0).",
            callback=_positive_seconds,
        ),
    ] = 15.0,
    reconnect_grace: ReconnectGraceOpt = Overrides.reconnect_grace_s,
    lock_timeout: LockTimeoutOpt = 5.0,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
    metrics_file: MetricsFileOpt = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    log_format: LogFormatOpt = logs.LogFormat.text,
    redis_username: RedisUsername = None,
    sentinel: SentinelOpt = None,
    sentinel_service: SentinelService = None,
    sentinel_db: SentinelDb = None,
    tls_ca_cert: TlsCaCert = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_verify: TlsVerifyOpt = None,
) -> None:
    """Apply a policy: classify every started job and act on the stuck ones."""
    _setup_logging(verbose, quiet, log_format)
    connection = _connection(
        redis_url,
        redis_username,
        sentinel,
        sentinel_service,
        sentinel_db,
        (tls_ca_cert, tls_cert, tls_key, tls_verify),
    )
    if policy_file is None and plan_file is None:
        _fail(UsageError("give a POLICY file, or --plan with a plan file"))
    _refuse_overwriting("--metrics-file", metrics_file, policy_file, plan_file)
    _note_mistakes_in_metrics("apply", metrics_file)
    policy = None
    if policy_file is not None:
        url_given = _guard(connection.given_url) is not None
        policy = _guard(lambda: _load_for_apply(policy_file, url_given))
    if plan_file is not None:
        _guard(lambda: planfile.check_plan_file(plan_file))
    url, options = _guard(lambda: connection.resolve(policy))
    _setup_logging(verbose, quiet, log_format, url)
    overrides = _overrides(
        dry_run, force, max_age, queue, max_actions, stop_timeout, reconnect_grace
    )
    job = Job(
        url, timeout, lock_timeout, overrides, progress=output is Format.text, options=options
    )
    began = time.monotonic()
    with _stop_on_signals() as received:
        job.should_stop = lambda: bool(received)
        run, error = _apply(
            job, policy, plan_file, max_plan_age, force, max_age, queue, max_actions, url, output
        )
    left = run is None or bool(run.stopped or run.locked_out or run.redis_lost or run.refused)
    unwaited = run is not None and run.stops_not_waited_for
    _exit_if_signalled(received, reported=run is not None, left=left, unwaited=unwaited)
    _finish(error, best_effort, url, ("apply", metrics_file), run, began)


def _apply(
    job: Job,
    policy: Policy | None,
    plan_file: str | None,
    max_plan_age: str | None,
    force: bool | None,
    max_age: str | None,
    queue: list[str] | None,
    max_actions: int | None,
    url: str,
    output: Format,
) -> tuple[Run | None, OpsctlError | None]:
    """Run `apply` (from a policy or a plan) and print its report; the run and its error."""
    run: Run | None
    if plan_file is not None:
        _refuse_with_plan(force=force, max_age=max_age, queue=queue, max_actions=max_actions)
        if job.overrides.dry_run is False:
            _fail(
                UsageError(
                    "--no-dry-run (or OPSCTL_DRY_RUN=false) cannot be used with --plan: a "
                    "plan does what the policy it was made from says, and one made where "
                    "dry_run is true changes nothing; make the plan from a policy without it"
                )
            )
        plan_age = _guard(
            lambda: _parse_duration_option(
                "--max-plan-age", DEFAULT_MAX_PLAN_AGE if max_plan_age is None else max_plan_age
            )
        )
        done, error = _attempt(lambda: job.apply_plan(plan_file, plan_age, policy), url)
        run, where = None, None
        if done is not None:
            run, (policy_path, plan_digest) = done
            where = (policy.path if policy else policy_path, plan_digest)
    else:
        assert policy is not None
        if max_plan_age is not None:
            # Most likely --plan was meant, and forgetting it would act on the policy.
            given_as = _given_as("--max-plan-age")
            _fail(UsageError(f"{given_as} applies only with --plan, which was not given"))
        run, error = _attempt(lambda: job.apply_policy(policy), url)
        where = (policy.path, policy.digest)
    if run is not None and where is not None:
        _print_run(run, output, url, where)
        error = _run_error(run)
    return run, error


@contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """Take SIGTERM and SIGINT as a request to stop between two changes, so locks
    are released and the report printed (a second one stops at once); the signals
    received are yielded, for the run to poll."""
    received: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        if received:
            log.warning("signal=%s stopping at once", signum)
            watch.exit_at_once(128 + signum)
        received.append(signum)
        log.warning("signal=%s stopping after the change in progress (again: at once)", signum)

    with watch.stop_signals_handled(stop):
        yield received


def _exit_if_signalled(
    received: list[int], reported: bool, left: bool = True, unwaited: bool = False
) -> None:
    """Exit as the first stop signal says, if one came: a run cut short never passes
    for a finished one. ``reported``: its report, of what was done, is printed;
    ``left``: something was left for a later run (the signal may have come after the
    last change); ``unwaited``: stops were sent and not waited for."""
    if not received:
        return
    done = "what was done is in the report"
    if left:
        done += "; run again to finish"
    if unwaited:
        done += "; stops sent were not waited for: see their jobs' reasons"
    if not (left or unwaited):
        done += ", and nothing was left undone"
    said = done if reported else "nothing was done"
    _say(f"stopped by signal {received[0]}: {said}", logging.WARNING)
    raise typer.Exit(128 + received[0])


#: How old a plan ``apply --plan`` accepts when --max-plan-age is not given.
DEFAULT_MAX_PLAN_AGE = "15m"


def _refuse_with_plan(**given: object) -> None:
    """Options that choose what a run does cannot change a plan, which holds exactly
    the actions it lists: refuse them rather than ignore them."""
    names = [_given_as(f"--{name.replace('_', '-')}") for name, value in given.items() if value]
    if names:
        _fail(
            UsageError(
                f"{' and '.join(names)} cannot be used with --plan: a plan acts on exactly "
                "the jobs it lists; give them to opsctl plan instead"
            )
        )


def _note_mistakes_in_metrics(command: str, metrics_file: str | None) -> None:
    """From here on, a mistake in the policy or an option (exit 2) is written to
    ``metrics_file``, when given, as ``command``'s exit code."""
    target = (command, metrics_file, time.monotonic()) if metrics_file is not None else None
    _metrics_if_invalid.set(target)


def _finish(
    error: OpsctlError | None,
    best_effort: bool,
    url: str,
    metrics_to: tuple[str, str | None],
    run: Run | None,
    began: float,
    seen: metrics.Observation | None = None,
) -> None:
    """Write the metrics file (when asked), then exit as the run's outcome calls for.

    ``metrics_to`` is the command's name (the metrics' ``command`` label) and
    the metrics file, None when none is asked for. The run's own error decides
    the exit code; a metrics file that cannot be written exits 6 only when the
    run itself succeeded.
    """
    command, metrics_file = metrics_to
    _metrics_if_invalid.set(None)  # written here, whatever the error
    if metrics_file is not None:
        if run is not None:
            seen = metrics.observe_run(run)
        code = error.exit_code if error is not None else ExitCode.OK
        _, write_error = _attempt(
            lambda: _write_metrics(metrics_file, command, seen, code, began), url
        )
        # A report was printed whole (status reports without a run).
        reported = (run is not None or seen is not None) and not _output_cut_short.get()
        if isinstance(write_error, metrics.MetricsWriteError) and reported:
            write_error = metrics.MetricsWriteError(f"{write_error}; the report above is complete")
        if write_error is not None and error is None:
            error = write_error
        elif write_error is not None and error is not None:
            if best_effort and error.exit_code in BEST_EFFORT_CODES:
                # --best-effort hides the run's failure, never a setup mistake.
                _say(f"error: {redact(str(error), url)}", logging.ERROR)
                error = write_error
            else:
                _say(f"error: {redact(str(write_error), url)}", logging.ERROR)
    if error is not None:
        _fail(error, best_effort, url)


def _write_metrics(
    path: str,
    command: str,
    seen: metrics.Observation | None,
    code: int,
    began: float,
    policy_rejected: bool | None = None,
) -> None:
    now_s = time.time()
    samples = metrics.recorded(path)
    facts = metrics.RunFacts(
        command=command,
        timestamp_s=now_s,
        duration_s=time.monotonic() - began,
        exit_code=code,
        last_success_s=metrics.last_success(samples, command, code, now_s),
        policy_rejected=policy_rejected,
    )
    metrics.write(path, seen, facts, samples)


@dataclass
class Job:
    """One apply or plan against one Redis, with this invocation's settings."""

    url: str
    timeout_s: float
    lock_timeout_s: float
    overrides: Overrides
    progress: bool = False  # a progress bar on a terminal's stderr for long scans
    should_stop: Callable[[], bool] | None = None  # polled between changes (opsctl watch)
    options: ConnectionOptions = field(default_factory=ConnectionOptions)
    #: Whether this is the process's only run, its records kept until it exits
    #: (not so for opsctl watch: see run.collector_paused).
    once: bool = True

    def connect(self) -> redis.Redis:
        """A checked connection to this job's Redis."""
        conn = connect(self.url, self.timeout_s, self.options)
        log.info("connected redis=%s", mask_url(self.url))
        return conn

    def apply_policy(self, policy: Policy) -> Run:
        run_id = new_run_id()
        logs.current_run_id.set(run_id)  # every line of the run names it, from the first
        conn = self.connect()
        keys = Keys(policy.key_prefix)
        log.info("run started policy=%s", policy.path, extra={"run_id": run_id})
        dry = self.overrides.dry_run
        if dry if dry is not None else policy.defaults.dry_run:
            return self._plan(conn, keys, policy, run_id)
        with run_lock(conn, run_id, self.lock_timeout_s, self.should_stop):
            run = self._plan(conn, keys, policy, run_id)
            self._execute(conn, keys, run, policy.digest)
        return run

    def apply_plan(
        self, path: str, max_age_s: int, policy: Policy | None
    ) -> tuple[Run, tuple[str, str]]:
        """Carry out a plan file; the run, and the path and digest of the policy the
        plan was made from (as the plan records them)."""
        run_id = new_run_id()  # a run of its own, as each carrying out of a plan is
        logs.current_run_id.set(run_id)
        conn = self.connect()
        identity = planfile.server_identity(conn, self.url)

        def read() -> planfile.Plan:
            digest, rule_for = (policy.digest, policy.rule_for) if policy else (None, None)
            found = planfile.read(path, identity, server_time(conn), max_age_s, digest, rule_for)
            found.run.run_id = run_id
            return found

        plan_read = read()
        log.info("run started plan=%s", path)
        made_from = (plan_read.policy_path, plan_read.policy_digest)
        if self.overrides.dry_run or plan_read.run.dry_run:
            recheck_plan(conn, Keys(plan_read.key_prefix), plan_read.run)
            # A plan made from a policy whose defaults say dry_run changes nothing either.
            plan_read.run.dry_run = True
            plan_read.run.server_version, plan_read.run.warnings = server_notes(conn)
            return plan_read.run, made_from
        with run_lock(conn, run_id, self.lock_timeout_s, self.should_stop):
            plan_read = read()  # again, now that no other run can act meanwhile
            run = plan_read.run
            run.server_version, run.warnings = server_notes(conn)
            keys = Keys(plan_read.key_prefix)
            recheck_plan(conn, keys, run)
            self._execute(conn, keys, run, plan_read.policy_digest)
        return run, made_from

    def write_plan(self, policy: Policy, path: str) -> tuple[Run, int]:
        conn = self.connect()
        run = self._plan(conn, Keys(policy.key_prefix), policy, None)
        identity = planfile.server_identity(conn, self.url)
        where = (policy.path, policy.digest)
        count = planfile.write(
            path,
            run,
            identity,
            mask_url(self.url),
            where,
            policy.key_prefix,
            dry_run=policy.defaults.dry_run,
        )
        return run, count

    def _plan(self, conn: redis.Redis, keys: Keys, policy: Policy, run_id: str | None) -> Run:
        with ScanProgress(self.progress) as progress, collector_paused(keep=self.once):
            return with_retries(
                lambda: plan(conn, keys, policy, self.overrides, progress, run_id, self.should_stop)
            )

    def _execute(self, conn: redis.Redis, keys: Keys, run: Run, digest: str) -> None:
        context = AuditContext(run.run_id, digest, keys.prefix)
        with ScanProgress(self.progress) as progress:
            Executor(
                conn,
                keys,
                run,
                context,
                stop_timeout_s=self.overrides.stop_timeout_s,
                lock_timeout_s=self.lock_timeout_s,
                should_stop=self.should_stop,
                on_progress=progress,
            ).execute()


def _refuse_overwriting(option: str, path: str | None, *inputs: str | None) -> None:
    """Refuse an output path that names one of the command's input files (the policy,
    a plan): writing it would destroy the input."""
    for given in inputs:
        if path is not None and given is not None and _same_file(path, given):
            reads = f"is the file {quoted(given)} this command reads"
            _fail(UsageError(f"{option} {quoted(path)} {reads}"))


def _same_file(one: str, other: str) -> bool:
    """Whether two paths name one existing file (through links and ``..`` too)."""
    try:
        return os.path.samefile(one, other)
    except (OSError, ValueError):
        return False


def _print_run(run: Run, output: Format, url: str, where: tuple[str, str]) -> None:
    shown = mask_url(url)
    with _reader_may_leave():
        if output is Format.json:
            report.write_run_json(run, shown, where[0], where[1], sys.stdout)
        else:
            report.print_text(run, _console(), shown)


#: Whether the last report's reader went away before its end (see _reader_may_leave).
_output_cut_short: ContextVar[bool] = ContextVar("opsctl_output_cut_short", default=False)


@contextmanager
def _reader_may_leave() -> Iterator[None]:
    """Let the reader of the output go early (``| head``): the output is cut short,
    and the command's exit code stays that of what it did."""
    _output_cut_short.set(False)
    try:
        yield
        # Now, while a reader that has gone can still be told apart: what is
        # left in the buffer would otherwise fail at exit, and exit 120.
        sys.stdout.flush()
    except BrokenPipeError:
        # What is still buffered, and later writes, go nowhere instead of failing again.
        terminal.discard(sys.stdout)
        _output_cut_short.set(True)
        _say("the output's reader went away; the output was cut short", logging.WARNING)


def _exit_for(run: Run, best_effort: bool, url: str) -> None:
    """Exit with the code the outcome calls for (the report is already printed)."""
    error = _run_error(run)
    if error is not None:
        _fail(error, best_effort, url)


def _run_error(run: Run) -> OpsctlError | None:
    """The error a finished run's outcome calls for; None when it exits 0."""
    if run.redis_lost:
        return RedisUnavailable("lost the connection to Redis; see the report")
    if run.refused:
        why = f"Redis refused a command mid-run ({run.refused}); see the report for what was done"
        return RedisUnavailable(why)
    if run.failed:
        count = report.summary(run)["errors"]
        return OpsctlError(f"{count} action(s) failed; see the report")
    if run.limits_tripped and not run.dry_run:
        return LimitTripped("; ".join(run.limits_tripped) + "; nothing was done")
    if run.locked_out:
        queues = ", ".join(repr(q) for q in run.locked_out)
        why = f"RQ's maintenance lock kept this run from queue(s) {queues}: their jobs were skipped"
        return LockTimeout(why)
    return None


@app.command("watch")
def watch_command(
    policy_file: Annotated[str, typer.Argument(metavar="POLICY", help="Policy file (YAML).")],
    every: Annotated[
        str, _option("--every", help="Time between rounds (90s, 10m, 2h, 1d).")
    ] = "60s",
    dry_run: Annotated[
        bool | None,
        _flag("--dry-run/--no-dry-run", help="Only report what would be done.", show_default=False),
    ] = None,
    force: ForceOpt = None,
    max_age: MaxAgeOpt = None,
    queue: QueueOpt = None,
    max_actions: MaxActionsOpt = None,
    redis_url: RedisUrl = None,
    output: FormatOpt = Format.text,
    stop_timeout: Annotated[
        float,
        _option(
            "--stop-timeout",
            help="Seconds to wait for workers to stop jobs (above 0).",
            callback=_positive_seconds,
        ),
    ] = 15.0,
    reconnect_grace: ReconnectGraceOpt = Overrides.reconnect_grace_s,
    lock_timeout: LockTimeoutOpt = 5.0,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
    metrics_file: MetricsFileOpt = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    log_format: LogFormatOpt = logs.LogFormat.text,
    redis_username: RedisUsername = None,
    sentinel: SentinelOpt = None,
    sentinel_service: SentinelService = None,
    sentinel_db: SentinelDb = None,
    tls_ca_cert: TlsCaCert = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_verify: TlsVerifyOpt = None,
) -> None:
    """Apply a policy in a loop, re-reading it when it changes; SIGTERM stops it cleanly."""
    _setup_logging(verbose, quiet, log_format)
    connection = _connection(
        redis_url,
        redis_username,
        sentinel,
        sentinel_service,
        sentinel_db,
        (tls_ca_cert, tls_cert, tls_key, tls_verify),
    )
    _refuse_overwriting("--metrics-file", metrics_file, policy_file)
    if metrics_file is not None and (unwritable := metrics.unwritable_directory(metrics_file)):
        # A loop would run for ever without them, and an alert on their age see no data.
        _fail(
            UsageError(
                f"{_given_as('--metrics-file')}: cannot write a file in {unwritable}; "
                "create the directory, or give a writable one"
            )
        )
    _note_mistakes_in_metrics("watch", metrics_file)
    every_s = _guard(lambda: _parse_duration_option("--every", every))
    if not 0 < every_s <= MAX_WATCH_EVERY_S:
        _fail(
            UsageError(f"{_given_as('--every')}: {every!r} must be longer than 0s and at most 7d")
        )
    url_given = _guard(connection.given_url) is not None
    policy = _guard(lambda: _load_for_apply(policy_file, url_given))
    first_url, first_options = _guard(lambda: connection.resolve(policy))
    # What every round would refuse (a malformed URL, a TLS file that cannot be read)
    # is refused now, as apply refuses it, rather than logged round after round.
    _guard(lambda: check_settings(first_url, first_options))
    _setup_logging(verbose, quiet, log_format, first_url)
    overrides = _overrides(
        dry_run, force, max_age, queue, max_actions, stop_timeout, reconnect_grace
    )

    def one_round(current: Policy, should_stop: Callable[[], bool]) -> watch.RoundResult:
        resolved, error = _attempt(lambda: connection.resolve(current))
        if resolved is None:
            log.error("round not run: %s", error)
            return watch.RoundResult(None, error.exit_code if error else ExitCode.INVALID)
        url, options = resolved
        job = Job(
            url,
            timeout,
            lock_timeout,
            overrides,
            should_stop=should_stop,
            options=options,
            once=False,
        )
        run, error = _attempt(lambda: job.apply_policy(current), url)
        if isinstance(error, StoppedEarly):
            # Stopped before it could act: neither a failure (a shutdown must not pass
            # for a lock held too long) nor a success; the loop writes no metrics for it.
            log.warning("round stopped: %s", redact(str(error), url))
            return watch.RoundResult(None, ExitCode.OK)
        if run is not None:
            _print_round(run, output, url, current)
            error = _run_error(run)
        if error is None:
            return watch.RoundResult(run, ExitCode.OK)
        log.error("round failed, exit_code=%d: %s", error.exit_code, redact(str(error), url))
        return watch.RoundResult(run, error.exit_code)

    _metrics_if_invalid.set(None)  # the rounds write their own
    loop = watch.Watch(
        policy,
        lambda path, raw: _load_for_apply(path, url_given, raw),
        one_round,
        every_s,
        metrics_file,
    )
    raise typer.Exit(loop.run())


def _print_round(run: Run, output: Format, url: str, policy: Policy) -> None:
    """One round's report: the text report, or the JSON report on a single line. A
    reader that went away is said once; the loop goes on, its reports going nowhere."""
    with _reader_may_leave():
        if output is Format.json:
            document = report.to_json(run, mask_url(url), policy.path, policy.digest)
            print(json.dumps(document), flush=True)
        else:
            report.print_text(run, _console(), mask_url(url))


@app.command("plan")
def plan_command(
    policy_file: Annotated[str, typer.Argument(metavar="POLICY", help="Policy file (YAML).")],
    output_file: Annotated[
        str | None, _option("--output", "-o", help="Where to write the plan (JSON). Required.")
    ] = None,
    force: ForceOpt = None,
    max_age: MaxAgeOpt = None,
    queue: QueueOpt = None,
    max_actions: MaxActionsOpt = None,
    reconnect_grace: ReconnectGraceOpt = Overrides.reconnect_grace_s,
    redis_url: RedisUrl = None,
    output: FormatOpt = Format.text,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    log_format: LogFormatOpt = logs.LogFormat.text,
    redis_username: RedisUsername = None,
    sentinel: SentinelOpt = None,
    sentinel_service: SentinelService = None,
    sentinel_db: SentinelDb = None,
    tls_ca_cert: TlsCaCert = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_verify: TlsVerifyOpt = None,
) -> None:
    """Write the exact actions a policy would take to a file, for review and apply --plan."""
    _setup_logging(verbose, quiet, log_format)
    connection = _connection(
        redis_url,
        redis_username,
        sentinel,
        sentinel_service,
        sentinel_db,
        (tls_ca_cert, tls_cert, tls_key, tls_verify),
    )
    if output_file is None:
        # Not required by the parser, so that a blank OPSCTL_OUTPUT is named as such.
        _fail(UsageError("give --output FILE (or OPSCTL_OUTPUT): where to write the plan"))
    url_given = _guard(connection.given_url) is not None
    policy = _guard(lambda: _load_for_apply(policy_file, url_given))
    _refuse_overwriting("--output", output_file, policy_file)
    unfit = planfile.unfit_output(output_file)
    if unfit is not None:  # refused before anything is read
        _fail(UsageError(unfit))
    url, options = _guard(lambda: connection.resolve(policy))
    _setup_logging(verbose, quiet, log_format, url)
    overrides = _overrides(
        True, force, max_age, queue, max_actions, reconnect_grace_s=reconnect_grace
    )
    job = Job(url, timeout, 0, overrides, progress=output is Format.text, options=options)
    run, count = _guard(lambda: job.write_plan(policy, output_file), url=url)
    _print_run(run, output, url, (policy.path, policy.digest))
    if not quiet:
        _say(f"wrote {count} planned action(s) to {printable(output_file)}")


@app.command()
def history(
    redis_url: StatusRedisUrl = None,
    run_id: Annotated[
        str | None, _option("--run", help="Only this run id.", callback=_an_id)
    ] = None,
    job_id: Annotated[
        str | None, _option("--job", help="Only this job id.", callback=_an_id)
    ] = None,
    output: FormatOpt = Format.text,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    log_format: LogFormatOpt = logs.LogFormat.text,
    redis_username: RedisUsername = None,
    sentinel: SentinelOpt = None,
    sentinel_service: SentinelService = None,
    sentinel_db: SentinelDb = None,
    tls_ca_cert: TlsCaCert = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_verify: TlsVerifyOpt = None,
) -> None:
    """Show the audit trail of actions opsctl has taken."""
    _setup_logging(verbose, quiet, log_format)
    connection = _connection(
        redis_url,
        redis_username,
        sentinel,
        sentinel_service,
        sentinel_db,
        (tls_ca_cert, tls_cert, tls_key, tls_verify),
    )
    url, options = _guard(lambda: connection.resolve(None))
    _setup_logging(verbose, quiet, log_format, url)
    entries = _guard(lambda: audit.history(connect(url, timeout, options), run_id, job_id), url=url)
    with _reader_may_leave():
        if output is Format.json:
            report.print_json({"redis": mask_url(url), "entries": entries})
        else:
            report.print_history(entries, _console())


@app.command("requeue")
def requeue_command(
    run_id: Annotated[
        str,
        _option(
            "--run", help="The run whose failed and canceled jobs to requeue.", callback=_an_id
        ),
    ],
    redis_url: StatusRedisUrl = None,
    dry_run: Annotated[
        bool, _flag("--dry-run", help="Only report what would be requeued.")
    ] = False,
    output: FormatOpt = Format.text,
    key_prefix: Annotated[
        str | None,
        _option(
            "--key-prefix",
            help="RQ key prefix. Default: the one the run used, as its audit entries record.",
            callback=_key_prefix,
        ),
    ] = None,
    lock_timeout: LockTimeoutOpt = 5.0,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    log_format: LogFormatOpt = logs.LogFormat.text,
    redis_username: RedisUsername = None,
    sentinel: SentinelOpt = None,
    sentinel_service: SentinelService = None,
    sentinel_db: SentinelDb = None,
    tls_ca_cert: TlsCaCert = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_verify: TlsVerifyOpt = None,
) -> None:
    """Undo a run: put the jobs it failed or canceled back on their queues."""
    _setup_logging(verbose, quiet, log_format)
    connection = _connection(
        redis_url,
        redis_username,
        sentinel,
        sentinel_service,
        sentinel_db,
        (tls_ca_cert, tls_cert, tls_key, tls_verify),
    )
    url, options = _guard(lambda: connection.resolve(None))
    _setup_logging(verbose, quiet, log_format, url)
    with _stop_on_signals() as received:
        done, error = _attempt(
            lambda: undo.requeue_run(
                connect(url, timeout, options),
                key_prefix,
                run_id,
                dry_run,
                lock_timeout,
                lambda: bool(received),
            ),
            url=url,
        )
        if done is not None:
            with _reader_may_leave():
                if output is Format.json:
                    report.print_json(done.to_json(mask_url(url)))
                else:
                    undo.print_text(done, _console())
    _exit_if_signalled(received, reported=done is not None, left=done is None or done.cut_short)
    if done is None:
        _fail(error or OpsctlError("requeue did not run"), url=url)
    if done.redis_lost:
        _fail(RedisUnavailable("lost the connection to Redis; see the report"), url=url)
    if done.refused and not dry_run:
        why = f"Redis refused a command ({done.refused}); see the report for what was done"
        _fail(RedisUnavailable(why), url=url)
    if done.failed and not dry_run:  # a dry run changes nothing, so nothing can fail
        errors = done.summary()["errors"]
        _fail(OpsctlError(f"{errors} requeue(s) failed; see the report"), url=url)


@app.command()
def validate(
    files: Annotated[list[str], typer.Argument(metavar="FILE...", help="Policy files to check.")],
    strict_env: Annotated[
        bool,
        _flag("--strict-env", help="Treat unset environment variables as errors."),
    ] = False,
) -> None:
    """Check policy files: one line per problem (FILE:LINE:COL: path: message)."""
    _setup_logging(0, False)
    problems = _guard(lambda: validate_files(files, strict_env=strict_env))
    for problem in problems:
        print(problem)
    failed = {p.file for p in problems if p.severity == "error"}
    for name in files:
        if name not in failed:
            terminal.say_on_stderr(f"{printable(name)}: ok")
    if failed:
        raise typer.Exit(ExitCode.INVALID)


class StatusFormat(str, Enum):
    text = "text"
    json = "json"
    prometheus = "prometheus"


@app.command("status")
def status_command(
    redis_url: StatusRedisUrl = None,
    output: Annotated[StatusFormat, _option("--format", help="Report format.")] = StatusFormat.text,
    key_prefix: Annotated[
        str, _option("--key-prefix", help="RQ key prefix.", callback=_key_prefix)
    ] = DEFAULT_PREFIX,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
    metrics_file: MetricsFileOpt = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    log_format: LogFormatOpt = logs.LogFormat.text,
    redis_username: RedisUsername = None,
    sentinel: SentinelOpt = None,
    sentinel_service: SentinelService = None,
    sentinel_db: SentinelDb = None,
    tls_ca_cert: TlsCaCert = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_verify: TlsVerifyOpt = None,
) -> None:
    """Per queue: counts of jobs by state, oldest started job, workers alive and dead."""
    _setup_logging(verbose, quiet, log_format)
    connection = _connection(
        redis_url,
        redis_username,
        sentinel,
        sentinel_service,
        sentinel_db,
        (tls_ca_cert, tls_cert, tls_key, tls_verify),
    )
    url, options = _guard(lambda: connection.resolve(None))
    _setup_logging(verbose, quiet, log_format, url)
    began = time.monotonic()
    found, error = _attempt(
        lambda: status.collect_with_snapshot(connect(url, timeout, options), Keys(key_prefix)),
        url,
    )
    seen = None
    if found is not None:
        now, statuses, snapshot = found
        if output is StatusFormat.prometheus or metrics_file is not None:
            # status takes no policy: states are judged by the built-in rule (max_age 10m).
            seen = metrics.observe_snapshot(snapshot, Rule())
        with _reader_may_leave():
            if output is StatusFormat.json:
                report.print_json(status.to_json(now, mask_url(url), statuses, snapshot.problems))
            elif output is StatusFormat.text:
                status.print_text(statuses, _console(), key_prefix, snapshot.problems)
            else:
                code = ExitCode.OK
                moment = time.time()
                facts = metrics.RunFacts("status", moment, time.monotonic() - began, code, moment)
                sys.stdout.write(metrics.render(metrics.build(seen, facts)))
    _finish(error, False, url, ("status", metrics_file), None, began, seen)


@app.command("explain")
def explain_command(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id.")],
    policy_file: Annotated[
        str | None,
        _option("--policy", help="Policy whose rule to apply (default: built-in rule)."),
    ] = None,
    redis_url: RedisUrl = None,
    output: FormatOpt = Format.text,
    key_prefix: Annotated[
        str | None,
        _option(
            "--key-prefix",
            help="RQ key prefix. Default: the policy's, else rq.",
            callback=_key_prefix,
        ),
    ] = None,
    timeout: Timeout = DEFAULT_TIMEOUT_S,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    log_format: LogFormatOpt = logs.LogFormat.text,
    redis_username: RedisUsername = None,
    sentinel: SentinelOpt = None,
    sentinel_service: SentinelService = None,
    sentinel_db: SentinelDb = None,
    tls_ca_cert: TlsCaCert = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_verify: TlsVerifyOpt = None,
) -> None:
    """Everything known about one job, and what the policy would do with it and why."""
    from opsctl import explain

    _setup_logging(verbose, quiet, log_format)
    connection = _connection(
        redis_url,
        redis_username,
        sentinel,
        sentinel_service,
        sentinel_db,
        (tls_ca_cert, tls_cert, tls_key, tls_verify),
    )
    policy = None
    if policy_file is not None:
        path = policy_file
        url_given = _guard(connection.given_url) is not None
        policy = _guard(lambda: _load_for_apply(path, url_given))
    url, options = _guard(lambda: connection.resolve(policy))
    _setup_logging(verbose, quiet, log_format, url)
    keys = Keys(key_prefix or (policy.key_prefix if policy else DEFAULT_PREFIX))
    # Which server and prefix were read: a policy's URL wins over REDIS_URL, and a
    # job looked for under another prefix or database is simply not found.
    where = f"{mask_url(url)}, key prefix {quoted(keys.prefix)}"

    def read() -> explain.Explanation:
        try:
            return explain.explain(connect(url, timeout, options), keys, job_id, policy)
        except explain.JobNotFound as exc:
            raise explain.JobNotFound(f"{exc} (looked for on {where})") from None

    found = _guard(read, url=url)
    with _reader_may_leave():
        if output is Format.json:
            report.print_json(explain.to_json(found, mask_url(url)))
        else:
            explain.print_text(found, _console(), where)


@app.command()
def schema() -> None:
    """Print the policy file's JSON Schema."""
    print(json.dumps(load_policy_schema(), indent=2))


def main() -> None:
    """Console-script entry point."""
    terminal.streams_ready()
    # A fixed name, so that completion works the same from `opsctl` and `python -m opsctl`.
    app(prog_name="opsctl")
