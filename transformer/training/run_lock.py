"""One run at a time per run folder: a lock file naming its owner, refreshed while the run lives.

`RUN/run.lock` holds JSON: the owner's pid, host name, start time and the time it was last
refreshed, plus a random token that tells two owners with the same pid apart. A background thread
rewrites the refresh time every `REFRESH_SECONDS`. Another process may take the lock over only
when it is stale:

- on the same host, when the owner's process no longer runs: its pid is gone (a killed run), or
  now belongs to a process started later (a reused pid; told apart by the process start time the
  lock records, where `/proc` gives it). A live owner keeps the lock however old its refresh time:
  a run stopped with Ctrl-Z, or one that cannot refresh on a full disk, still owns its folder;
- on another host, when the refresh time is older than `STALE_SECONDS`: its pid cannot be checked
  from here. The same rule serves the same host where `/proc` is missing.

A lock file that cannot be read counts as refreshed when it was last modified: it may be one that
its owner has just created and not yet written, which must not be taken for a stale one.

Otherwise acquiring fails with a one-line :class:`RunLockedError` naming the owner. An owner whose
lock is deleted or taken over finds out at its next refresh (`RunLock.lost`); training then stops. Under
`torchrun` only global rank 0 writes the run folder, so only it takes the lock.

This module imports only :mod:`transformer.atomic` from the rest of the package.
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

from transformer.atomic import pid_running

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
REFRESH_SECONDS = 30.0
STALE_SECONDS = 300.0  # ten missed refreshes; clocks of hosts sharing a file system must agree to within this


class RunLockedError(RuntimeError):
    """The run folder is owned by another live run; the message names it."""


def _process_identity(pid: int) -> str | None:
    """The boot and start time of process `pid`, which a later process with the same pid cannot share;
    None where `/proc` does not tell (not Linux) or the process is gone."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot} {stat.rsplit(')', 1)[1].split()[19]}"  # field 22, starttime: after the ')' closing the name


def _describe(owner: dict[str, Any]) -> str:
    if "pid" not in owner:
        return f"its lock file holds no owner record (being written, or damaged), last modified " \
               f"{time.time() - owner['refreshed']:.0f} s ago"
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
        self.process = _process_identity(os.getpid())
        self.lost = False  # set when a refresh finds the lock gone or another run's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "process": self.process, "started": self.started,
                "refreshed": time.time(), "token": self.token}

    def _read(self, path: Path | None = None) -> dict[str, Any] | None:
        """The lock's owner record; None if there is no lock file.

        A file that holds no valid record (empty while its owner is about to write it, or damaged)
        reads as `{"refreshed": its modification time}`: live for `STALE_SECONDS`, then stale.
        """
        path = path or self.path
        try:
            owner = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            owner = None
        if isinstance(owner, dict) and isinstance(owner.get("pid"), int) and isinstance(owner.get("refreshed"), (int, float)):
            return owner
        try:
            return {"refreshed": path.stat().st_mtime}
        except FileNotFoundError:
            return None

    def is_stale(self, owner: dict[str, Any]) -> bool:
        """Whether the run that wrote `owner` is gone (see the module docstring)."""
        aged = time.time() - owner["refreshed"] > STALE_SECONDS
        if owner.get("host") != socket.gethostname():
            return aged
        pid = owner.get("pid", -1)
        if not pid_running(pid):
            return True
        recorded, now = owner.get("process"), _process_identity(pid)
        if recorded is not None and now is not None:
            return recorded != now
        return aged

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
            # The flag first: whoever sees the warning may rely on `lost` being set already.
            self.lost = True
            self._stop.set()
            log.warning("%s is no longer held by this run", self.path)
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
