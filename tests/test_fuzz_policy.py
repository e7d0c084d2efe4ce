"""Hostile and malformed policy files: opsctl refuses them cleanly, quickly and cheaply.

Two kinds of test live here. Fuzzers (hypothesis, a fixed and derandomized budget, so a CI
run always tries the same inputs in bounded time) feed `opsctl validate` and `opsctl apply`
arbitrary YAML, text, bytes and mutations of a valid policy, and check the contract every
input must keep: validate exits 0 or 2 and prints one FILE:LINE:COL line per problem,
apply exits 2 with the same problems or 3 for a valid policy, and neither ever prints a
traceback. Hazard tests each feed one known YAML attack and check the refusal and its
message; those where size is the attack run a real `python -m opsctl` process, whose CPU
time and peak memory os.wait4 reports, and the others run in-process under a time limit.
The last section holds inputs that once crashed or misled opsctl, kept as regression tests.

The inputs are built in code rather than kept under tests/policies: most are megabytes
or thousands of levels deep, and what they show is in how they are built.

Every Redis URL here is redis://127.0.0.1:1/0, a closed port: a policy that passes
validation makes apply exit 3 (Redis unreachable) without any server being contacted.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import clean_env
from opsctl.cli import app
from opsctl.errors import ExitCode
from opsctl.policy import UNCHECKED_SUFFIX, load_policy

CLOSED_URL = "redis://127.0.0.1:1/0"
UNREACHABLE = f"opsctl: error: cannot reach Redis at {CLOSED_URL}: "

#: Wall-clock seconds one in-process CLI call may take, whatever the input.
CALL_LIMIT_S = 5.0
#: CPU seconds a hazard may cost a real process beyond validating a trivial policy.
HAZARD_CPU_LIMIT_S = 2.0
#: Peak memory (MiB) a hazard may add to a real process beyond a trivial policy's.
HAZARD_MEMORY_LIMIT_MB = 50.0

#: The example policy of the docs, with limits and max_requeues: every feature, all valid.
EXAMPLE = """\
version: 1
redis:
  url: ${REDIS_URL}
  key_prefix: rq
defaults:
  max_age: 10m
  action: fail
  force: false
  dry_run: false
  limits:
    max_actions: 50
    max_percent: 25
queues:
  - name: casestrainer
  - name: "reports-*"
    max_age: 2h
    action: requeue
    max_requeues: 2
    limits:
      max_actions: 5
  - name: imports
    enabled: false
"""

MINIMAL = "version: 1\nqueues:\n  - name: casestrainer\n"

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)


# Running the CLI ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one in-process opsctl call printed and returned, and how long it took."""

    exit_code: int
    stdout: str
    stderr: str
    seconds: float


def opsctl(*args: str) -> Outcome:
    """Run the CLI in-process with REDIS_URL unset."""
    started = time.monotonic()
    result = CliRunner().invoke(app, list(args), env={"REDIS_URL": None})
    seconds = time.monotonic() - started
    return Outcome(result.exit_code, result.stdout, result.stderr, seconds)


def validate(path: Path) -> Outcome:
    return opsctl("validate", str(path))


def apply(path: Path) -> Outcome:
    return opsctl("apply", str(path), "--redis-url", CLOSED_URL)


@dataclass(frozen=True)
class ProcessOutcome:
    """What a real `python -m opsctl` process printed, returned and cost."""

    exit_code: int
    stdout: str
    stderr: str
    cpu_seconds: float
    max_rss_mb: float


def _limit_child() -> None:
    """Cap a child's CPU time and address space, so a hazard that works cannot hurt the host."""
    resource.setrlimit(resource.RLIMIT_CPU, (30, 30))
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def opsctl_process(workdir: Path, *args: str, env: dict[str, str] | None = None) -> ProcessOutcome:
    """Run `python -m opsctl ARGS` in `workdir`; os.wait4 gives this one child's usage."""
    stdout, stderr = workdir / "opsctl.stdout", workdir / "opsctl.stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "opsctl", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=workdir,
            env={**clean_env(), **(env or {})},
            preexec_fn=_limit_child,
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return ProcessOutcome(
        exit_code=process.returncode,
        stdout=stdout.read_text(errors="replace"),
        stderr=stderr.read_text(errors="replace"),
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        max_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
    )


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> ProcessOutcome:
    """What validating a trivial policy costs a real process: interpreter and imports."""
    workdir = tmp_path_factory.mktemp("baseline")
    (workdir / "minimal.yaml").write_text(MINIMAL)
    outcome = opsctl_process(workdir, "validate", "minimal.yaml")
    assert outcome.exit_code == 0, outcome.stderr
    return outcome


def assert_cheap(outcome: ProcessOutcome, baseline: ProcessOutcome) -> None:
    """The call cost little more CPU and memory than validating a trivial policy."""
    cpu = outcome.cpu_seconds - baseline.cpu_seconds
    memory = outcome.max_rss_mb - baseline.max_rss_mb
    assert cpu < HAZARD_CPU_LIMIT_S, f"{cpu:.2f} s of CPU over the baseline"
    assert memory < HAZARD_MEMORY_LIMIT_MB, f"{memory:.1f} MiB of memory over the baseline"
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome.stderr


# The contract every input keeps ---------------------------------------------------------------


def _shape(raw: bytes) -> tuple[int, int]:
    """How many lines the file has and how long its longest line is, in characters."""
    lines = raw.decode("utf-8", "replace").removeprefix("\ufeff").splitlines() or [""]
    return len(lines), max(len(line) for line in lines)


def assert_problem_lines(outcome: Outcome, path: Path, raw: bytes) -> None:
    """Each stdout line is FILE:LINE:COL: [note: ]message, at a place inside the file."""
    pattern = re.compile(rf"^{re.escape(str(path))}:(\d+):(\d+): (?:note: )?\S.*$")
    line_count, width = _shape(raw)
    for text in outcome.stdout.splitlines():
        match = pattern.match(text)
        assert match, f"not a problem line: {text!r}\nin:\n{outcome.stdout}"
        line, column = int(match[1]), int(match[2])
        assert 1 <= line <= line_count + 1, text
        assert 1 <= column <= width + 1, text


def _unset_variable_errors(validated: Outcome) -> list[str]:
    """The notes that apply --redis-url turns into errors: variables unset, except the URL."""
    errors = []
    for text in validated.stdout.splitlines():
        where, _, rest = text.partition(": note: ")
        if "environment variable" in rest and not rest.startswith("redis.url: "):
            errors.append(f"{where}: {rest.removesuffix(UNCHECKED_SUFFIX)}")
    return errors


def assert_contract(path: Path, raw: bytes) -> None:
    """validate and apply agree on `path` and keep their exit codes and output formats."""
    path.write_bytes(raw)
    validated, applied = validate(path), apply(path)

    for outcome in (validated, applied):
        assert outcome.seconds < CALL_LIMIT_S, outcome
        assert "Traceback" not in outcome.stdout + outcome.stderr, outcome
    assert validated.exit_code in (ExitCode.OK, ExitCode.INVALID), validated
    assert_problem_lines(validated, path, raw)

    if validated.exit_code == ExitCode.INVALID:
        assert f"{path}: ok" not in validated.stderr, validated
        assert (applied.exit_code, applied.stdout) == (ExitCode.INVALID, ""), applied
        assert applied.stderr == f"opsctl: error: {validated.stdout}", (validated, applied)
        return

    assert validated.stderr == f"{path}: ok\n", validated
    errors = _unset_variable_errors(validated)
    if errors:
        assert applied.exit_code == ExitCode.INVALID, applied
        assert applied.stderr == "opsctl: error: " + "\n".join(errors) + "\n", applied
    else:
        assert applied.exit_code == ExitCode.REDIS_UNAVAILABLE, (validated, applied)
        assert applied.stderr.startswith(UNREACHABLE), applied


def test_example_policy_is_valid_and_apply_stops_only_at_the_closed_port(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(EXAMPLE)

    assert_contract(path, EXAMPLE.encode())
    assert validate(path).exit_code == ExitCode.OK
    assert apply(path).exit_code == ExitCode.REDIS_UNAVAILABLE


# Fuzzing: arbitrary YAML, text and bytes ------------------------------------------------------

SCHEMA_WORDS = (
    "version",
    "redis",
    "url",
    "key_prefix",
    "defaults",
    "queues",
    "name",
    "max_age",
    "action",
    "force",
    "dry_run",
    "enabled",
    "limits",
    "max_actions",
    "max_percent",
    "max_requeues",
)
TRICKY_STRINGS = (
    "10m",
    "90s",
    "2h",
    "1d",
    "10 minutes",
    "fail",
    "requeue",
    "delete",
    "reports-*",
    "[abc",
    "[!]",
    "${REDIS_URL}",
    "${OPSCTL_FUZZ_UNSET}",
    "${OPSCTL_FUZZ_UNSET:-5m}",
    "${",
    "${1}",
    "redis://h",
    "http://u:p@h",
    "2001-12-14",
    "1:30",
    "0x1F",
    "~",
    "<<",
)

#: Keys without control characters or line separators: a key's raw text reaches the path of
#: a problem line (see test_control_character_in_a_key_cannot_break_a_problem_line).
PRINTABLE_KEY = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp"))
KEYS = st.sampled_from(SCHEMA_WORDS) | st.text(PRINTABLE_KEY, max_size=8)
STRINGS = st.sampled_from(TRICKY_STRINGS) | st.text(st.characters(codec="utf-8"), max_size=12)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | STRINGS
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=20,
)


Wrap = Callable[[st.SearchStrategy[object]], st.SearchStrategy[object]]


def _sometimes_anything(good: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """Mostly a value the schema accepts, one time in eight anything at all."""
    return st.sampled_from(range(8)).flatmap(lambda n: VALUES if n == 7 else good)


def _exactly(good: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """Always a value the schema accepts."""
    return good


def policy_shaped(wrap: Wrap) -> st.SearchStrategy[object]:
    """Policies whose every value passes through `wrap`: valid ones, or nearly valid ones."""
    counts = st.integers(0, 1000)
    limits = st.fixed_dictionaries(
        {},
        optional={
            "max_actions": wrap(counts),
            "max_percent": wrap(st.integers(0, 100) | st.floats(0, 100)),
        },
    )
    settings = {
        # A zero max_age is refused (see test_policy), so valid ones start at 1.
        "max_age": wrap(st.from_regex(r"\A[1-9][0-9]{0,3}[smhd]\Z") | st.integers(1, 1000)),
        "action": wrap(st.sampled_from(["fail", "requeue", "cancel", "delete"])),
        "force": wrap(st.booleans()),
        "dry_run": wrap(st.booleans()),
        "enabled": wrap(st.booleans()),
        "max_requeues": wrap(counts),
        "limits": wrap(limits),
    }
    names = st.sampled_from(["casestrainer", "reports-*", "report?-[0-9]", "imports"])
    entry = st.fixed_dictionaries({"name": wrap(names | STRINGS)}, optional=settings)
    redis = st.fixed_dictionaries(
        {},
        optional={
            "url": wrap(st.sampled_from(["redis://h:6380/0", "${REDIS_URL}", "unix:///s"])),
            "key_prefix": wrap(st.from_regex(r"\A[A-Za-z0-9_.{}-]{1,8}\Z")),
        },
    )
    return st.fixed_dictionaries(
        {"version": wrap(st.just(1)), "queues": wrap(st.lists(wrap(entry), max_size=4))},
        optional={
            "redis": wrap(redis),
            "defaults": wrap(st.fixed_dictionaries({}, optional=settings)),
        },
    )


@st.composite
def dumped_yaml(draw: st.DrawFn) -> bytes:
    """A YAML document from yaml.safe_dump, mostly policy-shaped, in a random style."""
    value = draw(st.one_of(policy_shaped(_exactly), policy_shaped(_sometimes_anything), VALUES))
    text = yaml.safe_dump(
        value,
        allow_unicode=draw(st.booleans()),
        default_flow_style=draw(st.sampled_from([None, True, False])),
        sort_keys=False,
    )
    return text.encode("utf-8")


YAML_PIECES = st.sampled_from(
    [
        *"{}[],:-?!&*#|>'\"%@`\\ \t\n\r$~.",
        *["version: 1\n", "queues:\n", "  - name: ", "---\n", "...\n", "${", "&a ", "*a "],
        *["!!python/object:os.system ", "<<: ", "? "],
    ]
)
YAML_TEXT = st.lists(YAML_PIECES | st.characters(codec="utf-8"), max_size=120).map("".join)


@settings(FUZZ, max_examples=150)
@given(raw=dumped_yaml())
def test_any_yaml_document_gets_a_clean_verdict(tmp_path: Path, raw: bytes) -> None:
    assert_contract(tmp_path / "policy.yaml", raw)


@settings(FUZZ, max_examples=150)
@given(text=YAML_TEXT)
def test_any_text_gets_a_clean_verdict(tmp_path: Path, text: str) -> None:
    assert_contract(tmp_path / "policy.yaml", text.encode("utf-8"))


@settings(FUZZ, max_examples=100)
@given(raw=st.binary(max_size=200), after_valid_lines=st.booleans())
def test_any_bytes_get_a_clean_verdict(tmp_path: Path, raw: bytes, after_valid_lines: bool) -> None:
    prefix = MINIMAL.encode() if after_valid_lines else b""
    assert_contract(tmp_path / "policy.yaml", prefix + raw)


# Fuzzing: mutations of a valid policy ---------------------------------------------------------

Lines = list[str]
Mutation = Callable[[st.DrawFn, Lines], Lines]

_KEY_LINE = re.compile(r"^(?P<indent>[ \t]*(?:- )?)(?P<key>[^:#\n]+):(?P<rest>.*)$", re.DOTALL)

OTHER_TYPES = [
    "[]",
    "{}",
    "~",
    "",
    "true",
    "no",
    "12",
    "-3",
    "1.5",
    ".nan",
    ".inf",
    "1e3",
    "'12'",
    "2001-12-14",
    "0x1F",
    "0o17",
    "1:30",
    "!!str 5",
    "!!int '5'",
    "!!binary aGk=",
    "!custom x",
    "&anchor x",
    "*undefined",
    "[a, b]",
    "{a: 1}",
    "|\n      block",
    "'unclosed",
    '"\\x00"',
    "${OPSCTL_FUZZ_UNSET}",
    "${OPSCTL_FUZZ_UNSET:-x}",
    "${REDIS_URL}",
    "${",
]
BAD_DURATIONS = ["10 minutes", "10M", "-5m", "5.5m", "1e3", "10", "m", "10mm", "0x10m", "10m "]
BAD_GLOBS = ['"reports-["', '"[!"', '"[]"', '"[!]"', '"a[b"', '"[[]"', '"reports-[a-"', '""']
KEY_TYPOS = ["max_agee", "Max_age", "name ", "queue", "'name'", "version2", "action:", "limit"]
SNIPPETS = [*KEY_TYPOS, "\t", " ", "  ", ":", "- ", "#", "[", "{", "&a", "*a", "!", "%", "---"]


def _pick(draw: st.DrawFn, lines: Lines) -> int:
    return draw(st.integers(0, len(lines) - 1))


def _key_lines(lines: Lines) -> list[int]:
    return [i for i, line in enumerate(lines) if _KEY_LINE.match(line)]


def rename_key(draw: st.DrawFn, lines: Lines) -> Lines:
    candidates = _key_lines(lines)
    if not candidates:
        return lines
    index = draw(st.sampled_from(candidates))
    match = _KEY_LINE.match(lines[index])
    assert match
    new_key = draw(st.sampled_from(KEY_TYPOS + list(SCHEMA_WORDS)) | KEYS.filter(str.isprintable))
    lines[index] = f"{match['indent']}{new_key}:{match['rest']}"
    return lines


def replace_value(draw: st.DrawFn, lines: Lines, values: list[str], only: str = "") -> Lines:
    candidates = [i for i in _key_lines(lines) if only in lines[i]]
    if not candidates:
        return lines
    index = draw(st.sampled_from(candidates))
    match = _KEY_LINE.match(lines[index])
    assert match
    lines[index] = f"{match['indent']}{match['key']}: {draw(st.sampled_from(values))}\n"
    return lines


def retype_value(draw: st.DrawFn, lines: Lines) -> Lines:
    return replace_value(draw, lines, OTHER_TYPES)


def malform_duration(draw: st.DrawFn, lines: Lines) -> Lines:
    return replace_value(draw, lines, BAD_DURATIONS, only="max_age:")


def break_glob(draw: st.DrawFn, lines: Lines) -> Lines:
    return replace_value(draw, lines, BAD_GLOBS, only="name:")


def drop_line(draw: st.DrawFn, lines: Lines) -> Lines:
    if len(lines) > 1:
        del lines[_pick(draw, lines)]
    return lines


def duplicate_line(draw: st.DrawFn, lines: Lines) -> Lines:
    copied = lines[_pick(draw, lines)]
    lines.insert(draw(st.integers(0, len(lines))), copied)
    return lines


def insert_tab(draw: st.DrawFn, lines: Lines) -> Lines:
    index = _pick(draw, lines)
    line = lines[index]
    if draw(st.booleans()):
        lines[index] = "\t" + line.lstrip(" ")
    else:
        at = draw(st.integers(0, len(line)))
        lines[index] = line[:at] + "\t" + line[at:]
    return lines


def insert_snippet(draw: st.DrawFn, lines: Lines) -> Lines:
    index = _pick(draw, lines)
    line = lines[index]
    at = draw(st.integers(0, len(line)))
    snippet = draw(st.sampled_from(SNIPPETS) | st.text(st.characters(codec="utf-8"), max_size=3))
    lines[index] = line[:at] + snippet + line[at:]
    return lines


def delete_characters(draw: st.DrawFn, lines: Lines) -> Lines:
    index = _pick(draw, lines)
    line = lines[index]
    start = draw(st.integers(0, len(line)))
    lines[index] = line[:start] + line[start + draw(st.integers(1, 4)) :]
    return lines


def reindent(draw: st.DrawFn, lines: Lines) -> Lines:
    index = _pick(draw, lines)
    shift = draw(st.sampled_from([-2, -1, 1, 2]))
    line = lines[index]
    lines[index] = (
        line[-shift:] if shift < 0 and line.startswith(" " * -shift) else " " * shift + line
    )
    return lines


def swap_lines(draw: st.DrawFn, lines: Lines) -> Lines:
    first, second = _pick(draw, lines), _pick(draw, lines)
    lines[first], lines[second] = lines[second], lines[first]
    return lines


MUTATIONS: list[Mutation] = [
    rename_key,
    retype_value,
    malform_duration,
    break_glob,
    drop_line,
    duplicate_line,
    insert_tab,
    insert_snippet,
    delete_characters,
    reindent,
    swap_lines,
]


@st.composite
def mutated_example(draw: st.DrawFn) -> bytes:
    """The example policy after one to three mutations, optionally with CRLF line ends."""
    lines = EXAMPLE.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        mutation = draw(st.sampled_from(MUTATIONS))
        lines = mutation(draw, lines)
    text = "".join(lines)
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    return text.encode("utf-8")


@settings(FUZZ, max_examples=400)
@given(raw=mutated_example())
def test_any_mutation_of_a_valid_policy_gets_a_clean_verdict(tmp_path: Path, raw: bytes) -> None:
    assert_contract(tmp_path / "policy.yaml", raw)


# YAML hazards, each refused cheaply by a real process -----------------------------------------


def write(workdir: Path, content: bytes, name: str = "policy.yaml") -> str:
    """Write `content` to `workdir`/`name`; return the name, as a process in `workdir` sees it."""
    (workdir / name).write_bytes(content)
    return name


def billion_laughs(levels: int = 10, width: int = 10) -> bytes:
    """The classic alias bomb: `width`**`levels` strings once every alias is expanded."""
    lines = ["version: 1", 'lol0: &lol0 "lol"']
    for level in range(1, levels):
        aliases = ", ".join([f"*lol{level - 1}"] * width)
        lines.append(f"lol{level}: &lol{level} [{aliases}]")
    lines += ["queues:", f"  - name: *lol{levels - 1}"]
    return "\n".join(lines).encode() + b"\n"


def test_billion_laughs_is_refused_without_expanding_it(
    tmp_path: Path, baseline: ProcessOutcome
) -> None:
    policy = write(tmp_path, billion_laughs())

    for command in (["validate", policy], ["apply", policy, "--redis-url", CLOSED_URL]):
        outcome = opsctl_process(tmp_path, *command)

        assert outcome.exit_code == ExitCode.INVALID, outcome
        assert "file expands to more than 100,000 YAML values" in outcome.stdout + outcome.stderr
        assert "Redis" not in outcome.stderr
        assert_cheap(outcome, baseline)


@pytest.mark.parametrize(
    "nesting",
    [
        pytest.param(b"version: 1\nqueues: " + b"[" * 10_000 + b"]" * 10_000, id="flow-lists"),
        pytest.param(b"[" * 1_000_000, id="a-mebibyte-of-unclosed-brackets"),
        pytest.param(b"{a: " * 10_000 + b"1" + b"}" * 10_000, id="flow-mappings"),
        pytest.param(b"- " * 10_000 + b"x", id="block-lists"),
    ],
)
def test_deeply_nested_document_is_refused_quickly(
    tmp_path: Path, baseline: ProcessOutcome, nesting: bytes
) -> None:
    policy = write(tmp_path, nesting + b"\n")

    outcome = opsctl_process(tmp_path, "validate", policy)

    assert outcome.exit_code == ExitCode.INVALID, outcome
    [line] = outcome.stdout.splitlines()
    assert line.startswith(f"{policy}:"), line
    assert "nested" in line, line
    assert "64 levels" in line, line
    assert_cheap(outcome, baseline)


def test_queue_name_of_900_kb_is_accepted_cheaply(tmp_path: Path, baseline: ProcessOutcome) -> None:
    policy = write(tmp_path, b"version: 1\nqueues:\n  - name: " + b"q" * 900_000 + b"\n")

    validated = validate(tmp_path / policy)
    applied = opsctl_process(tmp_path, "apply", policy, "--redis-url", CLOSED_URL)

    assert validated.exit_code == ExitCode.OK, validated
    assert applied.exit_code == ExitCode.REDIS_UNAVAILABLE, applied
    assert_cheap(applied, baseline)


def test_problem_with_a_900_kb_queue_name_quotes_only_its_start(
    tmp_path: Path, baseline: ProcessOutcome
) -> None:
    policy = write(tmp_path, b'version: 1\nqueues:\n  - name: "' + b"q" * 900_000 + b'["\n')

    outcome = opsctl_process(tmp_path, "validate", policy)

    assert outcome.exit_code == ExitCode.INVALID, outcome
    assert outcome.stdout == (
        f"{policy}:3:11: queues[0].name: '{'q' * 57}...' is not a valid glob (unclosed '[')\n"
    )
    assert_cheap(outcome, baseline)


def test_gibibyte_file_is_refused_without_being_read(
    tmp_path: Path, baseline: ProcessOutcome
) -> None:
    with (tmp_path / "huge.yaml").open("wb") as huge:
        huge.write(MINIMAL.encode())
        huge.truncate(1 << 30)  # sparse: a gibibyte to read, nothing on disk

    outcome = opsctl_process(tmp_path, "apply", "huge.yaml", "--redis-url", CLOSED_URL)

    assert outcome.exit_code == ExitCode.INVALID, outcome
    assert outcome.stderr == (
        "opsctl: error: huge.yaml:1:1: file is 1024 MiB; policy files are limited to 1 MiB\n"
    )
    assert_cheap(outcome, baseline)


def test_endless_file_is_refused_after_reading_one_mebibyte(
    tmp_path: Path, baseline: ProcessOutcome
) -> None:
    outcome = opsctl_process(tmp_path, "validate", "/dev/zero")

    assert outcome.exit_code == ExitCode.INVALID, outcome
    assert outcome.stdout == "/dev/zero:1:1: file is 1.1 MiB; policy files are limited to 1 MiB\n"
    assert_cheap(outcome, baseline)


@pytest.mark.parametrize(
    "tagged",
    [
        pytest.param('  - name: !!python/object/apply:os.system ["touch {marker}"]', id="value"),
        pytest.param('  - !!python/object/apply:os.system ["touch {marker}"]: x', id="key"),
        pytest.param(
            "  - name: !!python/object/new:subprocess.Popen [[touch, {marker}]]", id="new"
        ),
        pytest.param(
            "  - name: !!python/object/apply:builtins.exec [\"open('{marker}', 'w')\"]", id="exec"
        ),
        pytest.param("  - name: !!python/name:os.system", id="name"),
    ],
)
def test_object_building_tag_is_refused_and_never_runs(
    tmp_path: Path, baseline: ProcessOutcome, tagged: str
) -> None:
    marker = tmp_path / "pwned"
    policy = write(tmp_path, f"version: 1\nqueues:\n{tagged.format(marker=marker)}\n".encode())

    validated = validate(tmp_path / policy)
    applied = opsctl_process(tmp_path, "apply", policy, "--redis-url", CLOSED_URL)

    assert validated.exit_code == ExitCode.INVALID, validated
    assert f"{policy}:3:" in validated.stdout, validated.stdout
    assert applied.exit_code == ExitCode.INVALID, applied
    assert "Redis" not in applied.stderr
    assert not marker.exists()
    assert_cheap(applied, baseline)


# YAML hazards refused with a clear message: the CLI in-process --------------------------------


def assert_refused(path: Path, *expected: str) -> None:
    """validate and apply both exit 2, quickly, printing exactly the `expected` problems."""
    validated, applied = validate(path), apply(path)

    assert validated.exit_code == ExitCode.INVALID, validated
    assert validated.stdout.splitlines() == [f"{path}:{line}" for line in expected]
    assert applied.exit_code == ExitCode.INVALID, applied
    assert applied.stderr == f"opsctl: error: {validated.stdout}", applied
    assert validated.seconds < 2, validated
    assert applied.seconds < 2, applied


def test_object_building_tag_on_the_whole_document_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "policy.yaml"
    path.write_text(f'!!python/object/apply:os.system ["touch {marker}"]\n')

    assert_refused(
        path, "1:1: the top level is a list; a policy is a mapping with 'version' and 'queues'"
    )
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "version: 1\nqueues:\n  - name: a\nqueues:\n  - name: b\n",
            "4:1: duplicate key 'queues' (first at line 2)",
            id="top-level-queues",
        ),
        pytest.param(
            "version: 1\nredis:\n  url: redis://a\n  url: redis://b\nqueues:\n  - name: a\n",
            "4:3: redis: duplicate key 'url' (first at line 3)",
            id="redis-url",
        ),
        pytest.param(
            'version: 1\n"version": 1\nqueues:\n  - name: a\n',
            "2:1: duplicate key 'version' (first at line 1)",
            id="quoted-and-plain",
        ),
        pytest.param(
            "version: 1\nqueues:\n  - {name: a, action: fail, action: delete}\n",
            "3:29: queues[0]: duplicate key 'action' (first at line 3)",
            id="flow-mapping",
        ),
    ],
)
def test_duplicate_key_is_an_error_not_last_one_wins(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)

    assert_refused(path, expected)


@pytest.mark.parametrize(
    ("after", "line"),
    [
        pytest.param("---\nversion: 1\nqueues:\n  - name: b\n", 4, id="second-policy"),
        pytest.param("---\n", 4, id="empty-second-document"),
        pytest.param("...\n---\nversion: 1\n", 5, id="after-an-end-marker"),
    ],
)
def test_second_document_is_refused_by_apply_as_well(tmp_path: Path, after: str, line: int) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(MINIMAL + after)

    assert_refused(
        path, f"{line}:1: file holds a second YAML document here; keep one policy per file"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            MINIMAL.encode("utf-16"),
            "1:1: byte 0xff is not UTF-8 text; save the file as UTF-8",
            id="utf-16",
        ),
        pytest.param(
            b"version: 1\nqueues:\n  # caf\xe9\n  - name: a\n",
            "3:8: byte 0xe9 is not UTF-8 text; save the file as UTF-8",
            id="latin-1-in-a-comment",
        ),
        pytest.param(
            b"version: 1\nqueues:\n  - name: \xe2\x82\n",
            "3:11: byte 0xe2 is not UTF-8 text; save the file as UTF-8",
            id="truncated-sequence",
        ),
    ],
)
def test_text_that_is_not_utf8_is_refused_at_the_first_bad_byte(
    tmp_path: Path, raw: bytes, expected: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(raw)

    assert_refused(path, expected)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            b"version: 1\nqueues:\n  - name: case\x00strainer\n",
            "3:15: character #x0000 is not allowed in YAML; remove it",
            id="nul-in-a-name",
        ),
        pytest.param(
            b"version: 1\n# \x00\nqueues:\n  - name: a\n",
            "2:3: character #x0000 is not allowed in YAML; remove it",
            id="nul-in-a-comment",
        ),
        pytest.param(
            b"version: 1\nqueues:\n  - name: \x1b[31mred\n",
            "3:11: character #x001b is not allowed in YAML; remove it",
            id="terminal-escape",
        ),
    ],
)
def test_control_character_is_refused_where_it_stands(
    tmp_path: Path, raw: bytes, expected: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(raw)

    assert_refused(path, expected)


def with_bom(text: str) -> bytes:
    return b"\xef\xbb\xbf" + text.encode()


def with_crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def with_bom_and_crlf(text: str) -> bytes:
    return b"\xef\xbb\xbf" + with_crlf(text)


@pytest.mark.parametrize("encode", [with_bom, with_crlf, with_bom_and_crlf])
def test_byte_order_mark_and_crlf_line_ends_are_accepted(
    tmp_path: Path, encode: Callable[[str], bytes]
) -> None:
    path, plain = tmp_path / "policy.yaml", tmp_path / "plain.yaml"
    path.write_bytes(encode(EXAMPLE))
    plain.write_text(EXAMPLE)

    validated, applied = validate(path), apply(path)

    assert validated.exit_code == ExitCode.OK, validated
    assert applied.exit_code == ExitCode.REDIS_UNAVAILABLE, applied
    environ = {"REDIS_URL": CLOSED_URL}
    policy, expected = load_policy(path, environ=environ), load_policy(plain, environ=environ)
    assert (policy.defaults, policy.limits, policy.entries) == (
        expected.defaults,
        expected.limits,
        expected.entries,
    )


@pytest.mark.parametrize("encode", [with_bom, with_crlf, with_bom_and_crlf])
def test_problem_after_a_byte_order_mark_or_crlf_is_placed_as_an_editor_shows_it(
    tmp_path: Path, encode: Callable[[str], bytes]
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(encode(EXAMPLE.replace("max_age: 2h", "max_age: 2 hours")))

    assert_refused(
        path,
        "3:8: note: redis.url: environment variable 'REDIS_URL' is not set"
        " (set it, or give a default with ${REDIS_URL:-...}); the value was not checked",
        "16:14: queues[1].max_age: '2 hours' is not a duration (use 90s, 10m, 2h or 1d)",
    )


# Inputs that once crashed or misled opsctl -------------------------------------------------


def policy_with(tmp_path: Path, line: str, at: str = "queues") -> Path:
    """MINIMAL with `line` added under `at` ("top", "defaults" or "queues")."""
    body = {
        "top": f"version: 1\n{line}\nqueues:\n  - name: a\n",
        "defaults": f"version: 1\ndefaults:\n  {line}\nqueues:\n  - name: a\n",
        "queues": f"version: 1\nqueues:\n  - name: a\n    {line}\n",
    }[at]
    path = tmp_path / "policy.yaml"
    path.write_text(body)
    return path


def test_duration_of_thousands_of_digits_is_refused_not_crashed(tmp_path: Path) -> None:
    path = policy_with(tmp_path, "max_age: " + "1" * 4301 + "s", at="defaults")

    for outcome in (validate(path), apply(path)):
        assert outcome.exit_code == ExitCode.INVALID, outcome
        assert f"{path}:3:12: defaults.max_age: " in outcome.stdout + outcome.stderr


@pytest.mark.parametrize("escape", ["\\U00110000", "\\UFFFFFFFF"])
def test_unicode_escape_past_the_last_code_point_is_invalid_yaml(
    tmp_path: Path, escape: str
) -> None:
    path = policy_with(tmp_path, f'action: "{escape}"')

    for outcome in (validate(path), apply(path)):
        assert outcome.exit_code == ExitCode.INVALID, outcome
        assert f"{path}:4:" in outcome.stdout + outcome.stderr


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("version: 0x" + "f" * 4000 + "\nqueues:\n  - name: a\n", id="version"),
        pytest.param("version: 1\nqueues:\n  - name: 0x" + "f" * 4000 + "\n", id="name"),
        pytest.param(
            "version: 1\nqueues:\n  - name: a\n    max_age: 0x" + "f" * 4000 + "\n",
            id="max-age",
        ),
    ],
)
def test_number_too_long_to_print_is_refused_not_crashed(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)

    validated, applied = validate(path), apply(path)

    assert validated.exit_code in (ExitCode.OK, ExitCode.INVALID), validated
    assert applied.exit_code in (ExitCode.INVALID, ExitCode.REDIS_UNAVAILABLE), applied
    assert "unexpected" not in validated.stderr + applied.stderr


@pytest.mark.parametrize("digits", ["9" * 5000, "-" + "9" * 5000])
def test_a_number_of_thousands_of_digits_is_too_large_and_names_no_tag(
    tmp_path: Path, digits: str
) -> None:
    # The file writes no !!int: the error must not tell the reader to drop one.
    path = policy_with(tmp_path, f"max_age: {digits}")

    outcome = validate(path)

    assert outcome.exit_code == ExitCode.INVALID, outcome
    assert "max_age: the number is too large for any setting" in outcome.stdout
    assert "!!int" not in outcome.stdout


@pytest.mark.parametrize("at", ["defaults", "queues"])
def test_nan_max_percent_is_refused(tmp_path: Path, at: str) -> None:
    path = policy_with(tmp_path, "limits: {max_percent: .nan}", at=at)

    outcome = validate(path)

    assert outcome.exit_code == ExitCode.INVALID, outcome
    assert "max_percent: nan is not a finite number" in outcome.stdout


@pytest.mark.parametrize("escape", ["\\n", "\\N", "\\e[2J"], ids=["newline", "nel", "escape"])
def test_control_character_in_a_key_cannot_break_a_problem_line(
    tmp_path: Path, escape: str
) -> None:
    path = policy_with(tmp_path, f'"x{escape}y": !custom 1', at="top")

    outcome = validate(path)

    assert outcome.exit_code == ExitCode.INVALID, outcome
    assert_problem_lines(outcome, path, path.read_bytes())
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", outcome.stdout), outcome.stdout


def test_interpolation_cannot_amplify_a_policy_past_its_size_cap(
    tmp_path: Path, baseline: ProcessOutcome
) -> None:
    references = "${OPSCTL_FUZZ_BIG}" * 50_000
    policy = write(tmp_path, f"version: 1\nqueues:\n  - name: {references}\n".encode())

    outcome = opsctl_process(tmp_path, "validate", policy, env={"OPSCTL_FUZZ_BIG": "x" * 1000})

    assert outcome.exit_code in (ExitCode.OK, ExitCode.INVALID), outcome
    assert_cheap(outcome, baseline)
