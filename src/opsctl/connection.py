"""Connecting to Redis, and showing where without ever showing a password."""

from __future__ import annotations

import logging
import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.sentinel import MasterNotFoundError, Sentinel

from opsctl.errors import RedisUnavailable, UsageError
from opsctl.shown import quoted

log = logging.getLogger(__name__)

SENTINEL_SCHEME = "redis+sentinel"
SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME)
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_SENTINEL_PORT = 26379

#: How a TLS connection checks the server: "full" checks the certificate against the CA and
#: the host name against the certificate; "certificate" skips the host name; "none" checks
#: nothing and only encrypts.
TLS_VERIFY_MODES = ("full", "certificate", "none")

#: Passwords that did not come inside a URL (policy values), scrubbed from every message.
_SECRETS: set[str] = set()


def register_secret(secret: str | None) -> None:
    """Remember ``secret`` so that redact() removes it from every message and log line."""
    if secret:
        _SECRETS.add(secret)


@dataclass(frozen=True)
class Tls:
    """TLS settings of a rediss:// connection; None leaves redis-py's default."""

    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: str | None = None  # one of TLS_VERIFY_MODES; None means "full"

    def is_set(self) -> bool:
        """Whether any TLS setting was given."""
        return any(v is not None for v in (self.ca_cert, self.cert, self.key, self.verify))


@dataclass(frozen=True)
class ConnectionOptions:
    """What a connection needs besides its URL: credentials and TLS settings.

    ``password`` is used only when the URL holds no credentials. ``username`` adds a user to a
    URL that names none; a URL and ``username`` naming two different users are refused.
    ``sentinel_password`` is the sentinels' own, for redis+sentinel:// URLs.
    """

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    tls: Tls = field(default_factory=Tls)


_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>.*)$", re.DOTALL)


def _secrets(url: str) -> tuple[str, list[str]]:
    """``url`` with its credentials masked, and the secret strings it held.

    Parsed by hand rather than with urllib: a password holding an unencoded '#',
    '?' or '/' would otherwise end the host part early and escape the mask.
    Everything before the last '@' is the user information.
    """
    match = _URL.match(url)
    if match is None:
        return "<not a URL>", [url] if "@" in url else []
    scheme, rest = match["scheme"], match["rest"]
    secrets = []
    # A unix:// URL's user information ends with an '@' before its path, which may
    # hold '@' of its own: a URL whose path comes first (unix:///...) has none.
    if scheme.lower() == "unix://":
        cut = -1 if rest.startswith("/") else rest.rfind("@/")
    else:
        cut = rest.rfind("@")
    if cut >= 0:
        userinfo, rest = rest[:cut], rest[cut + 1 :]
        user, colon, password = userinfo.partition(":")
        # Without a colon the lone value may be a password typed without one.
        secrets.append(password if colon else userinfo)
        rest = f"{user}:***@{rest}" if colon else f"***@{rest}"
    else:
        # USER:PASSWORD with the '@HOST' left out reads as HOST:PORT: a "port"
        # that is no port number may be a password.
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        tail = rest[len(authority) :]
        masked = []
        for address in authority.split(","):
            address, secret = _masked_address(address)
            if secret:
                secrets.append(secret)
            masked.append(address)
        rest = ",".join(masked) + tail
    for found in re.finditer(r"(?i)password=([^&]*)", rest):
        secrets.append(found[1])
    rest = re.sub(r"(?i)(password=)[^&]*", r"\1***", rest)
    # A percent-encoded password can show up decoded in redis-py's messages.
    secrets += [unquote(s) for s in secrets]
    return scheme + rest, [s for s in secrets if s]


def _masked_address(address: str) -> tuple[str, str]:
    """HOST:PORT with a "port" that is no port number masked, and what was masked."""
    if address.startswith("["):
        close = address.find("]")
        if close < 0:  # no closing bracket: what follows may be anything
            return ("[***", address[1:]) if len(address) > 1 else (address, "")
        host, after = address[: close + 1], address[close + 1 :]
        if after and not after.startswith(":"):  # no :PORT: anything may follow
            return f"{host}***", after
        colon, port = after[:1] == ":", after[1:]
    else:
        host, sep, port = address.partition(":")
        colon = bool(sep)
    if colon and port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return f"{host}:***", port
    return address, ""


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``; safe to print and log."""
    return _secrets(url)[0]


def redact(message: str, url: str | None) -> str:
    """``message`` without the credentials of ``url`` or any registered password."""
    secrets = set(_SECRETS)
    if url:
        masked, found = _secrets(url)
        message = message.replace(url, masked)
        secrets.update(found)
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


#: What one sentinel answered, in redis-py's "no master" message (which also
#: holds each sentinel client's long description, left out).
# redis-py lists each sentinel that failed as its client's description (which
# starts "<redis.") followed by " - NAME:ErrorClass: text"; the text may hold "<".
_SENTINEL_ANSWER = re.compile(r" - [^:\s]+:(\w+: .*?)\s*(?=, <redis\.|$)", re.S)
_REFUSED_LOGIN = ("AuthenticationError", "NOAUTH", "WRONGPASS")


def _sentinel_answers(exc: Exception, url: str) -> str:
    """What the sentinels said when none named a master, without client descriptions."""
    answers = [a.rstrip() for a in _SENTINEL_ANSWER.findall(str(exc))]
    if not answers:
        return "none of them knows the service"
    # A server that is not a Sentinel refuses the SENTINEL command.
    said = redact("; ".join(answers), url)
    if any(word in said for word in _REFUSED_LOGIN):
        said += (
            " (a sentinel refused the login: give the sentinels' own password as "
            "the policy's redis.sentinel.password)"
        )
    return said


_UNKNOWN_OPTION = re.compile(r"unexpected keyword argument '([^']+)'")


def _why_not_valid(exc: Exception, url: str) -> str:
    """Why redis-py refused ``url``, in words about the URL rather than its code."""
    unknown = _UNKNOWN_OPTION.search(str(exc))
    if "'ssl_min_version'" in str(exc):
        return "ssl_min_version takes a TLS version's number: 771 for TLS 1.2, 772 for TLS 1.3"
    if unknown is None:
        return redact(str(exc), url)
    scheme = url.split("://", 1)[0].lower()
    why = f"its option {unknown[1]!r} is not one a {scheme}:// connection takes"
    if unknown[1].startswith("ssl") and scheme != "rediss":
        why += " (TLS options need a rediss:// URL)"
    return why


def check_url(url: str) -> None:
    """Refuse a URL that redis-py would read differently, or complete with defaults.

    Either would send opsctl to another server than the one written.
    """
    match = _URL.match(url)
    scheme = match["scheme"][:-3].lower() if match else ""
    if match is None or scheme not in SCHEMES:
        raise UsageError(
            f"Redis URL {mask_url(url)!r} is not valid: it must start with redis://, "
            "rediss://, unix:// or redis+sentinel://"
        )
    shown = mask_url(url)
    try:
        url.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a YAML escape such as "\ud800": neither text nor a byte
        raise UsageError(
            f"Redis URL {shown!r} holds a lone surrogate (such as \\ud800), which no "
            "connection can send"
        ) from None
    # redis-py reads the protocol from the URL and refuses other values only
    # when it connects, as if the server could not be reached.
    query = url.partition("?")[2].partition("#")[0]
    for value in parse_qs(query).get("protocol", []):
        if value not in ("2", "3"):
            raise UsageError(f"Redis URL {shown!r}: protocol {value!r} is not 2 or 3")
    rest = match["rest"].rsplit("@", 1)[-1]
    if scheme == "unix":
        _check_socket_path(url, shown)
        _check_options(url)
        return
    if scheme == SENTINEL_SCHEME:
        parse_sentinel_url(url)
        if query:
            # Nothing reads it: ?db=9 would be ignored, and database 0 used.
            raise UsageError(
                f"Redis URL {shown!r}: a redis+sentinel:// URL takes no ?options; write the "
                "database as /SERVICE/DB and connection settings as options of their own"
            )
        return
    address, _, tail = rest.partition("/")
    host, port = _host_and_port(address.split("?", 1)[0].split("#", 1)[0], shown)
    if not host:
        raise UsageError(
            f"Redis URL {shown!r} names no host; opsctl never falls back to a default server"
        )
    database = tail.split("?", 1)[0].split("#", 1)[0].strip("/")
    if database and not (database.isascii() and database.isdigit()):
        raise UsageError(f"Redis URL {shown!r}: database {database!r} is not a number")
    named = [*([database] if database else []), *parse_qs(query).get("db", [])]
    if len({int(n) if n.isascii() and n.isdigit() else n for n in named}) > 1:
        # redis-py would use one of them, while every message shows the URL as written.
        raise UsageError(
            f"Redis URL {shown!r} names more than one database (in its path or as ?db=): give one"
        )
    try:
        parsed = urlsplit(url)
        same = (parsed.hostname or "") == host.strip("[]").lower() and parsed.port == port
    except ValueError:
        same = False
    if not same:
        raise UsageError(
            f"Redis URL {shown!r} is ambiguous: percent-encode any '#', '?', '/' or '@' in "
            "the user name or password (for example '#' as %23)"
        )
    _check_options(url)


def _check_socket_path(url: str, shown: str) -> None:
    """Refuse a unix:// URL with no socket path, or with a host before it: redis-py
    reads unix://run/redis.sock as host "run" and the socket /redis.sock."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        parts, host = None, "?"
    if parts is not None and not host and not parts.path:
        raise UsageError(f"Redis URL {shown!r} names no socket path")
    if host:
        raise UsageError(
            f"Redis URL {shown!r}: the socket path must follow '//' and start with '/': "
            "write unix:///PATH/TO/redis.sock (three slashes) or unix://USER:PASSWORD@/PATH"
        )


def _check_options(url: str) -> None:
    """Refuse the query options redis-py would refuse on connecting: a value it cannot
    read (socket_timeout=abc), an option no connection takes (foo=bar), a timeout that
    is not a number of seconds above 0 (-1, nan)."""
    shown = mask_url(url)
    tls = url.lower().startswith("rediss://")
    parts = urlsplit(url)
    for name, values in parse_qs(parts.query).items():
        if name in ("username", "password") and getattr(parts, name):
            # redis-py would take the one before the host and drop the other in silence.
            raise UsageError(
                f"Redis URL {shown!r} gives a {'user' if name == 'username' else 'password'} "
                f"twice, before the host and as ?{name}=: give it once"
            )
        if name in _OPSCTL_SETS and (tls or not name.startswith("ssl_")):
            raise UsageError(
                f"Redis URL {shown!r}: opsctl sets {name} itself ({_OPSCTL_SETS[name]}); "
                "leave it out of the URL"
            )
        parse = redis.connection.URL_QUERY_ARGUMENT_PARSERS.get(name)
        if parse is redis.connection.to_bool and values[0].upper() not in _YES_OR_NO:
            # Never quoted: redis-py would take any word but a "no" for true.
            raise UsageError(f"Redis URL {shown!r}: {name} is not true or false")
    try:
        # Only built, as a pool builds it: it connects to nothing yet.
        redis.ConnectionPool.from_url(url).make_connection()
    except (ValueError, TypeError) as exc:
        raise UsageError(f"Redis URL {shown!r} is not valid: {_why_not_valid(exc, url)}") from None
    except Exception:  # redis-py raises many kinds for a value it cannot use
        # Its words may quote an option's value, which may have come from the environment.
        raise UsageError(
            f"Redis URL {shown!r}: one of its options has a value the connection cannot use"
        ) from None
    for name, values in parse_qs(parts.query).items():
        if name not in _URL_OPTIONS:
            raise UsageError(
                f"Redis URL {shown!r}: {name} is an option opsctl does not take in a URL "
                f"(it takes {', '.join(sorted(_URL_OPTIONS))})"
            )
        # redis-py reads these, but fails later on values out of range, in words that
        # blame the server (an unreachable one, exit 3), not the URL.
        least = _LEAST.get(name)
        try:
            too_small = least is not None and not float(values[0]) >= least
        except ValueError:  # read otherwise by an older redis-py: not a number here
            too_small = True
        if too_small:
            raise UsageError(f"Redis URL {shown!r}: {name} must be a number, {least:g} or more")


#: The least value of the numeric URL options (redis-py has read them as numbers).
_LEAST = {"max_connections": 1, "socket_read_size": 1, "health_check_interval": 0}


#: The query options opsctl takes in a URL: they change nothing it relies on.
_URL_OPTIONS = frozenset(
    {
        "db",
        "username",
        "password",
        "protocol",
        "max_connections",
        "health_check_interval",
        "socket_keepalive",
        "socket_read_size",
        "ssl_min_version",
        "ssl_ciphers",
        "ssl_validate_ocsp",
        "ssl_validate_ocsp_stapled",
    }
)


#: URL options for what opsctl sets itself, which a URL's options would silently
#: override: how replies are read (opsctl reads bytes exactly as stored), how long
#: it waits, and how it checks a TLS server.
_OPSCTL_SETS = {
    "decode_responses": "it reads replies as bytes",
    "encoding": "it writes and reads text as UTF-8",
    "encoding_errors": "it keeps bytes that are not UTF-8 as they are",
    "legacy_responses": "it reads replies in the forms redis-py has long given",
    "socket_timeout": "from --timeout",
    "socket_connect_timeout": "from --timeout",
    "retry_on_timeout": "a command that gets no answer within --timeout is not sent again",
    "retry_on_error": "it reconnects and reconciles by itself",
    "ssl_cert_reqs": "from --tls-verify or redis.tls.verify",
    "ssl_check_hostname": "from --tls-verify or redis.tls.verify",
    "ssl_ca_certs": "from --tls-ca-cert or redis.tls.ca_cert",
    "ssl_certfile": "from --tls-cert or redis.tls.cert",
    "ssl_keyfile": "from --tls-key or redis.tls.key",
    "ssl_ca_path": "from --tls-ca-cert or redis.tls.ca_cert",
    "ssl_ca_data": "from --tls-ca-cert or redis.tls.ca_cert",
    "client_name": "it names its connection opsctl-<pid>",
}

#: The words redis-py reads as false, and those that mean true.
_YES_OR_NO = frozenset({*redis.connection.FALSE_STRINGS, "1", "T", "TRUE", "Y", "YES", "ON"})


def url_problem(url: str) -> str | None:
    """Why :func:`check_url` refuses ``url``, in words that do not quote it; None if it accepts."""
    try:
        check_url(url)
    except UsageError as exc:
        lead = f"Redis URL {mask_url(url)!r}"
        return str(exc).removeprefix(lead).removeprefix(":").strip().removeprefix("is not valid: ")
    return None


def _host_and_port(address: str, shown: str) -> tuple[str, int | None]:
    """The host and port of HOST[:PORT] (an IPv6 host in brackets: [::1]:6379); the
    port is None when none is written. UsageError for a port that is not one, an
    empty one (``host:``, which redis-py would read as its default, 6379) included."""
    if address.startswith("["):
        host, bracket, after = address.partition("]")
        if not bracket:
            raise UsageError(f"Redis URL {shown!r}: the IPv6 address has no closing ']'")
        if after and not after.startswith(":"):
            raise UsageError(f"Redis URL {shown!r}: what follows the IPv6 address is not :PORT")
        host, colon, port = host + "]", after[:1], after[1:]
    else:
        host, colon, port = address.partition(":")
        host = host.lower()
    if not colon:
        return host, None
    if not port:
        raise UsageError(
            f"Redis URL {shown!r}: the port after ':' is empty; write the port or leave out "
            "the ':' (opsctl never falls back to a default server)"
        )
    if not (port.isascii() and port.isdigit()):
        # Never quoted: it is most often a password whose '@HOST' was left out.
        raise UsageError(
            f"Redis URL {shown!r}: what follows ':' is no port number; if it is a password, "
            "the host is missing: write USER:PASSWORD@HOST:PORT"
        )
    if not 0 < int(port) < 65536:
        # Never quoted either: digits past any port may be a password (see _secrets).
        raise UsageError(f"Redis URL {shown!r}: the port is not between 1 and 65535")
    return host, int(port)


@dataclass(frozen=True)
class SentinelUrl:
    """The parts of a redis+sentinel://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]
    URL; the credentials are the master's."""

    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The sentinels, service and database a redis+sentinel:// URL names; UsageError if none."""
    shown = mask_url(url)
    match = _URL.match(url)
    rest = match["rest"] if match else ""
    rest = rest.rpartition("@")[2].split("?", 1)[0].split("#", 1)[0]
    addresses, _, path = rest.partition("/")
    hosts = []
    for address in addresses.split(","):
        host, port = _host_and_port(address, shown)
        if not host:
            raise UsageError(f"Redis URL {shown!r}: every sentinel needs a host (HOST[:PORT])")
        hosts.append((host.strip("[]"), DEFAULT_SENTINEL_PORT if port is None else port))
    service, _, database = path.strip("/").partition("/")
    if not service:
        raise UsageError(
            f"Redis URL {shown!r} names no service: write redis+sentinel://HOST:PORT/SERVICE/DB"
        )
    if database and not (database.isascii() and database.isdigit()):
        raise UsageError(f"Redis URL {shown!r}: database {database!r} is not a number")
    user, password = _userinfo(url)
    return SentinelUrl(
        tuple(hosts), unquote(service), int(database or 0), user or None, password or None
    )


def sentinel_url(hosts: list[str], service: str, db: int = 0) -> str:
    """The redis+sentinel:// URL of ``hosts`` (HOST[:PORT] each), ``service`` and ``db``."""
    return f"{SENTINEL_SCHEME}://{','.join(hosts)}/{service}/{db}"


def check_settings(url: str, options: ConnectionOptions | None = None) -> None:
    """Refuse (UsageError) what :func:`connect` would refuse before it reaches the
    server: a malformed URL, TLS options for a URL without TLS, TLS files it cannot
    read. A loop (``opsctl watch``) checks at start what each round would refuse."""
    check_url(url)
    options = options or ConnectionOptions()
    _credentials(url, options)
    _tls_settings(url, options.tls)


def connect(
    url: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    options: ConnectionOptions | None = None,
) -> redis.Redis:
    """A checked connection to ``url`` (raw bytes replies, bounded waits).

    A redis+sentinel:// URL is resolved by asking its sentinels for the service's master.
    Raises UsageError for a malformed URL or unreadable TLS files, and RedisUnavailable when
    the server cannot be reached, refuses the login or does not answer in time.
    """
    check_url(url)
    options = options or ConnectionOptions()
    register_secret(options.password)
    register_secret(options.sentinel_password)
    settings: dict[str, Any] = {
        "socket_connect_timeout": timeout_s,
        "socket_timeout": timeout_s,
        "decode_responses": False,
        # Bytes that are not UTF-8 survive a round trip through str unchanged,
        # so a record read can be matched exactly when it is re-checked.
        "encoding_errors": "surrogateescape",
        "client_name": f"opsctl-{os.getpid()}",
    }
    settings.update(_credentials(url, options))
    settings.update(_tls_settings(url, options.tls))
    try:
        if url.lower().startswith(SENTINEL_SCHEME + "://"):
            conn = _master(url, settings, options)
        else:
            conn = _client(url, settings, timeout_s)
        _ping(conn)
    except MasterNotFoundError as exc:
        raise RedisUnavailable(
            f"no sentinel of {mask_url(url)} named a master: {_sentinel_answers(exc, url)}"
        ) from None
    except (ValueError, TypeError) as exc:
        raise UsageError(
            f"Redis URL {mask_url(url)!r} is not valid: {_why_not_valid(exc, url)}"
        ) from None
    except redis.AuthenticationError as exc:
        raise RedisUnavailable(
            f"Redis at {mask_url(url)} refused the login: {_login_hint(exc, url, settings)}"
            f"{redact(str(exc), url)}"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailable(
            f"cannot reach Redis at {mask_url(url)}: {redact(str(exc), url)}"
            f"{_tls_hint(exc, url, options.tls)}"
        ) from None
    except redis.exceptions.InvalidResponse as exc:
        # Something listens there, but not Redis (a web server, say).
        raise RedisUnavailable(
            f"{mask_url(url)} does not answer as Redis does ({redact(str(exc), url)}): "
            "check the host and port"
        ) from None
    except redis.ResponseError as exc:
        if "out of range" in str(exc):
            # SELECT of a database this server does not have: a setting to mend,
            # not a server that may come back.
            raise UsageError(
                f"Redis at {mask_url(url)} has no such database: {redact(str(exc), url)}; "
                "check the database number it names"
            ) from None
        raise RedisUnavailable(
            f"Redis at {mask_url(url)} refused the connection: {redact(str(exc), url)}"
        ) from None
    return conn


def _client(url: str, settings: dict[str, Any], timeout_s: float) -> redis.Redis:
    """A client for ``url``. A URL that caps its pool (``max_connections``) gets a
    pool whose callers wait up to ``timeout_s`` for a free connection: opsctl reads
    on several threads at once, and a plain pool refuses a connection past its cap
    at once, which a run would take for a server that cannot be reached."""
    if "max_connections" not in parse_qs(urlsplit(url).query):
        return redis.Redis.from_url(url, **settings)
    pool = redis.BlockingConnectionPool.from_url(url, timeout=timeout_s, **settings)
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


#: Words of a TLS connection the server closed during or right after the
#: handshake: most often, one that requires a client certificate got none.
_TLS_CLOSED = ("EOF occurred in violation of protocol", "certificate required", "UNEXPECTED_EOF")


def _tls_hint(exc: Exception, url: str, tls: Tls) -> str:
    """What a TLS connection closed at once most likely means, when no client
    certificate was given; '' otherwise."""
    if not url.lower().startswith("rediss://") or tls.cert is not None:
        return ""
    if not any(words in str(exc) for words in _TLS_CLOSED):
        return ""
    return (
        " (the server closed the TLS connection: if it requires a client certificate, "
        "give one with --tls-cert and --tls-key, or redis.tls.cert and redis.tls.key)"
    )


def _login_hint(exc: redis.AuthenticationError, url: str, settings: dict[str, Any]) -> str:
    """What a refused login most likely means, when Redis's own words do not say it."""
    said = str(exc)
    user, password = _userinfo(url)
    if (
        not password
        and settings.get("password") is None
        and ("NOAUTH" in said or "authenticated" in said or "Authentication required" in said)
    ):
        return (
            "the server requires a password and none was given (put it in the URL, "
            "redis://:PASSWORD@host, or in the policy's redis.password); Redis said: "
        )
    if user and not password and settings.get("password") is None:
        return (
            "the URL gives a user name and no password (redis://NAME@host: a password goes "
            "after a colon, redis://:PASSWORD@host or redis://NAME:PASSWORD@host); Redis said: "
        )
    return ""


def _ping(conn: redis.Redis) -> None:
    """PING through ``conn``, connecting first. A server whose answers redis-py
    cannot even take apart (one that says +OK to anything, say) makes it fail
    with errors of its own code; that is a server that does not speak Redis."""
    try:
        conn.ping()
    except (AttributeError, IndexError, KeyError) as exc:
        # Not ValueError or TypeError: redis-py raises those for settings of the
        # URL it meets only when it connects, which the caller reports as such.
        raise redis.exceptions.InvalidResponse(f"unexpected answer ({exc})") from None


def _credentials(url: str, options: ConnectionOptions) -> dict[str, Any]:
    """The username and password to log in with, from the options when the URL has none."""
    url_user, url_password = _userinfo(url)
    if options.username and url_user and options.username != url_user:
        # The URL's value is not quoted: written without a colon, it may be a password.
        raise UsageError(
            f"Redis URL {mask_url(url)!r} names another user than the options do "
            f"({options.username!r}); give the user in one place"
        )
    found: dict[str, Any] = {}
    if options.username:
        found["username"] = options.username
    if options.password and not url_password:
        found["password"] = options.password
    return found


def _userinfo(url: str) -> tuple[str, str]:
    """The user and password a URL holds ("" for each one it lacks).

    As in redis-py, a value without a colon (redis://NAME@host) is a user name:
    a password is written after a colon (redis://:PASSWORD@host). An empty
    password (redis://NAME:@host) is none.
    """
    match = _URL.match(url)
    userinfo = match["rest"].rpartition("@")[0] if match else ""
    user, _, password = userinfo.partition(":")
    return unquote(user), unquote(password)


def _tls_settings(url: str, tls: Tls) -> dict[str, Any]:
    """redis-py's ssl_* arguments for ``tls``; refused unless the URL asks for TLS."""
    if not tls.is_set():
        return {}
    if not url.lower().startswith("rediss://"):
        raise UsageError(
            f"TLS options were given but Redis URL {mask_url(url)!r} does not use TLS: "
            "write rediss://"
        )
    for option, path in (
        ("tls ca_cert", tls.ca_cert),
        ("tls cert", tls.cert),
        ("tls key", tls.key),
    ):
        if path is None:
            continue
        if not os.access(path, os.R_OK):
            why = "cannot be read (no such file, or no permission)"
            raise UsageError(f"{option}: {quoted(path)} {why}")
        if not os.path.isfile(path):
            # Each connection reads it again: a pipe (<(...)) would be empty the second time.
            raise UsageError(
                f"{option}: {quoted(path)} is not a regular file; give a file, which every "
                "connection can read again (not a directory or a pipe)"
            )
    if (tls.cert is None) != (tls.key is None):
        raise UsageError("TLS client authentication needs both a certificate and its key")
    _check_tls_files(tls)
    verify = tls.verify or "full"
    if verify not in TLS_VERIFY_MODES:
        raise UsageError(f"tls verify: {verify!r} is not one of {', '.join(TLS_VERIFY_MODES)}")
    settings: dict[str, Any] = {
        "ssl_cert_reqs": "none" if verify == "none" else "required",
        "ssl_check_hostname": verify == "full",
    }
    if verify == "none":
        log.warning("TLS certificate checks are off (tls verify none): the server is not verified")
    if tls.ca_cert:
        settings["ssl_ca_certs"] = tls.ca_cert
    if tls.cert:
        settings["ssl_certfile"], settings["ssl_keyfile"] = tls.cert, tls.key
    return settings


def _no_key_password() -> bytes:
    raise UsageError(
        "tls key: the private key is encrypted; opsctl takes no key password, so give it "
        "a key file without one"
    )


def _check_tls_files(tls: Tls) -> None:
    """Load the TLS files as the connection will, so that a file of the wrong kind is
    refused as a setting to mend (exit 2), not taken for a server that cannot be
    reached. An encrypted key is refused rather than prompted for: a deploy must
    never wait on a terminal."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca_cert:
        try:
            context.load_verify_locations(cafile=tls.ca_cert)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise UsageError(
                f"tls ca_cert: {quoted(tls.ca_cert)} holds no CA certificate in PEM form "
                f"({_ssl_reason(exc)})"
            ) from None
    if tls.cert and tls.key:
        try:
            context.load_cert_chain(tls.cert, tls.key, password=_no_key_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise UsageError(
                f"tls cert and key: {quoted(tls.cert)} and {quoted(tls.key)} are not a PEM "
                f"certificate and its private key ({_ssl_reason(exc)})"
            ) from None


def _ssl_reason(exc: BaseException) -> str:
    """OpenSSL's short reason for ``exc`` (NO_CERTIFICATE_OR_CRL_FOUND, say), or its text."""
    reason = getattr(exc, "reason", None)
    text = str(reason) if reason else str(exc)
    return re.sub(r"^\[SSL\] |\s*\(_ssl\.c:\d+\)$", "", text)


def _master(url: str, settings: dict[str, Any], options: ConnectionOptions) -> redis.Redis:
    """A client of the master that the sentinels of ``url`` name for its service.

    The client asks the sentinels again whenever it reconnects, so a failover during a run
    sends the next command to the new master.
    """
    parsed = parse_sentinel_url(url)
    register_secret(parsed.password)
    master = dict(settings)
    master["username"] = parsed.username or options.username
    master["password"] = parsed.password or options.password
    sentinel_settings = {
        "socket_connect_timeout": settings["socket_connect_timeout"],
        "socket_timeout": settings["socket_timeout"],
        "password": options.sentinel_password,
    }
    sentinels = Sentinel(list(parsed.hosts), sentinel_kwargs=sentinel_settings)
    address = sentinels.discover_master(parsed.service)
    log.info("sentinel service=%s master=%s:%s", parsed.service, *address)
    client: redis.Redis = sentinels.master_for(parsed.service, db=parsed.db, **master)
    return client
