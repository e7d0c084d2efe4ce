"""The policy's redis section: sentinel, credentials and TLS settings, and their mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from opsctl.connection import ConnectionOptions, Tls, parse_sentinel_url
from opsctl.errors import PolicyError
from opsctl.policy import load_policy, validate_files

POLICIES = Path(__file__).resolve().parent / "policies"
SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "policy.schema.json"


def problems(name: str, environ: dict[str, str] | None = None) -> list[str]:
    """What `opsctl validate` says about tests/policies/NAME.yaml, without the file name."""
    path = str(POLICIES / f"{name}.yaml")
    found = validate_files([path], environ=environ or {})
    return [str(problem).removeprefix(path + ":") for problem in found]


def test_sentinel_section_becomes_a_sentinel_url_with_the_masters_credentials() -> None:
    environ = {"SENTINEL_PASSWORD": "sentinel-secret", "REDIS_PASSWORD": "master-secret"}

    policy = load_policy(POLICIES / "redis_sentinel.yaml", environ=environ)

    assert policy.redis_url is not None
    parsed = parse_sentinel_url(policy.redis_url)
    hosts = (("sentinel-a.internal", 26379), ("sentinel-b.internal", 26379), ("::1", 26380))
    assert parsed.hosts == hosts
    assert (parsed.service, parsed.db) == ("rq-master", 2)
    assert policy.redis_options == ConnectionOptions(
        username="opsctl", password="master-secret", sentinel_password="sentinel-secret"
    )


def test_tls_section_reads_paths_from_the_environment_with_defaults() -> None:
    policy = load_policy(POLICIES / "redis_tls.yaml", environ={"TLS_DIR": "/run/secrets/redis"})

    assert policy.redis_options.tls == Tls(
        "/run/secrets/redis/ca.pem",
        "/run/secrets/redis/client.crt",
        "/run/secrets/redis/client.key",
        "certificate",
    )
    assert load_policy(POLICIES / "redis_tls.yaml", environ={}).redis_options.tls.ca_cert == (
        "/etc/opsctl/tls/ca.pem"
    )


def test_url_and_sentinel_together_are_refused_at_the_sentinel_key() -> None:
    assert problems("redis_url_and_sentinel") == [
        "4:3: redis: give url or sentinel, not both (both say where Redis is)"
    ]


def test_an_empty_redis_section_is_one_problem_not_also_a_url_and_sentinel_clash() -> None:
    assert problems("redis_empty") == [
        "2:7: redis: an empty value is not a mapping (put url: and key_prefix: beneath it)"
    ]


def test_tls_mistakes_are_each_reported_and_a_literal_password_is_never_quoted() -> None:
    assert problems("redis_tls_mistakes") == [
        "4:3: redis.tls: TLS settings need a rediss:// url (this one does not use TLS)",
        "6:13: redis.tls.verify: 'strict' is not one of full, certificate, none",
        "7:13: redis.password: the password is not a string (write ${VAR}, or quote the value)",
    ]


def test_sentinel_mistakes_are_each_reported() -> None:
    assert problems("bad_sentinel") == [
        "4:5: redis.sentinel: missing required key 'service'",
        "4:13: redis.sentinel.hosts[0]: 'sentinel a:26379' is not a sentinel address "
        "(use HOST or HOST:PORT, PORT 1 to 65535)",
        "5:9: redis.sentinel.db: -1 is not a database number (use a whole number, 0 or more)",
        "6:3: redis.tls: TLS through Redis Sentinel is not supported; give a rediss:// url instead",
    ]


def test_passwords_from_the_environment_never_appear_in_problems(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nredis:\n  password: ${PW}\n  username: ${PW}\n  tls: ${PW}\n"
        "queues:\n  - name: default\n"
    )

    with pytest.raises(PolicyError) as raised:
        load_policy(policy, environ={"PW": "hunter2-secret"})

    assert "hunter2-secret" not in str(raised.value)
    assert "redis.tls: the value from ${PW} is not a mapping" in str(raised.value)


# What `opsctl validate` refuses, a schema check in CI (the published schema, on the
# file as it stands) refuses too: each case with the problem validate reports.
REFUSED_BY_BOTH = {
    "tls cert without key": (
        "redis:\n  url: rediss://cache.internal:6380/0\n  tls:\n    cert: client.crt\n",
        "redis.tls: 'cert' is given without 'key'; give both, or neither",
    ),
    "tls key without cert": (
        "redis:\n  url: rediss://cache.internal:6380/0\n  tls:\n    key: client.key\n",
        "redis.tls: 'key' is given without 'cert'; give both, or neither",
    ),
    "sentinel port past 65535": (
        "redis:\n  sentinel:\n    hosts: ['s1:99999']\n    service: main\n",
        "redis.sentinel.hosts[0]: 's1:99999' is not a sentinel address "
        "(use HOST or HOST:PORT, PORT 1 to 65535)",
    ),
    "sentinel port 0": (
        "redis:\n  sentinel:\n    hosts: ['s1:0']\n    service: main\n",
        "redis.sentinel.hosts[0]: 's1:0' is not a sentinel address "
        "(use HOST or HOST:PORT, PORT 1 to 65535)",
    ),
    "no sentinel": (
        "redis:\n  sentinel:\n    hosts: []\n    service: main\n",
        "redis.sentinel.hosts: the list is empty; give at least one sentinel as HOST:PORT",
    ),
    "related key without the id": (
        "defaults:\n  related_keys: ['progress']\n",
        "defaults.related_keys[0]: 'progress' must hold the placeholder {job_id} exactly once",
    ),
    "related key that is the id alone": (
        "defaults:\n  related_keys: ['{job_id}']\n",
        "defaults.related_keys[0]: '{job_id}' must start with a fixed part before {job_id}, "
        "such as 'progress:'",
    ),
    "related key of opsctl's own": (
        "defaults:\n  related_keys: ['opsctl:{job_id}']\n",
        "defaults.related_keys[0]: 'opsctl:{job_id}' would name a key under 'opsctl:', which "
        "belongs to RQ or opsctl",
    ),
    "related key with another placeholder": (
        "defaults:\n  related_keys: ['p:{queue}:{job_id}']\n",
        "defaults.related_keys[0]: 'p:{queue}:{job_id}' holds a placeholder other than {job_id}",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_BY_BOTH))
def test_validate_and_the_published_schema_both_refuse(case: str, tmp_path: Path) -> None:
    section, message = REFUSED_BY_BOTH[case]
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"version: 1\n{section}queues:\n  - name: default\n")

    found = [p.split(": ", 1)[1] for p in map(str, validate_files([str(policy)], environ={}))]
    schema = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    schema_errors = list(schema.iter_errors(yaml.safe_load(policy.read_text())))

    assert found == [message]
    assert schema_errors, "the published schema accepts what validate refuses"


def test_a_related_key_with_a_variable_passes_validate_and_the_published_schema(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        'version: 1\ndefaults:\n  related_keys: ["${APP:-shop}:progress:{job_id}"]\n'
        "queues:\n  - name: default\n"
    )

    found = validate_files([str(policy)], environ={})
    schema = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))

    assert [str(p) for p in found] == []
    assert list(schema.iter_errors(yaml.safe_load(policy.read_text()))) == []
