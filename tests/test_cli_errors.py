"""Mistakes and outages as a user meets them on the command line: message and exit code.

Every Redis URL here points at a port on 127.0.0.1 that nothing listens on, so a test
shows both what opsctl reports and that it never needed a server to report it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from conftest import clean_env, free_port
from opsctl import __version__
from opsctl.cli import app
from opsctl.shown import quoted

TESTS = Path(__file__).resolve().parent
REPOSITORY = TESTS.parent

#: What `opsctl validate` prints for each problem: FILE:LINE:COL: [path: ]message.
PROBLEM_LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<column>\d+): (?P<rest>\S.*)$")

BAD_DURATION = (
    "policies/bad_duration.yaml:7:14: queues[0].max_age: '10 minutes' is not a duration "
    "(use 90s, 10m, 2h or 1d)"
)


@pytest.fixture(autouse=True)
def in_tests_directory(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run from tests/, so that messages name files as policies/NAME.yaml."""
    monkeypatch.chdir(TESTS)
    yield


@pytest.fixture
def closed_url() -> str:
    """A Redis URL on 127.0.0.1 where nothing listens."""
    return f"redis://127.0.0.1:{free_port()}/0"


def opsctl(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run the CLI in-process; REDIS_URL is unset unless `env` sets it."""
    result = CliRunner().invoke(app, list(args), env={"REDIS_URL": None, **(env or {})})
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def python_m_opsctl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m opsctl` as a separate process, without REDIS_* or RQ_* variables."""
    process = subprocess.run(
        [sys.executable, "-m", "opsctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=TESTS,
        env=clean_env(),
        check=False,
    )
    assert "Traceback" not in process.stdout + process.stderr, process.stderr
    return process


# --- validate -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bad_duration", BAD_DURATION),
        (
            "bad_action",
            "policies/bad_action.yaml:3:11: defaults.action: 'kill' is not one of fail, "
            "requeue, cancel, delete",
        ),
        (
            "bad_boolean",
            "policies/bad_boolean.yaml:3:10: defaults.force: 'yes please' is not a boolean "
            "(use true or false)",
        ),
        ("bad_version", "policies/bad_version.yaml:1:10: version: 2 is not supported (use 1)"),
        (
            "missing_name",
            "policies/missing_name.yaml:3:5: queues[0]: missing required key 'name'",
        ),
        (
            "unknown_key",
            "policies/unknown_key.yaml:7:5: queues[2]: unknown key 'max_agee' (allowed: name, "
            "max_age, action, force, dry_run, enabled",
        ),
        (
            "duplicate_key",
            "policies/duplicate_key.yaml:5:5: queues[0]: duplicate key 'name' (first at line 3)",
        ),
        (
            "syntax_error",
            "policies/syntax_error.yaml:5:1: invalid YAML: expected ',' or ']', but got "
            "'<stream end>'",
        ),
        (
            "not_utf8",
            "policies/not_utf8.yaml:4:14: byte 0xe9 is not UTF-8 text; save the file as UTF-8",
        ),
    ],
)
def test_validate_prints_each_problem_at_its_file_line_and_column_and_exits_2(
    name: str, expected: str
) -> None:
    result = opsctl("validate", f"policies/{name}.yaml")

    assert result.exit_code == 2, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith(expected), lines[0]
    assert f"policies/{name}.yaml: ok" not in result.stderr


def test_validate_reports_every_problem_of_a_file_at_once_in_file_order() -> None:
    result = opsctl("validate", "policies/many_problems.yaml")

    assert result.exit_code == 2, result.output
    problems = [PROBLEM_LINE.match(line) for line in result.stdout.splitlines()]
    assert all(problems), result.stdout
    positions = [(int(p["line"]), int(p["column"])) for p in problems if p]
    assert positions == [(1, 10), (3, 12), (4, 11), (7, 12), (8, 5), (10, 5)]
    paths = [p["rest"].split(": ", 1)[0] for p in problems if p]
    assert paths == [
        "version",
        "defaults.max_age",
        "defaults.action",
        "queues[0].force",
        "queues[1]",
        "queues[2]",
    ]
    assert {p["file"] for p in problems if p} == {"policies/many_problems.yaml"}


def test_validate_accepts_a_valid_file_and_exits_0() -> None:
    result = opsctl("validate", "policies/minimal.yaml", "policies/overrides.yaml")

    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "policies/minimal.yaml: ok" in result.stderr
    assert "policies/overrides.yaml: ok" in result.stderr


def test_validate_of_several_files_fails_when_one_of_them_does() -> None:
    result = opsctl("validate", "policies/minimal.yaml", "policies/bad_duration.yaml")

    assert result.exit_code == 2, result.output
    assert result.stdout.splitlines() == [BAD_DURATION]
    assert "policies/minimal.yaml: ok" in result.stderr


def test_validate_refuses_a_fifo_at_once_instead_of_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)

    result = opsctl("validate", str(fifo))

    assert result.exit_code == 2, result.output
    assert f"{fifo}:1:1: cannot read file: it is a FIFO, not a file" in result.output


def test_validate_of_a_missing_file_says_so_and_exits_2() -> None:
    result = opsctl("validate", "policies/no_such_policy.yaml")

    assert result.exit_code == 2, result.output
    assert result.stdout.splitlines() == [
        "policies/no_such_policy.yaml:1:1: cannot read file: no such file"
    ]


# --- apply: a bad policy is reported before Redis is contacted -----------------------------


def test_apply_with_an_invalid_policy_exits_2_with_the_problem_before_connecting(
    closed_url: str,
) -> None:
    result = opsctl("apply", "policies/bad_duration.yaml", "--redis-url", closed_url)

    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"opsctl: error: {BAD_DURATION}"]
    assert result.stdout == ""


def test_apply_lists_every_problem_of_an_invalid_policy(closed_url: str) -> None:
    validated = opsctl("validate", "policies/many_problems.yaml")

    result = opsctl("apply", "policies/many_problems.yaml", "--redis-url", closed_url)

    assert result.exit_code == 2, result.output
    for line in validated.stdout.splitlines():
        assert line in result.stderr
    assert "Redis" not in result.stderr


def test_apply_never_prints_the_password_of_an_invalid_policy_url(closed_url: str) -> None:
    result = opsctl("apply", "policies/bad_url.yaml")  # http://admin:hunter2@...

    assert result.exit_code == 2, result.output
    assert "policies/bad_url.yaml:3:8: redis.url:" in result.stderr
    assert "hunter2" not in result.output


# --- environment variables ------------------------------------------------------------------

UNSET_REDIS_URL = (
    "policies/example.yaml:3:8: redis.url: environment variable 'REDIS_URL' is not set "
    "(set it, or give a default with ${REDIS_URL:-...})"
)


def test_apply_with_an_unset_variable_in_redis_url_exits_2_naming_it() -> None:
    result = opsctl("apply", "policies/example.yaml")

    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"opsctl: error: {UNSET_REDIS_URL}"]


def test_validate_only_notes_an_unset_variable_and_exits_0() -> None:
    result = opsctl("validate", "policies/example.yaml")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        UNSET_REDIS_URL.replace("redis.url:", "note: redis.url:") + "; the value was not checked"
    ]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://:s3cret@127.0.0.1:6380/0/extra", "database (not shown) is not a number"),
        ("redis://:s3cret@/0", "names no host; opsctl never falls back to a default server"),
        (
            "redis+sentinel://:s3cret@h:\u00b2/mymaster",
            "what follows ':' is no port number; if it is a password, the host is missing: "
            "write USER:PASSWORD@HOST:PORT",
        ),
        ("redis://:s3cret@127.0.0.1:6380/0?protocol=9", "protocol (not shown) is not 2 or 3"),
        (
            "redis://:s3cret@127.0.0.1:6380/0?max_connections=abc",
            "Invalid value for (not shown) in connection URL.",
        ),
        (
            "redis://:s3cret@127.0.0.1:6380/0?socket_timeout=5",
            "opsctl sets socket_timeout itself (from --timeout); leave it out of the URL",
        ),
        (
            "redis://:s3cret@127.0.0.1:6380/0?foo=bar",
            "its option (not shown) is not one a redis:// connection takes",
        ),
        (
            "redis://:s3cret@127.0.0.1:6380/0?db=3",
            "names more than one database (in its path or as ?db=): give one",
        ),
        (
            "redis://:s3cret@127.0.0.1:6380?db=1&db=0",
            "names more than one database (in its path or as ?db=): give one",
        ),
        (
            "redis+sentinel://:s3cret@127.0.0.1:26379/mymaster?db=9",
            "a redis+sentinel:// URL takes no ?options; write the database as /SERVICE/DB "
            "and connection settings as options of their own",
        ),
    ],
)
def test_validate_refuses_an_environment_url_that_apply_would_refuse(url: str, reason: str) -> None:
    # The variable is named; no part of its value is quoted.
    result = opsctl("validate", "policies/example.yaml", env={"REDIS_URL": url})

    assert result.exit_code == 2, result.output
    assert result.stdout.splitlines()[-1].endswith(
        f"redis.url: the value from ${{REDIS_URL}}: {reason}"
    )
    assert "s3cret" not in result.output


def test_a_protocol_redis_py_would_refuse_is_a_bad_option_not_an_unreachable_server(
    closed_url: str,
) -> None:
    result = opsctl("status", "--redis-url", f"{closed_url}?protocol=9")

    assert result.exit_code == 2, result.output
    assert result.stderr.endswith(": protocol '9' is not 2 or 3\n")


def test_validate_strict_env_makes_an_unset_variable_an_error() -> None:
    result = opsctl("validate", "--strict-env", "policies/example.yaml")

    assert result.exit_code == 2, result.output
    assert result.stdout.splitlines() == [UNSET_REDIS_URL]


def test_redis_url_option_stands_in_for_an_unset_redis_url_variable(closed_url: str) -> None:
    result = opsctl("apply", "policies/example.yaml", "--redis-url", closed_url)

    assert result.exit_code == 3, result.output
    assert "cannot reach Redis" in result.stderr


def test_redis_url_option_does_not_excuse_other_unset_variables(closed_url: str) -> None:
    result = opsctl("apply", "policies/env_secrets.yaml", "--redis-url", closed_url)

    assert result.exit_code == 2, result.output
    assert "defaults.max_age: environment variable 'MAX_AGE' is not set" in result.stderr
    assert "REDIS_URL" not in result.stderr


def test_apply_without_any_redis_url_exits_2_and_says_where_to_give_one() -> None:
    result = opsctl("apply", "policies/minimal.yaml")

    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        "opsctl: error: no Redis URL: pass --redis-url (or set OPSCTL_REDIS_URL) or --sentinel, "
        "set redis.url or redis.sentinel in the policy, or set REDIS_URL"
    ]


@pytest.mark.parametrize("command", [("status",), ("history",), ("explain", "job-1")])
def test_a_command_without_a_policy_and_without_a_redis_url_names_only_what_it_takes(
    command: tuple[str, ...],
) -> None:
    result = opsctl(*command)

    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        "opsctl: error: no Redis URL: pass --redis-url (or set OPSCTL_REDIS_URL) or --sentinel, "
        "or set REDIS_URL"
    ]


# --- Redis unreachable ----------------------------------------------------------------------


def test_unreachable_redis_exits_3_with_a_one_line_message(closed_url: str) -> None:
    result = opsctl("apply", "policies/minimal.yaml", "--redis-url", closed_url)

    assert result.exit_code == 3, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"opsctl: error: cannot reach Redis at {closed_url}: "), line
    assert result.stdout == ""


def test_best_effort_exits_0_when_redis_is_unreachable_but_still_reports_it(
    closed_url: str,
) -> None:
    result = opsctl("apply", "policies/minimal.yaml", "--redis-url", closed_url, "--best-effort")

    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0].startswith("opsctl: error: cannot reach Redis at ")
    assert "--best-effort: exiting 0 despite the error above" in result.stderr


def test_best_effort_never_hides_an_invalid_policy(closed_url: str) -> None:
    result = opsctl(
        "apply", "policies/bad_duration.yaml", "--redis-url", closed_url, "--best-effort"
    )

    assert result.exit_code == 2, result.output


def test_password_in_the_redis_url_is_never_printed(closed_url: str) -> None:
    secret_url = closed_url.replace("redis://", "redis://:s3cret@")

    result = opsctl("apply", "policies/minimal.yaml", "--redis-url", secret_url)

    assert result.exit_code == 3, result.output
    assert "s3cret" not in result.output
    assert closed_url.replace("redis://", "redis://:***@") in result.stderr


def test_password_from_the_environment_is_never_printed(closed_url: str) -> None:
    secret_url = closed_url.replace("redis://", "redis://admin:hunter2@")

    result = opsctl("apply", "policies/example.yaml", env={"REDIS_URL": secret_url})

    assert result.exit_code == 3, result.output
    assert "hunter2" not in result.output
    assert "admin:***@" in result.stderr


# --- bad options ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://x", "http://:s3cret@cache.internal:6380/0", "localhost"])
def test_malformed_redis_url_exits_2(url: str) -> None:
    result = opsctl("apply", "policies/minimal.yaml", "--redis-url", url)

    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert "must start with redis://, rediss://, unix:// or redis+sentinel://" in line
    assert "s3cret" not in result.output


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://user:s3cret@127.0.0.1:99999/0", "the port is not between 1 and 65535"),
        ("redis://:s3cret@127.0.0.1:0/0", "the port is not between 1 and 65535"),
        ("redis+sentinel://:s3cret@s1:99999/main", "the port is not between 1 and 65535"),
        # redis-py would read an empty port as its default, 6379. The hosts here
        # can never be reached, so a regression cannot reach any server either.
        ("redis://:s3cret@nonexistent.invalid:/0", "the port after ':' is empty"),
        ("redis://:s3cret@[2001:db8::1]:/0", "the port after ':' is empty"),
        ("redis://:s3cret@[2001:db8::1:6380/0", "the IPv6 address has no closing ']'"),
    ],
)
def test_a_port_out_of_range_or_missing_is_named_as_the_problem(url: str, reason: str) -> None:
    result = opsctl("status", "--redis-url", url, "--timeout", "2")

    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert reason in line
    assert "s3cret" not in result.output


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        (
            "ssl_cert_reqs=none",
            "its option 'ssl_cert_reqs' is not one a redis:// connection takes "
            "(TLS options need a rediss:// URL)",
        ),
        ("colour=blue", "its option 'colour' is not one a redis:// connection takes"),
    ],
)
def test_a_url_option_the_connection_does_not_take_is_named(
    closed_url: str, query: str, reason: str
) -> None:
    result = opsctl("status", "--redis-url", f"{closed_url}?{query}")

    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.endswith(f"is not valid: {reason}")


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        # redis-py would take any word but a "no" for true.
        ("socket_keepalive=maybe", "socket_keepalive is not true or false"),
        ("ssl_validate_ocsp=sure", "ssl_validate_ocsp is not true or false"),
        # A URL's options would beat opsctl's own settings: how it reads Redis's bytes,
        ("encoding=utf-16", "opsctl sets encoding itself (it writes and reads text as UTF-8)"),
        ("decode_responses=yes", "opsctl sets decode_responses itself (it reads replies as bytes)"),
        # how it checks a TLS server (the certificate unchecked, in silence),
        ("ssl_cert_reqs=none", "opsctl sets ssl_cert_reqs itself (from --tls-verify or redis.tls"),
        ("ssl_check_hostname=false", "opsctl sets ssl_check_hostname itself (from --tls-verify"),
        ("ssl_ca_certs=/tmp/ca.pem", "opsctl sets ssl_ca_certs itself (from --tls-ca-cert or"),
        # and how long it waits, which --timeout bounds.
        ("socket_timeout=600", "opsctl sets socket_timeout itself (from --timeout)"),
        ("retry_on_timeout=true", "opsctl sets retry_on_timeout itself ("),
        ("client_name=a%20b", "opsctl sets client_name itself (it names its connection opsctl-"),
        # Numbers out of range: redis-py reads them, then fails as if the server had.
        ("health_check_interval=-5", "health_check_interval must be a number, 0 or more"),
        ("socket_read_size=0", "socket_read_size must be a number, 1 or more"),
        ("max_connections=0", "max_connections must be a number, 1 or more"),
        # A TLS version by name: redis-py takes only its number, and says only "invalid".
        ("ssl_min_version=TLSv1_2", "ssl_min_version takes a TLS version's number: 771 for"),
    ],
)
def test_a_url_option_opsctl_would_misread_or_not_keep_is_refused_in_both_places(
    closed_url: str, tmp_path: Path, query: str, reason: str
) -> None:
    url = f"{closed_url.replace('redis://', 'rediss://')}?{query}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"version: 1\nredis:\n  url: '{url}'\nqueues:\n  - name: a\n")
    other = tmp_path / "other.yaml"
    other.write_text("version: 1\nqueues:\n  - name: a\n")

    checked = opsctl("validate", str(policy), str(other))
    applied = opsctl("apply", str(policy), "--best-effort")

    assert checked.exit_code == 2, checked.output
    [line] = checked.stdout.splitlines()
    assert line.startswith(f"{policy}:3:8: redis.url: the URL: {reason}")
    assert checked.stderr == f"{other}: ok\n"  # the next file is still checked
    assert applied.exit_code == 2, applied.output
    assert reason in applied.stderr


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("retry=x", "retry is an option opsctl does not take in a URL (it takes db, "),
        ("cache_config=x", "one of its options has a value the connection cannot use"),
        ("username=default", "gives a user twice, before the host and as ?username=: give it once"),
        (
            "password=other",
            "gives a password twice, before the host and as ?password=: give it once",
        ),
    ],
)
def test_a_url_option_that_would_change_the_connection_unseen_is_refused(
    closed_url: str, tmp_path: Path, query: str, said: str
) -> None:
    url = closed_url.replace("redis://", "redis://app:s3cret@") + f"?{query}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"version: 1\nredis:\n  url: '{url}'\nqueues:\n  - name: a\n")

    checked = opsctl("validate", str(policy))
    shown = opsctl("status", "--redis-url", url)

    assert checked.exit_code == 2 and said in checked.stdout, checked.output
    assert shown.exit_code == 2 and said in shown.stderr, shown.output
    assert "s3cret" not in checked.output + shown.output


def test_max_age_in_words_exits_2_with_the_accepted_forms(closed_url: str) -> None:
    result = opsctl(
        "apply", "policies/minimal.yaml", "--redis-url", closed_url, "--max-age", "10 minutes"
    )

    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        "opsctl: error: --max-age: '10 minutes' is not a duration (use 90s, 10m, 2h or 1d)"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Digits of other scripts pass str.isdigit(): a full-width zero was taken for 0.
        (("apply", "policies/minimal.yaml", "--max-age", "\uff10"), "is not a duration"),
        (("apply", "policies/minimal.yaml", "--max-age", "٣"), "is not a duration"),
        (
            ("apply", "policies/minimal.yaml", "--max-age", "99999999999d"),
            "has 11 digits before its unit; at most 9 are allowed",
        ),
        (("watch", "policies/minimal.yaml", "--every", "999999999d"), "at most 7d"),
        # An empty queue name matches nothing: the run would quietly do nothing.
        (("apply", "policies/minimal.yaml", "--queue", ""), "an empty name matches no queue"),
        (("plan", "policies/minimal.yaml", "-o", "p.json", "--queue", " "), "an empty name"),
        # An empty id would filter nothing out: requeue would undo every run.
        (("requeue", "--run", ""), "an empty id names nothing"),
        (("history", "--run", ""), "an empty id names nothing"),
        (("history", "--job", " "), "an empty id names nothing"),
        (("status", "--metrics-file", ""), "give a file path"),
        (("status", "--metrics-file", "."), "is a directory"),
        (("status", "--key-prefix", "rq:*"), "is not a key prefix"),
        (("requeue", "--run", "r1", "--key-prefix", ""), "is not a key prefix"),
        (("explain", "job-1", "--key-prefix", "a b"), "is not a key prefix"),
        (("status", "--timeout", "-1"), "-1.0 is not a number of seconds above 0"),
        (("status", "--timeout", "0"), "0.0 is not a number of seconds above 0"),
        (("status", "--timeout", "1e10"), "1e+10 seconds is longer than the most allowed, 86400"),
        (("apply", "policies/minimal.yaml", "--stop-timeout", "1e10"), "the most allowed, 86400"),
        (
            ("apply", "policies/minimal.yaml", "--stop-timeout", "0"),
            "0.0 is not a number of seconds above 0",
        ),
        (("apply", "policies/minimal.yaml", "--lock-timeout", "1e300"), "the most allowed"),
    ],
)
def test_options_no_run_could_use_are_refused_before_anything_happens(
    closed_url: str, args: tuple[str, ...], message: str
) -> None:
    result = opsctl(*args, "--redis-url", closed_url)

    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "cannot reach Redis" not in result.output  # refused before connecting


@pytest.mark.parametrize("blank", ["", " ", "\t"])
@pytest.mark.parametrize(
    "command",
    [("apply", "policies/minimal.yaml"), ("plan", "policies/minimal.yaml", "-o", "p.json")],
)
def test_a_blank_queue_variable_is_refused_rather_than_read_as_every_queue(
    closed_url: str, blank: str, command: tuple[str, ...]
) -> None:
    # A deploy script's OPSCTL_QUEUE="$QUEUES" with QUEUES unset must not widen the
    # run to every queue the policy covers.
    result = opsctl(*command, "--redis-url", closed_url, env={"OPSCTL_QUEUE": blank})

    assert result.exit_code == 2, result.output
    assert "OPSCTL_QUEUE is set but names no queue" in result.output
    assert "cannot reach Redis" not in result.output  # refused before connecting


@pytest.mark.parametrize("blank", ["", " "])
@pytest.mark.parametrize(
    ("variable", "command"),
    [
        ("OPSCTL_DRY_RUN", ("apply", "policies/minimal.yaml")),
        ("OPSCTL_DRY_RUN", ("requeue", "--run", "0123456789ab")),
        ("OPSCTL_FORCE", ("apply", "policies/minimal.yaml")),
        ("OPSCTL_BEST_EFFORT", ("apply", "policies/minimal.yaml")),
        ("OPSCTL_PLAN", ("apply", "policies/minimal.yaml")),
        ("OPSCTL_MAX_ACTIONS", ("apply", "policies/minimal.yaml")),
        ("OPSCTL_MAX_AGE", ("apply", "policies/minimal.yaml")),
        ("OPSCTL_MAX_PLAN_AGE", ("apply", "policies/minimal.yaml")),
        ("OPSCTL_METRICS_FILE", ("apply", "policies/minimal.yaml")),
        ("OPSCTL_FORMAT", ("apply", "policies/minimal.yaml")),
        ("OPSCTL_EVERY", ("watch", "policies/minimal.yaml")),
        ("OPSCTL_RUN", ("history",)),
        ("OPSCTL_OUTPUT", ("plan", "policies/minimal.yaml")),
    ],
)
def test_a_blank_variable_is_refused_rather_than_read_as_not_given(
    closed_url: str, blank: str, variable: str, command: tuple[str, ...]
) -> None:
    # OPSCTL_DRY_RUN="$PREVIEW" with PREVIEW unset must not make a preview a real run,
    # nor OPSCTL_PLAN="$PLAN" a reviewed run one of every job, nor OPSCTL_MAX_ACTIONS=
    # "$CAP" a capped run an uncapped one.
    result = opsctl(*command, "--redis-url", closed_url, env={variable: blank})

    assert result.exit_code == 2, result.output
    assert "cannot reach Redis" not in result.output  # refused before connecting
    if blank == "" or "DRY_RUN" in variable or "FORCE" in variable or "EFFORT" in variable:
        assert f"{variable} is set but empty (is a variable unset?)" in result.output
    else:  # a space is a value, and one a number or a choice cannot be
        assert variable in result.output


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"OPSCTL_MAX_AGE": "5x"}, (), "OPSCTL_MAX_AGE: '5x' is not a duration"),
        ({"OPSCTL_MAX_AGE": "0"}, (), "OPSCTL_MAX_AGE: '0' is zero"),
        ({"OPSCTL_MAX_AGE": "5x"}, ("--max-age", "7x"), "--max-age: '7x' is not a duration"),
        ({}, ("--max-age", "7x"), "--max-age: '7x' is not a duration"),
    ],
)
def test_a_bad_duration_is_named_where_it_was_given(
    closed_url: str, env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    # A deploy script that sets OPSCTL_MAX_AGE passes no --max-age: an error naming
    # the option would send its reader looking for one.
    command = ("apply", "policies/minimal.yaml", *args, "--redis-url", closed_url)

    result = opsctl(*command, env=env)

    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "cannot reach Redis" not in result.output  # refused before connecting


def test_a_bad_watch_interval_from_the_environment_names_its_variable(closed_url: str) -> None:
    result = opsctl(
        "watch", "policies/minimal.yaml", "--redis-url", closed_url, env={"OPSCTL_EVERY": "0s"}
    )

    assert result.exit_code == 2, result.output
    assert "OPSCTL_EVERY: '0s' must be longer than 0s" in result.output


@pytest.mark.parametrize(
    ("variable", "option"),
    [("OPSCTL_DRY_RUN", ("--dry-run",)), ("OPSCTL_MAX_ACTIONS", ("--max-actions", "5"))],
)
def test_a_blank_variable_gives_way_to_the_option_on_the_command_line(
    closed_url: str, variable: str, option: tuple[str, ...]
) -> None:
    result = opsctl(
        "apply", "policies/minimal.yaml", *option, "--redis-url", closed_url, "--timeout", "1",
        env={variable: ""},
    )  # fmt: skip

    assert result.exit_code == 3, result.output  # it went on, to the closed port
    assert "cannot reach Redis" in result.output


def test_unknown_option_is_a_usage_error_not_a_crash() -> None:
    result = opsctl("apply", "policies/minimal.yaml", "--max-agee", "10m")

    assert result.exit_code == 2, result.output
    assert "No such option" in result.output


# --- schema, version, help ------------------------------------------------------------------


def test_schema_prints_the_policy_schema_as_json() -> None:
    result = opsctl("schema")

    assert result.exit_code == 0, result.output
    on_disk = json.loads((REPOSITORY / "schemas" / "policy.schema.json").read_text())
    assert json.loads(result.stdout) == on_disk


def test_version_option_prints_the_version() -> None:
    result = opsctl("--version")

    assert result.exit_code == 0, result.output
    assert result.stdout == f"opsctl {__version__}\n"


def test_python_m_opsctl_help_lists_the_commands() -> None:
    process = python_m_opsctl("--help")

    assert process.returncode == 0, process.stderr
    for command in ("apply", "validate", "status", "schema"):
        assert re.search(rf"^\s*│?\s*{command}\b", process.stdout, re.MULTILINE), process.stdout


def test_python_m_opsctl_maps_errors_to_exit_codes_in_a_real_process() -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"

    invalid = python_m_opsctl("apply", "policies/bad_duration.yaml", "--redis-url", closed)
    unreachable = python_m_opsctl("apply", "policies/minimal.yaml", "--redis-url", closed)
    unset = python_m_opsctl("apply", "policies/example.yaml")

    assert (invalid.returncode, invalid.stderr) == (2, f"opsctl: error: {BAD_DURATION}\n")
    assert unreachable.returncode == 3, unreachable.stderr
    assert len(unreachable.stderr.splitlines()) == 1, unreachable.stderr
    assert unset.returncode == 2, unset.stderr
    assert "'REDIS_URL' is not set" in unset.stderr


@pytest.mark.parametrize("zero", ["0", "0s", "00h"])
def test_a_zero_max_age_option_is_refused_before_redis_is_contacted(zero: str) -> None:
    result = opsctl(
        "apply", "policies/minimal.yaml", "--max-age", zero, "--redis-url", "redis://127.0.0.1:1/0"
    )

    assert result.exit_code == 2, result.output
    assert f"--max-age: {zero!r} is zero: every job a live worker runs" in result.output
    assert "(or --force to act on every started job)" in result.output


#: Takes stop signals as apply does, then is signalled twice; a thread blocked
#: for good (as on a server that does not answer) must not hold the exit up.
TWO_SIGNALS = """
import os, sys, threading, time
from opsctl.cli import _stop_on_signals
signum = int(sys.argv[1])
threading.Thread(target=time.sleep, args=(600,)).start()
with _stop_on_signals() as received:
    os.kill(os.getpid(), signum)  # the first asks for a stop between changes
    print(received == [signum], flush=True)
    os.kill(os.getpid(), signum)  # the second stops it at once
    time.sleep(60)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_stop_signal_ends_apply_at_once_with_that_signals_exit_code(
    signum: signal.Signals,
) -> None:
    env = {**clean_env(), "PYTHONPATH": str(REPOSITORY / "src")}
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", TWO_SIGNALS, str(int(signum))],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip

    assert result.returncode == 128 + signum, result.stderr
    assert result.stdout == "True\n"
    assert f"signal={int(signum)} stopping at once" in result.stderr
    assert time.monotonic() - began < 30  # neither the sleep nor the blocked thread


def test_a_ctrl_c_while_opsctl_loads_exits_130_without_a_traceback() -> None:
    # The signal comes as the CLI's modules begin to load, before opsctl
    # handles signals itself, as the `opsctl` command starts it.
    start = (
        "import builtins, os, signal\n"
        # As from a terminal: a process started in the background inherits SIGINT ignored.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "load = builtins.__import__\n"
        "def interrupted(name, *args, **kwargs):\n"
        "    if name == 'opsctl.cli':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return load(name, *args, **kwargs)\n"
        "builtins.__import__ = interrupted\n"
        "from opsctl.__main__ import run\n"
        "run()\n"
    )
    env = {**clean_env(), "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    result = subprocess.run(
        [sys.executable, "-c", start, "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )

    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_a_ctrl_c_while_a_read_only_command_waits_for_redis_exits_130() -> None:
    # A server that accepts the connection but never answers: `status` waits on it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        waiting = subprocess.Popen(
            [sys.executable, "-m", "opsctl", "status", "--redis-url", url, "--timeout", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**clean_env(), "PYTHONPATH": str(REPOSITORY / "src")},
        )
        time.sleep(3)  # loaded, connected, and waiting for the first answer
        waiting.send_signal(signal.SIGINT)
        out, err = waiting.communicate(timeout=30)

    assert waiting.returncode == 130, err
    assert "Traceback" not in err
    assert "Aborted" not in err
    assert out == ""


#: URLs whose '@HOST' was left out: USER:PASSWORD then reads as HOST:PORT.
_HOSTLESS = [
    "redis://opsctl-apply:Hunter2pw/0",
    "redis://opsctl-apply:123456789/0",
    "redis://[::1]:Hunter2pw/0",
    "redis://[::1]Hunter2pw/0",
    "redis://:Hunter2pw",
    "rediss://default:Hunter2pw",
    "redis+sentinel://default:Hunter2pw/mymaster",
    "unix://:Hunter2pw",
]


@pytest.mark.parametrize("url", _HOSTLESS)
@pytest.mark.parametrize("given", ["option", "environment", "policy"])
def test_a_password_whose_host_was_left_out_is_never_shown(
    url: str, given: str, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    if given == "option":
        result = opsctl("status", "--redis-url", url, "--timeout", "1")
    elif given == "environment":
        policy.write_text("version: 1\nqueues:\n  - name: a\n")
        result = opsctl("apply", str(policy), "--dry-run", env={"OPSCTL_REDIS_URL": url})
    else:
        policy.write_text("version: 1\nredis:\n  url: ${MYURL}\nqueues:\n  - name: a\n")
        result = opsctl("validate", str(policy), env={"MYURL": url})

    assert result.exit_code == 2, result.output
    assert "Hunter2pw" not in result.output and "123456789" not in result.output
    if given == "policy":
        assert "redis.url: the value from ${MYURL}: " in result.stdout
    else:
        masked = url.replace("Hunter2pw", "***").replace("123456789", "***")
        assert result.stderr.startswith(f"opsctl: error: Redis URL {masked!r}: "), result.stderr


def test_a_unix_url_whose_path_does_not_follow_the_slashes_is_refused() -> None:
    # redis-py would read unix://run/redis.sock as the socket /redis.sock.
    result = opsctl("status", "--redis-url", "unix://run/redis.sock", "--timeout", "1")

    assert result.exit_code == 2, result.output
    assert "the socket path must follow '//' and start with '/'" in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "unix:///run/redis@main/no.sock",
        "unix:///run/a@/no.sock",
        "unix:///run/no.sock?password=p@ss",
        "unix://:pw@/no.sock",
    ],
)
def test_a_unix_url_with_an_at_sign_in_its_path_or_options_is_taken_as_written(
    url: str, tmp_path: Path
) -> None:
    given = url.replace("/run", str(tmp_path))
    result = opsctl("status", "--redis-url", given, "--timeout", "1")

    assert result.exit_code == 3, result.output  # read as written: a socket that is not there
    assert "No such file or directory" in result.stderr
    shown = given.replace(":pw@", ":***@").replace("=p@ss", "=***")  # passwords masked
    assert f"cannot reach Redis at {shown}:" in result.stderr


@pytest.mark.parametrize("valid", [True, False])
def test_validate_shows_a_file_name_with_control_characters_escaped_on_one_line(
    tmp_path: Path, valid: bool
) -> None:
    # A file name may hold an escape sequence or a newline: it must not colour the
    # terminal, nor split a FILE:LINE:COL line in a CI log.
    path = tmp_path / "evil\x1b[31mred\n.yaml"
    path.write_text("version: 1\nqueues:\n  - name: a\n" if valid else "version: 2\n")

    result = opsctl("validate", str(path))

    shown = str(path).replace("\x1b", "\\x1b").replace("\n", "\\n")
    assert "\x1b" not in result.output
    if valid:
        assert result.stderr == f"{shown}: ok\n"
    else:
        lines = result.stdout.splitlines()
        assert lines and all(line.startswith(f"{shown}:1:") for line in lines), lines


def test_errors_quoting_a_file_name_show_a_byte_that_is_not_utf8_as_hex(
    tmp_path: Path, closed_url: str
) -> None:
    # Python keeps such a byte of a command-line argument as a lone surrogate; an
    # error that quotes the name must show the byte itself, as every report does.
    directory = tmp_path / os.fsdecode(b"metrics\xfe")
    directory.mkdir()
    plan = tmp_path / os.fsdecode(b"plan\xff.json")  # not there

    as_metrics = opsctl("status", "--redis-url", closed_url, "--metrics-file", str(directory))
    as_plan = opsctl("apply", "--plan", str(plan), "--redis-url", closed_url)

    assert as_metrics.exit_code == 2, as_metrics.output
    assert f"'{tmp_path}/metrics\\xfe' is a directory" in as_metrics.output
    assert as_plan.exit_code == 2, as_plan.output
    assert f"cannot read plan '{tmp_path}/plan\\xff.json': " in as_plan.output
    assert "\\udc" not in as_metrics.output + as_plan.output


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"plan\xff.json", r"'plan\xff.json'"),
        (b"\xfe\xff", r"'\xfe\xff'"),
        # Text that only looks like an escape stays as written (its backslash doubled).
        (b"a\\udc80", r"'a\\udc80'"),
        (b"a\\\xff", r"'a\\\xff'"),
        (b"it's\n", '"it\'s\\n"'),
    ],
)
def test_a_quoted_file_name_shows_each_byte_as_the_name_holds_it(raw: bytes, shown: str) -> None:
    assert quoted(os.fsdecode(raw)) == shown


def test_plan_without_an_output_file_says_where_to_give_one(closed_url: str) -> None:
    result = opsctl("plan", "policies/minimal.yaml", "--redis-url", closed_url)

    assert result.exit_code == 2, result.output
    assert "give --output FILE (or OPSCTL_OUTPUT): where to write the plan" in result.output


def test_watch_refuses_at_start_a_metrics_file_in_a_directory_it_cannot_write(
    closed_url: str, tmp_path: Path
) -> None:
    # A loop that could never write its metrics would run for ever with none.
    target = tmp_path / "missing" / "opsctl.prom"

    result = opsctl(
        "watch", "policies/minimal.yaml", "--redis-url", closed_url, "--metrics-file", str(target)
    )

    assert result.exit_code == 2, result.output
    assert "cannot write a file in" in result.output
    assert "No such file or directory" in result.output
    assert "cannot reach Redis" not in result.output  # refused before connecting


def test_watch_that_cannot_start_on_its_policy_says_so_in_its_metrics(
    closed_url: str, tmp_path: Path
) -> None:
    # A sidecar restarted on a broken policy: an alert on the refused file keeps firing.
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nqueues: [\n")
    target = tmp_path / "opsctl.prom"

    result = opsctl("watch", str(policy), "--redis-url", closed_url, "--metrics-file", str(target))

    assert result.exit_code == 2, result.output
    written = target.read_text()
    assert 'opsctl_last_run_exit_code{command="watch"} 2.0' in written
    assert 'opsctl_policy_file_rejected{command="watch"} 1.0' in written


def test_options_refused_with_a_plan_are_named_as_they_were_given(
    closed_url: str, tmp_path: Path
) -> None:
    # A shared env file sets OPSCTL_MAX_ACTIONS: the message must not send its reader
    # looking for a --max-actions the command line never gave.
    plan = tmp_path / "plan.json"
    plan.write_text("{}")

    with_plan = opsctl(
        "apply", "--plan", str(plan), "--redis-url", closed_url,
        env={"OPSCTL_MAX_ACTIONS": "200"},
    )  # fmt: skip
    without = opsctl(
        "apply", "policies/minimal.yaml", "--redis-url", closed_url,
        env={"OPSCTL_MAX_PLAN_AGE": "30m"},
    )  # fmt: skip

    assert (with_plan.exit_code, without.exit_code) == (2, 2), with_plan.output + without.output
    assert "OPSCTL_MAX_ACTIONS cannot be used with --plan" in with_plan.output
    assert "OPSCTL_MAX_PLAN_AGE applies only with --plan" in without.output


@pytest.mark.parametrize(
    "args",
    [
        ("--redis-url", "notaurl"),
        ("--tls-ca-cert", "/nonexistent/ca.pem"),
        ("--every", "bogus"),
    ],
    ids=["malformed-url", "tls-without-rediss", "bad-interval"],
)
def test_watch_refuses_at_start_what_every_round_would_refuse_and_says_so_in_its_metrics(
    closed_url: str, tmp_path: Path, args: tuple[str, ...]
) -> None:
    target = tmp_path / "opsctl.prom"
    command = ["watch", "policies/minimal.yaml", "--metrics-file", str(target), *args]
    if "--redis-url" not in args:
        command += ["--redis-url", closed_url]

    result = opsctl(*command)

    assert result.exit_code == 2, result.output
    written = target.read_text()
    assert 'opsctl_last_run_exit_code{command="watch"} 2.0' in written
    # Nothing is known of the policy file: no series says it is fine, or refused.
    assert "opsctl_policy_file_rejected{" not in written
