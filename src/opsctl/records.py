"""Reading what a job hash says about its function, without running anything.

RQ stores a job's call in ``data``: zlib-compressed (usually) serializer output of
``(func_name, instance, args, kwargs)``. Unpickling it would import modules and could
run arbitrary code, so opsctl never does. With the pickle serializer the first string
in the pickle stream is the function's name; :func:`pickletools.genops` walks the
opcodes of a stream without building a single object. With the JSON serializer it is
the first element of a list. Anything else is "unknown".
"""

from __future__ import annotations

import json
import pickletools
import zlib

#: Shown when no function name can be read safely.
UNKNOWN_FUNCTION = "unknown"
#: Most bytes of ``data`` opsctl decompresses: the name is at the very start.
MAX_INFLATED_BYTES = 64 * 1024
#: Longest function name shown.
MAX_NAME_CHARS = 200

_STRING_OPCODES = frozenset(
    {
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "UNICODE",
        "SHORT_BINSTRING",
        "BINSTRING",
        "STRING",
        "SHORT_BINBYTES",
        "BINBYTES",
    }
)


def function_name(data: bytes | None, description: str | None = None) -> str:
    """The function a job calls, read without unpickling; ``"unknown"`` if not readable.

    Tries the pickle opcodes, then a JSON list, then the part of ``description``
    before its first parenthesis (RQ writes ``module.func(args)`` there).
    """
    name = _from_data(data) if data else None
    if name is None and description:
        name = description.split("(", 1)[0].strip() or None
    if not name or not name.isprintable():
        return UNKNOWN_FUNCTION
    return name[:MAX_NAME_CHARS]


def _from_data(data: bytes) -> str | None:
    quick = _leading_name(_inflate(data, QUICK_INFLATED_BYTES))
    if quick is not None:
        return quick
    raw = _inflate(data)
    return _from_json(raw) or _from_pickle(raw)


#: Bytes decompressed for the quick look at how a pickle starts.
QUICK_INFLATED_BYTES = 512
_PROTO, _FRAME, _MARK = 0x80, 0x95, 0x28
#: String opcodes and the width of their length prefix.
_LEADING_STRINGS = {0x8C: 1, 0x58: 4}  # SHORT_BINUNICODE, BINUNICODE


def _leading_name(raw: bytes) -> str | None:
    """The name at the usual start of RQ's pickle, else None.

    That start is PROTO, FRAME (protocol 4 and later), MARK, then the name as
    a string. Reading those opcodes directly spares walking the stream; any
    other start is left to :func:`_from_pickle`.
    """
    if len(raw) < 4 or raw[0] != _PROTO:
        return None
    at = 11 if raw[2] == _FRAME else 2
    if at < len(raw) and raw[at] == _MARK:
        at += 1
    width = _LEADING_STRINGS.get(raw[at]) if at < len(raw) else None
    if width is None:
        return None
    size = int.from_bytes(raw[at + 1 : at + 1 + width], "little")
    start = at + 1 + width
    if len(raw) < start + size:
        return None
    return raw[start : start + size].decode("utf-8", "replace")


def _inflate(data: bytes, limit: int = MAX_INFLATED_BYTES) -> bytes:
    """``data`` decompressed if it is zlib, else as it is; never more than ``limit`` bytes."""
    try:
        return zlib.decompressobj().decompress(data, limit)
    except zlib.error:
        return data[:limit]


def _from_pickle(raw: bytes) -> str | None:
    """The first string of a pickle stream, or None if it is not one.

    genops only parses; a truncated or corrupt stream raises, which just means
    no name was found before the damage.
    """
    try:
        for opcode, arg, _pos in pickletools.genops(raw):
            if opcode.name in _STRING_OPCODES:
                return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
            if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                return arg.replace(" ", ".")
    except Exception:  # genops raises many kinds on damaged input; no name then
        return None
    return None


def _from_json(raw: bytes) -> str | None:
    """The first item of a JSON list, if a string; the rest is never parsed
    (only the start of a large ``data`` is read, so it may be cut off)."""
    text = raw.decode("utf-8", "replace").lstrip()
    if not text.startswith("["):
        return None
    first = len(text) - len(text[1:].lstrip())
    try:
        value, _end = json.JSONDecoder().raw_decode(text, first)
    except ValueError:
        return None
    return value if isinstance(value, str) else None
