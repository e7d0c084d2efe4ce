"""The recipes in examples/: every policy validates, every YAML and JSON file parses, the
dashboard charts only opsctl's metrics, the Dockerfile and the shell hook pass their linters,
the systemd units pass systemd-analyze, and the deploy hook runs against a real Redis."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
import yaml

from conftest import clean_env, opsctl_env, run_opsctl, wait_until
from opsctl.errors import ExitCode
from test_cli_fake import started_job, status_of

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent

SCHEMA_COMMENT = re.compile(r"# yaml-language-server: \$schema=(\S+)\n")

#: The metrics opsctl watch writes, all gauges; the dashboard may chart these and no other.
METRICS = {
    "opsctl_started_jobs",
    "opsctl_oldest_started_job_age_seconds",
    "opsctl_actions",
    "opsctl_run_duration_seconds",
    "opsctl_last_run_timestamp_seconds",
    "opsctl_last_run_exit_code",
    "opsctl_last_success_timestamp_seconds",
    "opsctl_problems",
    "opsctl_policy_file_rejected",
}

POLICY_FILES = sorted([*EXAMPLES.rglob("*.yaml"), *(ROOT / "policies").glob("*.yaml")])
POLICY_FILES = [
    p for p in POLICY_FILES if "queues:" in p.read_text() and "kind:" not in p.read_text()
]


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _validate(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**clean_env(), "REDIS_URL": "redis://redis.invalid:6379/0", **env}
    return run_opsctl("validate", "--strict-env", str(path), env=environment)


# --- policies -------------------------------------------------------------------------------


def test_examples_and_policies_hold_policy_files() -> None:
    assert EXAMPLES / "policy.yaml" in POLICY_FILES
    assert ROOT / "policies" / "prod.yaml" in POLICY_FILES


@pytest.mark.parametrize("path", POLICY_FILES, ids=_relative)
def test_policy_file_names_the_schema_on_its_first_line_and_validates(path: Path) -> None:
    match = SCHEMA_COMMENT.match(path.read_text())

    assert match, f"{_relative(path)} does not start with the yaml-language-server comment"
    schema = (path.parent / match[1]).resolve()
    assert schema == ROOT / "schemas" / "policy.schema.json"
    result = _validate(path, REDIS_PASSWORD="x")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", POLICY_FILES, ids=_relative)
def test_policy_file_as_it_stands_passes_the_schema_it_names(path: Path) -> None:
    # What an editor, or a CI step such as check-jsonschema, checks: ${VAR} unread.
    schema = json.loads((ROOT / "schemas" / "policy.schema.json").read_text())

    errors = list(
        jsonschema.Draft202012Validator(schema).iter_errors(yaml.safe_load(path.read_text()))
    )

    assert errors == [], [e.message for e in errors]


def test_policy_in_the_configmap_is_the_example_policy_and_validates(tmp_path: Path) -> None:
    configmap = yaml.safe_load((EXAMPLES / "kubernetes" / "configmap.yaml").read_text())
    embedded = configmap["data"]["policy.yaml"]

    assert embedded == (EXAMPLES / "policy.yaml").read_text()
    copy = tmp_path / "policy.yaml"
    copy.write_text(embedded)
    result = _validate(copy, REDIS_PASSWORD="x")
    assert result.returncode == 0, result.stdout + result.stderr


# --- YAML and JSON recipes ------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=_relative)
def test_yaml_recipe_parses(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]

    assert documents
    assert all(isinstance(d, dict) for d in documents)


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.json")), ids=_relative)
def test_json_recipe_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


def _kubernetes(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((EXAMPLES / "kubernetes" / name).read_text())
    return document


def _pod(document: dict[str, Any]) -> dict[str, Any]:
    spec = document["spec"]
    if document["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    pod: dict[str, Any] = spec["template"]["spec"]
    return pod


@pytest.mark.parametrize("name", ["cronjob.yaml", "watch-deployment.yaml"])
def test_kubernetes_workloads_mount_the_policy_and_read_the_password_from_the_secret(
    name: str,
) -> None:
    secret = _kubernetes("secret.yaml")
    pod = _pod(_kubernetes(name))
    opsctl = pod["containers"][0]

    policy_arg = next(a for a in opsctl["args"] if a.endswith("policy.yaml"))
    mounts = {m["name"]: m["mountPath"] for m in opsctl["volumeMounts"]}
    assert policy_arg == f"{mounts['policy']}/policy.yaml"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert (
        volumes["policy"]["configMap"]["name"] == _kubernetes("configmap.yaml")["metadata"]["name"]
    )
    env = {e["name"]: e for e in opsctl["env"]}
    reference = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert reference["name"] == secret["metadata"]["name"]
    assert reference["key"] in secret["stringData"]
    assert "${REDIS_PASSWORD" in (EXAMPLES / "policy.yaml").read_text()
    assert all(not n.startswith("OPSCTL_") or "value" in e for n, e in env.items())


def test_watch_deployment_runs_watch_every_60s_with_a_metrics_file_its_sidecar_reads() -> None:
    pod = _pod(_kubernetes("watch-deployment.yaml"))
    opsctl, exporter = pod["containers"]

    args = opsctl["args"]
    assert args[:2] == ["watch", "/etc/opsctl/policy.yaml"]
    assert args[args.index("--every") + 1] == "60s"
    metrics_file = Path(args[args.index("--metrics-file") + 1])
    exporter_mounts = {m["name"]: m["mountPath"] for m in exporter["volumeMounts"]}
    opsctl_mounts = {m["name"]: m["mountPath"] for m in opsctl["volumeMounts"]}
    assert str(metrics_file.parent) == opsctl_mounts["metrics"] == exporter_mounts["metrics"]
    assert f"--collector.textfile.directory={metrics_file.parent}" in exporter["args"]


def test_watch_deployment_command_runs_rounds_writes_metrics_and_stops_on_sigterm(
    fake_redis_url: str, tmp_path: Path
) -> None:
    # The container's own arguments, with the mounted paths pointed at this test's files.
    args = list(_pod(_kubernetes("watch-deployment.yaml"))["containers"][0]["args"])
    args[1] = str(EXAMPLES / "policy.yaml")
    args[args.index("--every") + 1] = "1s"
    metrics_file = tmp_path / "opsctl.prom"
    args[args.index("--metrics-file") + 1] = str(metrics_file)
    env = {**opsctl_env(), "OPSCTL_REDIS_URL": fake_redis_url}
    process = subprocess.Popen(
        [sys.executable, "-m", "opsctl", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        rounds = wait_until(
            lambda: (
                metrics_file.exists()
                and 'opsctl_last_run_exit_code{command="watch"} 0.0' in metrics_file.read_text()
            ),
            timeout=60,
        )
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert rounds, f"no successful round written to {metrics_file}"
    assert process.returncode == 0, stderr
    assert "opsctl_last_success_timestamp_seconds" in metrics_file.read_text()


# --- the Grafana dashboard ------------------------------------------------------------------


def _queries(node: Any) -> list[str]:
    """Every PromQL text in a dashboard: panel targets' expr and variables' queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if (key in ("expr", "definition") and isinstance(value, str)) or (
                key == "query" and isinstance(value, str) and "(" in value
            ):
                found.append(value)
            else:
                found += _queries(value)
    elif isinstance(node, list):
        for item in node:
            found += _queries(item)
    return found


def test_dashboard_queries_name_only_opsctls_metrics_and_chart_every_one() -> None:
    dashboard = json.loads((EXAMPLES / "grafana" / "opsctl-dashboard.json").read_text())

    queries = _queries(dashboard)
    named = {name for q in queries for name in re.findall(r"\b[a-z_:]+(?=\s*[{\[)]|\s*$)", q)}
    metrics = {name for name in named if name.startswith("opsctl_")}
    assert queries
    assert metrics == METRICS
    functions = named - metrics
    promql = {"time", "max", "sum", "label_values", "by", "queue", "state", "action", "outcome"}
    assert functions <= promql, functions - promql


def test_the_dashboards_stuck_jobs_are_the_reports_every_state_but_running() -> None:
    dashboard = json.loads((EXAMPLES / "grafana" / "opsctl-dashboard.json").read_text())

    [panel] = [p for p in dashboard["panels"] if p["title"] == "Stuck jobs now"]
    [query] = [t["expr"] for t in panel["targets"]]

    # Lost, stranded, orphaned and leftover jobs are stuck too, as the report counts them.
    assert 'state!="running"' in query
    assert "state=~" not in query


def test_dashboard_has_a_panel_per_metric_family_and_unique_ids() -> None:
    dashboard = json.loads((EXAMPLES / "grafana" / "opsctl-dashboard.json").read_text())

    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])


# --- the Dockerfile -------------------------------------------------------------------------


def _copy_sources(dockerfile: str) -> list[str]:
    sources = []
    for line in dockerfile.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += words[1:-1]
    return sources


def test_dockerfile_copies_only_what_exists_and_what_its_ignore_file_lets_through() -> None:
    dockerfile = (EXAMPLES / "Dockerfile").read_text()
    ignore = (EXAMPLES / "Dockerfile.dockerignore").read_text().splitlines()

    sources = _copy_sources(dockerfile)
    assert "src" in sources and "pyproject.toml" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert f"!{source.rstrip('/')}" in [i.rstrip("/") for i in ignore], source
    # Everything the package build reads: hatchling's readme, the schemas it bundles.
    assert {"README.md", "schemas", "src"} <= set(sources)


def checked_by(linter: str, example: str) -> subprocess.CompletedProcess[str]:
    """``linter`` (installed by ``make venv``) run over one example; skipped without it."""
    found = shutil.which(linter, path=str(BIN)) or shutil.which(linter)
    if found is None:
        pytest.skip(f"{linter} is not installed (make venv installs it)")
    return subprocess.run(
        [found, str(EXAMPLES / example)], capture_output=True, text=True, timeout=60
    )


def test_dockerfile_passes_hadolint() -> None:
    result = checked_by("hadolint", "Dockerfile")

    assert result.returncode == 0, result.stdout + result.stderr


# --- systemd --------------------------------------------------------------------------------


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    service = (EXAMPLES / "systemd" / "opsctl.service").read_text()
    assert "ExecStart=/usr/local/bin/opsctl apply /etc/opsctl/policy.yaml" in service
    # verify checks that ExecStart's program exists: point it at this environment's opsctl.
    (tmp_path / "opsctl.service").write_text(
        service.replace("/usr/local/bin/opsctl", str(BIN / "opsctl"))
    )
    shutil.copy(EXAMPLES / "systemd" / "opsctl.timer", tmp_path / "opsctl.timer")

    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "opsctl.service"), str(tmp_path / "opsctl.timer")],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr


# --- exit codes in the deploy recipes -------------------------------------------------------


def _bash_cases(text: str) -> set[int]:
    """The exit codes named by the labels of the shell script's `case` (`1 | 3 | 5)`)."""
    labels = re.findall(r"^\s*([0-9][0-9 |]*)\)", text, re.MULTILINE)
    return {int(code) for label in labels for code in label.split("|")}


def _powershell_cases(text: str) -> set[int]:
    """The exit codes named by the PowerShell switch (`2 {` and `{ $_ -in 1, 3, 5 }`)."""
    body = text[text.index("switch ($code)") :]
    single = re.findall(r"^\s*([0-9]+) \{", body, re.MULTILINE)
    grouped = re.findall(r"\{ \$_ -in ([0-9, ]+) \}", body)
    return {int(c) for c in single} | {int(c) for g in grouped for c in g.split(",")}


@pytest.mark.parametrize(
    ("name", "cases", "signals"),
    [
        ("deploy-hook.sh", _bash_cases, {130, 143}),  # stopped by SIGINT, SIGTERM
        ("Invoke-OpsctlCleanup.ps1", _powershell_cases, set()),
    ],
)
def test_deploy_recipes_decide_on_every_documented_exit_code(
    name: str, cases: Any, signals: set[int]
) -> None:
    handled = cases((EXAMPLES / name).read_text())

    assert handled == {code.value for code in ExitCode} | signals


def test_deploy_hook_passes_shellcheck() -> None:
    result = checked_by("shellcheck", "deploy-hook.sh")

    assert result.returncode == 0, result.stdout


# --- the deploy hook against a real Redis ---------------------------------------------------


def _hook(policy: Path, url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["OPSCTL_REDIS_URL"] = url
    env["REDIS_PASSWORD"] = ""
    env["DEPLOY_HOOK_REPORT"] = str(tmp_path / "report.json")
    return subprocess.run(
        ["bash", str(EXAMPLES / "deploy-hook.sh"), str(policy)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.redis_server
def test_deploy_hook_cleans_up_and_lets_the_deploy_go_on(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    job = started_job(redis_conn, "killed-in-the-deploy", "emails")

    result = _hook(EXAMPLES / "policy.yaml", redis_url, tmp_path)

    assert result.returncode == 0, result.stderr
    assert "cleaned up" in result.stdout
    assert status_of(redis_conn, job.id) == "failed"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["acted"] == 1


@pytest.mark.redis_server
def test_deploy_hook_blocks_the_deploy_when_a_limit_trips_and_changes_nothing(
    redis_url: str, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    jobs = [started_job(redis_conn, "killed-in-the-deploy", "emails") for _ in range(3)]
    policy = tmp_path / "policy.yaml"
    text = (EXAMPLES / "policy.yaml").read_text().replace("max_actions: 200", "max_actions: 2")
    policy.write_text(text.replace("../schemas", str(ROOT / "schemas")))

    result = _hook(policy, redis_url, tmp_path)

    assert result.returncode == 4, result.stderr
    assert "limit tripped" in result.stderr
    assert [status_of(redis_conn, job.id) for job in jobs] == ["started"] * 3


@pytest.mark.redis_server
def test_deploy_hook_blocks_the_deploy_on_an_invalid_policy(redis_url: str, tmp_path: Path) -> None:
    result = _hook(ROOT / "tests" / "policies" / "bad_action.yaml", redis_url, tmp_path)

    assert result.returncode == 2
    assert "invalid" in result.stderr


def test_deploy_hook_only_warns_when_redis_is_unreachable(tmp_path: Path) -> None:
    nothing_listens = tmp_path / "no-redis.sock"

    result = _hook(EXAMPLES / "policy.yaml", f"unix://{nothing_listens}", tmp_path)

    assert result.returncode == 0, result.stderr
    assert "warning: exit 3; the deploy goes on (report: none; see the message above)" in (
        result.stderr
    )


# --- the README's JSON report -----------------------------------------------------------


def test_the_readmes_report_example_holds_every_field_a_report_has() -> None:
    readme = (ROOT / "README.md").read_text()
    intro = "Here is the report from the demo's real run, trimmed to one element per list:"
    block = readme.split(intro, 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    example = json.loads(block)
    schema = json.loads((ROOT / "schemas" / "report.schema.json").read_text())

    jsonschema.validate(example, schema)
    # Each list trimmed to one element, every field of a real report shown.
    assert set(example) == set(schema["properties"])
    for name in ("job", "worker", "queue"):
        [item] = example[f"{name}s"]
        assert set(item) == set(schema["$defs"][name]["properties"]), name
