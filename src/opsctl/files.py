"""Reading the files opsctl is given (policies, plans) without ever waiting on one,
and refusing to replace anything but a regular file with one it writes.

A path may name a FIFO, a device or a directory as well as a file; opening a
FIFO waits for a writer, and reading some special files waits for data, both
perhaps for ever and deaf to a polite signal. opsctl opens every such file
without blocking and refuses anything but a regular file's bytes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable


class NotReadable(Exception):
    """The file cannot be read; ``reason`` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TooLarge(Exception):
    """The file holds more than the reader's limit; ``size_bytes`` is its size."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__(f"{size_bytes} bytes")
        self.size_bytes = size_bytes


def read_file(path: str, limit_bytes: int) -> bytes:
    """The bytes of ``path``, at most ``limit_bytes`` of them.

    Raises :class:`NotReadable` (missing, a directory, no permission, a FIFO or
    another special file) or :class:`TooLarge`.
    """
    try:
        fd = _open(path)
        with open(fd, "rb") as stream:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise NotReadable("it is a FIFO, not a file")
            raw = stream.read(limit_bytes + 1)
            size_bytes = os.fstat(fd).st_size
    except OSError as error:
        raise NotReadable(_reason(error)) from None
    if raw is None:  # nothing to read yet from a special file
        raise NotReadable("it is not a file")
    if len(raw) > limit_bytes:
        raise TooLarge(max(size_bytes, len(raw)))
    return raw


def check_file(path: str) -> None:
    """Raise :class:`NotReadable` unless ``path`` is a regular file opsctl may
    open; nothing is read (the bytes are read later, once needed)."""
    try:
        fd = _open(path)
    except OSError as error:
        raise NotReadable(_reason(error)) from None
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if stat.S_ISFIFO(mode):
        raise NotReadable("it is a FIFO, not a file")
    if stat.S_ISDIR(mode):
        raise NotReadable("it is a directory")
    if not stat.S_ISREG(mode):
        raise NotReadable("it is not a file")


def replaceable(path: str) -> bool:
    """Whether opsctl may replace ``path`` with a file it writes (by a rename):
    only a regular file, or nothing. Never a directory, a device (``/dev/null``),
    a FIFO or a socket, which a rename would put a plain file in place of, nor a
    symbolic link, which could point anywhere and would be replaced itself."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return True
    except OSError:
        return True  # the write itself then says why it cannot
    return stat.S_ISREG(mode)


#: Why :func:`kept_from_replacing` keeps a file: it is no regular file, it cannot
#: be read (so what it holds is unknown), or it holds something else.
NOT_A_FILE, UNREADABLE, SOMETHING_ELSE = "not a file", "unreadable", "something else"


def kept_from_replacing(
    path: str, limit_bytes: int, ours: Callable[[bytes], bool]
) -> tuple[str, str] | None:
    """Why opsctl may not replace ``path`` with a file it writes, or None: it may when
    the path names nothing yet, or a regular file that is empty or whose bytes
    ``ours`` recognises as opsctl's own. Otherwise (one of the reasons above, and
    the reason a file could not be read)."""
    if not replaceable(path):
        return NOT_A_FILE, ""
    if not os.path.lexists(path):
        return None
    try:
        raw = read_file(path, limit_bytes)
    except NotReadable as exc:  # what it holds cannot be checked: never replaced
        return UNREADABLE, exc.reason
    except TooLarge:
        return SOMETHING_ELSE, ""
    return None if not raw.strip() or ours(raw) else (SOMETHING_ELSE, "")


def _open(path: str) -> int:
    """A descriptor of ``path`` opened for reading without waiting (a FIFO's
    open waits for a writer otherwise)."""
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))


def _reason(error: OSError) -> str:
    """Why a file could not be read, in a few words."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "it is a directory"
    if isinstance(error, PermissionError):
        return "permission denied"
    return (error.strerror or type(error).__name__).lower()
