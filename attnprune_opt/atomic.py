"""Outputs appear whole or not at all, and the output path always holds a complete folder, old or new.

A folder is written as a hidden sibling, ``.NAME.partial-PID-XXXX``, and moved into place at the end. Replacing an
existing output (``overwrite``) is one atomic exchange of the two folders where the OS has one (Linux
``renameat2(RENAME_EXCHANGE)``); elsewhere it is two renames through ``.NAME.old-PID-XXXX``, and a run killed
between them leaves the old folder there, which the next run on the same output moves back. SIGTERM and SIGHUP are
raised as :class:`~attnprune_opt.errors.Terminated` (a KeyboardInterrupt) while a folder is written, so the
temporary folder is removed as on Ctrl-C; the moves themselves run with those signals held. What a SIGKILL leaves
(a partial folder of a process that no longer exists) is removed by the next run on the same output.
Folders get the permissions the umask gives, as ``mkdir`` would.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError, OutputPathError, Terminated

logger = logging.getLogger(__name__)

_HANDLED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_HELD = (*_HANDLED, signal.SIGINT)
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Fail before any work is done if ``path`` may not be written or replaced; clean up after dead runs first.

    Refused: a path that is or contains the current directory, an existing path without ``overwrite`` or that is
    not a folder, a parent that is not a writable folder.
    """
    path = Path(path)
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if cwd == resolved or resolved in cwd.parents:
        raise OutputPathError(f"output {path} contains the current directory; name a folder of its own, "
                              "such as out/NAME")
    recover(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} already exists; pass overwrite=True (--overwrite) to replace it")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"output {path} exists and is not a folder")
    _check_writable(path.parent)
    return path


def check_free_space(path: str | Path, needed: int) -> None:
    """Fail if the file system that will hold ``path`` has less than ``needed`` bytes free."""
    ancestor = _existing_ancestor(Path(path).parent)
    free = shutil.disk_usage(ancestor).free
    if free < needed:
        raise OutputPathError(f"output {path}: {free / 1e6:.0f} MB free on its file system, the output needs about "
                              f"{needed / 1e6:.0f} MB")


@contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on any error or SIGINT, SIGTERM
    or SIGHUP it is removed. An existing ``path`` is only replaced with ``overwrite``, once the new one is complete.
    """
    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    with terminations_raised():
        try:
            with _signals_held():  # so that the folder is known to the cleanup below as soon as it exists
                tmp = _make_temp(path)
            try:
                yield tmp
            except Exception as exc:
                reason = _no_room(exc)
                if reason is None:
                    raise
                raise OutputPathError(f"cannot write output {path}: {reason}") from exc
            check_output_dir(path, overwrite)  # it may have appeared while we worked
            with _signals_held():
                _replace(tmp, path)
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def recover(path: str | Path) -> list[str]:
    """Finish what dead runs on ``path`` left: remove their partial folders, and complete (the output exists) or
    roll back (it does not) an interrupted two-rename swap. Returns what was done, also logged as warnings."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(partial|old)-(\d+)-\w+")
    done = []
    for entry in sorted(path.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if not match or _alive(int(match[2])):
            continue
        if match[1] == "old" and not path.exists():
            _move(entry, path)
            done.append(f"restored {path} from {entry.name}, left by an interrupted overwrite")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed {entry}, left by an interrupted run (process {match[2]})")
    for line in done:
        logger.warning(line)
    return done


def _no_room(exc: Exception) -> str | None:
    """The reason, if ``exc`` says the output does not fit (disk full, file size limit, quota, read-only)."""
    if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
        return exc.strerror
    code = re.search(r"\(os error (\d+)\)", str(exc))  # I/O errors of Rust libraries (safetensors)
    return os.strerror(int(code[1])) if code and int(code[1]) in _NO_ROOM else None


def _make_temp(path: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700
    return tmp


def _replace(tmp: Path, path: Path) -> None:
    """Put the complete folder ``tmp`` at ``path``; an old ``path`` ends up in ``tmp`` (exchange) or is removed."""
    if not path.exists():
        _move(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old output
    else:
        old = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        _move(path, old)
        _move(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def _move(source: Path, target: Path) -> None:
    os.rename(source, target)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the OS or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc older than 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


@contextmanager
def terminations_raised() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` meanwhile (main thread, default handlers only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in _HANDLED}
    for signum, handler in previous.items():
        if handler is signal.SIG_DFL:
            signal.signal(signum, _raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP (delivered afterwards) so the moves are not cut in half by our own handler."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _check_writable(parent: Path) -> None:
    """The nearest existing ancestor of ``parent`` is a folder we can create entries in (tried, not guessed)."""
    ancestor = _existing_ancestor(parent)
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot create the output in {parent}: {ancestor} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".attnprune-probe-", dir=ancestor))
    except OSError as exc:
        raise OutputPathError(f"cannot write in {ancestor}: {exc.strerror or exc}") from None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
