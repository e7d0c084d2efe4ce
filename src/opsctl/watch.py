"""``opsctl watch``: apply a policy in a loop, for a sidecar or a small deployment.

Each round re-reads the policy file if its bytes changed. A valid edit takes
effect in that round; an invalid one is logged and the last good policy stays
in force. A round that fails (Redis down, the lock held, an action failed) is
logged and reflected in the metrics, and the loop goes on.

SIGTERM and SIGINT only raise a flag. A round in progress notices it between
two changes (each change is one atomic script, so none is ever cut in half),
releases its locks and ends without writing metrics; a signal during the sleep
between rounds ends the loop at once. The process then exits 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import NoReturn

from opsctl import metrics
from opsctl.errors import ExitCode, OpsctlError, PolicyError
from opsctl.policy import Policy, read_policy_bytes
from opsctl.run import Run

log = logging.getLogger(__name__)

#: Signals that stop the loop (and an apply) cleanly.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_at_once(code: int) -> NoReturn:
    """End the process now, as a second stop signal asks: a read blocked on a server
    that does not answer is not waited for, and the locks held are left to their
    expiry (giving them back could wait as long). Nothing more is written: the log
    line that says so is already out (each is flushed as it is written)."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(code)


@contextmanager
def stop_signals_handled(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Let ``handler`` take SIGTERM and SIGINT for the body; the previous handlers after."""
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@dataclass
class RoundResult:
    """How one round ended: its run (None when it never got that far) and exit code."""

    run: Run | None
    exit_code: int


#: Carries out one round under a policy; polls the callable to know when to stop.
RoundFn = Callable[[Policy, Callable[[], bool]], RoundResult]


class Watch:
    """The loop: reload the policy, run a round, write metrics, sleep."""

    def __init__(
        self,
        policy: Policy,
        load: Callable[[str, bytes], Policy],
        round_fn: RoundFn,
        every_s: float,
        metrics_file: str | None = None,
    ) -> None:
        self.policy = policy
        self._load = load
        self._round = round_fn
        self.every_s = every_s
        self.metrics_file = metrics_file
        self._stop = threading.Event()
        self._seen_digest = policy.digest
        #: Whether the policy file's current content was refused (see _reload).
        self.policy_rejected = False
        self._last_success_s = (
            metrics.previous_success(metrics.recorded(metrics_file), "watch")
            if metrics_file
            else None
        )
        self.rounds = 0

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        if self._stop.is_set():
            log.warning("signal=%s stopping at once", signum)
            exit_at_once(128 + signum)
        log.warning("signal=%s stopping after the change in progress (again: at once)", signum)
        self._stop.set()

    def run(self) -> ExitCode:
        """Loop until a stop signal; the exit code of a clean stop (0)."""
        with stop_signals_handled(self.request_stop):
            while not self._stop.is_set():
                self._reload()
                began = time.monotonic()
                result = self._round(self.policy, self.stop_requested)
                self.rounds += 1
                if self._stop.is_set():
                    # A round a stop signal cut short is no run that exited 0: as an
                    # apply stopped so writes no metrics, the file keeps the last
                    # finished round's figures and success time.
                    break
                self._write_metrics(result, began)
                self._stop.wait(self.every_s)
        log.warning("stopped after %d round(s)", self.rounds)
        return ExitCode.OK

    def _reload(self) -> None:
        """Take up a changed policy file; keep the last good policy if it is invalid."""
        path = self.policy.path
        try:
            raw = read_policy_bytes(path)
        except PolicyError as exc:
            if self._seen_digest != "unreadable":
                log.error("policy=%s unreadable, keeping the last good policy: %s", path, exc)
            self._seen_digest = "unreadable"
            self.policy_rejected = True
            return
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._seen_digest:
            return
        self._seen_digest = digest
        try:
            # The bytes just read, not the file again: a write landing between two
            # reads would leave the digest of one and the policy of the other.
            self.policy = self._load(path, raw)
        except OpsctlError as exc:
            problems = str(exc).replace("\n", " | ")
            log.error("policy=%s invalid, keeping the last good policy: %s", path, problems)
            self.policy_rejected = True
            return
        self.policy_rejected = False
        log.warning("policy=%s reloaded sha256=%s", path, self.policy.digest[:12])

    def _write_metrics(self, result: RoundResult, began: float) -> None:
        now_s = time.time()
        if result.exit_code == ExitCode.OK:
            self._last_success_s = now_s
        if not self.metrics_file:
            return
        facts = metrics.RunFacts(
            command="watch",
            timestamp_s=now_s,
            duration_s=time.monotonic() - began,
            exit_code=result.exit_code,
            last_success_s=self._last_success_s,
            policy_rejected=self.policy_rejected,
        )
        seen = metrics.observe_run(result.run) if result.run is not None else None
        try:
            # Read again each round: another command may share the file.
            samples = metrics.recorded(self.metrics_file)
            metrics.write(self.metrics_file, seen, facts, samples)
        except metrics.MetricsWriteError as exc:
            log.error("%s", exc)
