"""How text read from Redis or given by a user is shown: never raw.

Names come from Redis, where anything may be stored: control characters (a
terminal escape sequence, a newline that would start a forged line) and bytes
that are not UTF-8 (RQ 1 accepted any job id). opsctl keeps such bytes as lone
surrogates (``surrogateescape``) so that it acts on exactly what is stored, and
shows them as ``\\xNN``.
"""

from __future__ import annotations

import re


def printable(value: str) -> str:
    """``value`` with control characters shown as escapes: a name read from Redis
    then never acts as a terminal control sequence, nor starts a line of its own.
    Bytes that were not UTF-8 (held as lone surrogates) show as ``\\xNN``."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else _escaped(c) for c in value)


def bytes_shown(value: str) -> str:
    """``value`` with each byte that was not UTF-8 (a lone surrogate) as ``\\xNN``: the
    form every report and log shows it in, and valid Unicode for JSON."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def quoted(value: str) -> str:
    """``value`` quoted as Python's ``repr`` quotes it (a file name in an error, say),
    with each byte that was not UTF-8 shown as ``\\xNN`` rather than as the lone
    surrogate that holds it."""
    return _SURROGATE_IN_REPR.sub(r"\1\\x\2", repr(value))


#: A lone surrogate as ``repr`` writes it, ``\udcNN``, after an even run of
#: backslashes (an odd run would make it text the value holds).
_SURROGATE_IN_REPR = re.compile(r"(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])")


def _escaped(char: str) -> str:
    if "\udc80" <= char <= "\udcff":  # a byte that was not UTF-8, kept by surrogateescape
        return f"\\x{ord(char) - 0xDC00:02x}"
    return char.encode("unicode_escape").decode()
