"""Connecting to Redis, and showing where without ever showing a password."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

import redis

from opsctl.errors import RedisUnavailable, UsageError

SCHEMES = ("redis", "rediss", "unix")
DEFAULT_TIMEOUT_S = 10.0


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``; safe to print and log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        # Without a colon the lone value may be a password typed without one.
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    masked = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    if not netloc and url.startswith(f"{parts.scheme}://"):
        masked = masked.replace(f"{parts.scheme}:", f"{parts.scheme}://", 1)
    return masked


def redact(message: str, url: str | None) -> str:
    """``message`` with the password of ``url`` removed wherever it appears."""
    if not url:
        return message
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        message = message.replace(password, "***")
    return message.replace(url, mask_url(url))


def check_url(url: str) -> None:
    """Refuse a URL that redis-py would quietly complete with defaults (another server)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise UsageError(
            f"Redis URL {mask_url(url)!r} is not valid: it must start with redis://, "
            "rediss:// or unix://"
        )
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError as exc:
        raise UsageError(f"Redis URL {mask_url(url)!r} is not valid: {exc}") from None
    if scheme == "unix":
        if not parts.path:
            raise UsageError(f"Redis URL {mask_url(url)!r} names no socket path")
        return
    if not parts.hostname:
        raise UsageError(
            f"Redis URL {mask_url(url)!r} names no host; opsctl never falls back to a "
            "default server"
        )
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise UsageError(f"Redis URL {mask_url(url)!r}: database {database!r} is not a number")


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
            client_name="opsctl",
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
