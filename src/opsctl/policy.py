"""Policy files: load YAML safely, interpolate the environment, validate, resolve rules.

A policy file goes through five steps, each a section of this module:

1. read: the file's bytes, refused above 1 MiB, decoded as UTF-8;
2. parse: YAML composed into nodes by the safe loader; no object is ever built from a tag;
3. build: plain values made from the nodes, recording the line and column of every value and
   key, with ``${VAR}`` and ``${VAR:-default}`` replaced from the environment;
4. validate: JSON Schema (``schemas/policy.schema.json``), then what a schema cannot say
   (glob syntax, a queue listed twice, the Redis URL scheme);
5. assemble: defaults and overrides merged into one Rule per queue entry.

Every problem is reported at its file, line and column, all of them at once; no input makes
this module raise anything but PolicyError.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import jsonschema
import yaml
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator

from opsctl.connection import (
    ConnectionOptions,
    Tls,
    mask_url,
    register_secret,
    sentinel_url,
    url_problem,
)
from opsctl.errors import PolicyError, Problem
from opsctl.files import NotReadable, TooLarge, read_file

ACTIONS = ("fail", "requeue", "cancel", "delete")

MAX_FILE_BYTES = 1024 * 1024
"""Largest policy file read, in bytes; real policies are a few hundred bytes."""

MAX_NODES = 100_000
"""Most YAML values built from one file; a value reached through an alias counts again."""

MAX_DEPTH = 64
"""Deepest nesting of mappings and lists accepted in a policy file."""

DEFAULT_KEY_PREFIX = "rq"
"""Prefix of RQ's Redis keys when the policy does not set redis.key_prefix."""

REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://")
"""URL schemes redis-py can connect with."""

#: As in the schema: at most nine digits, then a unit.
_DURATION = re.compile(r"([0-9]{1,9})([smhd])")
#: The largest bare number of minutes the schema allows.
_DURATION_MAX_MINUTES = 1_000_000_000
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_HINT = "use 90s, 10m, 2h or 1d"
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REFERENCE_HINT = "write ${NAME} or ${NAME:-default}"
#: A shell's other forms of a reference (${NAME-x}, ${NAME:?x}, ${NAME:=x}, ${NAME+x}, ...):
#: the name, and the operator.
#: A reference written with spaces around its name (``${ NAME }``, ``${NAME :-x}``).
_SPACED = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(:-.*)?", re.DOTALL)
_OTHER_FORM = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?=+]|)(?:.*)", re.DOTALL)
_GLOB_CHARACTERS = "*?["
#: Ends the note about an unset variable while the value it feeds goes unchecked.
UNCHECKED_SUFFIX = "; the value was not checked"
#: Longest value, in characters, that interpolating the environment may produce.
MAX_VALUE_CHARS = 65_536
_RULE_SETTINGS = (
    "max_age",
    "action",
    "force",
    "dry_run",
    "enabled",
    "max_requeues",
    "lost_after",
    "related_keys",
)
#: The one placeholder a related_keys template may hold.
JOB_ID_PLACEHOLDER = "{job_id}"

_Path = tuple[str | int, ...]
"""Where a value sits in the policy: ("queues", 0, "max_age") is queues[0].max_age."""


@dataclass(frozen=True)
class Rule:
    """The settings that apply to one queue after defaults and overrides are merged."""

    max_age_seconds: int = 600
    action: str = "fail"
    force: bool = False
    dry_run: bool = False
    enabled: bool = True
    source: str = "defaults"  # e.g. "queues[1] (reports-*)", shown in reports
    max_requeues: int = 3  # requeues of one job before a requeue becomes a fail
    limits: Limits | None = None  # the entry's own caps, per queue it matches
    lost_after_seconds: int = 600  # grace before a lost job is acted on
    related_keys: tuple[str, ...] = ()  # key templates deleted along with a job

    def related_keys_of(self, job_id: str, key_prefix: str) -> tuple[str, ...]:
        """The application keys that belong to ``job_id``, from ``related_keys``.

        A key that an odd job id (one holding colons) would place under RQ's
        prefix or opsctl's is left out: see :meth:`kept_related_keys_note`.
        """
        return tuple(
            k for k in self._filled(job_id) if not k.startswith(reserved_prefixes(key_prefix))
        )

    def kept_related_keys_note(self, job_id: str, key_prefix: str) -> str | None:
        """What a delete of ``job_id`` says about the related keys it keeps; None if none.

        Templates are checked when the policy loads, but the id is only known
        later: a template ``r{job_id}`` and an id ``q:queue:default`` name
        RQ's queue. Keys under RQ's prefix or opsctl's are never deleted.
        """
        reserved = reserved_prefixes(key_prefix)
        refused = [k for k in self._filled(job_id) if k.startswith(reserved)]
        if not refused:
            return None
        shown = ", ".join(repr(k) for k in refused)
        return f"kept related keys that belong to RQ or opsctl: {shown}"

    def _filled(self, job_id: str) -> tuple[str, ...]:
        return tuple(t.replace(JOB_ID_PLACEHOLDER, job_id) for t in self.related_keys)


@dataclass(frozen=True)
class Limits:
    """Blast-radius caps for one scope: the whole run, or one queue."""

    max_actions: int | None = None
    max_percent: float | None = None

    def tripped(self, actions: int, inspected: int) -> str | None:
        """Which cap ``actions`` out of ``inspected`` jobs exceeds, in words; None if none."""
        if self.max_actions is not None and actions > self.max_actions:
            planned = "1 action exceeds" if actions == 1 else f"{actions} actions exceed"
            return f"{planned} max_actions {self.max_actions}"
        if self.max_percent is not None and inspected:
            percent = 100.0 * actions / inspected
            if percent > self.max_percent:
                return (
                    f"{actions} of {inspected} started jobs ({percent:.1f}%) exceed "
                    f"max_percent {self.max_percent:g}"
                )
        return None


@dataclass(frozen=True)
class Policy:
    """A validated policy file."""

    path: str
    redis_url: str | None
    key_prefix: str
    defaults: Rule
    entries: tuple[tuple[str, Rule], ...]  # (name or glob, merged rule), in file order
    digest: str  # sha256 hex of the file's bytes
    notes: tuple[Problem, ...] = field(default=())
    limits: Limits | None = None  # caps over the whole run, from defaults.limits
    # Credentials and TLS settings from the redis section; redis_url holds the sentinel
    # section as a redis+sentinel:// URL.
    redis_options: ConnectionOptions = field(default_factory=ConnectionOptions)

    def rule_for(self, queue: str) -> Rule | None:
        """The rule for `queue`, or None when no entry matches it.

        An entry whose name equals `queue` wins over every glob, wherever it stands in the
        file. Otherwise the first glob entry in file order that matches `queue` wins, and
        later globs are not consulted: put narrow globs before broad ones. Globs are
        fnmatch-style (* ? [seq]) and case-sensitive, like RQ's queue names. A disabled entry
        still matches; its rule has enabled=False, so the queue is listed but never touched.
        """
        for name, rule in self.entries:
            if name == queue:
                return rule

        for name, rule in self.entries:
            if _is_glob(name) and fnmatch.fnmatchcase(queue, name):
                return rule
        return None


def load_policy(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    strict_env: bool = True,
    raw: bytes | None = None,
) -> Policy:
    """Load and validate a policy file; raise PolicyError listing every problem.

    With ``raw``, those are the file's bytes (read earlier, as ``watch`` reads them
    to tell a change), and the file is not read again.

    With `strict_env` (the default, for commands that act on Redis) a ``${VAR}`` whose
    variable is unset and has no default is an error. Without it, that is a note, and the
    value is unknown: it is not checked, and the policy treats the key as absent (built-in or
    inherited settings apply, redis_url is None, an entry with an unknown name is left out).
    `environ` defaults to the process environment.
    """
    policy, problems = _inspect(str(path), _environment(environ), strict_env, raw)
    if policy is None:
        raise PolicyError(problems)
    return policy


def validate_files(
    paths: list[str], *, environ: Mapping[str, str] | None = None, strict_env: bool = False
) -> list[Problem]:
    """Every problem (errors and notes) found in the given files.

    Problems come file by file in the order given, each file's sorted by line and column.
    """
    variables = _environment(environ)
    problems: list[Problem] = []
    for path in paths:
        problems.extend(_inspect(path, variables, strict_env)[1])
    return problems


def parse_duration(text: str | int) -> int:
    """Seconds in a duration such as 90s, 10m, 2h, 1d or a bare integer of minutes.

    Raise ValueError for anything else, including booleans, floats and negative numbers.
    """
    if isinstance(text, int) and not isinstance(text, bool) and 0 <= text <= _DURATION_MAX_MINUTES:
        return text * _SECONDS_PER_UNIT["m"]

    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        if _too_long(text):
            raise ValueError(f"{_describe(text)} {_too_long_words(text)}")
        raise ValueError(f"{_describe(text)} is not a duration ({_DURATION_HINT})")
    return int(match[1]) * _SECONDS_PER_UNIT[match[2]]


def load_policy_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that policy files follow; `opsctl schema` prints it.

    An installed wheel carries it as opsctl/schemas/policy.schema.json; a source checkout
    has it at schemas/policy.schema.json, beside src/.
    """
    schema: dict[str, Any] = json.loads(_schema_text())
    return schema


# Reading and parsing ------------------------------------------------------------------------


class _Refused(Exception):
    """Raised within this module when a file cannot be looked at any further."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _inspect(
    file: str, environ: Mapping[str, str], strict_env: bool, raw: bytes | None = None
) -> tuple[Policy | None, list[Problem]]:
    """The policy in `file` (None when it has an error) and every problem found in it;
    `raw` holds its bytes when they were read already."""
    try:
        if raw is None:
            raw = _read_bytes(file)
        document = _build_document(file, raw, environ, strict_env)
    except _Refused as refused:
        return None, [refused.problem]

    _validate(document)
    problems = sorted(dict.fromkeys(document.problems), key=lambda p: (p.line, p.column))

    if any(problem.severity == "error" for problem in problems):
        return None, problems
    return _assemble(document, raw, problems), problems


def _environment(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    """The variables ${VAR} references read: `environ`, or the process environment."""
    return os.environ if environ is None else environ


def read_policy_bytes(file: str) -> bytes:
    """The bytes of the policy file `file`, read as `validate` and `apply` read them.

    Raises PolicyError when it cannot be read or is too large to be a policy.
    """
    try:
        return _read_bytes(file)
    except _Refused as refused:
        raise PolicyError([refused.problem]) from None


def _read_bytes(file: str) -> bytes:
    """The bytes of `file`; refuses one that cannot be read or is too large to be a policy."""
    try:
        return read_file(file, MAX_FILE_BYTES)
    except NotReadable as refused:
        raise _Refused(_file_problem(file, f"cannot read file: {refused.reason}")) from None
    except TooLarge as large:
        message = f"file is {_mebibytes(large.size_bytes)} MiB; policy files are limited to 1 MiB"
        raise _Refused(_file_problem(file, message)) from None


def _mebibytes(size_bytes: int) -> str:
    """`size_bytes` in MiB, rounded up to one decimal so that 1 MiB + 1 byte is not '1'."""
    return f"{math.ceil(size_bytes * 10 / MAX_FILE_BYTES) / 10:g}"


def _file_problem(file: str, message: str, line: int = 1, column: int = 1) -> Problem:
    """A problem with the file as a whole rather than with one value in it."""
    return Problem(file, line, column, "", message)


def _decode(file: str, raw: bytes) -> str:
    """The text of `raw`, which must be UTF-8; a leading byte-order mark is dropped."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = raw.rfind(b"\n", 0, error.start) + 1
        line = raw.count(b"\n", 0, error.start) + 1
        column = len(raw[line_start : error.start].decode("utf-8")) + 1
        message = f"byte 0x{raw[error.start]:02x} is not UTF-8 text; save the file as UTF-8"
        raise _Refused(_file_problem(file, message, line, column)) from None
    return text.removeprefix("\ufeff")


def _compose(file: str, text: str) -> yaml.Node:
    """The one YAML document in `text`, as nodes; tags are kept as names, never constructed."""
    try:
        loader = _Loader(text)
    except yaml.YAMLError as error:
        raise _Refused(_yaml_problem(file, text, error)) from None

    try:
        return _single_document(file, loader)
    except yaml.YAMLError as error:
        raise _Refused(_yaml_problem(file, text, error)) from None
    except RecursionError:
        message = f"values are nested too deeply; policy files nest at most {MAX_DEPTH} levels"
        raise _Refused(_file_problem(file, message)) from None
    except (ValueError, OverflowError) as error:
        # PyYAML raises these for escapes beyond Unicode, such as "\U00110000".
        mark = loader.get_mark()
        problem = _file_problem(file, f"invalid YAML: {error}", mark.line + 1, mark.column + 1)
        raise _Refused(problem) from None
    finally:
        loader.dispose()


def _single_document(file: str, loader: yaml.SafeLoader) -> yaml.Node:
    """The document `loader` reads; refuses an empty stream and a second document."""
    node = loader.get_node() if loader.check_node() else None
    if node is None:
        message = "file is empty; a policy needs at least 'version: 1' and a 'queues' list"
        raise _Refused(_file_problem(file, message))

    if loader.check_node():
        next_event = loader.peek_event()  # type: ignore[no-untyped-call]  # untyped in stubs
        line, column = _event_position(next_event)
        message = "file holds a second YAML document here; keep one policy per file"
        raise _Refused(_file_problem(file, message, line, column))
    return node


def _event_position(event: Any) -> tuple[int, int]:
    """The 1-based line and column where a parser event starts."""
    mark = getattr(event, "start_mark", None)
    return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)


def _yaml_problem(file: str, text: str, error: yaml.YAMLError) -> Problem:
    """One problem, on one line, for a YAML syntax or character error."""
    if isinstance(error, yaml.reader.ReaderError):
        line, column = _text_position(text, error.position)
        message = f"character #x{error.character:04x} is not allowed in YAML; remove it"
        return _file_problem(file, message, line, column)

    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        reason = error.problem or error.context or "unreadable"
        return _file_problem(file, f"invalid YAML: {reason}", line, column)
    return _file_problem(file, f"invalid YAML: {error}".splitlines()[0])


def _text_position(text: str, index: int) -> tuple[int, int]:
    """The 1-based line and column of the character at `index` in `text`."""
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


# Building values ----------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_STR_TAG = _TAG + "str"
#: A whole number as YAML writes one in decimal (a sign, digits, underscores).
_DIGITS = re.compile(r"[-+]?[0-9][0-9_]*")
_TOO_LARGE = "the number is too large for any setting"
_MAP_TAG = _TAG + "map"
_SEQ_TAG = _TAG + "seq"
_MERGE_TAG = _TAG + "merge"
_CONSTRUCTOR = yaml.constructor.SafeConstructor()


#: YAML 1.2's booleans, untagged or tagged !!bool; anything else (yes, on, ...) is not one.
_YAML12_BOOLEANS = {v: True for v in ("true", "True", "TRUE")} | {
    v: False for v in ("false", "False", "FALSE")
}


def _yaml12_booleans(
    resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]],
) -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    """``resolvers`` with YAML 1.2's booleans (true and false, in three cases) in
    place of YAML 1.1's, which also read yes, no, on, off, y and n as booleans.

    YAML 1.2 is what schema checkers and editors read a policy as, so `force: yes`
    is refused here as it is there, rather than valid here and wrong there, and a
    queue named `no` is the queue 'no'."""
    kept = {
        first: [(tag, regexp) for tag, regexp in found if tag != _TAG + "bool"]
        for first, found in resolvers.items()
    }
    boolean = re.compile("^(?:" + "|".join(_YAML12_BOOLEANS) + ")$")
    for first in "tTfF":
        kept.setdefault(first, []).insert(0, (_TAG + "bool", boolean))
    # YAML 1.2 reads decimal digits as an integer whatever their leading zeros
    # (08 is 8); YAML 1.1 read 010 as octal and 08 as text.
    decimal = re.compile(r"^[-+]?[0-9]+$")
    for first in "-+0123456789":
        kept.setdefault(first, []).insert(0, (_TAG + "int", decimal))
    return {first: found for first, found in kept.items() if found}


class _Resolver(yaml.resolver.Resolver):
    """PyYAML's resolver with YAML 1.2's booleans and decimal integers."""

    yaml_implicit_resolvers = _yaml12_booleans(yaml.resolver.Resolver.yaml_implicit_resolvers)


class _Loader(yaml.SafeLoader):
    """The safe loader with YAML 1.2's booleans."""

    yaml_implicit_resolvers = _Resolver.yaml_implicit_resolvers


_RESOLVER = _Resolver()


class _NotDecimal(ValueError):
    """An integer written in one of YAML 1.1's other notations."""


_DECIMAL = re.compile(r"[-+]?[0-9]+")


def _decimal_int(node: yaml.ScalarNode) -> int:
    """An integer written in decimal digits. YAML 1.1 also reads 010 as octal 8,
    0x10, 1_000 and 1:30 (sexagesimal); in a policy those are mistakes waiting to
    happen (a max_age of 010 would be 8 minutes), so they are refused."""
    text = str(node.value)
    if not _DECIMAL.fullmatch(text):
        raise _NotDecimal(text)
    return int(text, 10)


_SCALARS: dict[str, Callable[[yaml.ScalarNode], Any]] = {
    _TAG + "null": _CONSTRUCTOR.construct_yaml_null,
    _TAG + "bool": lambda node: _YAML12_BOOLEANS[str(node.value)],
    _TAG + "int": _decimal_int,
    _TAG + "float": _CONSTRUCTOR.construct_yaml_float,
    # Dates are kept as written; no policy value is a date, so the schema rejects them.
    _TAG + "timestamp": lambda node: str(node.value),
}
"""How each standard scalar tag other than str becomes a value; any other tag is refused."""

_CONSTRUCTION_ERRORS = (ValueError, KeyError, TypeError, yaml.YAMLError)


@dataclass
class _Document:
    """Plain values built from one policy file, and where each of them was written."""

    file: str
    text: str
    data: Any = None
    value_marks: dict[_Path, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[_Path, tuple[int, int]] = field(default_factory=dict)
    env_names: dict[_Path, tuple[str, ...]] = field(default_factory=dict)
    settled: set[_Path] = field(default_factory=set)  # reported or unknown: not checked again
    unknown: set[_Path] = field(default_factory=set)  # from an unset variable
    problems: list[Problem] = field(default_factory=list)

    def report(
        self,
        path: _Path,
        message: str,
        *,
        at: tuple[int, int] | None = None,
        severity: str = "error",
    ) -> None:
        """Record a problem with the value at `path`, located at that value unless `at`."""
        line, column = at or self.value_marks.get(path, (1, 1))
        self.problems.append(
            Problem(self.file, line, column, _format_path(path), message, severity)
        )

    def describe(self, path: _Path, value: Any) -> str:
        """`value` quoted for a message, unless it came from the environment or is a URL."""
        names = self.env_names.get(path)
        if names:
            return "the value from " + ", ".join(f"${{{name}}}" for name in names)
        if path == ("redis", "url"):
            return "the URL"
        if path and path[-1] == "password":
            return "the password"
        return _describe(value)

    def is_settled(self, path: _Path) -> bool:
        """Whether the value at `path`, or one containing it, needs no further checks."""
        return any(path[:length] in self.settled for length in range(len(path) + 1))

    def value(self, path: _Path) -> Any:
        """The value at `path`, or None when the policy has none there."""
        current = self.data
        for part in path:
            if isinstance(part, str) and isinstance(current, dict):
                current = current.get(part)
            elif isinstance(part, int) and isinstance(current, list) and part < len(current):
                current = current[part]
            else:
                return None
        return current


def _build_document(
    file: str, raw: bytes, environ: Mapping[str, str], strict_env: bool
) -> _Document:
    """Read, parse and build `raw`; refuses a file whose top level is not a mapping."""
    text = _decode(file, raw)
    node = _compose(file, text)
    document = _Document(file, text)
    document.data = _Builder(document, environ, strict_env).build(node, (), 0)

    if not isinstance(document.data, dict):
        # Its kind alone: a file that is one line of text may be a secret given by
        # mistake (a password file, a token), and this message reaches logs.
        what = _describe(document.data) if document.data is None else _kind_of(document.data)
        message = f"the top level is {what}; a policy is a mapping with 'version' and 'queues'"
        raise _Refused(_file_problem(file, message, *_position(node)))
    return document


class _Builder:
    """Builds plain values from YAML nodes into a _Document, interpolating the environment.

    An alias is expanded each time it is met, so the values it points to count again; the
    count and the nesting depth are capped, which defeats alias-expansion bombs and
    self-referencing anchors.
    """

    def __init__(self, document: _Document, environ: Mapping[str, str], strict_env: bool) -> None:
        self.document = document
        self.environ = environ
        self.strict_env = strict_env
        self.nodes_built = 0
        self.met: set[int] = set()  # the nodes built so far, by identity
        self.repeated = False  # whether one was built twice

    def build(self, node: yaml.Node, path: _Path, depth: int) -> Any:
        """The plain value of `node`, which sits at `path`."""
        self._count(node, depth)
        self.document.value_marks[path] = _position(node)

        if isinstance(node, yaml.MappingNode):
            self._check_tag(node, path, _MAP_TAG)
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            self._check_tag(node, path, _SEQ_TAG)
            return [self.build(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
        return self._scalar(node, path)

    def _count(self, node: yaml.Node, depth: int) -> None:
        """Count one more value; refuse the file past MAX_NODES or MAX_DEPTH."""
        self.nodes_built += 1
        # A node met again was reached through an alias.
        self.repeated = self.repeated or id(node) in self.met
        self.met.add(id(node))
        if self.nodes_built > MAX_NODES:
            if self.repeated:
                message = (
                    f"file expands to more than {MAX_NODES:,} YAML values (aliases repeat what "
                    "they point to); a policy needs a few dozen"
                )
            else:
                message = (
                    f"file holds more than {MAX_NODES:,} YAML values; a policy needs a few "
                    "dozen (one entry can cover many queues with a glob such as 'reports-*')"
                )
            raise _Refused(_file_problem(self.document.file, message, *_position(node)))
        if depth > MAX_DEPTH:
            message = f"values are nested more than {MAX_DEPTH} levels deep; flatten the file"
            raise _Refused(_file_problem(self.document.file, message, *_position(node)))

    def _check_tag(self, node: yaml.Node, path: _Path, expected: str) -> None:
        """Report an explicit tag other than the standard one for this kind of node."""
        if node.tag != expected:
            self._refuse_tag(node, path)

    def _refuse_tag(self, node: yaml.Node, path: _Path, at: tuple[int, int] | None = None) -> None:
        """Report a tag opsctl does not read; the value it carries is not checked further."""
        message = f"tag {_short_tag(node.tag)!r} is not allowed; policy files use plain values"
        self.document.report(path, message, at=at)
        self.document.settled.add(path)

    def _mapping(self, node: yaml.MappingNode, path: _Path, depth: int) -> dict[str, Any]:
        """The mapping's values by key; duplicate and unreadable keys are reported."""
        values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, path, depth)
            if key is None:
                continue

            key_path = (*path, key)
            where = _position(key_node)
            if key in values:
                first_line = self.document.key_marks[key_path][0]
                message = f"duplicate key {key!r} (first at line {first_line})"
                self.document.report(path, message, at=where)
                continue

            self.document.key_marks[key_path] = where
            values[key] = self.build(value_node, key_path, depth + 1)
        return values

    def _key(self, node: yaml.Node, path: _Path, depth: int) -> str | None:
        """The text of a mapping key, or None when the key cannot be used."""
        self._count(node, depth + 1)
        where = _position(node)
        if node.tag == _MERGE_TAG:
            message = "merge keys ('<<') are not supported; write the keys out in full"
            self.document.report(path, message, at=where)
            return None

        if not isinstance(node, yaml.ScalarNode):
            message = "a key must be a plain word, not a mapping or list"
            self.document.report(path, message, at=where)
            return None
        if node.tag != _STR_TAG and node.tag not in _SCALARS:
            self._refuse_tag(node, path, at=where)
            return None
        return str(node.value)

    def _scalar(self, node: yaml.Node, path: _Path) -> Any:
        """The value of a scalar node, typed by its tag."""
        assert isinstance(node, yaml.ScalarNode)  # composer yields only three node kinds
        if node.tag == _STR_TAG:
            return self._string(node, path)

        construct = _SCALARS.get(node.tag)
        if construct is None:
            self._refuse_tag(node, path)
            return str(node.value)
        try:
            return self._sane(construct(node), path)
        except _NotDecimal:
            what = self.document.describe(path, str(node.value))
            message = f"{what} is not a plain decimal number (write digits only, such as 10)"
            self.document.report(path, message)
            self.document.settled.add(path)
            return str(node.value)
        except _CONSTRUCTION_ERRORS:
            if node.tag == _TAG + "int" and _DIGITS.fullmatch(str(node.value)):
                # Too many digits for Python to read: far more than any setting holds.
                return self._refused_number(path, _TOO_LARGE)
            what = self.document.describe(path, str(node.value))
            tag = _short_tag(node.tag)
            self.document.report(path, f"{what} is not a valid {tag} value; fix it or drop {tag}")
            self.document.settled.add(path)
            return str(node.value)

    def _string(self, node: yaml.ScalarNode, path: _Path) -> Any:
        """A string with the environment interpolated.

        An unquoted value is then typed as if its text had been written in the file, so
        ``force: ${FORCE}`` with FORCE=true is a boolean, as ``force: true`` would be.
        """
        text = str(node.value)
        if "${" not in text:
            return text

        result = _interpolate(text, self.environ)
        if result.error is not None:
            offset, message = result.error
            self.document.report(path, message, at=self._position_in(node, offset))
            self.document.settled.add(path)
            return text

        self.document.env_names[path] = result.names
        if result.unset:
            self._report_unset(path, result.unset)
            return ""
        value = _retype(result.text) if node.style is None else result.text
        return self._sane(value, path)

    def _sane(self, value: Any, path: _Path) -> Any:
        """``value``, or a placeholder after reporting a number no setting can hold."""
        if isinstance(value, float) and not math.isfinite(value):
            return self._refused_number(path, f"{value} is not a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 63:
            return self._refused_number(path, _TOO_LARGE)
        return value

    def _refused_number(self, path: _Path, message: str) -> str:
        """Report a number no setting can hold; the placeholder that stands for it."""
        self.document.report(path, message)
        self.document.settled.add(path)
        return "<number>"

    def _report_unset(self, path: _Path, names: tuple[str, ...]) -> None:
        """Report unset variables: an error under strict_env, a note otherwise."""
        self.document.settled.add(path)
        self.document.unknown.add(path)
        severity = "error" if self.strict_env else "note"
        for name in names:
            message = (
                f"environment variable {name!r} is not set "
                f"(set it, or give a default with ${{{name}:-...}})"
            )
            if not self.strict_env:
                message += UNCHECKED_SUFFIX
            self.document.report(path, message, severity=severity)

    def _position_in(self, node: yaml.ScalarNode, offset: int) -> tuple[int, int]:
        """Where character `offset` of a scalar's value was written, when that is knowable.

        For a one-line plain or quoted scalar without escapes the value is the source text;
        otherwise (folded lines, escapes) the scalar's own start is the best answer.
        """
        line, column = _position(node)
        start, end = node.start_mark.index, node.end_mark.index
        source = self.document.text[start:end]
        if source == node.value:
            return line, column + offset
        if source[1:-1] == node.value and source[:1] in ("'", '"'):
            return line, column + 1 + offset
        return line, column


def _position(node: yaml.Node) -> tuple[int, int]:
    """The 1-based line and column where `node` starts."""
    mark = node.start_mark
    return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)


def _short_tag(tag: str) -> str:
    """A tag as it is written in YAML: tag:yaml.org,2002:python/object is !!python/object."""
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def _retype(text: str) -> Any:
    """`text` typed as YAML types an unquoted scalar: true is a boolean, 5 an integer."""
    tag: str = _RESOLVER.resolve(  # type: ignore[no-untyped-call]  # untyped in the stubs
        yaml.ScalarNode, text, (True, False)
    )
    construct = _SCALARS.get(tag)
    if construct is None:
        return text
    try:
        return construct(yaml.ScalarNode(tag, text))
    except _CONSTRUCTION_ERRORS:
        return text


@dataclass(frozen=True)
class _Interpolation:
    """The outcome of replacing ${VAR} references in one string."""

    text: str
    names: tuple[str, ...] = ()  # every variable referenced, in order
    unset: tuple[str, ...] = ()  # variables neither set nor given a default
    error: tuple[int, str] | None = None  # offset of the bad reference, and why


def _interpolate(text: str, environ: Mapping[str, str]) -> _Interpolation:
    """`text` with every ${VAR} and ${VAR:-default} replaced from `environ`.

    As in POSIX shells, ${VAR:-default} takes the default when VAR is unset or empty. A `$`
    not followed by `{` is kept as written. A default cannot contain `}`, nor
    another reference.
    """
    parts: list[str] = []
    names: list[str] = []
    unset: list[str] = []
    position = 0
    length = 0
    while (start := text.find("${", position)) != -1:
        end = text.find("}", start)
        if end == -1:
            return _Interpolation(text, error=(start, f"'${{' is never closed ({_REFERENCE_HINT})"))

        name, has_default, default = text[start + 2 : end].partition(":-")
        if not _VARIABLE_NAME.fullmatch(name):
            inside = text[start + 2 : end]
            form = _OTHER_FORM.fullmatch(inside)
            spaced = _SPACED.fullmatch(inside)
            if spaced is not None:
                message = f"no spaces around the name: write ${{{spaced[1]}{spaced[2] or ''}}}"
            elif form is not None:
                written = f"'${{{form[1]}{form[2]}...}}'"
                message = f"{written} is a form opsctl does not take ({_REFERENCE_HINT})"
            else:
                message = f"'${{' is not followed by a variable name ({_REFERENCE_HINT})"
            return _Interpolation(text, error=(start, message))
        if "${" in default:
            message = "a default cannot hold another ${...}: write it as plain text"
            return _Interpolation(text, error=(start, message))

        value = environ.get(name)
        if has_default and not value:
            value = default
        names.append(name)
        if value is None:
            unset.append(name)
        parts += [text[position:start], value or ""]
        length += start - position + len(value or "")
        if length > MAX_VALUE_CHARS:
            message = (
                f"the environment expands this value past {MAX_VALUE_CHARS:,} characters, "
                "the most a value may hold"
            )
            return _Interpolation(text, error=(start, message))
        position = end + 1

    parts.append(text[position:])
    return _Interpolation("".join(parts), tuple(dict.fromkeys(names)), tuple(unset))


# Validating ---------------------------------------------------------------------------------

_VALUE_MESSAGES = {
    "version": "{value} is not supported (use 1)",
    "max_age": "{value} is not a duration (" + _DURATION_HINT + ")",
    "action": "{value} is not one of " + ", ".join(ACTIONS),
    "force": "{value} is not a boolean (use true or false)",
    "dry_run": "{value} is not a boolean (use true or false)",
    "enabled": "{value} is not a boolean (use true or false)",
    "max_requeues": "{value} is not a count (use a whole number, 0 or more)",
    "lost_after": "{value} is not a duration (" + _DURATION_HINT + ")",
    "related_keys": "{value} is not a list (write one key template per item)",
    "related_key": "{value} is not a key template (use a string such as 'progress:{job_id}')",
    "max_actions": "{value} is not a count (use a whole number, 0 or more)",
    "max_percent": "{value} is not a percentage (use a number from 0 to 100)",
    "limits": "{value} is not a mapping (put max_actions: and max_percent: beneath it)",
    "name": (
        "{value} is not a queue name (use a non-empty string; quote a name that YAML reads "
        "as something else: a number, true, false or null)"
    ),
    "key_prefix": "{value} is not a key prefix (use letters, digits and _ . : - { })",
    "url": "is not a valid Redis URL (expected redis://, rediss://, unix:// or redis+sentinel://)",
    "redis": "{value} is not a mapping (put url: and key_prefix: beneath it)",
    "username": "{value} is not a user name (use a non-empty string)",
    "password": "{value} is not a string (write ${VAR}, or quote the value)",
    "tls": "{value} is not a mapping (put ca_cert:, cert:, key: and verify: beneath it)",
    "ca_cert": "{value} is not a file path (use a non-empty string)",
    "cert": "{value} is not a file path (use a non-empty string)",
    "key": "{value} is not a file path (use a non-empty string)",
    "verify": "{value} is not one of full, certificate, none",
    "sentinel": "{value} is not a mapping (put hosts: and service: beneath it)",
    "hosts": "{value} is not a list (write one HOST:PORT per sentinel)",
    "service": "{value} is not a service name (letters, digits and _ . -)",
    "db": "{value} is not a database number (use a whole number, 0 or more)",
    "defaults": "{value} is not a mapping (put max_age:, action: and so on beneath it)",
    "queues": "{value} is not a list (write one '- name: ...' entry per queue)",
    "entry": "{value} is not a queue entry (write it as '- name: ...')",
}
"""What is wrong with a value, by the key it sits under ("entry": an item of queues)."""

_EMPTY_QUEUES = (
    "the list is empty; add at least one '- name: ...' entry "
    "(a policy that matches no queue is a mistake)"
)


def _validate(document: _Document) -> None:
    """Report every schema violation and every problem the schema cannot express.

    `queues` must hold at least one entry: a policy that matches no queue does nothing,
    which is never what its author meant.
    """
    for error in _validator().iter_errors(document.data):
        for leaf in _leaf_errors(error):
            _report_schema_error(document, leaf)

    _check_redis_url(document)
    _check_credentials(document)
    _check_tls(document)
    _check_queue_names(document)
    _check_related_keys(document)
    _check_zero_durations(document)


def _types_of(error: ValidationError) -> set[str]:
    """The types a schema "type" error asked for."""
    wanted = error.validator_value
    if isinstance(wanted, str):
        return {wanted}
    return {str(w) for w in wanted} if isinstance(wanted, list) else set()


def _structure_wanted(error: ValidationError) -> bool:
    """Whether the error says a mapping or list is needed, and nothing else would do
    (a boolean or a number can come from a variable: its text is typed)."""
    wanted = _types_of(error)
    return error.validator == "type" and bool(wanted) and wanted <= {"object", "array"}


def _leaf_errors(error: ValidationError) -> Iterator[ValidationError]:
    """The errors that say what is wrong, found inside a oneOf or anyOf when they are deeper.

    A oneOf's own error names no branch. When a branch failed deeper inside the value than
    the oneOf itself, that branch is the one the author was writing, and its errors are the
    useful ones; when every branch failed at the value itself, the oneOf error stands.
    """
    depth = len(error.absolute_path)
    deeper = [e for e in error.context or () if len(e.absolute_path) > depth]
    if error.validator in ("oneOf", "anyOf") and deeper:
        for inner in deeper:
            yield from _leaf_errors(inner)
    else:
        yield error


def _report_schema_error(document: _Document, error: ValidationError) -> None:
    """Report a schema error in opsctl's words, at the line of the value it concerns."""
    path: _Path = tuple(error.absolute_path)
    if path in document.unknown and _structure_wanted(error):
        # Whatever the unset variable will hold, it gives text: never valid here.
        # That is the one problem to fix: that it is unset no longer matters.
        shown = _format_path(path)
        document.problems = [
            p
            for p in document.problems
            if not (p.path == shown and p.message.startswith("environment variable "))
        ]
        what = "a mapping" if "object" in _types_of(error) else "a list"
        document.report(
            path,
            f"{document.describe(path, None)} can only give text, and this must be {what} "
            "(write it out here; variables can stand for the values inside it)",
        )
        return
    if document.is_settled(path):
        return

    if error.validator == "additionalProperties":
        _report_unknown_keys(document, path, error)
    elif error.validator == "not" and path[-1:] in (("max_age",), ("lost_after",)):
        return  # a zero: reported in words by _check_zero_durations
    elif error.validator in ("pattern", "not") and _kind(path) == "related_key":
        return  # reported in words by _check_related_keys
    elif error.validator == "not" and path == ("redis",):
        # Only a mapping can hold both; another value has its own error.
        if isinstance(error.instance, dict):
            message = "give url or sentinel, not both (both say where Redis is)"
            document.report(path, message, at=document.key_marks.get(("redis", "sentinel")))
    elif path[:2] == ("redis", "sentinel") and len(path) == 4 and path[2] == "hosts":
        what = document.describe(path, error.instance)
        document.report(
            path, f"{what} is not a sentinel address (use HOST or HOST:PORT, PORT 1 to 65535)"
        )
    elif error.validator == "required":
        _report_missing_keys(document, path, error)
    elif error.validator == "dependentRequired":
        _report_missing_partners(document, path, error)
    elif error.validator == "minItems" and path == ("queues",):
        document.report(path, _EMPTY_QUEUES)
    elif error.validator == "minItems" and path == ("redis", "sentinel", "hosts"):
        document.report(path, "the list is empty; give at least one sentinel as HOST:PORT")
    elif error.validator == "maxItems" and isinstance(error.instance, list):
        most = error.validator_value
        document.report(path, f"holds {len(error.instance)} items; at most {most} are allowed")
    elif error.validator == "maximum":
        what = document.describe(path, error.instance)
        document.report(path, f"{what} is more than the most allowed, {error.validator_value:,}")
    elif _kind(path) in ("max_age", "lost_after") and _too_long(error.instance):
        what = document.describe(path, error.instance)
        document.report(path, f"{what} {_too_long_words(error.instance)}")
    else:
        template = _VALUE_MESSAGES.get(_kind(path), "{value} is not allowed here")
        what = document.describe(path, error.instance)
        document.report(path, template.replace("{value}", what))


def _too_long_words(value: Any) -> str:
    """Why a duration :func:`_too_long` calls too long is refused, after its value."""
    if isinstance(value, int):
        return f"is more minutes than the most allowed, {_DURATION_MAX_MINUTES:,}"
    digits = len(str(value)) - 1
    return (
        f"has {digits} digits before its unit; at most 9 are allowed (as in 999999999{value[-1]})"
    )


def _too_long(value: Any) -> bool:
    """Whether ``value`` is written as a duration but is past the longest one allowed."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value > _DURATION_MAX_MINUTES
    return isinstance(value, str) and re.fullmatch(r"[0-9]+[smhd]", value) is not None


def _report_unknown_keys(document: _Document, path: _Path, error: ValidationError) -> None:
    """One problem per unknown key, located at the key."""
    allowed = list(error.schema.get("properties", {})) if isinstance(error.schema, dict) else []
    keys = error.instance if isinstance(error.instance, dict) else {}
    for key in keys:
        if key not in allowed:
            message = f"unknown key {key!r} (allowed: {', '.join(allowed)})"
            document.report(path, message, at=document.key_marks.get((*path, key)))


def _report_missing_keys(document: _Document, path: _Path, error: ValidationError) -> None:
    """One problem per missing key, located at the mapping that lacks it."""
    present = error.instance if isinstance(error.instance, dict) else {}
    required = error.validator_value if isinstance(error.validator_value, list) else []
    for key in required:
        if key not in present:
            document.report(path, f"missing required key {key!r}")


def _report_missing_partners(document: _Document, path: _Path, error: ValidationError) -> None:
    """One problem per key given without a key it needs (a TLS cert without its key)."""
    present = error.instance if isinstance(error.instance, dict) else {}
    needs = error.validator_value if isinstance(error.validator_value, dict) else {}
    for key, partners in needs.items():
        for partner in partners:
            if key in present and partner not in present:
                message = f"{key!r} is given without {partner!r}; give both, or neither"
                document.report(path, message, at=document.key_marks.get((*path, key)))


def _kind(path: _Path) -> str:
    """Which entry of _VALUE_MESSAGES describes the value at `path`."""
    if not path:
        return "top"
    if len(path) > 1 and path[-2] == "related_keys":
        return "related_key"
    return "entry" if isinstance(path[-1], int) else path[-1]


#: A quoted part of a message about a URL.
_URL_PART = re.compile(r"'([^']*)'")


def _unquoted(part: re.Match[str], url: str) -> str:
    """A quoted part of a message about ``url`` that came from the environment:
    "(not shown)" when it is a part of the URL, kept when it is punctuation the
    message names (':', '//')."""
    words = part[1]
    return "(not shown)" if words in url and any(c.isalnum() for c in words) else part[0]


def _check_redis_url(document: _Document) -> None:
    """Report a Redis URL whose scheme redis-py cannot connect with; never quote the URL."""
    path: _Path = ("redis", "url")
    url = document.value(path)
    if document.is_settled(path) or not isinstance(url, str):
        return
    if not url.startswith(REDIS_URL_SCHEMES):
        # A URL from the environment is named by its variable, never quoted.
        source = f"{document.describe(path, url)} " if path in document.env_names else ""
        document.report(path, source + _VALUE_MESSAGES["url"])
        return
    # What a connection would refuse (no host, a port or database that is not
    # a number, ...) is an error here too, so that validate agrees with apply.
    why = url_problem(url)
    if why:
        if path in document.env_names:
            # Parts of a URL from the environment are never quoted either.
            why = _URL_PART.sub(lambda m: _unquoted(m, url), why)
        document.report(path, f"{document.describe(path, url)}: {why}")
        return
    user_path: _Path = ("redis", "username")
    username = document.value(user_path)
    url_user = unquote(urlsplit(url).username or "")
    if (
        isinstance(username, str)
        and url_user
        and username != url_user
        and not document.is_settled(user_path)
    ):
        # The URL's user is never quoted: the URL may come from a secret.
        message = "names another user than the URL does; give the user in one place"
        document.report(user_path, f"{document.describe(user_path, username)} {message}")


def _check_credentials(document: _Document) -> None:
    """Report a user name or password no connection could send: one holding a lone
    surrogate (a YAML escape such as "\\ud800"), which is neither text nor a byte kept
    from the environment. Apply would fail on it in words that blame the URL."""
    for path in (("redis", "username"), ("redis", "password"), ("redis", "sentinel", "password")):
        value = document.value(path)
        if not isinstance(value, str) or document.is_settled(path):
            continue
        try:
            value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            message = "holds a lone surrogate (such as \\ud800), which no connection can send"
            document.report(path, f"{document.describe(path, value)} {message}")


def _check_tls(document: _Document) -> None:
    """Report TLS settings that no connection of this policy would use."""
    tls_path: _Path = ("redis", "tls")
    if document.value(tls_path) is None or document.is_settled(tls_path):
        return
    at = document.key_marks.get(tls_path)
    url = document.value(("redis", "url"))
    plain = isinstance(url, str) and not url.startswith("rediss://")
    if document.value(("redis", "sentinel")) is not None:
        message = "TLS through Redis Sentinel is not supported; give a rediss:// url instead"
        document.report(tls_path, message, at=at)
    elif plain and not document.is_settled(("redis", "url")):
        message = "TLS settings need a rediss:// url (this one does not use TLS)"
        document.report(tls_path, message, at=at)


def _setting_paths(document: _Document, name: str) -> list[_Path]:
    """Where setting ``name`` may stand: in the defaults and in each queue entry."""
    queues = document.value(("queues",))
    count = len(queues) if isinstance(queues, list) else 0
    return [("defaults", name), *(("queues", i, name) for i in range(count))]


#: Why a max_age of zero is refused: many tools read 0 as "no limit", and here
#: it would stop every job a live worker runs.
ZERO_MAX_AGE = (
    "is zero: every job a live worker runs would be overdue at once, and stopped; "
    "give a positive duration (or {force} to act on every started job)"
)


#: Why a lost_after of zero is refused: it is the grace that covers a worker
#: moving a job between places, which takes several steps.
ZERO_LOST_AFTER = (
    "is zero: a job a worker has just taken, and not yet entered everywhere, would be "
    "acted on at once; give a positive duration, well above a worker's monitoring interval"
)


def _check_zero_durations(document: _Document) -> None:
    """Report a max_age or lost_after of zero, in the defaults or in any queue entry."""
    why = {"max_age": ZERO_MAX_AGE.format(force="force: true"), "lost_after": ZERO_LOST_AFTER}
    for name, words in why.items():
        for path in _setting_paths(document, name):
            value = document.value(path)
            if value is None or document.is_settled(path):
                continue
            try:
                zero = parse_duration(value) == 0
            except ValueError:
                continue  # reported by the schema
            if zero:
                document.report(path, f"{document.describe(path, value)} {words}")


def _check_queue_names(document: _Document) -> None:
    """Report malformed globs and queue names listed twice (the second entry would be dead)."""
    first_index: dict[str, int] = {}
    for index, name in _queue_names(document):
        path: _Path = ("queues", index, "name")
        what = document.describe(path, name)
        reason = _glob_error(name)
        if reason is not None:
            document.report(path, f"{what} is not a valid glob ({reason})")

        if name in first_index:
            first = first_index[name]
            line = document.value_marks[("queues", first)][0]
            message = f"{what} is already listed at queues[{first}] (line {line}); merge them"
            document.report(path, message)
        first_index.setdefault(name, index)


def _check_related_keys(document: _Document) -> None:
    """Report related_keys templates that could name anything but one job's own keys."""
    prefix = document.value(("redis", "key_prefix"))
    prefix = prefix if isinstance(prefix, str) else DEFAULT_KEY_PREFIX
    for place in _setting_paths(document, "related_keys"):
        templates = document.value(place)
        for index, template in enumerate(templates if isinstance(templates, list) else []):
            path = (*place, index)
            if not isinstance(template, str) or document.is_settled(path):
                continue
            why = related_key_error(template, prefix)
            if why:
                document.report(path, f"{document.describe(path, template)} {why}")


def reserved_prefixes(key_prefix: str) -> tuple[str, str]:
    """Starts of the key names that belong to RQ (under ``key_prefix``) and to opsctl."""
    return (f"{key_prefix}:", "opsctl:")


def related_key_error(template: str, key_prefix: str) -> str | None:
    """Why ``template`` is refused as a related key, or None when it is fine.

    A template must name one job's own key: exactly one ``{job_id}`` placeholder,
    no other braces, a fixed part before the id (so the id alone never decides
    what is deleted), and nothing under RQ's prefix or opsctl's own.
    """
    if template.count(JOB_ID_PLACEHOLDER) != 1:
        return "must hold the placeholder {job_id} exactly once"
    rest = template.replace(JOB_ID_PLACEHOLDER, "")
    if "{" in rest or "}" in rest:
        return "holds a placeholder other than {job_id}"
    if template.startswith(JOB_ID_PLACEHOLDER):
        return "must start with a fixed part before {job_id}, such as 'progress:'"
    for reserved in reserved_prefixes(key_prefix):
        if template.startswith(reserved):
            return f"would name a key under {reserved!r}, which belongs to RQ or opsctl"
    if not template.isprintable():
        return "holds a control character"
    return None


def _queue_names(document: _Document) -> Iterator[tuple[int, str]]:
    """(index, name) of each queue entry whose name is a known string."""
    queues = document.value(("queues",))
    for index, entry in enumerate(queues if isinstance(queues, list) else []):
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and not document.is_settled(("queues", index, "name")):
            yield index, name


def _glob_error(pattern: str) -> str | None:
    """Why `pattern` is not a valid fnmatch glob, or None when it is.

    fnmatch quietly reads an unclosed `[` as a literal character; a policy author who wrote
    one almost certainly meant a set, so it is an error here.
    """
    position = 0
    while (start := pattern.find("[", position)) != -1:
        end = start + 1
        end += pattern.startswith("!", end)
        end += pattern.startswith("]", end)
        end = pattern.find("]", end)
        if end == -1:
            return "unclosed '['"
        position = end + 1
    return None


def _is_glob(name: str) -> bool:
    """Whether a queue entry's name is a glob rather than one queue's name."""
    return any(character in name for character in _GLOB_CHARACTERS)


@lru_cache(maxsize=1)
def _schema_text() -> str:
    """The schema file's text, from the installed package or else from the source checkout."""
    installed = resources.files("opsctl").joinpath("schemas").joinpath("policy.schema.json")
    if installed.is_file():
        return installed.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parents[2] / "schemas" / "policy.schema.json"
    return checkout.read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _validator() -> Validator:
    """A draft 2020-12 validator of policy files, made stricter in two ways.

    An integer is an int: the stock checker would take 5.0, which parse_duration rejects.
    A pattern's final `$` means the end of the text, as in ECMA-262: Python's `$` also
    matches before a trailing newline, so "10m\\n" would pass and then fail to parse.
    """
    checker = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: type(value) is int
    )
    cls = jsonschema.validators.extend(  # type: ignore[no-untyped-call]  # untyped in stubs
        jsonschema.Draft202012Validator,
        validators={"pattern": _pattern_to_end},
        type_checker=checker,
    )
    validator: Validator = cls(_as_read(load_policy_schema()))
    return validator


_REFERENCE = {"$ref": "#/$defs/reference"}


def _as_read(node: Any) -> Any:
    """The schema a policy is checked against once its ${VAR} references are read.

    The published schema also allows a reference wherever a value may come from
    the environment, as it stands in the file (for editors and CI tools that
    check files); opsctl checks the value the reference stands for, so here
    each such choice keeps only its other alternative.
    """
    if isinstance(node, list):
        return [_as_read(item) for item in node]
    if not isinstance(node, dict):
        return node
    choices = node.get("anyOf")
    if isinstance(choices, list) and _REFERENCE in choices:
        kept = [c for c in choices if c != _REFERENCE]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        node = {**rest, **kept[0]} if len(kept) == 1 else {**rest, "anyOf": kept}
    return {key: _as_read(value) for key, value in node.items()}


def _pattern_to_end(
    validator: Validator, pattern: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    """JSON Schema's `pattern` keyword, with a final `$` matching only at the very end."""
    anchored = pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern
    if isinstance(instance, str) and re.search(anchored, instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


# Assembling ---------------------------------------------------------------------------------


def _assemble(document: _Document, raw: bytes, notes: list[Problem]) -> Policy:
    """The Policy of a document that has no errors; unknown values count as absent."""
    data: dict[str, Any] = document.data
    redis = _known(document, ("redis",))
    defaults = _merge(Rule(), _known(document, ("defaults",)), "defaults")

    entries: list[tuple[str, Rule]] = []
    for index in range(len(data["queues"])):
        settings = _known(document, ("queues", index))
        name = settings.pop("name", None)
        if name is not None:
            entries.append((name, _merge(defaults, settings, f"queues[{index}] ({name})")))

    return Policy(
        path=document.file,
        redis_url=_redis_url(document, redis),
        key_prefix=redis.get("key_prefix", DEFAULT_KEY_PREFIX),
        defaults=defaults,
        entries=tuple(entries),
        digest=hashlib.sha256(raw).hexdigest(),
        notes=tuple(notes),
        limits=_limits(_known(document, ("defaults",)).get("limits")),
        redis_options=_redis_options(document, redis),
    )


def _redis_url(document: _Document, redis: dict[str, Any]) -> str | None:
    """redis.url, or the sentinel section as a redis+sentinel:// URL (None when unknown)."""
    sentinel = _known(document, ("redis", "sentinel"))
    if "url" in redis or not {"hosts", "service"} <= sentinel.keys():
        return redis.get("url")
    return sentinel_url(sentinel["hosts"], sentinel["service"], sentinel.get("db", 0))


def _redis_options(document: _Document, redis: dict[str, Any]) -> ConnectionOptions:
    """The credentials and TLS settings of the redis section."""
    tls = _known(document, ("redis", "tls"))
    sentinel = _known(document, ("redis", "sentinel"))
    for secret in (redis.get("password"), sentinel.get("password")):
        register_secret(secret)
    return ConnectionOptions(
        username=redis.get("username"),
        password=redis.get("password") or None,
        sentinel_password=sentinel.get("password") or None,
        tls=Tls(tls.get("ca_cert"), tls.get("cert"), tls.get("key"), tls.get("verify")),
    )


def _known(document: _Document, path: _Path) -> dict[str, Any]:
    """The mapping at `path` without the keys whose value is unknown; {} when absent."""
    mapping = document.value(path)
    if not isinstance(mapping, dict):
        return {}
    return {k: v for k, v in mapping.items() if (*path, k) not in document.unknown}


def _merge(base: Rule, settings: Mapping[str, Any], source: str) -> Rule:
    """`base` with the settings given in a policy's defaults or queue entry applied."""
    changes = {key: settings[key] for key in _RULE_SETTINGS if key in settings}
    if "max_age" in changes:
        changes["max_age_seconds"] = parse_duration(changes.pop("max_age"))
    if "lost_after" in changes:
        changes["lost_after_seconds"] = parse_duration(changes.pop("lost_after"))
    if "related_keys" in changes:
        changes["related_keys"] = tuple(changes["related_keys"])
    # Caps are never inherited: those in defaults count the whole run.
    changes["limits"] = _limits(settings.get("limits")) if source != "defaults" else None
    return replace(base, **changes, source=source)


def _limits(settings: Any) -> Limits | None:
    if not isinstance(settings, dict) or not settings:
        return None
    return Limits(settings.get("max_actions"), settings.get("max_percent"))


# Messages -----------------------------------------------------------------------------------


def _format_path(path: _Path) -> str:
    """A value's path as messages show it: queues[0].max_age."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        if not part.isprintable():
            part = part.encode("unicode_escape").decode()  # never a control character
        text += f".{part}" if text else part
    return text


def _kind_of(value: Any) -> str:
    """What kind of YAML value ``value`` is, in words, without quoting it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text (not shown: is this the policy file meant?)"
    return _describe(value)  # a mapping, a list


def _describe(value: Any) -> str:
    """`value` as a message quotes it: strings quoted and shortened, YAML words for the rest."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "an empty value"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        if "://" in value or "password" in value.lower():
            value = mask_url(value)  # a URL in the wrong place still hides its password
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return repr(value)


__all__ = [
    "ACTIONS",
    "ZERO_MAX_AGE",
    "Limits",
    "Policy",
    "PolicyError",
    "Rule",
    "load_policy",
    "load_policy_schema",
    "parse_duration",
    "validate_files",
]
