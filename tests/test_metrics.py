"""Prometheus metrics: `status --format prometheus`, `--metrics-file` on apply and status.

The output is parsed back with prometheus_client's own text parser and compared with a
state seeded through RQ's API (against a fakeredis server over TCP) and, after apply, with
what RQ's API shows.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue
from rq.job import JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, StartedJobRegistry

from conftest import free_port, invoke_opsctl, run_opsctl
from test_cli_fake import LiveWorker, register_worker, started_job

STATES = ("orphaned", "leftover", "abandoned", "overdue", "running")

POLICY = """version: 1
defaults:
  max_age: 10m
  action: fail
queues:
  - name: default
  - name: spare
    action: cancel
"""


@pytest.fixture
def conn(fake_redis_url: str) -> Any:
    client = redis.Redis.from_url(fake_redis_url, decode_responses=False)
    yield client
    client.close()


@pytest.fixture
def live(fake_redis_url: str) -> Any:
    worker = LiveWorker(fake_redis_url, "w-live")
    yield worker
    worker.close()


def gauges(text: str, command: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of ``command`` in a Prometheus text exposition: (name, sorted
    labels but ``command``) -> value. Every sample must name its command."""
    found = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge", family
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("command") == command:
                found[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return found


def started(values: dict[Any, float], queue: str, state: str) -> float:
    return values[("opsctl_started_jobs", (("queue", queue), ("state", state)))]


def action(values: dict[Any, float], queue: str, name: str, outcome: str) -> float | None:
    key = (("action", name), ("outcome", outcome), ("queue", queue))
    return values.get(("opsctl_actions", key))


def single(values: dict[Any, float], name: str) -> float:
    return values[(name, ())]


def seed(conn: redis.Redis, url: str) -> dict[str, Any]:
    """Two abandoned jobs (one started 5 minutes ago), an orphaned and a leftover entry,
    one job a live worker is running, all in `default`; `spare` holds only a queued job."""
    register_worker(url, "w-dead")
    old = started_job(conn, "w-dead", started_ago_s=300)
    young = started_job(conn, "w-dead", started_ago_s=20)
    orphan = started_job(conn, "w-dead")
    conn.delete(orphan.key)
    leftover = started_job(conn, "w-dead")
    leftover.set_status(JobStatus.FINISHED)
    running = started_job(conn, "w-live", started_ago_s=60)
    Queue("spare", connection=conn).enqueue("jobs.quick")
    return {"abandoned": [old, young], "orphan": orphan, "leftover": leftover, "run": running}


def test_status_prints_started_jobs_by_queue_and_state_and_the_oldest_age(
    conn: redis.Redis, fake_redis_url: str, live: LiveWorker
) -> None:
    seed(conn, fake_redis_url)

    result = run_opsctl("status", "--redis-url", fake_redis_url, "--format", "prometheus")

    assert result.returncode == 0, result.stderr
    values = gauges(result.stdout, "status")
    expected = {"orphaned": 1, "leftover": 1, "abandoned": 2, "overdue": 0, "running": 1}
    assert {s: started(values, "default", s) for s in STATES} == expected
    assert {s: started(values, "spare", s) for s in STATES} == dict.fromkeys(STATES, 0)
    oldest = values[("opsctl_oldest_started_job_age_seconds", (("queue", "default"),))]
    assert 300 <= oldest < 400
    assert ("opsctl_oldest_started_job_age_seconds", (("queue", "spare"),)) not in values
    assert single(values, "opsctl_problems") == 0
    assert single(values, "opsctl_last_run_exit_code") == 0
    assert single(values, "opsctl_last_success_timestamp_seconds") == pytest.approx(
        single(values, "opsctl_last_run_timestamp_seconds"), abs=5
    )
    # status only reads: nothing was changed
    assert len(StartedJobRegistry("default", connection=conn).get_job_ids(cleanup=False)) == 5


def test_apply_metrics_file_counts_what_rq_shows_afterwards(
    conn: redis.Redis, fake_redis_url: str, live: LiveWorker, tmp_path: Path
) -> None:
    seed(conn, fake_redis_url)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    metrics_dir = tmp_path / "textfile"
    metrics_dir.mkdir()
    target = metrics_dir / "opsctl.prom"

    result = run_opsctl(
        "apply", str(policy), "--redis-url", fake_redis_url, "--metrics-file", str(target)
    )

    assert result.returncode == 0, result.stderr
    values = gauges(target.read_text(), "apply")
    failed = FailedJobRegistry("default", connection=conn).get_job_ids(cleanup=False)
    still_started = StartedJobRegistry("default", connection=conn).get_job_ids(cleanup=False)
    assert action(values, "default", "fail", "done") == len(failed) == 2
    assert action(values, "default", "remove-entry", "done") == 2
    assert started(values, "default", "running") == len(still_started) == 1
    assert started(values, "default", "abandoned") == 2
    assert single(values, "opsctl_last_run_exit_code") == 0
    assert single(values, "opsctl_run_duration_seconds") > 0
    # written beside its target and renamed into place: no temporary file stays behind
    assert [p.name for p in metrics_dir.iterdir()] == ["opsctl.prom"]


def test_dry_run_metrics_show_planned_actions_and_nothing_changes(
    conn: redis.Redis, fake_redis_url: str, live: LiveWorker, tmp_path: Path
) -> None:
    seeded = seed(conn, fake_redis_url)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    target = tmp_path / "opsctl.prom"

    result = run_opsctl(
        "apply", str(policy), "--dry-run", "--redis-url", fake_redis_url,
        "--metrics-file", str(target),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    values = gauges(target.read_text(), "apply")
    assert action(values, "default", "fail", "planned") == 2
    assert action(values, "default", "fail", "done") is None
    assert FailedJobRegistry("default", connection=conn).get_job_ids(cleanup=False) == []
    assert seeded["abandoned"][0].get_status(refresh=True) == JobStatus.STARTED


def test_a_registry_that_cannot_be_read_is_a_problem_with_no_counts_and_no_exit_code(
    conn: redis.Redis, fake_redis_url: str, live: LiveWorker, tmp_path: Path
) -> None:
    seeded = seed(conn, fake_redis_url)
    conn.set("rq:wip:spare", "not a registry")  # another program wrote a string there
    target = tmp_path / "opsctl.prom"

    result = run_opsctl(
        "apply", str(written_policy(tmp_path)), "--redis-url", fake_redis_url,
        "--metrics-file", str(target),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr  # the other queue was cleaned up
    assert "problem: " in result.stdout
    values = gauges(target.read_text(), "apply")
    assert single(values, "opsctl_problems") == 1
    assert single(values, "opsctl_last_run_exit_code") == 0
    # No counts for the unread queue: zeros would say nothing is stuck there.
    assert not [key for key in values if ("queue", "spare") in key[1]]
    assert started(values, "default", "abandoned") == 2
    assert seeded["abandoned"][0].get_status(refresh=True) == JobStatus.FAILED
    assert conn.get("rq:wip:spare") == b"not a registry"


def test_a_plan_carries_the_registries_it_could_not_read_to_the_run_that_applies_it(
    conn: redis.Redis, fake_redis_url: str, live: LiveWorker, tmp_path: Path
) -> None:
    seeded = seed(conn, fake_redis_url)
    conn.set("rq:wip:spare", "not a registry")
    plan, target = tmp_path / "plan.json", tmp_path / "opsctl.prom"
    made = run_opsctl(
        "plan", str(written_policy(tmp_path)), "--redis-url", fake_redis_url, "-o", str(plan)
    )
    assert made.returncode == 0, made.stderr

    result = run_opsctl(
        "apply", "--plan", str(plan), "--redis-url", fake_redis_url, "--format", "json",
        "--metrics-file", str(target),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert [p for p in json.loads(result.stdout)["problems"] if "rq:wip:spare" in p]
    values = gauges(target.read_text(), "apply")
    assert single(values, "opsctl_problems") == 1
    assert not [key for key in values if ("queue", "spare") in key[1]]
    assert seeded["abandoned"][0].get_status(refresh=True) == JobStatus.FAILED


def written_policy(tmp_path: Path, text: str = POLICY) -> Path:
    """A policy (POLICY unless told), in a file."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    return policy


def apply_with_metrics(
    url: str, tmp_path: Path, text: str = POLICY
) -> tuple[tuple[str, ...], Path]:
    """The arguments of an apply of a policy (POLICY unless told) that writes its
    metrics to a file, and that file (not written yet)."""
    target = tmp_path / "opsctl.prom"
    policy = written_policy(tmp_path, text)
    return ("apply", str(policy), "--redis-url", url, "--metrics-file", str(target)), target


def succeeded_then_locked_out(
    conn: redis.Redis, url: str, tmp_path: Path
) -> tuple[tuple[str, ...], Path, float]:
    """An apply that wrote its metrics file and succeeded, after which the run lock
    is held, so the next apply fails: its arguments, the file and its success time."""
    args, target = apply_with_metrics(url, tmp_path)
    first = run_opsctl(*args)
    assert first.returncode == 0, first.stderr
    success = single(gauges(target.read_text(), "apply"), "opsctl_last_success_timestamp_seconds")
    conn.set("opsctl:lock", "another opsctl run")
    return args, target, success


def test_failed_run_keeps_the_last_success_time_of_the_previous_run(
    conn: redis.Redis, fake_redis_url: str, tmp_path: Path
) -> None:
    args, target, success = succeeded_then_locked_out(conn, fake_redis_url, tmp_path)

    second = run_opsctl(*args, "--lock-timeout", "0")

    assert second.returncode == 5, second.stderr
    values = gauges(target.read_text(), "apply")
    assert single(values, "opsctl_last_run_exit_code") == 5
    assert single(values, "opsctl_last_success_timestamp_seconds") == success
    assert single(values, "opsctl_last_run_timestamp_seconds") >= success


def test_status_sharing_the_file_of_apply_keeps_apply_failures_visible(
    conn: redis.Redis, fake_redis_url: str, tmp_path: Path
) -> None:
    apply, target, success = succeeded_then_locked_out(conn, fake_redis_url, tmp_path)
    status = ("status", "--redis-url", fake_redis_url, "--metrics-file", str(target))

    assert run_opsctl(*status).returncode == 0  # a status succeeds meanwhile: no apply success
    assert run_opsctl(*apply, "--lock-timeout", "0").returncode == 5

    values = gauges(target.read_text(), "apply")
    assert single(values, "opsctl_last_run_exit_code") == 5
    assert single(values, "opsctl_last_success_timestamp_seconds") == success
    assert single(gauges(target.read_text(), "status"), "opsctl_last_run_exit_code") == 0


def test_a_command_that_read_nothing_keeps_the_problems_another_command_counted(
    conn: redis.Redis, fake_redis_url: str, live: LiveWorker, tmp_path: Path
) -> None:
    seed(conn, fake_redis_url)
    conn.set("rq:wip:spare", "not a registry")
    apply, target = apply_with_metrics(fake_redis_url, tmp_path)
    assert run_opsctl(*apply).returncode == 0
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    status = run_opsctl("status", "--redis-url", closed, "--metrics-file", str(target))

    assert status.returncode == 3, status.stderr
    # An alert on apply's problems must not resolve because status could not connect.
    assert single(gauges(target.read_text(), "apply"), "opsctl_problems") == 1
    assert single(gauges(target.read_text(), "status"), "opsctl_last_run_exit_code") == 3


@pytest.mark.parametrize(
    ("policy_text", "extra"),
    [(POLICY.replace("action: fail", "action: kill"), ()), (POLICY, ("--max-age", "0"))],
    ids=["invalid-policy", "bad-option"],
)
def test_a_run_refused_as_a_mistake_shows_exit_code_2_and_keeps_the_last_success(
    conn: redis.Redis, fake_redis_url: str, tmp_path: Path, policy_text: str, extra: tuple[str, ...]
) -> None:
    args, target = apply_with_metrics(fake_redis_url, tmp_path)
    assert run_opsctl(*args).returncode == 0
    success = single(gauges(target.read_text(), "apply"), "opsctl_last_success_timestamp_seconds")
    written_policy(tmp_path, policy_text)  # the deploy ships a broken policy or command

    result = run_opsctl(*args, *extra)

    assert result.returncode == 2, result.stderr
    values = gauges(target.read_text(), "apply")
    assert single(values, "opsctl_last_run_exit_code") == 2
    assert single(values, "opsctl_last_success_timestamp_seconds") == success


def test_apply_and_status_files_in_one_collector_directory_hold_no_series_twice(
    conn: redis.Redis, fake_redis_url: str, live: LiveWorker, tmp_path: Path
) -> None:
    seed(conn, fake_redis_url)
    files = {"apply": tmp_path / "apply.prom", "status": tmp_path / "status.prom"}
    apply = ("apply", str(written_policy(tmp_path)), "--dry-run", "--metrics-file")
    apply += (str(files["apply"]),)
    assert run_opsctl(*apply, "--redis-url", fake_redis_url).returncode == 0
    status = ("status", "--metrics-file", str(files["status"]))
    assert run_opsctl(*status, "--redis-url", fake_redis_url).returncode == 0

    series = [
        (sample.name, tuple(sorted(sample.labels.items())))
        for path in files.values()
        for family in text_string_to_metric_families(path.read_text())
        for sample in family.samples
    ]
    assert len(series) == len(set(series))  # node_exporter refuses a series two files repeat
    for command, path in files.items():
        assert started(gauges(path.read_text(), command), "default", "abandoned") == 2


def test_metrics_file_that_cannot_be_written_exits_6_after_the_full_report(
    conn: redis.Redis, fake_redis_url: str, tmp_path: Path
) -> None:
    register_worker(fake_redis_url, "w-dead")
    job = started_job(conn, "w-dead")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")

    result = run_opsctl(
        "apply", str(policy), "--redis-url", fake_redis_url, "--format", "json",
        "--metrics-file", str(not_a_folder / "opsctl.prom"),
    )  # fmt: skip

    assert result.returncode == 6, result.stderr
    report = json.loads(result.stdout)
    assert [(j["id"], j["outcome"]) for j in report["jobs"]] == [(job.id, "done")]
    assert job.get_status(refresh=True) == JobStatus.FAILED
    assert "Traceback" not in result.stderr
    # The dead worker's hash is still there: the run looks at it again first, and says so.
    waited, failed = result.stderr.strip().splitlines()
    assert "workers_without_connection count=1" in waited, result.stderr
    assert "cannot write the metrics file" in failed, result.stderr
    assert "the report above is complete" in failed, result.stderr


def test_a_run_that_printed_no_report_does_not_say_its_report_is_complete(
    tmp_path: Path,
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    target = tmp_path / "missing" / "opsctl.prom"

    result = run_opsctl(
        "apply", str(written_policy(tmp_path)), "--redis-url", closed, "--best-effort",
        "--metrics-file", str(target),
    )  # fmt: skip

    assert result.returncode == 6, result.stderr  # --best-effort never hides 6
    assert "cannot write the metrics file" in result.stderr
    assert "report above" not in result.stderr


def test_action_failure_keeps_its_own_exit_code_when_metrics_are_written(
    conn: redis.Redis, fake_redis_url: str, tmp_path: Path
) -> None:
    register_worker(fake_redis_url, "w-dead")
    job = started_job(conn, "w-dead", "spare")
    conn.set(CanceledJobRegistry("spare", connection=conn).key, "not a sorted set")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    target = tmp_path / "opsctl.prom"

    result = run_opsctl(
        "apply", str(policy), "--redis-url", fake_redis_url, "--metrics-file", str(target)
    )

    assert result.returncode == 1, result.stderr
    values = gauges(target.read_text(), "apply")
    assert action(values, "spare", "cancel", "error") == 1
    assert single(values, "opsctl_last_run_exit_code") == 1
    assert single(values, "opsctl_last_success_timestamp_seconds") == 0
    assert job.get_status(refresh=True) == JobStatus.STARTED


def test_status_metrics_file_holds_the_gauges_it_prints(
    conn: redis.Redis, fake_redis_url: str, live: LiveWorker, tmp_path: Path
) -> None:
    seed(conn, fake_redis_url)
    target = tmp_path / "status.prom"

    result = run_opsctl(
        "status", "--redis-url", fake_redis_url, "--format", "prometheus",
        "--metrics-file", str(target),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    printed, written = gauges(result.stdout, "status"), gauges(target.read_text(), "status")
    timing = {"opsctl_run_duration_seconds", "opsctl_last_run_timestamp_seconds"}
    timing.add("opsctl_last_success_timestamp_seconds")
    assert {k: v for k, v in printed.items() if k[0] not in timing} == {
        k: v for k, v in written.items() if k[0] not in timing
    }
    assert started(written, "default", "abandoned") == 2


def test_a_queue_whose_started_registry_cannot_be_read_gets_no_series_rather_than_zeros(
    conn: redis.Redis, fake_redis_url: str, live: LiveWorker
) -> None:
    seed(conn, fake_redis_url)
    conn.sadd("rq:queues", "rq:queue:odd")
    conn.set("rq:wip:odd", "written by something else")

    result = run_opsctl("status", "--redis-url", fake_redis_url, "--format", "prometheus")

    assert result.returncode == 0, result.stderr
    values = gauges(result.stdout, "status")
    assert not [key for key in values if ("queue", "odd") in key[1]]
    assert started(values, "default", "abandoned") == 2
    assert single(values, "opsctl_problems") == 1


def test_a_queue_name_that_is_not_utf8_is_written_escaped(
    conn: redis.Redis, fake_redis_url: str, tmp_path: Path
) -> None:
    conn.sadd("rq:queues", b"rq:queue:\xfe")
    register_worker(fake_redis_url, "w-dead")
    started_job(conn, "w-dead")
    args, target = apply_with_metrics(
        fake_redis_url, tmp_path, 'version: 1\nqueues:\n  - name: "*"\n'
    )

    printed = run_opsctl("status", "--redis-url", fake_redis_url, "--format", "prometheus")
    applied = run_opsctl(*args)

    assert printed.returncode == 0, printed.stderr
    assert started(gauges(printed.stdout, "status"), "\\xfe", "abandoned") == 0
    assert applied.returncode == 0, applied.stderr
    values = gauges(target.read_text(), "apply")
    assert started(values, "\\xfe", "running") == 0
    assert action(values, "default", "fail", "done") == 1


def test_a_success_time_that_is_no_moment_is_not_carried_forward(
    conn: redis.Redis, fake_redis_url: str, tmp_path: Path
) -> None:
    args, target = apply_with_metrics(fake_redis_url, tmp_path)
    target.write_text('opsctl_last_success_timestamp_seconds{command="apply"} +Inf\n')
    conn.set("opsctl:lock", "another opsctl run")

    result = run_opsctl(*args, "--lock-timeout", "0")

    assert result.returncode == 5, result.stderr
    values = gauges(target.read_text(), "apply")
    assert single(values, "opsctl_last_success_timestamp_seconds") == 0  # none known


def test_a_failed_run_keeps_the_success_time_an_older_opsctl_wrote_without_labels(
    conn: redis.Redis, fake_redis_url: str, tmp_path: Path
) -> None:
    args, target = apply_with_metrics(fake_redis_url, tmp_path)
    target.write_text(
        "# HELP opsctl_last_success_timestamp_seconds Unix time of the last run that exited 0.\n"
        "# TYPE opsctl_last_success_timestamp_seconds gauge\n"
        "opsctl_last_success_timestamp_seconds 1.7e+09\n"
        "# HELP opsctl_last_run_exit_code Exit code of the run.\n"
        "# TYPE opsctl_last_run_exit_code gauge\n"
        "opsctl_last_run_exit_code 0.0\n"
    )
    conn.set("opsctl:lock", "another opsctl run")

    result = run_opsctl(*args, "--lock-timeout", "0")

    assert result.returncode == 5, result.stderr
    values = gauges(target.read_text(), "apply")  # every sample is labelled now
    assert single(values, "opsctl_last_success_timestamp_seconds") == 1.7e9
    assert single(values, "opsctl_last_run_exit_code") == 5


#: What a metrics path may name besides a metrics file, and what it then holds.
_HELD = {
    "tls-key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkq\n-----END PRIVATE KEY-----\n",
    "env-file": "REDIS_PASSWORD=hunter2secret\n",
    "policy": "version: 1\nqueues:\n  - name: a\n",
    "comments-only": "# secret=hunter2secret\n",
    "other-samples": "hunter2secret 12345\n",  # parses as a sample, but no gauge of opsctl's
}


def _special(kind: str, target: Path) -> str:
    """Make ``target`` something other than a metrics file; what it then is."""
    if kind == "fifo":
        os.mkfifo(target)  # reading it back would wait for a writer that never comes
    elif kind == "socket":
        listening = socket.socket(socket.AF_UNIX)
        listening.bind(str(target))
        listening.close()
    elif kind == "symlink":
        (target.parent / "elsewhere.prom").write_text("# kept\n")
        target.symlink_to("elsewhere.prom")
    else:
        target.write_text(_HELD[kind])
    return _what(target)


def _what(path: Path) -> str:
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return f"link to {os.readlink(path)}"
    if stat.S_ISREG(mode):
        return path.read_text()
    return stat.filemode(mode)[0]


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        *[(k, "exists and is not a regular file") for k in ("fifo", "socket", "symlink")],
        *[(k, "does not hold opsctl's metrics in the Prometheus text format") for k in _HELD],
    ],
)
def test_a_metrics_path_naming_anything_but_a_metrics_file_is_refused_and_left_as_it_is(
    conn: redis.Redis, fake_redis_url: str, tmp_path: Path, kind: str, why: str
) -> None:
    # A rename would put a plain file in its place: /dev/null for everyone, say, or
    # the TLS key named by a slip of the hand. What such a file holds is never shown.
    register_worker(fake_redis_url, "w-dead")
    job = started_job(conn, "w-dead")
    args, target = apply_with_metrics(fake_redis_url, tmp_path)
    was = _special(kind, target)

    result = run_opsctl(*args)

    assert result.returncode == 2, result.stderr
    assert why in result.stderr
    assert "hunter2secret" not in result.stderr + result.stdout
    assert _what(target) == was
    assert job.get_status(refresh=True) == JobStatus.STARTED  # refused before anything was done
    if kind == "symlink":
        assert (tmp_path / "elsewhere.prom").read_text() == "# kept\n"


def test_a_metrics_file_that_cannot_be_read_is_not_replaced(
    fake_redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A key its owner may write but not read (mode 0200): what it holds cannot be
    # checked, so it is kept.
    args, target = apply_with_metrics(fake_redis_url, tmp_path)
    target.write_text("-----BEGIN PRIVATE KEY-----\n")
    from opsctl import files
    from opsctl.files import NotReadable

    def refused(path: str, limit_bytes: int) -> bytes:
        raise NotReadable("permission denied")

    monkeypatch.setattr(files, "read_file", refused)
    result = invoke_opsctl(*args)

    assert result.exit_code == 2, result.output
    assert "it exists and cannot be read (permission denied)" in result.output
    assert target.read_text() == "-----BEGIN PRIVATE KEY-----\n"


def test_a_metrics_path_that_stops_being_a_regular_file_during_a_run_is_not_replaced(
    conn: redis.Redis, fake_redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args, target = apply_with_metrics(fake_redis_url, tmp_path)
    from opsctl import metrics

    made = metrics.build

    def build_then_swap(*given: Any) -> Any:
        os.mkfifo(target)  # someone put a FIFO there after the path was checked
        return made(*given)

    monkeypatch.setattr(metrics, "build", build_then_swap)
    result = invoke_opsctl(*args)

    assert result.exit_code == 6, result.stderr
    assert "exists and is not a regular file" in result.stderr
    assert _what(target) == "p"
