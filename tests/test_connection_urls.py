"""Sentinel URLs: how they are read, refused and masked."""

from __future__ import annotations

import pytest

from opsctl.connection import check_url, mask_url, parse_sentinel_url, redact, sentinel_url
from opsctl.errors import UsageError


def test_sentinel_url_names_every_sentinel_the_service_and_the_database() -> None:
    parsed = parse_sentinel_url("redis+sentinel://app:p%40ss@s1:26380,s2,[::1]:5000/rq-main/4")

    assert parsed.hosts == (("s1", 26380), ("s2", 26379), ("::1", 5000))
    assert (parsed.service, parsed.db) == ("rq-main", 4)
    assert (parsed.username, parsed.password) == ("app", "p@ss")


def test_sentinel_url_built_from_options_reads_back_the_same() -> None:
    url = sentinel_url(["s1:26379", "s2:26380"], "rq-main", 1)

    assert url == "redis+sentinel://s1:26379,s2:26380/rq-main/1"
    assert parse_sentinel_url(url).hosts == (("s1", 26379), ("s2", 26380))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379", "names no service"),
        ("redis+sentinel://s1:26379/", "names no service"),
        ("redis+sentinel://s1,:26379/main", "every sentinel needs a host"),
        ("redis+sentinel://s1:abc/main", "what follows ':' is no port number"),
        ("redis+sentinel://s1/main/x", "database 'x' is not a number"),
    ],
)
def test_malformed_sentinel_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        check_url(url)


def test_sentinel_url_password_is_masked_in_urls_and_messages() -> None:
    url = "redis+sentinel://:top#secret@s1,s2/main/0"

    assert mask_url(url) == "redis+sentinel://:***@s1,s2/main/0"
    assert "top#secret" not in redact(f"failed at {url}: auth top#secret refused", url)
