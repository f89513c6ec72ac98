"""The file system, treated as hostile: inputs checked before reading, outputs written atomically.

Inputs: anything that is not a regular file (a FIFO, a device, a socket) is refused before it
is opened for reading, and opened without blocking so that a file swapped for a FIFO meanwhile
is refused too; inside a directory, an entry that is a symbolic link or leaves the directory is
refused.

Outputs: data goes to a temporary file (or directory) next to the destination, renamed onto it
when complete; a failure leaves nothing behind. Modes are those ``cp`` gives: a new file gets
``0666 & ~umask`` (a directory ``0777 & ~umask``), a replaced one keeps the mode it had. Errors
while writing name the destination, never the temporary.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import DestinationExistsError, FileFormatError

__all__ = [
    "atomic_dir",
    "atomic_file",
    "check_entry",
    "check_input",
    "check_not_nested",
    "escape",
    "exists_error",
    "one_line",
    "open_entry",
    "open_regular",
    "short",
]


_NOT_REGULAR = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def escape(text: str) -> str:
    r"""``text`` with control and other unprintable characters escaped, as ``repr`` writes them.

    Names from a file (keys, class names, paths) go through this before reaching a terminal, so
    that a key such as ``"\x1b]0;owned\x07"`` cannot clear the screen or set the title.

    Examples:
        >>> escape("layer.weight"), escape("a\x1b[2Jb"), escape("tab\there")
        ('layer.weight', 'a\\x1b[2Jb', 'tab\\there')
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def short(value: Any, limit: int = 40) -> str:
    r"""``repr(value)``, escaped and cut to ``limit`` characters, built from a bounded part of it.

    A gigabyte of bytes, a huge set or a 10,000-digit int is never turned into text whole.

    Examples:
        >>> short("x" * 10**6, 12), short(10**5000, 20), short({"k": "\x1b[2J"})
        ("'xxxxxxxx...", '<int of 16610 bits>', "{'k': '\\x1b[2J'}")
    """
    text = escape(_bounded_repr(value, limit + 1))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bounded_repr(value: Any, budget: int) -> str:
    if isinstance(value, str | bytes | bytearray):
        return repr(value[:budget])
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 4 * budget:
            return f"<int of {value.bit_length()} bits>"
        return repr(value)
    if isinstance(value, list | tuple | set | frozenset | dict):
        brackets = {list: "[]", tuple: "()"}.get(type(value), "{}")
        opening, closing = brackets[0], brackets[1]
        items = value.items() if isinstance(value, dict) else value
        parts, used = [], 0
        for item in itertools.islice(items, budget):
            if isinstance(value, dict):
                text = f"{_bounded_repr(item[0], budget)}: {_bounded_repr(item[1], budget)}"
            else:
                text = _bounded_repr(item, budget)
            parts.append(text)
            used += len(text) + 2
            if used > budget:
                break
        inner = ", ".join(parts)
        if type(value) not in (list, tuple, dict, set):
            return f"{type(value).__name__}({opening}{inner}{closing})"
        return f"{opening}{inner}{closing}"
    text = repr(value)
    return text[: budget + 1]


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message, cut to 300."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    first = first[:300] + ("..." if len(first) > 300 else "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _what(mode: int) -> str:
    return next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")


def check_input(path: Path) -> bool:
    """Check ``path`` (following symbolic links) before reading it; True for a directory.

    Raises:
        FileNotFoundError: Nothing is there.
        FileFormatError: It is a FIFO, a device or a socket.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file or directory") from None
    if stat.S_ISDIR(st.st_mode):
        return True
    if not stat.S_ISREG(st.st_mode):
        raise FileFormatError(
            f"{path}: {_what(st.st_mode)}, not a regular file; tonumpy reads regular files "
            "(and directories of them) only"
        )
    return False


def _regular_fd(path: Path, fd: int, source: str) -> int:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileFormatError(
            f"{source}: {_what(st.st_mode)}, not a regular file; tonumpy reads regular files only"
        )
    os.set_blocking(fd, True)
    return fd


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading; refuse anything else without blocking on it."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file or directory") from None
    return os.fdopen(_regular_fd(path, fd, str(path)), "rb")


def check_entry(folder: Path, name: str) -> Path:
    """``folder / name``, checked: a plain name, not a symbolic link, a regular file.

    Raises:
        FileNotFoundError: The entry does not exist.
        FileFormatError: The name leaves the directory, or the entry is a symbolic link or
            not a regular file.
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\x00" in name:
        raise FileFormatError(f"{folder}: names a file outside the directory: {name[:80]!r}")
    path = folder / name
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (the directory names it)") from None
    if stat.S_ISLNK(st.st_mode):
        raise FileFormatError(
            f"{path}: a symbolic link; files inside a directory must be regular files in it "
            "(a link may lead anywhere): copy the real file in (cp -L) if you trust it"
        )
    if not stat.S_ISREG(st.st_mode):
        raise FileFormatError(f"{path}: {_what(st.st_mode)}, not a regular file")
    return path


def open_entry(folder: Path, name: str) -> BinaryIO:
    """Open a checked directory entry, refusing a symbolic link put there after the check."""
    path = check_entry(folder, name)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileFormatError(f"{path}: a symbolic link; refused") from None
        raise
    return os.fdopen(_regular_fd(path, fd, str(path)), "rb")


def check_not_nested(src: Path, dst: Path) -> None:
    """Refuse a destination that is the source, contains it, or lies inside it."""
    source, target = src.resolve(), dst.resolve()
    if source == target:
        raise FileFormatError(f"{dst} is the source file; choose another destination")
    if target in source.parents:
        raise FileFormatError(
            f"{dst} contains the source {src}: writing it would delete the source; choose "
            "another destination"
        )
    if source in target.parents:
        raise FileFormatError(f"{dst} is inside the source {src}; choose another destination")


# ------------------------------------------------------------------------------- outputs


def _parent_of(dst: Path) -> Path:
    parent = dst.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{parent}: no such directory (create it first)")
    return parent


def _temporary_name(dst: Path, suffix: str) -> Path:
    return dst.parent / f".{dst.name[:80]}.{secrets.token_hex(4)}{suffix}"


def _create_file(dst: Path) -> Path:
    """A new empty file next to ``dst``, mode ``0666 & ~umask`` (the kernel applies the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = _temporary_name(dst, ".tmp")
        try:
            os.close(os.open(tmp, flags | getattr(os, "O_NOFOLLOW", 0), 0o666))
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
        return tmp


def _create_dir(dst: Path, suffix: str) -> Path:
    while True:
        tmp = _temporary_name(dst, suffix)
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
        return tmp


def _keep_mode(old: Path, new: Path) -> None:
    """Give ``new`` the permission bits of the file it replaces (set-id bits dropped)."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(new, stat.S_IMODE(old.stat().st_mode) & 0o1777)


_DISK_FULL = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    errno.EFBIG: "the file grew past the largest size allowed here (the file system's limit, "
    "or a file size limit: ulimit -f); write elsewhere or to a directory of .npy files",
}


def _write_error(dst: Path, tmp: Path, exc: OSError) -> OSError | None:
    """The error to raise instead of ``exc`` (naming ``dst``), or None to keep ``exc``."""
    reason = _DISK_FULL.get(exc.errno or 0)
    if reason is None and exc.filename is not None and str(tmp) in str(exc.filename):
        reason = exc.strerror or type(exc).__name__
    if reason is None:
        return None
    error = OSError(f"{dst}: cannot write it: {reason}")
    error.errno = exc.errno  # str(error) stays the message above
    return error


def exists_error(dst: Path) -> DestinationExistsError:
    """The error for a destination that exists when ``overwrite=False``.

    It names the parameter in ``.option``; the command line says ``--force`` instead.

    Examples:
        >>> error = exists_error(Path("out.npz"))
        >>> str(error), error.option
        ('out.npz exists; pass overwrite=True to replace it', 'overwrite')
    """
    return DestinationExistsError.naming(f"{dst} exists; pass ", "overwrite", " to replace it")


@contextlib.contextmanager
def atomic_file(dst: Path, *, overwrite: bool) -> Iterator[Path]:
    """A temporary path next to ``dst``; renamed onto ``dst`` if the block succeeds."""
    if dst.is_dir():
        raise IsADirectoryError(f"{dst} is a directory; choose a file name")
    exists = os.path.lexists(dst)
    if exists and not overwrite:
        raise exists_error(dst)
    _parent_of(dst)
    tmp = _create_file(dst)
    try:
        try:
            yield tmp
            if exists and dst.is_file():
                _keep_mode(dst, tmp)
            _commit_file(tmp, dst, overwrite=overwrite)
        except OSError as exc:
            error = _write_error(dst, tmp, exc)
            if error is None:
                raise
            raise error from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _commit_file(tmp: Path, dst: Path, *, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)  # fails if dst appeared meanwhile: never clobbers
    except FileExistsError:
        raise exists_error(dst) from None
    except OSError:  # no hard links on this file system
        if os.path.lexists(dst):
            raise FileExistsError(f"{dst} exists") from None
        os.replace(tmp, dst)


@contextlib.contextmanager
def atomic_dir(
    dst: Path, *, overwrite: bool, replaceable: Callable[[Path], bool]
) -> Iterator[Path]:
    """A temporary directory next to ``dst``; it replaces ``dst`` if the block succeeds.

    An existing ``dst`` is replaced only with ``overwrite`` and if ``replaceable(dst)``.
    """
    if os.path.lexists(dst):
        if not overwrite:
            raise exists_error(dst)
        if not dst.is_dir() or dst.is_symlink():
            raise DestinationExistsError(f"{dst} exists and is not a directory; remove it first")
        if not replaceable(dst):
            raise DestinationExistsError.naming(
                f"{dst} is a directory that holds more than a tonumpy export; not replacing "
                "it even with ",
                "overwrite",
                ": remove it yourself or choose another name",
            )
    _parent_of(dst)
    tmp = _create_dir(dst, ".tmp")
    old: Path | None = None
    try:
        try:
            yield tmp
            if dst.exists():
                _keep_mode(dst, tmp)
                old = _create_dir(dst, ".old")
                os.rmdir(old)
                os.rename(dst, old)
            os.rename(tmp, dst)
        except OSError as exc:
            error = _write_error(dst, tmp, exc)
            if error is None:
                raise
            raise error from None
    except BaseException:
        if old is not None and not dst.exists():
            os.rename(old, dst)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
