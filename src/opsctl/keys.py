"""RQ's Redis key layout and the timing defaults opsctl relies on.

Every key name opsctl reads or writes is built here, from one configurable
prefix (RQ 3 lets deployments change it; older releases always use ``rq``).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "rq"

#: Fields of a job hash that opsctl reads. ``data``, ``meta`` and ``result``
#: hold pickled user objects and are never read.
JOB_FIELDS: tuple[str, ...] = (
    "status",
    "origin",
    "created_at",
    "started_at",
    "last_heartbeat",
    "timeout",
    "worker_name",
    "retries_left",
    "retry_intervals",
    "enqueue_at_front_on_retry",
    "failure_ttl",
)

#: Fields of a job hash that tell which function it calls (see :mod:`opsctl.records`).
FUNCTION_FIELDS: tuple[str, ...] = ("description", "data")

#: Fields of an execution hash (``<prefix>:execution:<job>:<execution>``), RQ 2+.
EXECUTION_FIELDS: tuple[str, ...] = ("worker_name", "created_at", "last_heartbeat")

#: Fields of a worker hash that bear on liveness and on what it is executing.
WORKER_FIELDS: tuple[str, ...] = (
    "birth",
    "death",
    "death_noted_by",
    "death_noted_after",
    "last_heartbeat",
    "state",
    "current_job",
    "queues",
    "version",
    "hostname",
    "pid",
)

#: Seconds a failed job is kept when its hash names no ``failure_ttl`` (RQ: one year).
DEFAULT_FAILURE_TTL_S = 31_536_000

#: Seconds a dead worker's hash lingers after opsctl records its death, as RQ
#: itself does when a worker shuts down cleanly.
DEAD_WORKER_TTL_S = 60


#: Seconds opsctl remembers how often it requeued a job (a week).
RESCUE_TTL_S = 7 * 86400


def rescue_key(prefix: str, job_id: str) -> str:
    """opsctl's own counter of how often it requeued the job ``job_id`` (of RQ's key
    prefix ``prefix``: deployments under other prefixes may use the same ids)."""
    return f"opsctl:rescues:{prefix}:{job_id}"


def legacy_rescue_key(job_id: str) -> str:
    """The name opsctl gave the counter of :func:`rescue_key` before it kept one per
    key prefix. Read, never written: its count is added to the new counter's until
    it expires, a week after the job's last requeue counted there."""
    return f"opsctl:rescues:{job_id}"


#: Seconds opsctl remembers when it first found a queued job lost (a week).
LOST_NOTE_TTL_S = 7 * 86400


def lost_note_key(prefix: str, job_id: str) -> str:
    """opsctl's own note of when it first found the queued job ``job_id`` (of RQ's
    key prefix ``prefix``) out of place: lost, or stranded with no mark of RQ's.

    RQ records no moment at which a worker takes a job off its queue, so the
    grace of such a job counts from this note. Its value is the job's
    ``enqueued_at``, a space, and the server time of the finding: a job
    enqueued again since has another ``enqueued_at``, which voids the note.
    """
    return f"opsctl:lost:{prefix}:{job_id}"


@dataclass(frozen=True)
class Keys:
    """Key names under one RQ prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def queues(self) -> str:
        """Set of queue keys (``<prefix>:queue:<name>``) that RQ knows."""
        return f"{self.prefix}:queues"

    @property
    def workers(self) -> str:
        """Set of every registered worker key."""
        return f"{self.prefix}:workers"

    @property
    def queue_key_prefix(self) -> str:
        return f"{self.prefix}:queue:"

    def queue(self, queue: str) -> str:
        """List of job ids waiting on ``queue``."""
        return f"{self.prefix}:queue:{queue}"

    def intermediate(self, queue: str) -> str:
        """List of ids a worker has taken from ``queue`` but not yet started (RQ 1.15+)."""
        return f"{self.prefix}:queue:{queue}:intermediate"

    def intermediate_first_seen(self, queue: str, job_id: str) -> str:
        """When RQ's own cleanup first saw ``job_id`` stranded in the intermediate list."""
        return f"{self.intermediate(queue)}:first_seen:{job_id}"

    @property
    def scheduler_jobs(self) -> str:
        """Sorted set of job ids the separate rq-scheduler package will enqueue."""
        return f"{self.prefix}:scheduler:scheduled_jobs"

    @property
    def job_prefix(self) -> str:
        """What every job hash's key starts with."""
        return f"{self.prefix}:job:"

    def started(self, queue: str) -> str:
        """Sorted set of started entries; the score is the lease's expiry."""
        return f"{self.prefix}:wip:{queue}"

    def failed(self, queue: str) -> str:
        return f"{self.prefix}:failed:{queue}"

    def finished(self, queue: str) -> str:
        return f"{self.prefix}:finished:{queue}"

    def canceled(self, queue: str) -> str:
        return f"{self.prefix}:canceled:{queue}"

    def deferred(self, queue: str) -> str:
        return f"{self.prefix}:deferred:{queue}"

    def scheduled(self, queue: str) -> str:
        return f"{self.prefix}:scheduled:{queue}"

    def queue_workers(self, queue: str) -> str:
        """Set of worker keys that listen on ``queue``."""
        return f"{self.prefix}:workers:{queue}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def dependents(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:dependents"

    def dependencies(self, job_id: str) -> str:
        # RQ builds this one with an extra colon after the job prefix.
        return f"{self.prefix}:job::{job_id}:dependencies"

    def results(self, job_id: str) -> str:
        """Stream of results, one entry per ended execution."""
        return f"{self.prefix}:results:{job_id}"

    def execution(self, job_id: str, execution_id: str) -> str:
        return f"{self.prefix}:execution:{job_id}:{execution_id}"

    def executions(self, job_id: str) -> str:
        """Sorted set of a job's execution ids (RQ 2+)."""
        return f"{self.prefix}:executions:{job_id}"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def worker_executions(self, name: str) -> str:
        """Set of ``job:execution`` members a worker is running (RQ 3)."""
        return f"{self.prefix}:worker:{name}:executions"

    def worker_channel(self, name: str) -> str:
        """Pub/sub channel a live worker listens on for commands."""
        return f"{self.prefix}:pubsub:{name}"

    def worker_name_from_key(self, key: str) -> str:
        return key.removeprefix(f"{self.prefix}:worker:")


def nothing_under(prefix: str, setting: str) -> str:
    """Why a database may show nothing of RQ's under ``prefix``: the words for a
    run that found no job, registry or worker there; ``setting`` names where the
    prefix was given."""
    hint = " (opsctl puts the ':' after the prefix itself)" if prefix.endswith(":") else ""
    return (
        f"no RQ job, registry or worker key under the prefix {prefix!r}{hint}: "
        f"if RQ has jobs, check {setting} and the database number"
    )
