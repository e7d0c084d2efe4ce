"""The progress bar: on a terminal's stderr only, naming each stage of a long scan.

The bar appears once a scan has run for a second; these runs lower that
threshold to zero (in the child process) so a small database shows it.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.executions import Execution
from rq.job import Job, JobStatus

import opsctl.progress as progress_module
from conftest import clean_env, opsctl_env
from opsctl.progress import SCANNING, WALKING, ScanProgress
from opsctl.run import _WalkAndScan

pytestmark = pytest.mark.redis_server


#: Runs opsctl's CLI with the bar shown at once.
AT_ONCE = (
    "import sys, opsctl.progress as p; p.SHOW_AFTER_S = 0.0; "
    "from opsctl.cli import main; sys.argv[0] = 'opsctl'; main()"
)


def run_with_stderr_on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Exit code, stdout, and what a terminal on stderr received."""
    leader, follower = pty.openpty()
    env = opsctl_env({**clean_env(), "TERM": "xterm", "COLUMNS": "100"})
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        [sys.executable, "-c", AT_ONCE, *args],
        stdout=subprocess.PIPE,
        stderr=follower,
        env=env,
        text=True,
    )
    os.close(follower)
    received = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        received += chunk
    stdout, _ = process.communicate(timeout=120)
    os.close(leader)
    return process.returncode, stdout, received.decode("utf-8", "replace")


@pytest.fixture
def policy(tmp_path: Path, redis_conn: redis.Redis) -> Path:
    queue = Queue("progress", connection=redis_conn)
    for _ in range(50):
        queue.enqueue("jobs.quick")
    path = tmp_path / "policy.yaml"
    path.write_text('version: 1\nqueues:\n  - name: "*"\n')
    return path


def test_a_text_run_on_a_terminal_names_each_stage_on_stderr(policy: Path, redis_url: str) -> None:
    code, stdout, terminal = run_with_stderr_on_a_terminal(
        "apply", str(policy), "--dry-run", "--redis-url", redis_url
    )

    assert code == 0, terminal
    assert "walking the keyspace" in terminal
    assert "walking the keyspace" not in stdout and "dry run" in stdout


def test_a_json_run_draws_no_bar_even_on_a_terminal(policy: Path, redis_url: str) -> None:
    code, stdout, terminal = run_with_stderr_on_a_terminal(
        "apply", str(policy), "--dry-run", "--format", "json", "--redis-url", redis_url
    )

    assert code == 0, terminal
    assert "walking the keyspace" not in terminal and "scanning" not in terminal
    assert stdout.lstrip().startswith("{")


def test_an_apply_on_a_terminal_shows_its_acting_stage_and_acts(
    redis_conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    queue = Queue("progress", connection=redis_conn)
    jobs = [queue.enqueue("jobs.quick") for _ in range(30)]
    with redis_conn.pipeline() as pipe:  # started by a worker that is gone
        for job in jobs:
            Execution.create(job, 600, pipe, worker_name="gone-worker")
            job.prepare_for_execution("gone-worker", pipe)
            pipe.lrem(queue.key, 0, job.id)
        pipe.execute()
    path = tmp_path / "fail.yaml"
    path.write_text('version: 1\ndefaults:\n  action: fail\nqueues:\n  - name: "*"\n')

    code, _stdout, terminal = run_with_stderr_on_a_terminal(
        "apply", str(path), "--redis-url", redis_url
    )

    assert code == 0, terminal
    assert "acting on stuck jobs" in terminal
    statuses = {Job.fetch(j.id, connection=redis_conn).get_status() for j in jobs}
    assert statuses == {JobStatus.FAILED}


def test_the_bar_follows_the_scan_while_it_runs_and_the_walk_once_it_is_done() -> None:
    shown: list[tuple[int, int | None, str]] = []
    progress = _WalkAndScan(lambda done, total, what: shown.append((done, total, what)))

    progress.walk(2000, None, WALKING)
    progress.scan(500, 1000, SCANNING)
    progress.walk(4000, None, WALKING)  # the scan is still running: not shown
    progress.scan(990, 1000, SCANNING)  # the registry shrank meanwhile: 990 is all
    progress.scan_done()
    progress.walk(6000, None, WALKING)

    assert shown == [
        (0, None, WALKING),
        (2000, None, WALKING),
        (500, 1000, SCANNING),
        (990, 1000, SCANNING),
        (6000, None, WALKING),
    ]


def test_a_new_stage_never_shows_the_last_stages_total(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "SHOW_AFTER_S", 0.0)
    bar = ScanProgress(enabled=True)
    bar.enabled = True  # stderr is not a terminal under pytest
    with bar:
        bar(10, 100, SCANNING)
        bar(5000, None, WALKING)
        assert bar._bar is not None
        assert [(t.description, t.total, t.completed) for t in bar._bar.tasks] == [
            (WALKING, None, 5000)
        ]
