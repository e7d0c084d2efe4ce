"""OPSCTL_* environment variables and their precedence, JSON log lines, colour, shell
completion and what a stop signal says, mostly through the real CLI in a subprocess
against fakeredis servers."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import typer

from conftest import clean_env, run_opsctl, serve_fake_redis
from opsctl import cli
from test_cli_fake import started_job, status_of

ANSI = re.compile(r"\x1b\[")

POLICY = """\
version: 1
{redis}
queues:
  - name: "*"
    action: fail
"""


@pytest.fixture
def two_servers() -> Iterator[tuple[str, str]]:
    """Two fakeredis servers; each holds one queue named after it ("first", "second")."""
    with serve_fake_redis() as first, serve_fake_redis() as second:
        for url, name in ((first, "first"), (second, "second")):
            conn = redis.Redis.from_url(url)
            conn.sadd("rq:queues", f"rq:queue:{name}")
            conn.rpush(f"rq:queue:{name}", "some-job")
            conn.close()
        yield first, second


def _opsctl(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    result = run_opsctl(*args, env={**clean_env(), **env})
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _queues_seen(*args: str, **env: str) -> list[str]:
    """The queue names `opsctl status --format json` reports with these settings."""
    result = _opsctl("status", "--format", "json", *args, **env)
    assert result.returncode == 0, result.stderr
    return [queue["name"] for queue in json.loads(result.stdout)["queues"]]


def _write(tmp_path: Path, redis_section: str = "") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(redis=redis_section))
    return path


# --- environment variables ------------------------------------------------------------------


def test_opsctl_redis_url_is_used_when_no_flag_is_given(two_servers: tuple[str, str]) -> None:
    first, _ = two_servers

    assert _queues_seen(OPSCTL_REDIS_URL=first) == ["first"]


def test_flag_beats_opsctl_redis_url_which_beats_redis_url(two_servers: tuple[str, str]) -> None:
    first, second = two_servers

    assert _queues_seen("--redis-url", first, OPSCTL_REDIS_URL=second) == ["first"]
    assert _queues_seen(OPSCTL_REDIS_URL=second, REDIS_URL=first) == ["second"]
    assert _queues_seen(REDIS_URL=first) == ["first"]


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (["--redis-url", ""], {}, "the URL is empty (is a variable unset?)"),
        ([], {"OPSCTL_REDIS_URL": ""}, "OPSCTL_REDIS_URL is set but empty (is a variable unset?)"),
        (["--sentinel", ""], {}, "an empty sentinel address (is a variable unset?)"),
        ([], {"OPSCTL_SENTINEL": " "}, "OPSCTL_SENTINEL is set but names no sentinel"),
    ],
)
def test_an_empty_url_is_refused_rather_than_read_as_no_url(
    two_servers: tuple[str, str], tmp_path: Path, args: list[str], env: dict[str, str], said: str
) -> None:
    # Read as "not given", it would send the run to the policy's URL or $REDIS_URL.
    first, _ = two_servers
    policy = str(_write(tmp_path, "redis:\n  url: ${POLICY_URL}"))
    urls = {"POLICY_URL": first, "REDIS_URL": first}

    applied = _opsctl("apply", policy, "--dry-run", *args, **urls, **env)
    shown = _opsctl("status", *args, **urls, **env)

    for result in (applied, shown):
        assert result.returncode == 2, result.stdout
        assert said in result.stderr
        assert result.stdout == ""


@pytest.mark.parametrize("sources", ["env+policy+redis_url", "policy+redis_url", "redis_url"])
def test_apply_takes_the_url_from_the_first_source_that_gives_one(
    two_servers: tuple[str, str], tmp_path: Path, sources: str
) -> None:
    first, second = two_servers
    env = {"REDIS_URL": second, "POLICY_URL": first}
    if sources.startswith("env"):
        env["OPSCTL_REDIS_URL"] = second
        env["POLICY_URL"] = first
    section = "redis:\n  url: ${POLICY_URL}" if "policy" in sources else ""
    expected = {"env+policy+redis_url": second, "policy+redis_url": first, "redis_url": second}

    result = _opsctl("apply", str(_write(tmp_path, section)), "--format", "json", **env)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["redis"] == expected[sources]


def test_opsctl_format_and_dry_run_variables_act_like_their_flags(tmp_path: Path) -> None:
    with serve_fake_redis() as url:
        conn = redis.Redis.from_url(url)
        job = started_job(conn, "gone-worker")
        policy = str(_write(tmp_path))

        planned = _opsctl(
            "apply", policy, OPSCTL_REDIS_URL=url, OPSCTL_FORMAT="json", OPSCTL_DRY_RUN="true"
        )
        status_after_plan = status_of(conn, job.id)
        done = _opsctl("apply", policy, OPSCTL_REDIS_URL=url, OPSCTL_FORMAT="json")

        assert planned.returncode == 0, planned.stderr
        assert json.loads(planned.stdout)["dry_run"] is True
        assert status_after_plan == "started"
        assert done.returncode == 0, done.stderr
        assert status_of(conn, job.id) == "failed"
        conn.close()


def test_a_bad_value_in_a_variable_is_a_usage_error_naming_the_variable() -> None:
    result = _opsctl("status", OPSCTL_FORMAT="yaml", OPSCTL_REDIS_URL="redis://127.0.0.1:1/0")

    assert result.returncode == 2
    assert "yaml" in result.stderr


@pytest.mark.parametrize("command", ["apply", "plan", "status", "history", "validate"])
def test_help_names_the_variable_of_every_option(command: str) -> None:
    result = _opsctl(command, "--help", COLUMNS="200")

    listed = result.stdout.split("Options:", 1)[1]
    options = re.findall(r"^  (?:-\w, )?(--[a-z-]+)", listed, flags=re.MULTILINE)
    assert options, result.stdout
    for option in set(options) - {"--help"}:
        variable = "OPSCTL_" + option[2:].replace("-", "_").upper()
        assert variable in result.stdout, (option, result.stdout)


# --- logs -----------------------------------------------------------------------------------


#: A JSON report on stdout, and JSON log lines (with info) on stderr.
JSON_LOGGED = ("--format", "json", "-v", "--log-format", "json")


def test_json_logs_are_one_object_per_line_on_stderr_with_the_runs_fields(
    tmp_path: Path,
) -> None:
    with serve_fake_redis() as url:
        conn = redis.Redis.from_url(url)
        job = started_job(conn, "gone-worker")

        result = _opsctl("apply", str(_write(tmp_path)), "--redis-url", url, *JSON_LOGGED)
        conn.close()

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds the report alone
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines
    for line in lines:
        assert {"time", "level", "message"} <= line.keys()
        assert line.get("run_id") == report["run_id"], line  # from the first line on
    acted = [line for line in lines if line.get("job_id") == job.id]
    assert acted, lines
    assert acted[0]["queue"] == "default"
    assert acted[0]["action"] == "fail"
    assert acted[0]["outcome"] == "done"
    assert acted[0]["run_id"] == report["run_id"]


def test_json_logs_of_a_plan_carried_out_name_the_plans_run(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    with serve_fake_redis() as url:
        conn = redis.Redis.from_url(url)
        started_job(conn, "gone-worker")
        made = _opsctl("plan", str(_write(tmp_path)), "--redis-url", url, "-o", str(plan))
        conn.close()
        result = _opsctl("apply", "--plan", str(plan), "--redis-url", url, *JSON_LOGGED)

    assert made.returncode == 0, made.stderr
    assert result.returncode == 0, result.stderr
    run_id = json.loads(result.stdout)["run_id"]  # a run of its own, not the plan's
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(line["message"].startswith("run started plan=") for line in lines), lines
    assert {line.get("run_id") for line in lines} == {run_id}, lines


def test_text_logs_need_v_and_q_silences_warnings(tmp_path: Path) -> None:
    with serve_fake_redis() as url:
        policy = str(_write(tmp_path))
        quiet = _opsctl("apply", policy, "--redis-url", url, "--dry-run")
        verbose = _opsctl("apply", policy, "--redis-url", url, "--dry-run", "-v")
        silent = _opsctl("status", "--redis-url", url, "--tls-verify", "none", "-q")

    assert quiet.stderr == ""
    assert " INFO opsctl " in verbose.stderr
    assert silent.returncode == 2  # TLS options refused on redis://, said once, no warning
    assert len(silent.stderr.splitlines()) == 1


# --- colour ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "coloured"),
    [
        ({}, False),
        ({"FORCE_COLOR": "1"}, True),
        ({"NO_COLOR": "1"}, False),
        ({"NO_COLOR": "1", "FORCE_COLOR": "1"}, False),
    ],
)
def test_colour_only_when_forced_and_never_with_no_color(
    tmp_path: Path, env: dict[str, str], coloured: bool
) -> None:
    with serve_fake_redis() as url:
        conn = redis.Redis.from_url(url)
        started_job(conn, "gone-worker")
        conn.close()

        result = _opsctl("apply", str(_write(tmp_path)), "--redis-url", url, "--dry-run", **env)

    assert result.returncode == 0, result.stderr
    assert "abandoned" in result.stdout
    assert bool(ANSI.search(result.stdout)) is coloured
    assert not ANSI.search(result.stderr)


# --- shell completion -----------------------------------------------------------------------

# opsctl detects the shell it runs under; typer's own switch turns that off so that the
# shell can be named, whichever shell runs the suite.
NAMED_SHELL = {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}


@pytest.mark.parametrize(
    ("shell", "marker"),
    [
        ("bash", "complete -o default -F _opsctl_completion opsctl"),
        ("zsh", "compdef _opsctl_completion opsctl"),
        ("fish", "complete --command opsctl"),
        ("powershell", "Register-ArgumentCompleter"),
    ],
)
def test_show_completion_prints_a_script_for_each_shell(shell: str, marker: str) -> None:
    result = _opsctl("--show-completion", shell, **NAMED_SHELL)

    assert result.returncode == 0, result.stderr
    assert marker in result.stdout
    assert "_OPSCTL_COMPLETE" in result.stdout


def test_completion_completes_commands_and_options() -> None:
    commands = _opsctl(_OPSCTL_COMPLETE="complete_bash", COMP_WORDS="opsctl ap", COMP_CWORD="1")
    options = _opsctl(
        _OPSCTL_COMPLETE="complete_bash", COMP_WORDS="opsctl apply --tls-v", COMP_CWORD="2"
    )

    assert commands.stdout.split() == ["apply"]
    assert options.stdout.split() == ["--tls-verify"]


def test_install_completion_writes_the_script_into_the_users_shell_setup(
    tmp_path: Path,
) -> None:
    result = _opsctl("--install-completion", "bash", HOME=str(tmp_path), **NAMED_SHELL)

    assert result.returncode == 0, result.stderr
    bashrc = (tmp_path / ".bashrc").read_text()
    assert "opsctl" in bashrc
    scripts = list((tmp_path / ".bash_completions").glob("opsctl*"))
    assert scripts and "_OPSCTL_COMPLETE" in scripts[0].read_text()


def test_with_json_logs_errors_and_notes_on_stderr_are_json_lines_too(tmp_path: Path) -> None:
    missing = tmp_path / "no-server.sock"  # nothing listens here: opsctl cannot connect
    policy = str(_write(tmp_path))

    failed = _opsctl(
        "apply",
        policy,
        "--redis-url",
        f"unix://{missing}",
        "--log-format",
        "json",
        "--best-effort",
    )
    with serve_fake_redis() as url:
        planned = _opsctl(
            "plan",
            policy,
            "--redis-url",
            url,
            "-o",
            str(tmp_path / "plan.json"),
            "--log-format",
            "json",
        )

    assert failed.returncode == 0  # --best-effort
    lines = [json.loads(line) for line in failed.stderr.splitlines()]
    assert [line["level"] for line in lines] == ["error", "warning"]
    assert "cannot reach Redis" in lines[0]["message"]
    assert planned.returncode == 0, planned.stderr
    notes = [json.loads(line) for line in planned.stderr.splitlines()]
    assert any("wrote 0 planned action(s)" in note["message"] for note in notes), notes


@pytest.mark.parametrize(
    ("reported", "left", "said"),
    [
        (True, True, "what was done is in the report; run again to finish"),
        (True, False, "what was done is in the report, and nothing was left undone"),
        (False, True, "nothing was done"),
    ],
)
def test_a_stop_signal_says_whether_a_run_again_has_anything_to_finish(
    capsys: pytest.CaptureFixture[str], reported: bool, left: bool, said: str
) -> None:
    with pytest.raises(typer.Exit) as stopped:
        cli._exit_if_signalled([15], reported=reported, left=left)

    assert stopped.value.exit_code == 143
    assert capsys.readouterr().err == f"opsctl: stopped by signal 15: {said}\n"
