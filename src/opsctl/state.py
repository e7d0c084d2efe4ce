"""Reading RQ's state from Redis: raw, pipelined, and free of side effects.

Nothing here calls RQ's own registry helpers, which clean registries (and run
user callbacks) as a side effect of counting; nothing reads the pickled
``data``, ``meta`` or ``result`` fields. A dry run therefore changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, TypeVar, cast

import redis

from opsctl.errors import ForeignKey
from opsctl.keys import EXECUTION_FIELDS, FUNCTION_FIELDS, JOB_FIELDS, WORKER_FIELDS, Keys
from opsctl.model import Fields, StartedEntry, WorkerRecord, fields_class
from opsctl.progress import SCANNING, OnProgress
from opsctl.records import function_name

log = logging.getLogger(__name__)

#: Commands sent in one pipeline round trip.
BATCH = 1000
#: Registry members read with one ZRANGE.
RANGE_CHUNK = 10_000

# Field names sent as bytes: redis-py passes bytes through instead of encoding
# every name of every command again.


@dataclass
class Snapshot:
    """Everything one run needs, read at (nearly) one moment."""

    now: float
    queues: list[str]
    entries: list[StartedEntry]
    workers: dict[str, WorkerRecord]
    problems: list[str] = field(default_factory=list)
    #: What the run should be told of what it was asked to read (a --queue that
    #: names no queue, say), for the report's warnings.
    warnings: list[str] = field(default_factory=list)
    #: Queues whose started registry could not be read (each also a problem).
    unread: set[str] = field(default_factory=set)


#: Errors that mean the connection to Redis is gone: it dropped, timed out, or
#: the server answered something that is not Redis's protocol (redis-py then
#: drops the connection too).
CONNECTION_LOST = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.InvalidResponse,
)

#: Waits before each further attempt of a read that failed on the connection.
READ_BACKOFF_S = (0.2, 0.5, 1.0)

T = TypeVar("T")


def with_retries(read: Callable[[], T]) -> T:
    """Run a read-only step, repeating it with backoff if the connection drops.

    Only reads go through here: repeating them is always safe. Changes are
    never repeated blindly; see :mod:`opsctl.apply`.
    """
    for wait_s in READ_BACKOFF_S:
        try:
            return read()
        except CONNECTION_LOST as exc:
            if unanswered(exc):
                raise
            log.warning("read_failed retry_in=%ss error=%s", wait_s, exc)
            time.sleep(wait_s)
    return read()


def unanswered(exc: BaseException) -> bool:
    """Whether ``exc`` says the server gave no answer within --timeout (it is hung,
    paused or unreachable), rather than dropping the connection: trying again
    would wait as long again, and --timeout bounds each wait, not their sum.
    Such an answer is noted for the rest of the run (see :func:`gave_no_answer`)."""
    if isinstance(exc, redis.TimeoutError):
        _NO_ANSWER.set()
        return True
    return False


def gave_no_answer() -> bool:
    """Whether the server gave no answer within --timeout since the run began:
    what is left to tidy (a lock to give back, say) is then not waited for."""
    return _NO_ANSWER.is_set()


def forget_no_answer() -> None:
    """Forget a command that got no answer: a new run begins, or the server
    answered after all (it was slow, not hung)."""
    _NO_ANSWER.clear()


_NO_ANSWER = threading.Event()


#: A server up for less than this may have restored its registries from a
#: snapshot taken before the latest jobs started or ended.
RECENT_RESTART_S = 600


def server_notes(conn: redis.Redis) -> tuple[str | None, list[str]]:
    """The server's version, and warnings about settings that make RQ's data unreliable.

    Servers (or ACLs) that refuse INFO give no version and no warnings.
    """
    try:
        info = conn.info()
    except redis.ResponseError:
        return None, []
    version = info.get("redis_version")
    warnings = []
    policy = info.get("maxmemory_policy", "noeviction")
    if policy != "noeviction":
        warnings.append(
            f"maxmemory-policy is {policy}: Redis may evict job hashes, and evicted jobs "
            "show up as orphaned entries"
        )
    uptime = info.get("uptime_in_seconds")
    # A server that loaded nothing at start (no snapshot, no append-only file)
    # restored nothing; servers before Redis 7 do not say, so they are warned about.
    restored = info.get("rdb_last_load_keys_loaded", 1) != 0 or info.get("aof_enabled", 0) != 0
    if isinstance(uptime, int) and uptime < RECENT_RESTART_S and restored:
        warnings.append(
            f"Redis started {uptime}s ago: its registries may have been restored from an "
            "older snapshot"
        )
    return (str(version) if version else None), warnings


def replies_of(pipe: Any) -> list[Any]:
    """A pipeline's replies, errors included, except a refused permission.

    A wrong-type key is one bad record: its error stays in the replies for the
    caller to report. A refused command (ACL) means opsctl cannot see what it
    needs, and guessing (a worker "gone" because EXISTS was refused) could act
    behind a live worker's back, so it stops the run.
    """
    replies: list[Any] = pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, redis.exceptions.NoPermissionError):
            raise reply
    return replies


def text(value: bytes | str | None) -> str:
    """Decode a Redis value for display and comparison, never failing."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    # Bytes that are not UTF-8 become lone surrogates, which the connection
    # (encoding_errors="surrogateescape") turns back into the same bytes, so
    # keys and re-checks built from the text match what is stored. Reports
    # escape them for display.
    return value.decode("utf-8", "surrogateescape")


def refuse_foreign_key(conn: redis.Redis, key: str, kind: str, what: str, then: str) -> None:
    """Stop with a message when ``key`` holds another type than ``kind`` (or nothing):
    something other than opsctl wrote it, and opsctl never overwrites it."""
    found = text(conn.type(key))
    if found not in ("none", kind):
        raise ForeignKey(f"{key} holds a {found}, not {what}; rename or remove it{then}")


def server_time(conn: redis.Redis) -> float:
    """The Redis server's clock, in epoch seconds."""
    seconds, micros = conn.time()
    return float(seconds) + float(micros) / 1_000_000


def known_queues(
    conn: redis.Redis,
    keys: Keys,
    listed: Iterable[str] | None = None,
    problems: list[str] | None = None,
) -> list[str]:
    """Queue names RQ knows: its queue set, every queue with a started registry,
    and every queue with registered workers.

    ``listed`` holds the registry and worker-set keys when a pass over the
    keyspace has already found them (see :func:`opsctl.keyspace.survey`);
    otherwise they are looked for here. A queue set that cannot be read is
    named in ``problems``.
    """
    names = set(_queue_names_from_set(conn, keys, problems))
    if listed is None:
        # A queue may show only as a started registry, or only through the
        # workers that serve it. One pass over the key space finds both: their
        # names share the start "<prefix>:w", which job keys do not.
        pattern = f"{glob_escape(keys.prefix)}:w*"
        listed = (text(k) for k in conn.scan_iter(match=pattern, count=1000))
    prefixes = (keys.started(""), keys.queue_workers(""))
    for name in listed:
        for prefix in prefixes:
            if name.startswith(prefix):
                names.add(name.removeprefix(prefix))
    return sorted(n for n in names if n)


#: Called with each batch of entries as soon as it is read, with the workers
#: read before them and the server time of the snapshot.
OnEntries = Callable[[list[StartedEntry], dict[str, WorkerRecord], float], None]


def read_snapshot(
    conn: redis.Redis,
    keys: Keys,
    queues: Iterable[str],
    on_progress: OnProgress | None = None,
    with_functions: bool = False,
    on_entries: OnEntries | None = None,
    ids: dict[str, str] | None = None,
    listed: ListedIds | None = None,
) -> Snapshot:
    """Read the started registries of ``queues`` and every worker they involve.

    With ``with_functions``, each job's function is read along with the job
    (:attr:`StartedEntry.function`), except for jobs whose worker's hash
    exists and records no death: those are most likely simply running, and a
    report names the function only of jobs that are not.

    ``on_entries`` sees each batch of entries while the next one is read. A
    batch may hold entries that change before the snapshot is complete (an
    RQ 1 id with a colon, read again whole) and entries naming workers not
    yet read (read at the end); the snapshot has the final ones. ``ids``
    keeps one copy of each job id for the whole run (see :func:`split_member`).
    ``listed`` receives the job ids of every registry once all are listed.
    """
    queues = list(queues)
    # Both the progress bar's total and how far ahead registries are listed.
    total = _registry_sizes(conn, keys, queues)
    reader = HashReader(conn, with_function=with_functions)
    try:
        return _read_snapshot(
            conn, keys, queues, on_progress, total, reader, on_entries, ids, listed
        )
    finally:
        reader.close()


def _read_snapshot(
    conn: redis.Redis,
    keys: Keys,
    queues: list[str],
    on_progress: OnProgress | None,
    total: int,
    reader: HashReader,
    on_entries: OnEntries | None,
    ids: dict[str, str] | None,
    listed: ListedIds | None,
) -> Snapshot:
    now = server_time(conn)
    problems: list[str] = []
    done = 0

    def decoded(batch: list[StartedEntry]) -> None:
        nonlocal done
        done += len(batch)
        if on_progress:
            on_progress(done, max(total, done), SCANNING)
        if on_entries:
            on_entries(batch, workers, now)

    workers, registrations = read_registered_workers(conn, keys, queues, problems)
    reader.held_by = {name for name, w in workers.items() if w.exists and not w.fields.get("death")}
    unread: set[str] = set()
    entries = _read_entries(
        conn, keys, queues, total, (problems, unread), decoded, reader, ids, listed
    )
    # Workers that entries name but no registration lists (most often dead ones).
    named = {name for e in entries if (name := e.worker_name)} - set(workers)
    workers.update(read_workers(conn, keys, named, problems, queues, registrations))
    return Snapshot(now, queues, entries, workers, problems, unread=unread)


def registry_members(conn: redis.Redis, key: str) -> Iterator[tuple[bytes, float]]:
    """Members and scores of a sorted set, read in chunks."""
    start = 0
    while True:
        chunk = cast(
            "list[tuple[bytes, float]]",
            conn.zrange(key, start, start + RANGE_CHUNK - 1, withscores=True),
        )
        yield from chunk
        if len(chunk) < RANGE_CHUNK:
            return
        start += RANGE_CHUNK


class ListedIds:
    """The job ids of the started registries, known as soon as they are listed.

    The keyspace walk runs meanwhile and need not read the status of a job a
    registry lists (see :func:`opsctl.keyspace.survey`). Each member's job id
    goes into ``ids``, the run's one copy of each job id (see
    :func:`split_member`), which therefore holds every listed job once
    ``done`` is set; it may also hold jobs the walk has already found.
    A registry that cannot be listed adds nothing: its jobs are then read on
    the walk.
    """

    def __init__(self, ids: dict[str, str]) -> None:
        self.ids = ids
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._awaited = 0

    def expect(self, listings: list[Future[list[tuple[bytes, float]]]]) -> None:
        """Take the job ids of ``listings`` as each completes; done after the last."""
        self._awaited = len(listings)
        if not listings:
            self.done.set()
        for listing in listings:
            listing.add_done_callback(self._add)

    def _add(self, listing: Future[list[tuple[bytes, float]]]) -> None:
        if not listing.cancelled() and listing.exception() is None:
            for member, _score in listing.result():
                split_member(member, self.ids)
        with self._lock:
            self._awaited -= 1
            if self._awaited == 0:
                self.done.set()


def split_member(member: bytes, ids: dict[str, str] | None = None) -> tuple[str, str | None]:
    """Job id and execution id of a started-registry member.

    RQ 1.x stores the bare job id; RQ 2 and later store ``job_id:execution_id``.
    Job ids cannot contain a colon in RQ 2+, so the last colon splits them.
    With ``ids``, the job id is the copy kept there: a run meets most jobs
    twice (in a registry and in the keyspace survey) and keeps one copy.
    """
    decoded = text(member)
    job_id, sep, execution = decoded.rpartition(":")
    execution_id: str | None = execution
    if not sep or not job_id or not execution:
        job_id, execution_id = decoded, None
    if ids is not None:
        job_id = ids.setdefault(job_id, job_id)
    return job_id, execution_id


def _read_entries(
    conn: redis.Redis,
    keys: Keys,
    queues: list[str],
    total: int,
    unreadable: tuple[list[str], set[str]],
    on_decoded: Callable[[list[StartedEntry]], None],
    reader: HashReader,
    ids: dict[str, str] | None = None,
    listed: ListedIds | None = None,
) -> list[StartedEntry]:
    """The entries of the started registries of ``queues`` (``total`` members
    together, as counted before), in turn. What cannot be read goes to
    ``unreadable``: the problems, and the queues whose registry is unreadable.

    Helper threads read the next batches (``READS_AHEAD`` of them, from this
    registry or the next ones) while this one is decoded and ``on_decoded``
    sees it, so Redis runs the read script while Python works on the replies.
    """
    problems = unreadable[0]
    entries: list[StartedEntry] = []
    pending: deque[tuple[str, list[tuple[bytes, float]], list[Any], Any]] = deque()
    with ThreadPoolExecutor(max_workers=READS_AHEAD, thread_name_prefix="opsctl-read") as ahead:
        listing = _registry_batches(conn, keys, queues, total, unreadable, ahead, listed)
        for item in chain(listing, [None]):
            if item is not None:
                queue, batch = item
                split, hash_keys, flags = _hash_keys(keys, batch, ids)
                pending.append((queue, batch, split, ahead.submit(reader.read, hash_keys, flags)))
                if len(pending) <= READS_AHEAD:
                    continue
            while pending and (item is None or len(pending) > READS_AHEAD):
                queue, done_batch, done_ids, replies = pending.popleft()
                decoded = replies.result()
                start = len(entries)
                _decode_entries(queue, done_batch, done_ids, decoded, problems, entries, reader)
                on_decoded(entries[start:])
    _resolve_rq1_ids_with_colons(keys, entries, problems, reader)
    return entries


def _registry_batches(
    conn: redis.Redis,
    keys: Keys,
    queues: list[str],
    total: int,
    unreadable: tuple[list[str], set[str]],
    ahead: Executor,
    listed: ListedIds | None = None,
) -> Iterator[tuple[str, list[tuple[bytes, float]]]]:
    """Batches of the members of each queue's started registry, with their queue.

    The registries are listed (members only: a fraction of what reading their
    hashes costs) on the helper threads ahead of their reads: all of them at
    once when they hold at most ``LISTED_AHEAD_MAX`` members (``total``), so that
    ``listed`` knows them all early; otherwise one ahead, to bound what is
    held, and ``listed`` is never done. One unreadable registry (the wrong
    type, say) is a problem, and never stops the run.
    """

    def members(queue: str) -> list[tuple[bytes, float]]:
        return list(registry_members(conn, keys.started(queue)))

    depth = len(queues) if total <= LISTED_AHEAD_MAX else 1
    listings: deque[Future[list[tuple[bytes, float]]]] = deque(
        ahead.submit(members, queue) for queue in queues[:depth]
    )
    if listed is not None and depth == len(queues):
        listed.expect(list(listings))
    for at, queue in enumerate(queues):
        listing = listings.popleft()  # its members are let go once read
        if at + depth < len(queues):
            listings.append(ahead.submit(members, queues[at + depth]))
        try:
            found = listing.result()
        except redis.exceptions.NoPermissionError:
            raise
        except redis.ResponseError as exc:
            problems, unread = unreadable
            problems.append(f"queue {queue}: {keys.started(queue)} cannot be read: {exc}")
            unread.add(queue)
            continue
        del listing
        for batch in batches(found, SCRIPT_BATCH * SCRIPT_CALLS):
            yield queue, batch


def _registry_sizes(conn: redis.Redis, keys: Keys, queues: list[str]) -> int:
    """How many members the started registries of ``queues`` hold together
    (one that cannot be counted counts as none: listing it says why)."""
    pipe = conn.pipeline(transaction=False)
    for queue in queues:
        pipe.zcard(keys.started(queue))
    return sum(n for n in replies_of(pipe) if isinstance(n, int))


#: An execution id as RQ 2 and 3 write them (uuid4().hex).
RQ_EXECUTION_ID = re.compile(r"[0-9a-f]{32}")


def may_be_read_again(entry: StartedEntry) -> bool:
    """Whether the snapshot may still replace ``entry``, whose member may be an RQ 1
    id holding a colon (see below): its split names no job, or names one but no
    execution record, after a colon that no execution id RQ writes could follow
    (``report:x1`` beside an RQ 1 job ``report`` of its own)."""
    return entry.execution_id is not None and (
        entry.job is None
        or (entry.execution is None and not RQ_EXECUTION_ID.fullmatch(entry.execution_id))
    )


def _resolve_rq1_ids_with_colons(
    keys: Keys, entries: list[StartedEntry], problems: list[str], reader: HashReader
) -> None:
    """Read a member whose split names no job as the bare job id RQ 1 stored.

    RQ 1 accepts any job id and stores it bare, so ``report:42`` may be a whole
    RQ 1 id as well as job ``report``, execution ``42`` of RQ 2+. The split is
    kept when its job hash exists and its execution record does, or could (the
    part after the colon has the form of RQ's execution ids); otherwise, when a
    job hash is named by the whole member, that is the job. Such members are rare.
    """
    candidates = [i for i, e in enumerate(entries) if may_be_read_again(e)]
    if not candidates:
        return
    hash_keys = [
        keys.job(entries[i].member_text).encode("utf-8", "surrogateescape") for i in candidates
    ]
    replies = reader.read(hash_keys, [False] * len(candidates))
    for i, reply in zip(candidates, replies, strict=True):
        e = entries[i]
        whole = e.member_text
        function = None
        if reply.__class__ is list:
            function, reply = split_extra(reply, reader)
            job: Fields | None = _JobFields(*_decode(_JOB_SHARED, reply))
        else:
            job = _odd_reply(_JobFields, reply, f"job {whole}", problems)
        if job is not None:
            entries[i] = StartedEntry(e.queue, whole, None, e.score, job, None, function=function)


def _hash_keys(
    keys: Keys, batch: list[tuple[bytes, float]], ids: dict[str, str] | None = None
) -> tuple[list[tuple[str, str | None]], list[bytes], list[bool]]:
    """Job and execution ids of a batch of members, and the hash keys to read for them."""
    split = [split_member(member, ids) for member, _score in batch]
    # The keys are the member's own bytes behind a prefix: the job's, the member
    # up to its last colon (or whole: RQ 1); the execution's, the whole member.
    job_prefix = keys.job("").encode("utf-8", "surrogateescape")
    execution_prefix = keys.execution("", "")[:-1].encode("utf-8", "surrogateescape")
    hash_keys: list[bytes] = []
    for (stored, _score), (_job_id, execution_id) in zip(batch, split, strict=True):
        member = stored if stored.__class__ is bytes else cast(bytes, as_bytes(stored))
        if execution_id is None:
            hash_keys.append(job_prefix + member)
        else:
            hash_keys.append(job_prefix + member[: member.rindex(b":")])
            hash_keys.append(execution_prefix + member)
    return split, hash_keys, [execution_id is not None for _, execution_id in split]


def _decode_entries(
    queue: str,
    batch: list[tuple[bytes, float]],
    ids: list[tuple[str, str | None]],
    replies: list[Any],
    problems: list[str],
    entries: list[StartedEntry],
    reader: HashReader,
) -> None:
    at = 0
    function = None
    for (member, score), (job_id, execution_id) in zip(batch, ids, strict=True):
        reply = replies[at]
        at += 1
        if reply.__class__ is list:
            if reader.extra:
                function, reply = split_extra(reply, reader)
            job: Fields | None = _JobFields(*_decode(_JOB_SHARED, reply, reader.as_text))
        else:
            function = None
            job = _odd_reply(_JobFields, reply, f"job {job_id}", problems)
        execution = None
        if execution_id is not None:
            reply = replies[at]
            at += 1
            if reply.__class__ is list:
                execution = _ExecutionFields(*_decode(_EXECUTION_SHARED, reply, reader.as_text))
            else:
                what = f"execution {job_id}:{execution_id}"
                execution = _odd_reply(_ExecutionFields, reply, what, problems)
        if math.isnan(score):
            problems.append(f"queue {queue}: entry {text(member)} has an unreadable score")
        entries.append(
            StartedEntry(queue, job_id, execution_id, score, job, execution, function=function)
        )


def split_extra(reply: list[Any], reader: HashReader) -> tuple[str | None, list[Any]]:
    """A job reply's function (None when its fields were not read) and its job fields."""
    if not reader.extra:
        return None, reply
    cut = len(reader.job_fields) - reader.extra
    description, data = reply[cut:]  # FUNCTION_FIELDS
    if description is None and data is None:
        return None, reply[:cut]
    # Many jobs call the same function: keep one copy of each name.
    return sys.intern(function_name(as_bytes(data), text(description) or None)), reply[:cut]


def as_bytes(value: bytes | str | None) -> bytes | None:
    """A field value as the bytes stored (the reader may have decoded it to text)."""
    if value is None or isinstance(value, bytes):
        return value
    return value.encode("utf-8", "surrogateescape")


#: First bytes of an extra field (a job's description and pickled call) the
#: read script sends: the function's name is at the start, and the whole
#: value may be megabytes.
EXTRA_BYTES = 4096
#: Extra fields that plain reads (without the script) leave out, since
#: Redis has no command that reads the start of a hash field.
UNBOUNDED_FIELDS = frozenset({b"data"})

#: Entries read by one call of the read script (each entry: a job hash and,
#: from RQ 2 on, an execution hash).
SCRIPT_BATCH = 500
#: Script calls sent in one pipeline round trip.
SCRIPT_CALLS = 2
#: Batches being read (each on a connection of its own) while one is decoded.
READS_AHEAD = 2
#: Most registry members listed ahead of their reads (about 160 bytes each
#: while held); more are listed one registry ahead.
LISTED_AHEAD_MAX = 250_000

# A read-only script that reads the fields opsctl needs from many hashes in
# one call, so a large registry costs a few hundred commands, not two per
# entry. It answers, for each key in KEYS: the HMGET reply when any field is
# present; 1 when the key exists but holds none of them; 0 when it does not
# exist; an error text when the key cannot be read as a hash. A refused
# permission stops the script, as it would stop a plain read.
# ARGV: a string of one character per entry ("2": a job and an execution key,
# "1": a job key only); the numbers of job fields, of execution fields and of
# extra job fields (the last job fields: only their first bytes are sent, and
# none for jobs held by a worker named at the end); the place of worker_name
# among the job fields (0: none); how many first bytes of an extra field are
# sent; the job field names; the execution field names; then those workers.
# A created_at is sent only where it decides something: a job's when its
# status is missing (it then tells a job from a hash that holds none), an
# execution's when its job's started_at is not in the form RQ writes (it then
# gives the age). At scale, these are a tenth of a large run's memory.
_READ_SCRIPT_BODY = """
local layout = ARGV[1]
local nj, ne = tonumber(ARGV[2]), tonumber(ARGV[3])
local extra, at, cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local job_fields, execution_fields, held = {}, {}, {}
for i = 1, nj do job_fields[i] = ARGV[6 + i] end
for i = 1, ne do execution_fields[i] = ARGV[6 + nj + i] end
for i = 7 + nj + ne, #ARGV do held[ARGV[i]] = true end
local function place(fields, name)
  for i, f in ipairs(fields) do if f == name then return i end end
  return 0
end
local status_at, created_at = place(job_fields, 'status'), place(job_fields, 'created_at')
local started_at = place(job_fields, 'started_at')
local execution_created_at = place(execution_fields, 'created_at')
local RQ_MOMENT = '^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d%d%d%dZ$'
local out, k = {}, 1
local function read(key, fields)
  local reply = redis.pcall('HMGET', key, unpack(fields))
  if type(reply) == 'table' and reply.err then
    local err = tostring(reply.err)
    if string.sub(err, 1, 6) == 'NOPERM' then error(reply) end
    return err
  end
  for i = 1, #fields do
    if reply[i] then return reply end
  end
  return redis.call('EXISTS', key)
end
for i = 1, #layout do
  local job = read(KEYS[k], job_fields)
  local started = false
  if type(job) == 'table' then
    if extra > 0 then
      local drop = at > 0 and job[at] and held[job[at]]
      for j = nj - extra + 1, nj do
        if drop then job[j] = false elseif job[j] then job[j] = string.sub(job[j], 1, cap) end
      end
    end
    if created_at > 0 and status_at > 0 and job[status_at] and job[status_at] ~= '' then
      job[created_at] = false
    end
    started = started_at > 0 and job[started_at] and string.find(job[started_at], RQ_MOMENT)
  end
  out[k] = job
  k = k + 1
  if string.sub(layout, i, i) == '2' then
    local execution = read(KEYS[k], execution_fields)
    if started and execution_created_at > 0 and type(execution) == 'table' then
      execution[execution_created_at] = false
    end
    out[k] = execution
    k = k + 1
  end
end
return out
"""
# Redis 7 runs a script flagged as read-only through EVAL_RO, which a
# read-only ACL user may be allowed and a replica accepts; older servers (and
# fakeredis) know neither the flag line nor EVAL_RO and get the plain body.
_READ_SCRIPTS = (
    ("EVAL_RO", "EVALSHA_RO", "#!lua flags=no-writes\n" + _READ_SCRIPT_BODY),
    ("EVAL", "EVALSHA", _READ_SCRIPT_BODY),
)


class HashReader:
    """Reads job and execution hashes the cheapest way the server allows.

    The first read tries the read script (read-only form first); a server or
    ACL that refuses both gets two pipelined HMGETs per entry instead, which
    answer the same.
    """

    def __init__(
        self,
        conn: redis.Redis,
        job_fields: tuple[str, ...] = JOB_FIELDS,
        execution_fields: tuple[str, ...] = EXECUTION_FIELDS,
        with_function: bool = False,
    ) -> None:
        extra_fields = FUNCTION_FIELDS if with_function else ()
        self.job_fields = tuple(f.encode() for f in (*job_fields, *extra_fields))
        self.execution_fields = tuple(f.encode() for f in execution_fields)
        #: How many of the job fields are extra: the function's, read last.
        self.extra = len(extra_fields)
        self.worker_at = job_fields.index("worker_name") + 1 if "worker_name" in job_fields else 0
        #: Workers whose jobs are read without the extra fields (the script
        #: leaves them out; plain reads bring them anyway).
        self.held_by: set[str] = set()
        self.own = twin_client(conn)
        self.conn = self.own or conn
        #: Whether replies hold only text (hiredis decoded them) rather than bytes.
        self.as_text = self.own is not None
        self.mode: int | None = None  # index into _READ_SCRIPTS; len() = pipelined reads
        self._choosing = threading.Lock()
        self.sha: list[str] = [
            hashlib.sha1(body.encode()).hexdigest() for _, _, body in _READ_SCRIPTS
        ]

    @property
    def _argv(self) -> list[Any]:
        """The script's arguments after the layout."""
        return [
            len(self.job_fields),
            len(self.execution_fields),
            self.extra,
            self.worker_at,
            EXTRA_BYTES,
            *self.job_fields,
            *self.execution_fields,
            *(name.encode("utf-8", "surrogateescape") for name in sorted(self.held_by)),
        ]

    def close(self) -> None:
        """Drop the reader's own connection, if it opened one."""
        if self.own is not None:
            self.own.connection_pool.disconnect()

    def read(self, hash_keys: list[bytes], has_execution: list[bool]) -> list[Any]:
        """Replies for ``hash_keys`` (a job key, then its execution key where it has one)."""
        calls = list(self._calls(hash_keys, has_execution))
        if self.mode is None:
            with self._choosing:  # reads may run at once: the first one chooses
                if self.mode is None:
                    self._choose(calls[0])
        if self.mode == len(_READ_SCRIPTS):
            return self._pipelined(hash_keys, has_execution)
        mode = cast(int, self.mode)
        eval_name, evalsha_name, body = _READ_SCRIPTS[mode]
        argv = self._argv
        pipe = self.conn.pipeline(transaction=False)
        for call in calls:
            _send_script(pipe, evalsha_name, self.sha[mode], *call, argv)
        replies: list[Any] = []
        for call, reply in zip(calls, replies_of(pipe), strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):
                # The script cache was emptied since: send the body again.
                reply = _send_script(self.conn, eval_name, body, *call, argv)
            if isinstance(reply, Exception):
                raise reply
            replies.extend(reply)
        return replies

    @staticmethod
    def _calls(
        hash_keys: list[bytes], has_execution: list[bool]
    ) -> Iterator[tuple[list[bytes], bytes]]:
        at = 0
        for start in range(0, len(has_execution), SCRIPT_BATCH):
            flags = has_execution[start : start + SCRIPT_BATCH]
            width = len(flags) + sum(flags)
            yield hash_keys[at : at + width], bytes(50 if f else 49 for f in flags)
            at += width

    def _choose(self, first: tuple[list[bytes], bytes]) -> None:
        call_keys, layout = first
        forms = [(eval_name, body) for eval_name, _, body in _READ_SCRIPTS]
        args = (len(call_keys), *call_keys, layout, *self._argv)
        if call_script(self.conn, forms, *args) is None:
            log.info("read_script_unavailable: reading hashes with pipelined HMGET")
        self.mode = len(_READ_SCRIPTS) - len(forms)  # the form that answered

    def _pipelined(self, hash_keys: list[bytes], has_execution: list[bool]) -> list[Any]:
        """The script's answers from plain commands: HMGET, then EXISTS where nothing was found.

        Unbounded extra fields are not read (they answer as missing), and the
        other extra fields are cut as the script cuts them.
        """
        job_fields = tuple(
            f
            for i, f in enumerate(self.job_fields)
            if i < len(self.job_fields) - self.extra or f not in UNBOUNDED_FIELDS
        )
        fields: list[tuple[bytes, ...]] = []
        for flag in has_execution:
            fields.append(job_fields)
            if flag:
                fields.append(self.execution_fields)
        replies: list[Any] = []
        for start in range(0, len(hash_keys), BATCH):
            pipe = self.conn.pipeline(transaction=False)
            for key, names in zip(
                hash_keys[start : start + BATCH], fields[start : start + BATCH], strict=True
            ):
                pipe.hmget(key, names)
            replies.extend(replies_of(pipe))
        empty = [
            i for i, r in enumerate(replies) if isinstance(r, list) and all(v is None for v in r)
        ]
        for start in range(0, len(empty), BATCH):
            pipe = self.conn.pipeline(transaction=False)
            for i in empty[start : start + BATCH]:
                pipe.exists(hash_keys[i])
            for i, exists in zip(empty[start : start + BATCH], replies_of(pipe), strict=True):
                replies[i] = exists
        if job_fields != self.job_fields:
            for i, names in enumerate(fields):
                if names is job_fields and isinstance(replies[i], list):
                    replies[i] = self._as_script_sends(dict(zip(names, replies[i], strict=True)))
        return replies

    def _as_script_sends(self, values: dict[bytes, Any]) -> list[Any]:
        """One job's plain HMGET reply widened to every job field, extras cut."""
        first_extra = len(self.job_fields) - self.extra
        return [
            value[:EXTRA_BYTES] if value is not None and i >= first_extra else value
            for i, value in enumerate(values.get(f) for f in self.job_fields)
        ]


def twin_client(conn: redis.Redis) -> redis.Redis | None:
    """A client on a pool of its own for the same server, whose replies
    hiredis decodes to text; None when the connection cannot be copied.

    Decoding hundreds of thousands of field values in C rather than one by one
    in Python is most of what a large read costs on the client, and a thread
    reading on its own leaves the caller's pool to the caller. Only a plain
    connection pool is copied; for others (Sentinel) the caller's is used.
    """
    pool = conn.connection_pool
    if type(pool) not in (redis.ConnectionPool, redis.BlockingConnectionPool):
        return None
    # Values that are not UTF-8 (pickled data) become lone surrogates, as
    # everywhere else in opsctl (see text()), rather than failing the read.
    kwargs = {
        **pool.connection_kwargs,
        "decode_responses": True,
        "encoding_errors": "surrogateescape",
    }
    if isinstance(pool, redis.BlockingConnectionPool):  # the URL's cap, and its wait
        kwargs.update(max_connections=pool.max_connections, timeout=pool.timeout)
    twin = type(pool)(connection_class=pool.connection_class, **kwargs)
    return redis.Redis(connection_pool=twin)


def _send_script(
    target: Any,
    command: str,
    script: str,
    call_keys: list[bytes],
    layout: bytes,
    argv: list[Any],
) -> Any:
    """Send one read-script call (on a pipeline: queue it)."""
    send: Callable[..., Any] = target.execute_command
    return send(command, script, len(call_keys), *call_keys, layout, *argv)


def _odd_reply(
    make: Callable[..., Fields], reply: Any, what: str, problems: list[str]
) -> Fields | None:
    """A hash's answer other than its fields: missing, holding none of them, or unreadable.

    A hash that exists but holds none of the fields gives empty fields: it is
    a record that holds no job, not a missing one.
    """
    if isinstance(reply, int):
        return make(*_NO_VALUES[make]) if reply else None
    # The key exists but cannot be read as a hash: never mistake it for a
    # missing one.
    detail = text(reply) if isinstance(reply, bytes | str) else str(reply)
    problems.append(f"{what}: could not be read ({detail})")
    return make(*_NO_VALUES[make])


_JobFields = fields_class("JobFields", JOB_FIELDS)
_ExecutionFields = fields_class("ExecutionFields", EXECUTION_FIELDS)
_NO_VALUES = {
    _JobFields: (None,) * len(JOB_FIELDS),
    _ExecutionFields: (None,) * len(EXECUTION_FIELDS),
}

#: Fields whose values repeat across jobs (status, queue and worker names,
#: settings); one shared copy of each value keeps large runs small.
_REPEATING = frozenset(
    {
        "status",
        "origin",
        "worker_name",
        "timeout",
        "retries_left",
        "retry_intervals",
        "enqueue_at_front_on_retry",
        "failure_ttl",
    }
)
_JOB_SHARED = tuple(i for i, name in enumerate(JOB_FIELDS) if name in _REPEATING)
_EXECUTION_SHARED = tuple(i for i, name in enumerate(EXECUTION_FIELDS) if name in _REPEATING)


def _decode(shared: tuple[int, ...], values: list[Any], as_text: bool = False) -> list[str | None]:
    """Field values as text, those at the ``shared`` places kept as one shared copy.

    ``values`` is a reply list the caller owns, changed in place. With
    ``as_text`` the reply is known to hold only text and None (hiredis decoded
    it), so only the shared values are touched: this runs for every entry.
    """
    if not as_text:
        for i, v in enumerate(values):
            if v is not None and v.__class__ is not str:
                values[i] = v.decode("utf-8", "surrogateescape")
    intern = sys.intern
    for i in shared:
        v = values[i]
        if v is not None:
            values[i] = intern(v)
    return values


#: Worker name → the registration sets (global and per queue) that list it.
Registrations = dict[str, set[str]]


def read_registered_workers(
    conn: redis.Redis,
    keys: Keys,
    queues: list[str],
    problems: list[str] | None = None,
    also: Iterable[str] = (),
) -> tuple[dict[str, WorkerRecord], Registrations]:
    """The workers registered, globally or on one of ``queues``, and those named
    in ``also``, read (see :func:`read_workers`); with the registrations read, for
    the workers a run reads later. A set of another type is named in ``problems``."""
    registrations = _registrations(conn, keys, queues, problems)
    wanted = {keys.workers, *(keys.queue_workers(queue) for queue in queues)}
    names = {n for n, listed_in in registrations.items() if not listed_in.isdisjoint(wanted)}
    names.update(also)
    return read_workers(conn, keys, names, problems, queues, registrations), registrations


def read_workers(
    conn: redis.Redis,
    keys: Keys,
    names: Iterable[str],
    problems: list[str] | None = None,
    queues: Iterable[str] = (),
    registrations: Registrations | None = None,
) -> dict[str, WorkerRecord]:
    """Worker hashes, registrations and connection signals for ``names``.

    Registrations are looked for in the global set and in the worker sets of
    the queues in RQ's queue set and of ``queues`` (a queue may be known only
    by its worker set), unless ``registrations`` gives them as read earlier in
    the run (see :func:`read_registered_workers`). A worker key that cannot be
    read as a hash (another type) counts as a hash without fields, judged by its
    connection signals, and is named in ``problems``.
    """
    names = sorted(set(names))
    if not names:
        return {}
    if registrations is None:
        registrations = _registrations(conn, keys, queues, problems)
    hashes: dict[str, tuple[Any, Any, Any, Any]] = {}
    for batch in batches(names, BATCH // 4):
        pipe = conn.pipeline(transaction=False)
        for name in batch:
            pipe.exists(keys.worker(name))
            pipe.hmget(keys.worker(name), WORKER_FIELDS)
            pipe.ttl(keys.worker(name))
            pipe.smembers(keys.worker_executions(name))
        replies = replies_of(pipe)
        for i, name in enumerate(batch):
            unreadable = replies[4 * i + 1]
            if isinstance(unreadable, Exception):
                note_problem(
                    problems, f"worker {name}: {keys.worker(name)} could not be read ({unreadable})"
                )
            unlisted = replies[4 * i + 3]
            if isinstance(unlisted, Exception):
                # Judged by its hash's state instead (busy: running any job that names it).
                key = keys.worker_executions(name)
                note_problem(problems, f"worker {name}: {key} could not be read ({unlisted})")
            exists, fields, ttl, executions = (
                ([] if isinstance(r, Exception) else r) for r in replies[4 * i : 4 * i + 4]
            )
            hashes[name] = (exists, fields, ttl, executions)
    _drop_ended_executions(conn, keys, hashes)
    # Connections are looked at after the hashes: a worker started in between
    # (it registers, then subscribes) then shows its connection, and is live.
    clients = read_clients(conn)
    subscribers = heard = channel_listeners(conn, keys, names)
    if clients is not None and clients.replica:
        subscribers, clients = None, None  # neither is known here
    elif clients is not None and subscribers is not None:
        subscribers = {n: clients.listeners(keys, n, c) for n, c in subscribers.items()}
    workers: dict[str, WorkerRecord] = {}
    started = _server_started(conn) if _any_rq1(hashes.values()) else None
    for name, (exists, fields, ttl, executions) in hashes.items():
        fields = fields or [None] * len(WORKER_FIELDS)
        ttl = ttl if isinstance(ttl, int) else -1
        workers[name] = WorkerRecord(
            name=name,
            exists=bool(exists),
            fields={
                k: text(v) for k, v in zip(WORKER_FIELDS, fields, strict=True) if v is not None
            },
            ttl_s=int(ttl) if exists else None,
            subscribers=subscribers.get(name) if subscribers is not None else None,
            heard_on_server=heard.get(name) if heard is not None else None,
            connected=clients.connected(keys, name) if clients is not None else None,
            executions=frozenset(text(m) for m in executions),
            registered_in=frozenset(registrations.get(name, ())),
            server_started=started,
        )
    return workers


def _drop_ended_executions(
    conn: redis.Redis, keys: Keys, hashes: dict[str, tuple[Any, Any, Any, Any]]
) -> None:
    """Leave out of each worker's set of executions (RQ 3) those whose record is gone.

    RQ writes an execution's record in the same transaction that lists it in the
    set, and deletes the record when the run ends, so a member without one names
    a run that ended without RQ's cleanup (a work horse that ended its process at
    once, say): the worker's heartbeat keeps the set, stale member and all, for
    as long as it lives, and RQ itself passes such members over. A member whose
    record cannot be read is kept. The records are looked for on the server (a
    set may list thousands of runs); where scripts are refused, with EXISTS.
    """
    names = [name for name, (_, _, _, executions) in hashes.items() if executions]
    # A member is the job and execution ids as the record's key ends.
    prefix = keys.execution("", "")[:-1].encode("utf-8", "surrogateescape")
    ended: set[tuple[str, bytes]] = set()
    forms = list(_ENDED_SCRIPTS)
    for batch in batches(names, BATCH):
        sets = [keys.worker_executions(name) for name in batch]
        gone: list[list[Any]] | None = call_script(conn, forms, len(sets), *sets, prefix)
        if gone is None:
            gone = _ended_by_exists(conn, [hashes[name][3] for name in batch], prefix)
        for name, members in zip(batch, gone, strict=True):
            ended.update((name, cast(bytes, as_bytes(m))) for m in members)
    if not ended:
        return
    for name, (exists, fields, ttl, executions) in list(hashes.items()):
        current = [m for m in executions if (name, as_bytes(m)) not in ended]
        hashes[name] = (exists, fields, ttl, current)


# A read-only script: for each set in KEYS, its members whose execution record
# (ARGV[1], the record keys' prefix, then the member) does not exist. A key that
# is not a set answers none.
_ENDED_SCRIPT_BODY = """
local out = {}
for i, key in ipairs(KEYS) do
  local gone = {}
  local members = redis.pcall('SMEMBERS', key)
  if type(members) == 'table' and not members.err then
    for _, member in ipairs(members) do
      if redis.call('EXISTS', ARGV[1] .. member) == 0 then gone[#gone + 1] = member end
    end
  elseif type(members) == 'table' and string.sub(tostring(members.err), 1, 6) == 'NOPERM' then
    error(members)
  end
  out[i] = gone
end
return out
"""
_ENDED_SCRIPTS = (
    ("EVAL_RO", "#!lua flags=no-writes\n" + _ENDED_SCRIPT_BODY),
    ("EVAL", _ENDED_SCRIPT_BODY),
)


def call_script(conn: redis.Redis, forms: list[tuple[str, str]], *args: Any) -> Any:
    """The reply of the first of ``forms`` (a command, such as EVAL_RO, and the
    script's body; read-only forms first) that the server runs with ``args``
    (the number of keys, the keys, then the arguments). A form the server or the
    user refuses is dropped from ``forms``, so that a caller calling again never
    sends it again. None once every form is refused: the caller reads with plain
    commands instead. The scripts given must not answer nil."""
    send: Callable[..., Any] = conn.execute_command
    while forms:
        command, body = forms[0]
        try:
            return send(command, body, *args)
        except redis.ResponseError as exc:
            log.debug("script_refused command=%s error=%s", command, exc)
            forms.pop(0)
    return None


def _ended_by_exists(conn: redis.Redis, listed: list[Any], prefix: bytes) -> list[list[Any]]:
    """Each list of members' members without a record, looked for with EXISTS."""
    members = [(i, m) for i, executions in enumerate(listed) for m in executions]
    gone: list[list[Any]] = [[] for _ in listed]
    for batch in batches(members, BATCH):
        pipe = conn.pipeline(transaction=False)
        for _, member in batch:
            pipe.exists(prefix + cast(bytes, as_bytes(member)))
        for (i, member), exists in zip(batch, replies_of(pipe), strict=True):
            if exists == 0:
                gone[i].append(member)
    return gone


_VERSION_AT = WORKER_FIELDS.index("version")


def _any_rq1(hashes: Iterable[tuple[Any, Any, Any, Any]]) -> bool:
    """Whether any of these worker hashes was written by RQ 1."""
    for _, fields, _, _ in hashes:
        version = fields[_VERSION_AT] if fields else None
        if isinstance(version, bytes | str) and text(version).startswith("1."):
            return True
    return False


def _server_started(conn: redis.Redis) -> float | None:
    """When the server last started (server time); None where INFO is refused."""
    try:
        uptime = conn.info("server").get("uptime_in_seconds")
    except redis.ResponseError:
        return None
    # INFO counts whole seconds: the start is up to a second earlier than it says.
    return server_time(conn) - uptime - 1 if isinstance(uptime, int) else None


def _registrations(
    conn: redis.Redis, keys: Keys, queues: Iterable[str], problems: list[str] | None = None
) -> Registrations:
    """The registration sets of each worker: the global set and those of the queues
    of RQ's queue set and of ``queues``; a set of another type is named in ``problems``."""
    sets = [keys.workers]
    known = sorted({*_queue_names_from_set(conn, keys, problems), *queues})
    sets += [keys.queue_workers(q) for q in known]
    found: Registrations = {}
    for key, names in _listed_workers(conn, keys, sets, problems):
        for name in names:
            found.setdefault(name, set()).add(key)
    return found


def _listed_workers(
    conn: redis.Redis, keys: Keys, sets: list[str], problems: list[str] | None
) -> list[tuple[str, list[str]]]:
    """Each readable registration set of ``sets`` with the worker names it lists; a
    set of another type is named in ``problems``."""
    pipe = conn.pipeline(transaction=False)
    for key in sets:
        pipe.smembers(key)
    listed = []
    for key, members in zip(sets, replies_of(pipe), strict=True):
        if isinstance(members, Exception):
            note_problem(problems, f"worker registrations: {key} could not be read ({members})")
            continue
        # A member that is not a worker key is someone else's data: left alone.
        shown = (text(m) for m in members)
        names = [keys.worker_name_from_key(m) for m in shown if m.startswith(keys.worker(""))]
        listed.append((key, names))
    return listed


def _queue_names_from_set(
    conn: redis.Redis, keys: Keys, problems: list[str] | None = None
) -> list[str]:
    prefix = keys.queue_key_prefix
    try:
        members = conn.smembers(keys.queues)
    except redis.exceptions.NoPermissionError:
        raise
    except redis.ResponseError as exc:
        # Queues are found by their registries and worker sets all the same.
        note_problem(problems, f"queue set: {keys.queues} could not be read ({exc})")
        return []
    # A member that is not a queue key is someone else's data: left alone.
    shown = (text(m) for m in members)
    return [name.removeprefix(prefix) for name in shown if name.startswith(prefix)]


def note_problem(problems: list[str] | None, what: str) -> None:
    """Name an unreadable record in ``problems`` (when kept), once."""
    if problems is not None and what not in problems:
        problems.append(what)


def channel_listeners(conn: redis.Redis, keys: Keys, names: list[str]) -> dict[str, int] | None:
    """How many connections of the whole server (every database) listen on each
    worker's command channel; None if not permitted."""
    counts: dict[str, int] = {}
    try:
        for batch in batches(names, 500):
            channels = [keys.worker_channel(n) for n in batch]
            for channel, count in conn.pubsub_numsub(*channels):
                counts[text(channel).removeprefix(keys.worker_channel(""))] = int(count)
    except redis.ResponseError as exc:
        log.warning("pubsub_numsub_unavailable error=%s", exc)
        return None
    return counts


@dataclass(frozen=True)
class Clients:
    """What CLIENT LIST says of the connections that bear on workers' liveness.

    Pub/sub channels, and CLIENT LIST, span every database of a server: a worker of
    the same name on another database (staging beside production, say) listens on
    the same channel as this database's. RQ 3 names its one subscribed connection
    after its worker, so a subscribed connection named N listening on one channel
    is taken to be worker N's; any other subscribed connection may be listening on
    any channel. A listing without a database or subscription field counts as this
    database's and listening: the side on which no worker is taken for dead.
    """

    names: frozenset[str]  # names of this database's connections
    here: Counter[str]  # this database's subscribed connections, by name ("": may be any)
    elsewhere: Counter[str]  # the same, on the server's other databases
    #: The server is a replica: workers hold their connections on its primary, so
    #: none here (nor any channel's listeners) says anything about them.
    replica: bool = False

    def listeners(self, keys: Keys, name: str, counted: int) -> int:
        """How many of the ``counted`` listeners of worker ``name``'s channel are on
        this database, as far as can be told; ``counted`` when it cannot be told,
        which keeps the worker live.

        Those named after the worker are surely on its channel; the others (""), any
        number of them up to all, may be. So this database has at most ``counted``
        less the named ones elsewhere, and at most as many as may be here."""
        own_here, any_here, own_elsewhere, any_elsewhere = self._counts(keys, name)
        most = min(counted - own_elsewhere, own_here + any_here)
        least = counted - own_elsewhere - any_elsewhere
        if most <= 0:
            return 0
        return least if least > 0 else counted

    def may_reach_elsewhere(self, keys: Keys, name: str, counted: int) -> bool:
        """Whether a stop published on worker ``name``'s channel, which ``counted``
        connections hear, may reach a connection of another database: the named
        ones here account for some of them for sure, the rest may be anywhere."""
        own_here, _, own_elsewhere, any_elsewhere = self._counts(keys, name)
        return min(own_elsewhere + any_elsewhere, counted - own_here) > 0

    def connected(self, keys: Keys, name: str) -> bool:
        """Whether a connection of this database bears worker ``name``'s name."""
        return any(n in self.names for n in _own_names(keys, name))

    def _counts(self, keys: Keys, name: str) -> tuple[int, int, int, int]:
        own = _own_names(keys, name)
        return (
            sum(self.here[n] for n in own),
            self.here[""],
            sum(self.elsewhere[n] for n in own),
            self.elsewhere[""],
        )


def _own_names(keys: Keys, name: str) -> tuple[str, str]:
    """The names a worker gives its connections: RQ 3 its own, older releases its key."""
    return name, keys.worker(name)


#: The connection pools whose server has been said to be a replica.
_REPLICAS_SAID: weakref.WeakSet[Any] = weakref.WeakSet()


def read_clients(conn: redis.Redis) -> Clients | None:
    """The server's connections, as they bear on liveness; None when not permitted."""
    try:
        clients = conn.client_list()
    except redis.ResponseError as exc:
        log.warning("client_list_unavailable error=%s", exc)
        return None
    if _is_replica(conn, clients):
        if conn.connection_pool not in _REPLICAS_SAID:
            # A run reads the workers more than once: saying it once is enough.
            _REPLICAS_SAID.add(conn.connection_pool)
            log.warning("replica: worker liveness is read from the worker hashes alone")
        return Clients(frozenset(), Counter(), Counter(), replica=True)
    db = str(conn.connection_pool.connection_kwargs.get("db") or 0)
    names: set[str] = set()
    here: Counter[str] = Counter()
    elsewhere: Counter[str] = Counter()
    for c in clients:
        name = text(c.get("name")) if c.get("name") else ""
        on_this = str(c.get("db", db)) == db
        if on_this and name:
            names.add(name)
        subscribed = str(c.get("sub", "1"))
        if subscribed == "0":
            continue
        (here if on_this else elsewhere)[name if subscribed == "1" else ""] += 1
    return Clients(frozenset(names), here, elsewhere)


def _is_replica(conn: redis.Redis, clients: list[dict[str, Any]]) -> bool:
    """Whether the server is a replica: its role, or else (INFO not permitted) the link
    to its primary among its clients, which is missing while that link is down."""
    try:
        return str(conn.info("replication").get("role", "")) in ("slave", "replica")
    except redis.ResponseError:
        return any("M" in str(c.get("flags", "")) for c in clients)


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in consecutive slices of ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def glob_escape(literal: str) -> str:
    """``literal`` as a SCAN pattern that matches only itself."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in literal)
