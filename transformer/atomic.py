"""Atomic file writes: a temporary file in the same folder, then a rename over the target.

A process killed at any moment leaves either the old file or the new one, never a torn file. A
write that fails (disk full, a folder in the way) removes its temporary file and raises
:class:`WriteError`, one line naming the file. Temporary files are named ``.NAME.tmpPID``; a killed
process cannot clean up after itself, so a run's start-up removes leftovers with
:func:`remove_stale_temp_files`.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable

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
