"""One run at a time per run folder: a lock file naming its owner, refreshed while the run lives.

`RUN/run.lock` holds JSON: the owner's pid, host name, start time and the time it was last
refreshed, plus a random token that tells two owners with the same pid apart. A background thread
rewrites the refresh time every `REFRESH_SECONDS`. Another process may take the lock over only
when it is stale:

- on the same host, when the owner's pid no longer runs (a killed run), or
- on any host, when the refresh time is older than `STALE_SECONDS`: a run on another machine of a
  shared file system whose pid cannot be checked from here, or a pid that was reused.

Otherwise acquiring fails with a one-line :class:`RunLockedError` naming the owner. Under
`torchrun` only global rank 0 writes the run folder, so only it takes the lock.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
REFRESH_SECONDS = 30.0
STALE_SECONDS = 300.0  # ten missed refreshes; clocks of hosts sharing a file system must agree to within this


class RunLockedError(RuntimeError):
    """The run folder is owned by another live run; the message names it."""


def _pid_running(pid: int) -> bool:
    if pid <= 0:  # 0 and negative pids name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _describe(owner: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    age = time.time() - owner.get("refreshed", 0)
    return f"pid {owner.get('pid')} on host {owner.get('host')!r}, started {started}, last refreshed {age:.0f} s ago"


class RunLock:
    """The lock of one run folder; a context manager that acquires on entry and releases on exit.

    Args:
        run_dir: the run folder (created if missing).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started,
                "refreshed": time.time(), "token": self.token}

    def _read(self, path: Path | None = None) -> dict[str, Any] | None:
        """The lock's owner record; None if there is no lock file. An unreadable one counts as stale."""
        try:
            owner = json.loads((path or self.path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"refreshed": 0}
        return owner if isinstance(owner, dict) else {"refreshed": 0}

    def is_stale(self, owner: dict[str, Any]) -> bool:
        """Whether the run that wrote `owner` is gone (see the module docstring)."""
        if time.time() - float(owner.get("refreshed", 0)) > STALE_SECONDS:
            return True
        return owner.get("host") == socket.gethostname() and not _pid_running(int(owner.get("pid", -1)))

    def acquire(self) -> None:
        """Take the lock, taking over a stale one (logged).

        Raises:
            RunLockedError: another live run owns the folder.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is None:
                    continue  # released in the meantime
                if not self.is_stale(owner):
                    raise RunLockedError(f"{self.path.parent} is in use by another run ({_describe(owner)}); "
                                         f"wait for it to finish or choose another train.output_dir") from None
                # Move the stale lock aside under a unique name, then check that it is the one judged
                # stale: a run that took it over in between gets its lock back.
                aside = self.path.with_name(f".{LOCK_NAME}.stale{self.token}")
                try:
                    os.replace(self.path, aside)
                except FileNotFoundError:
                    continue
                if self._read(aside) != owner:
                    os.replace(aside, self.path)
                    continue
                aside.unlink()
                log.warning("took over the stale lock of %s (%s)", self.path.parent, _describe(owner))
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._record(), f)
            self._thread = threading.Thread(target=self._refresh_loop, name="run-lock-refresh", daemon=True)
            self._thread.start()
            return
        raise RunLockedError(f"{self.path}: could not take the lock; another run is starting in the same folder")

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            self.refresh()

    def refresh(self) -> None:
        """Rewrite the refresh time, if the lock is still ours (a rename, so readers never see half a file)."""
        owner = self._read()
        if owner is None or owner.get("token") != self.token:
            log.warning("%s is no longer held by this run", self.path)
            self._stop.set()
            return
        tmp = self.path.with_name(f".{LOCK_NAME}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self._record()), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:  # e.g. a full disk: the run goes on, the lock ages
            tmp.unlink(missing_ok=True)
            log.warning("cannot refresh %s: %s", self.path, e.strerror or e)

    def release(self) -> None:
        """Stop refreshing and delete the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        owner = self._read()
        if owner is not None and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
