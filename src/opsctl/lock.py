"""Locks that keep opsctl runs, and RQ's own registry cleaning, out of each other's way.

Two kinds, both plain Redis strings holding an owner token with an expiry:

- the run lock (``opsctl:lock``): one ``opsctl apply`` at a time per Redis. If
  its holder dies the expiry frees it; a live holder renews it as it works.
- RQ's maintenance lock for a queue (``<prefix>:clean_registries:<queue>``):
  the key RQ's workers take before cleaning that queue's registries. opsctl
  takes it while acting on the queue, so a worker's cleanup and opsctl never
  handle the same job at once. RQ skips a queue whose lock is taken.

Only the owner releases or renews a lock: a script compares the token first.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from opsctl.errors import ExitCode, OpsctlError, StoppedEarly
from opsctl.state import (
    CONNECTION_LOST,
    forget_no_answer,
    gave_no_answer,
    refuse_foreign_key,
    unanswered,
)

log = logging.getLogger(__name__)

RUN_LOCK_KEY = "opsctl:lock"
#: Seconds a run lock lives without renewal: a dead holder frees it this soon.
RUN_LOCK_TTL_S = 60
#: Seconds opsctl holds a queue's maintenance lock without renewal.
MAINTENANCE_LOCK_TTL_S = 60
POLL_S = 0.1

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class LockTimeout(OpsctlError):
    """Raised when another opsctl run holds the run lock past --lock-timeout."""

    exit_code = ExitCode.LOCKED


class StoppedWaiting(StoppedEarly):
    """Raised when opsctl is asked to stop while it waits for the run lock:
    nothing was read or done."""

    exit_code = ExitCode.LOCKED


def owner_token(run_id: str) -> str:
    """A token naming this process, so a held lock says who holds it."""
    return (
        f"opsctl run={run_id} host={socket.gethostname()} pid={os.getpid()} {uuid.uuid4().hex[:8]}"
    )


class Lock:
    """One owner-checked lock with an expiry."""

    def __init__(self, conn: redis.Redis, key: str, token: str, ttl_s: int) -> None:
        self.conn, self.key, self.token, self.ttl_s = conn, key, token, ttl_s
        self._release = conn.register_script(_RELEASE)
        self._renew = conn.register_script(_RENEW)

    def try_acquire(self) -> bool:
        if self.conn.set(self.key, self.token, nx=True, ex=self.ttl_s):
            return True
        # This process may hold it still, from a run that left it to expire when
        # Redis did not answer (an earlier round of `opsctl watch`): take it back.
        earlier = _LEFT_TO_EXPIRE.pop(self.key, None)
        if earlier is not None and self._release(keys=[self.key], args=[earlier]):
            return bool(self.conn.set(self.key, self.token, nx=True, ex=self.ttl_s))
        return False

    def acquire(self, timeout_s: float, should_stop: Callable[[], bool] | None = None) -> bool:
        """Wait up to ``timeout_s`` for the lock, or until ``should_stop`` says to
        stop waiting; whether it was taken."""
        deadline = time.monotonic() + timeout_s
        while not self.try_acquire():
            if time.monotonic() >= deadline or (should_stop is not None and should_stop()):
                return False
            time.sleep(POLL_S)
        return True

    def holder(self) -> str:
        value = self.conn.get(self.key)
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        return value or "nobody"

    def renew(self) -> bool:
        """Push the expiry back; False when the lock is no longer ours."""
        return bool(self._renew(keys=[self.key], args=[self.token, self.ttl_s]))

    def release(self) -> None:
        """Give the lock back; retried while the connection is down.

        Releasing checks the owner, so repeating it is safe. A lock left behind
        would turn the next run away until its expiry, which after a brief
        network fault is the run most likely to follow.
        """
        if gave_no_answer():
            log.warning("lock=%s left to expire (in %ss at most)", self.key, self.ttl_s)
            _LEFT_TO_EXPIRE[self.key] = self.token
            return
        for wait_s in (*RELEASE_BACKOFF_S, None):
            try:
                self._release(keys=[self.key], args=[self.token])
                return
            except CONNECTION_LOST as exc:
                if wait_s is None or isinstance(exc, redis.TimeoutError):
                    # The expiry frees it; nothing else to do (trying again
                    # would wait out --timeout once more).
                    log.warning("lock=%s release_failed error=%s", self.key, exc)
                    _LEFT_TO_EXPIRE[self.key] = self.token
                    return
                time.sleep(wait_s)
            except redis.RedisError as exc:
                log.warning("lock=%s release_failed error=%s", self.key, exc)
                return


#: Locks this process left to their expiry, key → its token: a later run of the
#: same process (a round of `opsctl watch`) takes them back rather than wait.
_LEFT_TO_EXPIRE: dict[str, str] = {}

#: Waits before each further attempt to release a lock while Redis is unreachable.
RELEASE_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)


@contextmanager
def run_lock(
    conn: redis.Redis,
    run_id: str,
    timeout_s: float,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[Lock]:
    """Hold the run lock for the body, waiting up to ``timeout_s`` for it (and no
    longer once ``should_stop`` says so: a signal to stop never waits out the lock)."""
    forget_no_answer()  # a new run (`opsctl watch` runs many)
    lock = Lock(conn, RUN_LOCK_KEY, owner_token(run_id), RUN_LOCK_TTL_S)
    stopping = should_stop or (lambda: False)
    if stopping():
        raise StoppedWaiting("asked to stop before taking the run lock: nothing was done")
    if not lock.try_acquire():
        # A key no run ever wrote: no lock could ever be taken, and waiting
        # would end as if a run held it.
        then = " (no opsctl apply runs until then)"
        refuse_foreign_key(conn, RUN_LOCK_KEY, "string", "opsctl's run lock", then)
        # Without an expiry it was set by hand (each run sets one, and renews it):
        # no run will release it, so it is not waited for.
        pinned = conn.ttl(RUN_LOCK_KEY) == -1
        if pinned or not lock.acquire(timeout_s, stopping):
            if stopping():
                raise StoppedWaiting(
                    f"asked to stop while waiting for the run lock ({lock.holder()}): "
                    "nothing was done"
                )
            if pinned or conn.ttl(RUN_LOCK_KEY) == -1:
                raise LockTimeout(
                    f"{RUN_LOCK_KEY} is held ({lock.holder()}) and never expires, so it was "
                    "not left by a run, and no run will release it: not waited for. If it "
                    f"was set to pause opsctl, runs resume once it is removed (DEL {RUN_LOCK_KEY})."
                )
            holder, ttl = lock.holder(), conn.ttl(RUN_LOCK_KEY)
            within = f", in {ttl}s at most" if isinstance(ttl, int) and ttl > 0 else ""
            if _ended_here(holder):
                raise LockTimeout(
                    f"the run lock is held by an opsctl run that has ended, it seems ({holder}; "
                    f"no such process runs on this host): most likely it lost Redis and left "
                    f"the lock to expire{within}. Try again then (a run on another machine of "
                    "the same name would still hold it)."
                )
            raise LockTimeout(
                f"another opsctl run holds the lock ({holder}); waited {timeout_s:g}s. "
                "Try again when it has finished, or raise --lock-timeout."
            )
    keeper = _Keeper(lock)
    with released(lock):
        try:
            yield lock
        finally:
            keeper.stop()  # first: a renewal must not follow the release


def _ended_here(holder: str) -> bool:
    """Whether a lock's holder (an :func:`owner_token`) names a process of this host
    that no longer runs: a run that left its lock to expire when Redis went silent."""
    found = re.search(r"\bhost=(\S+) pid=(\d+)\b", holder)
    if found is None or found[1] != socket.gethostname() or int(found[2]) == os.getpid():
        return False
    try:
        os.kill(int(found[2]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs, as another user's process
        return False
    return False


@contextmanager
def released(lock: Lock) -> Iterator[None]:
    """Give ``lock`` back after the body, unless the body ended because the server
    gave no answer within --timeout: giving it back would wait as long again, so
    it is then left to its expiry."""
    try:
        yield
    except CONNECTION_LOST as exc:
        unanswered(exc)
        raise
    finally:
        lock.release()


class _Keeper:
    """Renews a held lock in the background, a third of its expiry apart, until
    stopped: a run's reads (minutes on a large keyspace) and its waits (for
    workers to connect again, or to stop jobs) must never outlast its lock."""

    def __init__(self, lock: Lock) -> None:
        self.lock = lock
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="opsctl-lock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.lock.ttl_s / 3):
            try:
                if not self.lock.renew():
                    log.warning("lock=%s lost: another run may act meanwhile", self.lock.key)
                    return
            except redis.RedisError as exc:
                log.warning("lock=%s renew_failed error=%s", self.lock.key, exc)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)


def maintenance_lock(conn: redis.Redis, prefix: str, queue: str, run_id: str) -> Lock:
    """RQ's registry-cleaning lock for ``queue``, in opsctl's name."""
    key = f"{prefix}:clean_registries:{queue}"
    return Lock(conn, key, owner_token(run_id), MAINTENANCE_LOCK_TTL_S)
