"""Exceptions raised by opsctl and the exit codes the CLI maps them to."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from opsctl.shown import printable


class ExitCode(IntEnum):
    """Process exit codes; the README documents each one."""

    OK = 0  # success, nothing to do, or any dry run
    ACTION_FAILED = 1  # at least one action on a job or worker failed
    INVALID = 2  # invalid policy file or command-line usage, or a key of opsctl's in the way
    REDIS_UNAVAILABLE = 3  # Redis unreachable, refused the login, or timed out
    LIMIT_TRIPPED = 4  # a blast-radius limit tripped: nothing was done
    LOCKED = 5  # another opsctl run held the lock past --lock-timeout
    METRICS_FAILED = 6  # the run is reported, but its metrics file could not be written


class OpsctlError(Exception):
    """Base class of every error opsctl reports to the user."""

    exit_code: ExitCode = ExitCode.ACTION_FAILED


@dataclass(frozen=True)
class Problem:
    """One finding about a policy file, located at a line and column (1-based)."""

    file: str
    line: int
    column: int
    path: str
    message: str
    severity: str = "error"  # "error" or "note"

    def __str__(self) -> str:
        # A file name may hold anything, a newline or an escape sequence included.
        where = f"{printable(self.file)}:{self.line}:{self.column}"
        prefix = "" if self.severity == "error" else f"{self.severity}: "
        path = f"{self.path}: " if self.path else ""
        return f"{where}: {prefix}{path}{self.message}"


class PolicyError(OpsctlError):
    """Raised when a policy file cannot be read, parsed or validated."""

    exit_code = ExitCode.INVALID

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


class ForeignKey(OpsctlError):
    """Raised when a key opsctl owns holds a value something else wrote: a setup
    mistake to mend by hand, not a transient failure."""

    exit_code = ExitCode.INVALID


class UsageError(OpsctlError):
    """Raised when command-line options contradict each other or are malformed."""

    exit_code = ExitCode.INVALID


class RedisUnavailable(OpsctlError):
    """Raised when Redis cannot be reached, refuses the login, or times out."""

    exit_code = ExitCode.REDIS_UNAVAILABLE


class LimitTripped(OpsctlError):
    """Raised when a run would act on more jobs than a blast-radius cap allows."""

    exit_code = ExitCode.LIMIT_TRIPPED


class StoppedEarly(OpsctlError):
    """Raised when opsctl is asked to stop (a signal) before its first change:
    nothing was done. Callers that were sent a signal exit as the signal says;
    the exit code here is for those that were not."""
