"""Policy files: what is accepted, how rules resolve, and what a user sees for each mistake."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml

from opsctl.errors import ExitCode, PolicyError
from opsctl.policy import (
    ACTIONS,
    Limits,
    Policy,
    Rule,
    load_policy,
    load_policy_schema,
    parse_duration,
    validate_files,
)

TESTS = Path(__file__).parent
REPOSITORY = TESTS.parent
SECRET = "hunter2"
REDIS_ENV = {"REDIS_URL": "redis://localhost:6380/0"}


@pytest.fixture(autouse=True)
def in_tests_directory(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run each test from tests/, so that messages name files as policies/NAME.yaml."""
    monkeypatch.chdir(TESTS)
    yield


def problem_lines(path: str, environ: dict[str, str] | None = None) -> list[str]:
    """What `opsctl validate PATH` prints, one problem per line."""
    return [str(problem) for problem in validate_files([path], environ=environ or {})]


def load(name: str, environ: dict[str, str] | None = None) -> Policy:
    """The policy in tests/policies/NAME.yaml, with REDIS_URL set unless `environ` is given."""
    return load_policy(f"policies/{name}.yaml", environ=REDIS_ENV if environ is None else environ)


# Accepted policies and rule resolution --------------------------------------------------------


def test_example_policy_from_the_docs_is_accepted() -> None:
    policy = load("example")

    assert policy.redis_url == "redis://localhost:6380/0"
    assert policy.key_prefix == "rq"
    assert [name for name, _ in policy.entries] == ["casestrainer", "reports-*", "imports"]
    assert policy.rule_for("reports-weekly") == Rule(
        max_age_seconds=7200, action="requeue", source="queues[1] (reports-*)"
    )
    assert policy.notes == ()


def test_exact_queue_name_beats_a_glob_listed_before_it() -> None:
    rule = load("overrides").rule_for("reports-daily")

    assert rule is not None
    assert (rule.action, rule.source) == ("delete", "queues[2] (reports-daily)")


def test_first_matching_glob_in_file_order_wins() -> None:
    # reports-x matches both "reports-*" (queues[0]) and "report?-*" (queues[1]).
    rule = load("overrides").rule_for("reports-x")

    assert rule is not None
    assert (rule.source, rule.max_age_seconds, rule.action) == (
        "queues[0] (reports-*)",
        7200,
        "requeue",
    )


def test_later_glob_applies_when_earlier_ones_do_not_match() -> None:
    rule = load("overrides").rule_for("reportz-x")

    assert rule is not None
    assert (rule.source, rule.action) == ("queues[1] (report?-*)", "cancel")


def test_queue_matched_by_no_entry_is_not_touched() -> None:
    policy = load("overrides")

    assert policy.rule_for("billing") is None
    assert policy.rule_for("REPORTS-x") is None  # globs are case-sensitive, like RQ queue names


def test_disabled_entry_still_matches_with_enabled_false() -> None:
    rule = load("overrides").rule_for("imports")

    assert rule is not None
    assert rule.enabled is False
    assert rule.source == "queues[3] (imports)"


def test_entries_inherit_the_policy_defaults() -> None:
    rule = load("overrides").rule_for("reportz-x")

    assert rule is not None
    assert (rule.max_age_seconds, rule.dry_run, rule.force, rule.enabled) == (
        1800,
        True,
        False,
        True,
    )


def test_bare_integer_max_age_means_minutes() -> None:
    policy = load("overrides")  # defaults.max_age: 30

    assert policy.defaults.max_age_seconds == 30 * 60


def test_built_in_defaults_apply_when_the_policy_sets_none() -> None:
    policy = load("minimal", environ={})

    assert (policy.redis_url, policy.key_prefix) == (None, "rq")
    assert policy.rule_for("casestrainer") == Rule(
        max_age_seconds=600,
        action="fail",
        force=False,
        dry_run=False,
        enabled=True,
        source="queues[0] (casestrainer)",
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("0s", 0), (5, 300), (0, 0)],
)
def test_parse_duration_reads_every_unit(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [True, False, -1, 1.5, "10 minutes", "10", "m", "-5m", "10M", ""])
def test_parse_duration_rejects_anything_else(text: object) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "too_long"),
    [
        (1_000_000_001, "is more minutes than the most allowed, 1,000,000,000"),
        ("1000000000m", "has 10 digits before its unit; at most 9 are allowed (as in 999999999m)"),
        (
            "99999999999999999999d",
            "has 20 digits before its unit; at most 9 are allowed (as in 999999999d)",
        ),
    ],
)
def test_a_duration_past_the_longest_allowed_is_called_too_long_not_malformed(
    text: str | int, too_long: str, tmp_path: Path
) -> None:
    path = tmp_path / "long.yaml"
    path.write_text(f"version: 1\nqueues:\n  - name: a\n    lost_after: {text}\n")

    with pytest.raises(ValueError, match=re.escape(too_long)):
        parse_duration(text)
    shown = repr(text) if isinstance(text, str) else str(text)
    assert problem_lines(str(path)) == [f"{path}:4:17: queues[0].lost_after: {shown} {too_long}"]


def test_an_integer_with_a_leading_zero_is_decimal_and_other_yaml_number_forms_are_refused(
    tmp_path: Path,
) -> None:
    # YAML 1.1 reads 010 as octal 8, and 0x10, 1_000 and 1:30 as 16, 1000 and 90.
    path = tmp_path / "numbers.yaml"
    for written, minutes in (("010", 10), ("08", 8), ("019", 19)):  # 08: octal could not be
        path.write_text(f"version: 1\nqueues:\n  - name: a\n    max_age: {written}\n")
        assert load_policy(str(path), environ={}).rule_for("a").max_age_seconds == minutes * 60

    for written in ("0x10", "1_000", "1:30"):
        path.write_text(f"version: 1\nqueues:\n  - name: a\n    max_requeues: {written}\n")
        assert problem_lines(str(path)) == [
            f"{path}:4:19: queues[0].max_requeues: {written!r} is not a plain decimal number"
            " (write digits only, such as 10)"
        ]


def test_booleans_are_yaml_1_2s_true_and_false_as_schema_checkers_read_them(
    tmp_path: Path,
) -> None:
    # YAML 1.1 also reads yes, no, on and off as booleans; a schema checker (YAML 1.2)
    # reads them as strings, so opsctl refuses them rather than disagree with CI.
    path = tmp_path / "booleans.yaml"
    path.write_text("version: 1\ndefaults:\n  force: yes\n  dry_run: off\nqueues:\n  - name: a\n")
    assert problem_lines(str(path)) == [
        f"{path}:3:10: defaults.force: 'yes' is not a boolean (use true or false)",
        f"{path}:4:12: defaults.dry_run: 'off' is not a boolean (use true or false)",
    ]

    path.write_text("version: 1\ndefaults:\n  force: !!bool on\nqueues:\n  - name: a\n")
    assert problem_lines(str(path)) == [
        f"{path}:3:10: defaults.force: 'on' is not a valid !!bool value; fix it or drop !!bool"
    ]

    path.write_text("version: 1\nqueues:\n  - name: no\n    force: True\n  - name: on\n")
    policy = load_policy(str(path), environ={})
    assert [name for name, _ in policy.entries] == ["no", "on"]
    assert policy.rule_for("no").force is True
    assert policy.rule_for("on").force is False


def test_digest_is_the_sha256_of_the_file_bytes() -> None:
    policy = load("example")

    expected = hashlib.sha256(Path("policies/example.yaml").read_bytes()).hexdigest()
    assert policy.digest == expected


# Errors, one exact line each ------------------------------------------------------------------

DURATION_HINT = "(use 90s, 10m, 2h or 1d)"
QUEUE_KEYS = (
    "name, max_age, action, force, dry_run, enabled, limits, max_requeues, lost_after, related_keys"
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "bad_duration",
            f"7:14: queues[0].max_age: '10 minutes' is not a duration {DURATION_HINT}",
        ),
        ("unknown_key", f"7:5: queues[2]: unknown key 'max_agee' (allowed: {QUEUE_KEYS})"),
        ("bad_boolean", "3:10: defaults.force: 'yes please' is not a boolean (use true or false)"),
        ("bad_action", "3:11: defaults.action: 'kill' is not one of fail, requeue, cancel, delete"),
        ("missing_name", "3:5: queues[0]: missing required key 'name'"),
        ("bad_version", "1:10: version: 2 is not supported (use 1)"),
        ("bad_glob", "4:11: queues[1].name: '[abc' is not a valid glob (unclosed '[')"),
        ("duplicate_key", "5:5: queues[0]: duplicate key 'name' (first at line 3)"),
        (
            "duplicate_queue",
            "5:11: queues[2].name: 'casestrainer' is already listed at queues[0] (line 3);"
            " merge them",
        ),
        (
            "bad_url",
            "3:8: redis.url: is not a valid Redis URL"
            " (expected redis://, rediss://, unix:// or redis+sentinel://)",
        ),
        (
            "empty_queues",
            "2:9: queues: the list is empty; add at least one '- name: ...' entry"
            " (a policy that matches no queue is a mistake)",
        ),
        (
            "custom_tag",
            "4:13: queues[0].action: tag '!custom' is not allowed; policy files use plain values",
        ),
        (
            "python_tag",
            "3:11: queues[0].name: tag '!!python/object/apply:os.system' is not allowed;"
            " policy files use plain values",
        ),
        (
            "unclosed_reference",
            "3:16: redis.url: '${' is never closed (write ${NAME} or ${NAME:-default})",
        ),
        ("two_documents", "4:1: file holds a second YAML document here; keep one policy per file"),
        ("empty", "1:1: file is empty; a policy needs at least 'version: 1' and a 'queues' list"),
        (
            "top_level_list",
            "1:1: the top level is a list; a policy is a mapping with 'version' and 'queues'",
        ),
        ("syntax_error", "5:1: invalid YAML: expected ',' or ']', but got '<stream end>'"),
        ("not_utf8", "4:14: byte 0xe9 is not UTF-8 text; save the file as UTF-8"),
        (
            "boolean_name",
            "3:11: queues[0].name: false is not a queue name (use a non-empty string; quote a"
            " name that YAML reads as something else: a number, true, false or null)",
        ),
    ],
)
def test_each_mistake_is_reported_on_its_own_exact_line(name: str, expected: str) -> None:
    assert problem_lines(f"policies/{name}.yaml", REDIS_ENV) == [f"policies/{name}.yaml:{expected}"]


@pytest.mark.parametrize("content", ["s3cr3tPW\n", "root:x:0:0:root:/root:/bin/bash\n", "42\n"])
def test_a_file_that_is_one_value_is_refused_without_quoting_it(
    tmp_path: Path, content: str
) -> None:
    # A password file or a token given by mistake for the policy: the message reaches logs.
    path = tmp_path / "mounted-secret"
    path.write_text(content)

    [line] = problem_lines(str(path))

    assert content.strip() not in line
    assert line.endswith("; a policy is a mapping with 'version' and 'queues'")


def test_every_problem_in_a_file_is_reported_in_line_order() -> None:
    assert problem_lines("policies/many_problems.yaml") == [
        "policies/many_problems.yaml:1:10: version: 2 is not supported (use 1)",
        f"policies/many_problems.yaml:3:12: defaults.max_age: '10 minutes' is not a duration"
        f" {DURATION_HINT}",
        "policies/many_problems.yaml:4:11: defaults.action: 'kill' is not one of"
        " fail, requeue, cancel, delete",
        "policies/many_problems.yaml:7:12: queues[0].force: 'maybe' is not a boolean"
        " (use true or false)",
        "policies/many_problems.yaml:8:5: queues[1]: missing required key 'name'",
        f"policies/many_problems.yaml:10:5: queues[2]: unknown key 'max_agee'"
        f" (allowed: {QUEUE_KEYS})",
    ]


def test_load_policy_raises_one_error_listing_every_problem() -> None:
    with pytest.raises(PolicyError) as raised:
        load("many_problems")

    assert raised.value.exit_code == ExitCode.INVALID
    assert len(raised.value.problems) == 6
    assert str(raised.value).splitlines()[0].startswith("policies/many_problems.yaml:1:10:")


def test_missing_file_is_reported_not_raised() -> None:
    assert problem_lines("policies/no_such_policy.yaml") == [
        "policies/no_such_policy.yaml:1:1: cannot read file: no such file"
    ]


def test_directory_is_reported_as_unreadable() -> None:
    assert problem_lines("policies") == ["policies:1:1: cannot read file: it is a directory"]


def test_validate_files_reports_each_file_in_the_order_given() -> None:
    problems = validate_files(["policies/bad_version.yaml", "policies/bad_action.yaml"])

    assert [(p.file, p.path) for p in problems] == [
        ("policies/bad_version.yaml", "version"),
        ("policies/bad_action.yaml", "defaults.action"),
    ]


# Environment interpolation ------------------------------------------------------------------


def test_both_reference_forms_are_interpolated() -> None:
    environ = {"REDIS_URL": "redis://cache:6380/2", "MAX_AGE": "2h"}

    policy = load("env_forms", environ)

    assert policy.redis_url == "redis://cache:6380/2"
    assert policy.defaults.max_age_seconds == 7200
    assert policy.key_prefix == "rq"  # ${RQ_PREFIX:-rq}, RQ_PREFIX unset


def test_a_default_holding_another_reference_is_refused_in_words(tmp_path: Path) -> None:
    path = tmp_path / "nested.yaml"
    path.write_text("version: 1\ndefaults:\n  action: ${ACT:-${X}}\nqueues:\n  - name: a\n")

    assert problem_lines(str(path), environ={"X": "fail"}) == [
        f"{path}:3:11: defaults.action: a default cannot hold another ${{...}}: "
        "write it as plain text"
    ]


@pytest.mark.parametrize(
    ("written", "said"),
    [
        ("${ACT-fail}", "'${ACT-...}' is a form opsctl does not take"),
        ("${ACT:?unset}", "'${ACT:?...}' is a form opsctl does not take"),
        ("${ACT:=fail}", "'${ACT:=...}' is a form opsctl does not take"),
        ("${ ACT }", "no spaces around the name: write ${ACT}"),
        ("${ACT :-fail}", "no spaces around the name: write ${ACT:-fail}"),
        ("${1ACT}", "'${' is not followed by a variable name"),
    ],
)
def test_a_reference_in_a_form_opsctl_does_not_take_is_named_as_such(
    tmp_path: Path, written: str, said: str
) -> None:
    path = tmp_path / "forms.yaml"
    path.write_text(f"version: 1\ndefaults:\n  action: {written}\nqueues:\n  - name: a\n")

    [line] = problem_lines(str(path), environ={"ACT": "fail"})

    assert line.startswith(f"{path}:3:11: defaults.action: {said}")


def test_empty_variable_takes_the_default_as_in_a_shell() -> None:
    policy = load("env_forms", {"REDIS_URL": "redis://cache", "RQ_PREFIX": ""})

    assert policy.key_prefix == "rq"


def test_unquoted_variable_is_typed_like_the_same_text_written_in_the_file() -> None:
    policy = load("env_forms", {"REDIS_URL": "redis://cache", "FORCE": "true", "MAX_AGE": "5"})

    assert policy.defaults.force is True
    assert policy.defaults.max_age_seconds == 300


def test_unset_variable_is_an_error_when_strict() -> None:
    with pytest.raises(PolicyError) as raised:
        load("example", environ={})

    assert [str(p) for p in raised.value.problems] == [
        "policies/example.yaml:3:8: redis.url: environment variable 'REDIS_URL' is not set"
        " (set it, or give a default with ${REDIS_URL:-...})"
    ]


def test_unset_variable_is_a_note_when_not_strict() -> None:
    assert problem_lines("policies/example.yaml") == [
        "policies/example.yaml:3:8: note: redis.url: environment variable 'REDIS_URL' is not set"
        " (set it, or give a default with ${REDIS_URL:-...}); the value was not checked"
    ]


@pytest.mark.parametrize(
    ("body", "path", "what"),
    [
        ("queues: ${Q}\n", "queues", "a list"),
        ("redis: ${Q}\nqueues:\n  - name: a\n", "redis", "a mapping"),
        ("queues:\n  - ${Q}\n", "queues[0]", "a mapping"),
        ("queues:\n  - name: a\n    related_keys: ${Q}\n", "queues[0].related_keys", "a list"),
    ],
)
def test_an_unset_variable_where_a_mapping_or_list_must_stand_is_an_error(
    tmp_path: Path, body: str, path: str, what: str
) -> None:
    # Whatever it holds, a variable gives text: the file can never be valid.
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\n" + body)

    lines = problem_lines(str(policy))

    # One line: that the variable is unset no longer matters, so no note says it.
    [error] = lines
    assert error.endswith(
        f"{path}: the value from ${{Q}} can only give text, and this must be {what} "
        "(write it out here; variables can stand for the values inside it)"
    )


def test_an_unset_variable_where_a_boolean_or_number_stands_is_only_a_note(
    tmp_path: Path,
) -> None:
    # Its text is typed once set (force: ${FORCE} with FORCE=true is a boolean).
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\ndefaults:\n  force: ${FORCE}\n  dry_run: ${DRY}\n  max_age: ${AGE}\n"
        "queues:\n  - name: a\n    enabled: ${ON}\n"
    )

    lines = problem_lines(str(policy))

    assert len(lines) == 4 and all(": note: " in line for line in lines), lines


def test_policy_loaded_without_strict_env_treats_unknown_values_as_absent() -> None:
    policy = load_policy("policies/env_secrets.yaml", environ={}, strict_env=False)

    assert policy.redis_url is None
    assert policy.defaults.max_age_seconds == 600
    assert [p.message.split(" (")[0] for p in policy.notes] == [
        "environment variable 'REDIS_URL' is not set",
        "environment variable 'MAX_AGE' is not set",
    ]


def test_password_in_an_environment_variable_never_appears_in_a_message() -> None:
    environ = {"REDIS_URL": f"http://admin:{SECRET}@cache:6380", "MAX_AGE": SECRET}

    lines = problem_lines("policies/env_secrets.yaml", environ)

    assert lines == [
        "policies/env_secrets.yaml:3:8: redis.url: the value from ${REDIS_URL} is not a valid"
        " Redis URL (expected redis://, rediss://, unix:// or redis+sentinel://)",
        f"policies/env_secrets.yaml:5:12: defaults.max_age: the value from ${{MAX_AGE}}"
        f" is not a duration {DURATION_HINT}",
    ]
    assert not any(SECRET in line for line in lines)


def test_url_written_in_the_file_is_never_quoted() -> None:
    assert SECRET in Path("policies/bad_url.yaml").read_text()

    assert not any(SECRET in line for line in problem_lines("policies/bad_url.yaml"))


# Hostile input --------------------------------------------------------------------------------


def test_alias_bomb_is_refused_quickly() -> None:
    started = time.monotonic()
    lines = problem_lines("policies/alias_bomb.yaml")

    assert time.monotonic() - started < 2
    assert len(lines) == 1
    assert "file expands to more than 100,000 YAML values" in lines[0]


def test_a_huge_file_without_aliases_is_refused_without_blaming_aliases(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("version: 1\nqueues:\n" + "".join(f"  - name: q{i}\n" for i in range(34_000)))

    lines = problem_lines(str(path))

    assert len(lines) == 1
    assert "file holds more than 100,000 YAML values; a policy needs a few dozen" in lines[0]
    assert "alias" not in lines[0].partition("huge.yaml:")[2]


def test_anchor_that_contains_itself_is_refused() -> None:
    lines = problem_lines("policies/self_reference.yaml")

    assert lines == [
        "policies/self_reference.yaml:3:9: values are nested more than 64 levels deep;"
        " flatten the file"
    ]


def test_file_over_1_mib_is_refused_before_parsing(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    header = b"version: 1\n#"
    big.write_bytes(header + b"x" * (2 * 1024 * 1024 - len(header)))

    started = time.monotonic()
    problems = validate_files([str(big)])

    assert time.monotonic() - started < 1
    assert [p.message for p in problems] == ["file is 2 MiB; policy files are limited to 1 MiB"]


# The deploy default and the schema ------------------------------------------------------------


def test_prod_policy_validates_with_redis_url_set() -> None:
    path = str(REPOSITORY / "policies" / "prod.yaml")

    assert validate_files([path], environ=REDIS_ENV) == []
    rule = load_policy(path, environ=REDIS_ENV).rule_for("casestrainer")
    assert rule == Rule(max_age_seconds=600, action="fail", source="queues[0] (casestrainer)")


def test_prod_policy_points_editors_at_the_schema() -> None:
    first_line = (REPOSITORY / "policies" / "prod.yaml").read_text().splitlines()[0]

    assert first_line == "# yaml-language-server: $schema=../schemas/policy.schema.json"


def test_schema_is_valid_draft_2020_12_and_lists_every_action() -> None:
    schema = load_policy_schema()

    jsonschema.Draft202012Validator.check_schema(schema)
    choices = schema["$defs"]["action"]["anyOf"]
    assert tuple(choices[0]["enum"]) == ACTIONS
    assert choices[1] == {"$ref": "#/$defs/reference"}  # or ${VAR}, as it stands in a file


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("version: 1\nredis:\n  key_prefix: ${RQ_PREFIX:-rq}\nqueues:\n  - name: a\n", True),
        ("version: 1\nqueues:\n  - name: a\n    force: ${FORCE}\n", True),
        ("version: 1\nqueues:\n  - name: a\n    max_age: ${MAX_AGE:-10m}\n", True),
        ("version: 1\nqueues:\n  - name: a\n    force: yes-please\n", False),
        ("version: 1\nqueues:\n  - name: a\n    max_age: $MAX_AGE\n", False),
        # opsctl refuses a zero max_age or lost_after (see below): so does the schema.
        ("version: 1\ndefaults:\n  max_age: 0\nqueues:\n  - name: a\n", False),
        ("version: 1\nqueues:\n  - name: a\n    max_age: 00m\n", False),
        ("version: 1\ndefaults:\n  lost_after: 0s\nqueues:\n  - name: a\n", False),
        ("version: 1\nqueues:\n  - name: a\n    lost_after: 1s\n", True),
        # A value with a final line break, which a checker written in Python reads with
        # '$' matching before it, is refused by the schema as opsctl refuses it.
        ('version: 1\nqueues:\n  - name: a\n    max_age: "10m\\n"\n', False),
        ('version: 1\nredis:\n  key_prefix: "rq\\n"\nqueues:\n  - name: a\n', False),
        (
            'version: 1\nredis:\n  sentinel:\n    hosts: ["h:1\\n"]\n    service: m\n'
            "queues:\n  - name: a\n",
            False,
        ),
        (
            'version: 1\nredis:\n  sentinel:\n    hosts: ["h:1"]\n    service: "m\\n"\n'
            "queues:\n  - name: a\n",
            False,
        ),
        # A control character in a related key, a final line break included.
        (
            'version: 1\nqueues:\n  - name: a\n    related_keys: ["x:{job_id}\\n"]\n',
            False,
        ),
        ('version: 1\nqueues:\n  - name: a\n    related_keys: ["x\\t:{job_id}"]\n', False),
        ('version: 1\nqueues:\n  - name: a\n    related_keys: ["x:{job_id}:y"]\n', True),
    ],
)
def test_the_published_schema_takes_a_policy_as_it_stands_in_its_file(
    text: str, valid: bool, tmp_path: Path
) -> None:
    # What an editor or a CI schema check sees: the file before ${VAR} is read.
    errors = list(
        jsonschema.Draft202012Validator(load_policy_schema()).iter_errors(yaml.safe_load(text))
    )
    path = tmp_path / "policy.yaml"
    path.write_text(text)

    assert (errors == []) is valid, errors
    if not valid:  # and opsctl refuses it too
        assert problem_lines(str(path))
    if valid:  # and opsctl agrees once the variables are set
        environ = {"RQ_PREFIX": "tenant", "FORCE": "true", "MAX_AGE": "5m"}
        assert load_policy(str(path), environ=environ).rule_for("a") is not None


@pytest.mark.parametrize(
    ("actions", "said"),
    [(1, "1 action exceeds max_actions 0"), (2, "2 actions exceed max_actions 0")],
)
def test_a_tripped_max_actions_counts_the_actions_in_words(actions: int, said: str) -> None:
    assert Limits(max_actions=0).tripped(actions, 10) == said


def test_a_zero_lost_after_is_refused_wherever_it_is_written(tmp_path: Path) -> None:
    # It is the grace that keeps a job a worker has just taken from being acted on.
    path = tmp_path / "zero.yaml"
    path.write_text(
        "version: 1\ndefaults:\n  lost_after: 0\nqueues:\n  - name: a\n    lost_after: 0m\n"
        "  - name: b\n    lost_after: 1s\n"
    )

    lines = problem_lines(str(path))

    zero = "is zero: a job a worker has just taken, and not yet entered everywhere"
    assert [line.split(": ", 1)[0] for line in lines] == [f"{path}:3:15", f"{path}:6:17"]
    assert f"defaults.lost_after: 0 {zero}" in lines[0]
    assert lines[0].endswith("give a positive duration, well above a worker's monitoring interval")
    assert f"queues[0].lost_after: '0m' {zero}" in lines[1]


def test_a_zero_max_age_is_refused_wherever_it_is_written(tmp_path: Path) -> None:
    path = tmp_path / "zero.yaml"
    path.write_text(
        "version: 1\ndefaults:\n  max_age: 0\nqueues:\n  - name: a\n    max_age: 00m\n"
        "  - name: b\n    max_age: ${MAX_AGE}\n  - name: c\n    max_age: 1s\n"
    )

    lines = problem_lines(str(path), environ={"MAX_AGE": "0h"})

    zero = "is zero: every job a live worker runs would be overdue at once, and stopped"
    assert [line.split(": ", 1)[0] for line in lines] == [
        f"{path}:3:12",
        f"{path}:6:14",
        f"{path}:8:14",
    ]
    assert lines[0].endswith(
        f"defaults.max_age: 0 {zero}; give a positive duration "
        "(or force: true to act on every started job)"
    )
    assert f"queues[0].max_age: '00m' {zero}" in lines[1]
    assert f"queues[1].max_age: the value from ${{MAX_AGE}} {zero}" in lines[2]
    with pytest.raises(PolicyError):
        load_policy(str(path), environ={"MAX_AGE": "0h"})


def test_a_user_named_both_in_the_url_and_beside_it_must_be_the_same(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(
        "version: 1\nredis:\n  url: redis://alice:pw1@127.0.0.1:1/0\n  username: bob\n"
        "queues:\n  - name: a\n"
    )

    lines = problem_lines(str(path))

    assert lines == [
        f"{path}:4:13: redis.username: 'bob' names another user than the URL does; "
        "give the user in one place"
    ]
    assert "alice" not in lines[0] and "pw1" not in lines[0]
    path.write_text(path.read_text().replace("bob", "alice"))
    assert problem_lines(str(path)) == []


def test_values_past_a_limit_name_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    keys = "".join(f'      - "k{i}:{{job_id}}"\n' for i in range(21))
    path.write_text(
        "version: 1\nqueues:\n  - name: a\n    max_requeues: 100000000000\n"
        f"    related_keys:\n{keys}"
    )

    assert problem_lines(str(path)) == [
        f"{path}:4:19: queues[0].max_requeues: 100000000000 is more than the most allowed, "
        "1,000,000",
        f"{path}:6:7: queues[0].related_keys: holds 21 items; at most 20 are allowed",
    ]


def test_a_user_or_password_no_connection_can_send_is_refused_without_quoting_it(
    tmp_path: Path,
) -> None:
    # A YAML escape of a lone surrogate is neither text nor a byte of the environment:
    # apply could not send it, and failed in words that blamed the URL.
    path = tmp_path / "policy.yaml"
    path.write_text(
        'version: 1\nredis:\n  url: "redis://127.0.0.1:1/0"\n  password: "pw\\ud800x"\n'
        '  username: "app\\ud800"\nqueues:\n  - name: a\n'
    )
    in_url = tmp_path / "in-url.yaml"
    in_url.write_text(
        'version: 1\nredis:\n  url: "redis://u:pw\\ud800@h:1/0"\nqueues:\n  - name: a\n'
    )
    kept = tmp_path / "kept.yaml"  # a byte from the environment is sent as that byte
    kept.write_text('version: 1\nredis:\n  password: "pw\\udcff"\nqueues:\n  - name: a\n')

    lines = problem_lines(str(path))

    lone = "holds a lone surrogate (such as \\ud800), which no connection can send"
    assert lines == [
        f"{path}:4:13: redis.password: the password {lone}",
        f"{path}:5:13: redis.username: 'app\\ud800' {lone}",
    ]
    assert problem_lines(str(kept)) == []
    assert problem_lines(str(in_url)) == [f"{in_url}:3:8: redis.url: the URL: {lone}"]
