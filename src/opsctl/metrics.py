"""Prometheus metrics of a run, for node_exporter's textfile collector or a scrape.

Every metric is a gauge describing the last run (``opsctl apply``, ``opsctl
status`` or one round of ``opsctl watch``):

- ``opsctl_started_jobs{queue,state}``: started-registry entries by state;
  every state opsctl knows gets a series per queue, 0 when empty, so a
  dashboard never sees a series vanish;
- ``opsctl_oldest_started_job_age_seconds{queue}``: age of the oldest started
  job (from ``started_at``), on queues whose started jobs have a readable age;
- ``opsctl_actions{queue,action,outcome}``: what the run did (``planned`` in
  a dry run);
- ``opsctl_problems``: records the run could not read (a registry or hash of
  the wrong type, say) and searches its user may not run, which do not change
  its exit code;
- ``opsctl_run_duration_seconds``, ``opsctl_last_run_timestamp_seconds``,
  ``opsctl_last_run_exit_code``;
- ``opsctl_last_success_timestamp_seconds``: the last run that exited 0. A
  failed run keeps the previous value, read back from the metrics file it
  replaces, so one-shot runs behave like a long-lived exporter.

Every series carries a ``command`` label (``apply``, ``status`` or
``watch``). Files of different commands in one collector directory then never
hold the same series (node_exporter refuses a series two files repeat), and a
``status`` that writes the file of an ``apply`` can neither hide the
``apply``'s failures nor erase its last success: the success read back is the
one recorded under the same command.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opsctl import files
from opsctl.engine import State, classify, jobs_in_hand
from opsctl.errors import ExitCode, OpsctlError
from opsctl.files import NotReadable, TooLarge, read_file
from opsctl.policy import Rule
from opsctl.run import Run
from opsctl.shown import quoted
from opsctl.state import Snapshot

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric
    from prometheus_client.samples import Sample

# prometheus_client is imported where it is used: it costs about 14 MB of
# memory, which a run that writes no metrics should not pay.

log = logging.getLogger(__name__)

LAST_SUCCESS = "opsctl_last_success_timestamp_seconds"
#: The gauge that tells a watch whose policy file is refused.
POLICY_REJECTED = "opsctl_policy_file_rejected"
PROBLEMS = "opsctl_problems"
#: Gauges a run may write no series of (problems, when it read nothing; the policy
#: file's, but for watch), and their help: a file shared by several commands keeps
#: the series of the others all the same (see :func:`write`).
_OPTIONAL = {
    PROBLEMS: "Records the run could not read, and searches its user may not run; listed "
    "under problems in its report.",
    POLICY_REJECTED: "1 when the policy file cannot be read or is invalid, so the round ran "
    "under the last good policy; 0 when the file's policy is the one in force.",
}


#: Why a metrics path that names something other than a regular file is refused.
NOT_A_FILE = (
    "it exists and is not a regular file (a device, FIFO, socket or symbolic link), "
    "and writing the metrics would replace it; to write no metrics, leave out --metrics-file"
)
#: Why a metrics path that names a file of other contents is refused.
NOT_METRICS_SHORT = (
    "writing the metrics would replace it; give the path of a metrics file opsctl "
    "wrote, of an empty file, or of none yet"
)
NOT_METRICS = (
    "it exists and does not hold opsctl's metrics in the Prometheus text format (a key, "
    f"a certificate, a policy?), and {NOT_METRICS_SHORT}"
)


def unwritable_directory(path: str) -> str | None:
    """Why no file can be written beside ``path`` (its directory is missing, or
    refuses a new file), or None. Tried by writing and removing an empty file,
    as the metrics are written: a permission check alone misleads root, and says
    nothing of a read-only file system."""
    where = os.path.dirname(os.path.abspath(path))
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".opsctl-check-", suffix=".tmp"):
            return None
    except OSError as exc:
        return f"{quoted(where)}: {exc.strerror or exc}"


def unfit_target(path: str) -> str | None:
    """Why writing the metrics to ``path`` would destroy something, or None: it names
    nothing yet, or a regular file that is empty or holds opsctl's metrics."""
    kept = files.kept_from_replacing(path, MAX_METRICS_FILE_BYTES, _holds_our_metrics)
    if kept is None:
        return None
    why, detail = kept
    if why == files.NOT_A_FILE:
        return NOT_A_FILE
    if why == files.UNREADABLE:
        return f"it exists and cannot be read ({detail}), so {NOT_METRICS_SHORT}"
    return NOT_METRICS


def _holds_our_metrics(raw: bytes) -> bool:
    """Whether ``raw`` is Prometheus text holding opsctl's gauges (a file of comments
    alone, or of other lines that parse, such as 'password 12345', is not)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        names = [f.name for f in text_string_to_metric_families(raw.decode("utf-8"))]
    except ValueError:  # UnicodeDecodeError included
        return False
    return any(name.startswith("opsctl_") for name in names)


class MetricsWriteError(OpsctlError):
    """Raised when the metrics file cannot be written (the report is already printed)."""

    exit_code = ExitCode.METRICS_FAILED


@dataclass
class Observation:
    """What one run saw and did, reduced to the numbers the gauges show."""

    queues: set[str] = field(default_factory=set)
    started: Counter[tuple[str, str]] = field(default_factory=Counter)  # (queue, state)
    oldest_age_s: dict[str, float] = field(default_factory=dict)  # per queue
    actions: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    problems: int = 0  # records that could not be read

    def add_entry(self, queue: str, state: str, age_s: float | None) -> None:
        self.queues.add(queue)
        self.started[(queue, state)] += 1
        if age_s is not None and age_s > self.oldest_age_s.get(queue, -1.0):
            self.oldest_age_s[queue] = age_s

    def leave_out(self, unread: Collection[str]) -> None:
        """No job counts or ages for queues whose started registry could not be read:
        a count of 0 would read as nothing stuck there. What the run did there stays."""
        self.queues -= set(unread)
        for queue in unread:
            self.oldest_age_s.pop(queue, None)


def observe_run(run: Run) -> Observation:
    """The gauges' view of an apply, plan or watch round."""
    seen = Observation(queues={q.name for q in run.queues}, problems=len(run.problems))
    for job in run.jobs:
        queue = job.entry.queue
        seen.add_entry(queue, job.verdict.state.value, job.verdict.signals.age_s)
        if job.acts:
            seen.actions[(queue, job.action, job.outcome)] += 1
    seen.leave_out(run.unread)
    return seen


def observe_snapshot(snapshot: Snapshot, rule: Rule) -> Observation:
    """The gauges' view of ``opsctl status``: every entry classified under ``rule``.
    Queues whose started registry could not be read get no series: a count of 0
    would read as nothing stuck there."""
    seen = Observation(queues=set(snapshot.queues), problems=len(snapshot.problems))
    in_hand = jobs_in_hand(snapshot.workers)
    for entry in snapshot.entries:
        verdict = classify(entry, snapshot.workers, rule, snapshot.now, in_hand)
        seen.add_entry(entry.queue, verdict.state.value, verdict.signals.age_s)
    seen.leave_out(snapshot.unread)
    return seen


@dataclass
class RunFacts:
    """The run-level numbers: which command ran, when, how long, how it ended, and
    when it last succeeded."""

    command: str
    timestamp_s: float
    duration_s: float
    exit_code: int
    last_success_s: float | None  # None: no run has succeeded yet
    #: ``watch`` only: whether the policy file's content was refused (unreadable
    #: or invalid), so the round ran under the last good policy; None: not watched.
    policy_rejected: bool | None = None


def build(seen: Observation | None, facts: RunFacts) -> CollectorRegistry:
    """A registry holding every gauge; ``seen`` is None when the run read nothing."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry(auto_describe=True)
    command = facts.command
    started = Gauge(
        "opsctl_started_jobs",
        "Started-registry entries by queue and opsctl state.",
        ["command", "queue", "state"],
        registry=registry,
    )
    oldest = Gauge(
        "opsctl_oldest_started_job_age_seconds",
        "Age since started_at of the oldest started job of the queue.",
        ["command", "queue"],
        registry=registry,
    )
    actions = Gauge(
        "opsctl_actions",
        "Actions the run took, by queue, action and outcome.",
        ["command", "queue", "action", "outcome"],
        registry=registry,
    )
    if seen is not None:
        for queue in sorted(seen.queues):
            for state in State:
                count = seen.started[(queue, state.value)]
                started.labels(command, _shown(queue), state.value).set(count)
        for queue, age_s in sorted(seen.oldest_age_s.items()):
            oldest.labels(command, _shown(queue)).set(age_s)
        for (queue, action, outcome), count in sorted(seen.actions.items()):
            actions.labels(command, _shown(queue), action, outcome).set(count)
        Gauge(PROBLEMS, _OPTIONAL[PROBLEMS], ["command"], registry=registry).labels(command).set(
            seen.problems
        )
    run_level = [
        ("opsctl_run_duration_seconds", "Seconds the run took.", facts.duration_s),
        (
            "opsctl_last_run_timestamp_seconds",
            "Unix time at which the run ended.",
            facts.timestamp_s,
        ),
        ("opsctl_last_run_exit_code", "Exit code of the run.", facts.exit_code),
        (
            LAST_SUCCESS,
            "Unix time of the last run that exited 0 (0: none yet).",
            facts.last_success_s or 0.0,
        ),
    ]
    if facts.policy_rejected is not None:
        run_level.append(
            (POLICY_REJECTED, _OPTIONAL[POLICY_REJECTED], float(facts.policy_rejected))
        )
    for name, help_text, value in run_level:
        Gauge(name, help_text, ["command"], registry=registry).labels(command).set(value)
    return registry


def _shown(name: str) -> str:
    """A queue name as a label value: bytes that are not UTF-8 (kept as lone
    surrogates, see :func:`opsctl.state.text`) are written as ``\\xNN`` escapes,
    since the exposition format is UTF-8."""
    if name.isascii():
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def render(registry: CollectorRegistry) -> str:
    """The Prometheus text exposition format."""
    from prometheus_client import generate_latest

    return generate_latest(registry).decode("utf-8")


#: Most bytes of an existing metrics file opsctl reads back (its own are a few kilobytes).
MAX_METRICS_FILE_BYTES = 16 * 1024 * 1024


def recorded(path: str) -> list[Sample]:
    """Every sample of the metrics file ``path`` (read once per write: see
    :func:`previous_success` and :func:`write`).

    A missing, unreadable, oversized or malformed file (or one that is no
    regular file: it is never waited on) is not an error: it only means nothing
    is known from earlier runs.
    """
    try:
        text = read_file(path, MAX_METRICS_FILE_BYTES).decode("utf-8")
    except (NotReadable, TooLarge, UnicodeDecodeError):
        return []
    from prometheus_client.parser import text_string_to_metric_families

    try:
        return [s for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError:
        # The parser's words quote the file, which may hold anything: never shown.
        log.warning("metrics_file=%s unreadable: not in the Prometheus text format", path)
        return []


def previous_success(samples: list[Sample], command: str) -> float | None:
    """The last success time of ``command`` among the ``samples`` of a metrics
    file (see :func:`recorded`); None if they hold none.

    A file an older opsctl wrote has no ``command`` label: its one success time
    is taken as this command's, so an upgrade does not lose it.
    """
    samples = [
        s for s in samples if s.name == LAST_SUCCESS and math.isfinite(s.value) and s.value > 0
    ]
    ours = [s for s in samples if s.labels.get("command") == command]
    older = [s for s in samples if not s.labels]
    found = ours or older
    return float(found[0].value) if found else None


def last_success(
    samples: list[Sample], command: str, facts_exit_code: int, now_s: float
) -> float | None:
    """This run's time when it succeeded, else the success of ``command`` that the
    ``samples`` of its metrics file record."""
    if facts_exit_code == ExitCode.OK:
        return now_s
    return previous_success(samples, command)


def write(path: str, seen: Observation | None, facts: RunFacts, samples: list[Sample]) -> None:
    """Write the gauges of ``seen`` and ``facts`` to ``path`` atomically: a
    temporary file beside it, then a rename.

    They replace the series the file holds for ``facts.command``; the series
    other commands wrote there (among its ``samples``, see :func:`recorded`)
    are kept, so one file can serve ``apply`` and ``status`` without either
    erasing what the other recorded.
    """
    from prometheus_client import CollectorRegistry, write_to_textfile

    command = facts.command
    others: dict[str, list[Sample]] = {}
    for sample in samples:
        # Samples of an older opsctl, without the label, are left behind.
        if sample.labels.get("command", command) != command:
            others.setdefault(sample.name, []).append(sample)
    families = list(build(seen, facts).collect())
    for family in families:
        family.samples += others.pop(family.name, [])
    from prometheus_client.metrics_core import Metric

    for name, kept in others.items():  # families of which this run writes no series
        family = Metric(name, _OPTIONAL.get(name, "Written by opsctl."), "gauge")
        family.samples = kept
        families.append(family)
    merged = CollectorRegistry(auto_describe=False)
    merged.register(_Families(families))
    unfit = unfit_target(path)  # checked at start too; it may have changed since
    if unfit is not None:
        raise MetricsWriteError(f"cannot write the metrics file {quoted(path)}: {unfit}")
    try:
        write_to_textfile(path, merged)
    except OSError as exc:
        where = os.path.dirname(os.path.abspath(path))
        raise MetricsWriteError(
            f"cannot write the metrics file {quoted(path)}: {exc.strerror or exc} "
            f"(check that {quoted(where)} exists and is writable)"
        ) from None


class _Families:
    """A collector of families already built (for :func:`write`)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)
