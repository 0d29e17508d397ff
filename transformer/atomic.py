"""Atomic file writes: a temporary file in the same folder, then a rename over the target.

A process killed at any moment leaves either the old file or the new one, never a torn file. A
write that fails (disk full, a folder in the way) removes its temporary file and raises
:class:`WriteError`, one line naming the file. Temporary files are named ``.NAME.tmpPID``; a killed
process cannot clean up after itself, so a run's start-up removes leftovers with
:func:`remove_stale_temp_files`.

Two guards every command that writes shares: :func:`check_not_an_input` refuses an output that is
one of the command's inputs, and :func:`staging_folder` / :func:`remove_stale_staging_folders` name
the folders a command builds beside its output so that the leftovers of a killed one can be told
from a live one's.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

log = logging.getLogger(__name__)

TEMP_PATTERN = re.compile(r"^\..+\.tmp\d+$")


class WriteError(OSError):
    """A file could not be written; the message names it and says why, on one line."""


def temp_path(path: Path) -> Path:
    """The temporary name this process writes `path` under: `.NAME.tmpPID` in the same folder."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file, flush it to disk, then rename it to `path`.

    Raises:
        WriteError: `path` names a folder, or writing failed (e.g. no space left on the device); the
            temporary file is gone and an existing `path` is unchanged.
    """
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"{path}: is a folder; give a file name")
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # BaseException: a KeyboardInterrupt in the middle of a write must not leave the file behind either.
        tmp.unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is not None:
            raise WriteError(f"{path}: cannot write: {cause.strerror or cause}") from None
        raise


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind `error`: torch.save, failing to write, raises a second error while closing its archive."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` in `folder` (not its subfolders), logging each.

    Only call this while no other process writes `folder` (a training run does it holding the
    run's lock): another writer's temporary file would look just as stale. Subfolders are left
    alone: the lock covers the files a run writes, not another run's folder nested inside.

    Returns:
        The files removed.
    """
    removed = []
    own = f".tmp{os.getpid()}"  # this process's own writes are under way, not stale
    for path in sorted(Path(folder).glob(".*.tmp*")):
        if TEMP_PATTERN.match(path.name) and not path.name.endswith(own) and path.is_file():
            path.unlink(missing_ok=True)
            log.info("removed %s, left behind by an interrupted write", path)
            removed.append(path)
    return removed


def _is_same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: the same path once links and `..` are resolved, or one file
    under two names (a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _is_inside(path: Path, folder: Path) -> bool:
    """Whether `path`, links resolved, is `folder` or lies under it."""
    return path.resolve().is_relative_to(folder.resolve())


def _stat(file: str | Path | int) -> os.stat_result | None:
    """The status of a path or an open file descriptor; None where there is none."""
    try:
        return os.fstat(file) if isinstance(file, int) else os.stat(file)
    except OSError:
        return None


def check_not_an_input(option: str, output: str | Path | int, inputs: Iterable[tuple[str, str | Path | int]],
                       replaces_folder: bool = False) -> None:
    """Refuse to write `output` where it would destroy one of the command's inputs.

    Call it before anything is written. An output is refused when it is an input under any name (a
    symlink, another spelling, a hard link), when it lies inside an input folder (writing there would
    change that input), and, with `replaces_folder`, when it is a folder that the command replaces as
    a whole and that holds an input.

    Args:
        option: what names the output, for the message (e.g. "--output", "data.prepared_dir").
        output: the path to be written, or an open file descriptor (e.g. standard output's).
        inputs: (what it is, path) for every file or folder the command reads, e.g.
            ("the --ref file", path); with a descriptor as `output`, a path may be one too.
        replaces_folder: `output` is a folder that is replaced as a whole.

    Raises:
        WriteError: one line naming the option, the output and the input it would destroy.
    """
    if isinstance(output, int):
        out_stat = _stat(output)
        if out_stat is None or not stat.S_ISREG(out_stat.st_mode):  # a terminal or a pipe is never an input file
            return
        for what, path in inputs:
            in_stat = _stat(path)
            if in_stat is not None and os.path.samestat(out_stat, in_stat):
                name = "" if isinstance(path, int) else f" {path}"
                raise WriteError(f"{option} is {what}{name}; writing it would destroy that input: "
                                 f"send {option} elsewhere")
        return
    output = Path(output)
    for what, path in inputs:
        path = Path(path)
        if _is_same_file(output, path):
            raise WriteError(f"{option} {output} is {what} {path}; writing it would destroy that input: "
                             f"choose another {option}")
        if path.is_dir() and (_is_inside(output, path) or any(
                _is_same_file(output, file) for file in path.rglob("*") if file.is_file())):
            raise WriteError(f"{option} {output} is inside {what} {path}; writing it would change that input: "
                             f"choose another {option}")
        if replaces_folder and _is_inside(path, output):
            raise WriteError(f"{option} {output} holds {what} {path}; the folder is replaced as a whole, "
                             f"which would destroy that input: choose another {option}")


def pid_running(pid: int) -> bool:
    """Whether a process with id `pid` runs on this host."""
    if pid <= 0:  # 0 and negative ids name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _staging_prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-"


def staging_folder(target: str | Path, kind: str = "tmp") -> Path:
    """Create an empty folder beside `target` to build it in, named `.NAME.KIND-HOST-PID-RANDOM`.

    The host and the process id in the name let :func:`remove_stale_staging_folders` tell the folder
    of a killed process from one still being written.
    """
    target = Path(target)
    prefix = f"{_staging_prefix(target, kind)}{socket.gethostname()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))


def remove_stale_staging_folders(target: str | Path, kinds: Iterable[str] = ("tmp",)) -> list[Path]:
    """Delete the folders that :func:`staging_folder` made beside `target` for processes of this host
    that no longer run, logging each.

    The folder of another host, of a live process or of this one is left alone: it may still be
    written. A process id that was reused only puts the removal off to a later start.

    Returns:
        The folders removed.
    """
    target = Path(target)
    host = socket.gethostname()
    removed = []
    for kind in kinds:
        prefix = _staging_prefix(target, kind)
        # mkdtemp's random part is lower-case letters, digits and "_": never a "-"
        pattern = re.compile(rf"^{re.escape(prefix)}(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")
        for path in sorted(target.parent.glob(f"{glob.escape(prefix)}*")):
            match = pattern.match(path.name)
            if match is None or match["host"] != host or path.is_symlink() or not path.is_dir():
                continue
            pid = int(match["pid"])
            if pid == os.getpid() or pid_running(pid):
                continue
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left behind by an interrupted process (pid %d)", path, pid)
            removed.append(path)
    return removed
