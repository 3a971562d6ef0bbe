"""One training at a time per output folder: a lock file ``<output_dir>/run.lock`` held while a run lives.

Two trainings writing into the same ``output_dir`` would interleave ``last.pt``, ``best.pt``, ``train.log`` and the
TensorBoard events, and a resume would read a mix of both. :func:`acquire_run_lock` (in the training configs'
``initialize``, on rank 0 only with ``torchrun``) creates the lock file atomically (``O_CREAT | O_EXCL``) with the
run's pid, host and start time as JSON, and refuses with a :class:`~bundle.errors.BundleInputError` naming the
running one while another live run holds it. A lock left by a killed run (its pid no longer alive on this host, or
reused by another process) is taken over with a one-line notice, so ``--resume true`` after a crash just works.

The lock is released (the file removed, if it is still this run's) when the process exits, normally or by an
exception (``atexit``); a run killed by a signal leaves it behind as a stale lock. A process may take the same lock
again (tests and MONAI Label run several workflows in one process, one after the other).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import socket
import sys
from typing import Any

from bundle.errors import BundleInputError

__all__ = ["LOCK_FILENAME", "RunLock", "acquire_run_lock", "release_run_lock"]

LOCK_FILENAME = "run.lock"
_ATTEMPTS = 5  # a stale lock is taken over, then created again; more rounds mean others keep racing for it

# the locks this process holds, by absolute path of the lock file
_HELD: dict[str, RunLock] = {}


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def _process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, from ``/proc``), telling a reused pid apart; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stream:
            fields = stream.read().rpartition(")")[2].split()
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stream:
            return stream.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _alive(pid: int, started: Any) -> bool:
    """Whether process ``pid`` of this host still runs (and is the one that started at ``started``, when known)."""
    if os.name != "posix":
        return True  # no safe probe (os.kill would end the process): keep the lock
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: the process exists under another user
        return True
    if _is_zombie(pid):
        return False
    now = _process_start(pid)
    return not (isinstance(started, int) and now is not None and now != started)


class RunLock:
    """The lock file of one output folder; :meth:`acquire` takes it, :meth:`release` gives it back.

    Args:
        folder: the run's output folder (created if missing).
        option: the config id of ``folder``, named in messages.
        filename: the lock file's name inside ``folder``.
    """

    def __init__(self, folder: str | os.PathLike, option: str = "output_dir", filename: str = LOCK_FILENAME) -> None:
        self.folder = os.path.abspath(os.fspath(folder))
        self.option = option
        self.path = os.path.join(self.folder, filename)
        self.content: dict[str, Any] | None = None

    def _describe(self, holder: dict[str, Any]) -> str:
        return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"

    def _read(self) -> tuple[bytes, dict[str, Any]] | None:
        """The lock file's bytes and content; None if it vanished; :class:`BundleInputError` if it cannot be read."""
        try:
            with open(self.path, "rb") as stream:
                data = stream.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._unreadable(_reason(error)) from error
        try:
            holder = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            holder = None
        if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or holder["pid"] <= 0:
            raise self._unreadable("not a run lock written by this bundle" if data.strip() else "it is empty")
        return data, holder

    def _unreadable(self, reason: str) -> BundleInputError:
        return BundleInputError(
            f"--{self.option} {self.folder} is locked by {self.path}, which cannot be read ({reason}); if no training "
            "runs in this folder, delete the lock file"
        )

    def _create(self) -> bool:
        """Create the lock file with this run's content; False if it already exists."""
        content = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "pid_start": _process_start(os.getpid()),
            "command": " ".join(sys.argv),
        }
        try:
            handle = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as error:
            raise BundleInputError(f"cannot create the run lock {self.path}: {_reason(error)}") from error
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(content, stream, indent=4)
                stream.write("\n")
                stream.flush()
                os.fsync(stream.fileno())
        except OSError as error:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            raise BundleInputError(f"cannot write the run lock {self.path}: {_reason(error)}") from error
        self.content = content
        return True

    def _take_over(self, seen: bytes) -> None:
        """Remove the stale lock whose bytes were ``seen``, unless another run replaced it meanwhile.

        The file is first moved aside (atomic), then compared: a fresh lock moved by mistake is put back.
        """
        moved = f"{self.path}.stale-{os.getpid()}"
        try:
            os.replace(self.path, moved)
        except FileNotFoundError:
            return
        except OSError as error:
            raise BundleInputError(f"cannot take over the stale run lock {self.path}: {_reason(error)}") from error
        try:
            with open(moved, "rb") as stream:
                if stream.read() != seen:
                    with contextlib.suppress(OSError):
                        os.link(moved, self.path)
        finally:
            with contextlib.suppress(OSError):
                os.remove(moved)

    def _own(self, holder: dict[str, Any]) -> bool:
        """Whether the lock was written by this very process (an earlier workflow of it)."""
        return (
            holder.get("pid") == os.getpid()
            and holder.get("host") == socket.gethostname()
            and holder.get("pid_start") == _process_start(os.getpid())
        )

    def acquire(self) -> RunLock:
        """Take the lock; :class:`BundleInputError` naming the holder while another live run holds it."""
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as error:
            raise BundleInputError(
                f"--{self.option} {self.folder}: cannot create the folder ({_reason(error)})"
            ) from error
        for _ in range(_ATTEMPTS):
            if self._create():
                break
            found = self._read()
            if found is None:
                continue  # released meanwhile
            seen, holder = found
            if self._own(holder):
                self.content = holder
                break
            if holder.get("host") != socket.gethostname():
                raise BundleInputError(
                    f"--{self.option} {self.folder} is in use by a training run on another host "
                    f"({self._describe(holder)}; lock file {self.path}): this host cannot tell whether it still runs; "
                    f"if it has ended, delete the lock file, else wait for it or pass another --{self.option}"
                )
            if _alive(holder["pid"], holder.get("pid_start")):
                raise BundleInputError(
                    f"--{self.option} {self.folder} is in use by another training run ({self._describe(holder)}; "
                    f"lock file {self.path}): wait for it to end or pass another --{self.option}"
                )
            print(
                f"notice: taking over the run lock {self.path} of a run that is no longer running "
                f"({self._describe(holder)})",
                file=sys.stderr,
                flush=True,
            )
            self._take_over(seen)
        else:
            raise BundleInputError(f"cannot take the run lock {self.path}: other runs keep replacing it")
        if _HELD.get(self.path) is not self:
            previous = _HELD.pop(self.path, None)
            if previous is not None:  # an earlier workflow of this process: this object holds the lock now
                previous.content = None
                atexit.unregister(previous.release)
            _HELD[self.path] = self
            atexit.register(self.release)
        return self

    def release(self) -> None:
        """Remove the lock file if it is still this run's (never one a later run took over)."""
        content, self.content = self.content, None
        if _HELD.get(self.path) is self:
            del _HELD[self.path]
            atexit.unregister(self.release)
        if content is None or content.get("pid") != os.getpid():
            return  # not taken, or a forked child (a data loader worker) that inherited it
        try:
            with open(self.path, "rb") as stream:
                holder = json.loads(stream.read().decode("utf-8"))
            if holder == content:
                os.remove(self.path)
        except (OSError, ValueError):
            pass


def acquire_run_lock(folder: str | os.PathLike | None, option: str = "output_dir") -> RunLock | None:
    """Take the run lock of ``folder`` for this process until it exits (see the module docstring); ``None``: no
    lock (evaluation, which may run beside a training of the same folder)."""
    return None if folder is None else RunLock(folder, option).acquire()


def release_run_lock(folder: str | os.PathLike) -> None:
    """Give back this process's run lock of ``folder`` now (nothing if it holds none)."""
    lock = _HELD.get(os.path.join(os.path.abspath(os.fspath(folder)), LOCK_FILENAME))
    if lock is not None:
        lock.release()
