"""Connecting to Redis, and showing where without ever showing a password."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

import redis

from opsctl.errors import RedisUnavailable, UsageError

SCHEMES = ("redis", "rediss", "unix")
DEFAULT_TIMEOUT_S = 10.0


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
    if "@" in rest:
        userinfo, rest = rest.rsplit("@", 1)
        user, colon, password = userinfo.partition(":")
        # Without a colon the lone value may be a password typed without one.
        secrets.append(password if colon else userinfo)
        rest = f"{user}:***@{rest}" if colon else f"***@{rest}"
    for found in re.finditer(r"(?i)password=([^&]*)", rest):
        secrets.append(found[1])
    rest = re.sub(r"(?i)(password=)[^&]*", r"\1***", rest)
    return scheme + rest, [s for s in secrets if s]


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``; safe to print and log."""
    return _secrets(url)[0]


def redact(message: str, url: str | None) -> str:
    """``message`` with the credentials of ``url`` removed wherever they appear."""
    if not url:
        return message
    masked, secrets = _secrets(url)
    message = message.replace(url, masked)
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def check_url(url: str) -> None:
    """Refuse a URL that redis-py would read differently, or complete with defaults.

    Either would send opsctl to another server than the one written.
    """
    match = _URL.match(url)
    scheme = match["scheme"][:-3].lower() if match else ""
    if match is None or scheme not in SCHEMES:
        raise UsageError(
            f"Redis URL {mask_url(url)!r} is not valid: it must start with redis://, "
            "rediss:// or unix://"
        )
    shown = mask_url(url)
    rest = match["rest"].rsplit("@", 1)[-1]
    if scheme == "unix":
        if not rest.split("?", 1)[0]:
            raise UsageError(f"Redis URL {shown!r} names no socket path")
        return
    address, _, tail = rest.partition("/")
    host, port = _host_and_port(address.split("?", 1)[0].split("#", 1)[0])
    if not host:
        raise UsageError(
            f"Redis URL {shown!r} names no host; opsctl never falls back to a default server"
        )
    if port and not port.isdigit():
        raise UsageError(f"Redis URL {shown!r}: port {port!r} is not a number")
    database = tail.split("?", 1)[0].split("#", 1)[0].strip("/")
    if database and not database.isdigit():
        raise UsageError(f"Redis URL {shown!r}: database {database!r} is not a number")
    try:
        parsed = urlsplit(url)
        same = (parsed.hostname or "") == host.strip("[]").lower() and parsed.port == (
            int(port) if port else None
        )
    except ValueError:
        same = False
    if not same:
        raise UsageError(
            f"Redis URL {shown!r} is ambiguous: percent-encode any '#', '?', '/' or '@' in "
            "the user name or password (for example '#' as %23)"
        )


def _host_and_port(address: str) -> tuple[str, str]:
    if address.startswith("["):  # an IPv6 address: [::1]:6379
        host, _, after = address.partition("]")
        return host + "]", after.removeprefix(":")
    host, _, port = address.partition(":")
    return host.lower(), port


def connect(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> redis.Redis:
    """A checked connection to ``url`` (raw bytes replies, bounded waits).

    Raises UsageError for a malformed URL and RedisUnavailable when the server
    cannot be reached, refuses the login or does not answer in time.
    """
    check_url(url)
    try:
        conn = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            decode_responses=False,
            # Bytes that are not UTF-8 survive a round trip through str unchanged,
            # so a record read can be matched exactly when it is re-checked.
            encoding_errors="surrogateescape",
            client_name=f"opsctl-{os.getpid()}",
        )
        conn.ping()
    except (ValueError, TypeError) as exc:
        raise UsageError(
            f"Redis URL {mask_url(url)!r} is not valid: {redact(str(exc), url)}"
        ) from None
    except redis.AuthenticationError as exc:
        raise RedisUnavailable(
            f"Redis at {mask_url(url)} refused the login: {redact(str(exc), url)}"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailable(
            f"cannot reach Redis at {mask_url(url)}: {redact(str(exc), url)}"
        ) from None
    except redis.ResponseError as exc:
        raise RedisUnavailable(
            f"Redis at {mask_url(url)} refused the connection: {redact(str(exc), url)}"
        ) from None
    return conn
