"""One writer per run: the run lock (between processes) and the writer lock (between threads of one process).

Between processes, ``run_lock(run_dir, role)`` takes an ``flock`` on ``RUN/.s3t-run.lock``:

======== ========= ==========================================================================
role     lock      who
======== ========= ==========================================================================
serve    exclusive ``s3t serve``: the one gateway of a run, for its whole life
delete   exclusive ``s3t delete --offline`` (a deletion applied without a server)
train    shared    ``s3t train`` (parallel ``--shards`` jobs coexist), ``s3t unlearn``
======== ========= ==========================================================================

so while a server runs nothing else writes the run (``s3t delete`` without ``--offline`` goes through the
server), and an offline deletion never overlaps training. The lock is taken without waiting: a refusal
names the holder (pid, command, gateway URL) and says what to do instead. The kernel drops an ``flock``
when its process dies, so a killed holder never blocks the run; its description file is ignored then.

Inside one process (the server: deletions from HTTP threads, background retraining), ``writer_lock(run_dir)``
is one re-entrant lock per run directory: a deletion's reconcile-switch-destroy-certify and a block or
adapter write's check-hashes-then-write never interleave.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path

LOCK_FILE = ".s3t-run.lock"
HOLDERS_DIR = ".s3t-locks"
ROLES = {"serve": fcntl.LOCK_EX, "delete": fcntl.LOCK_EX, "train": fcntl.LOCK_SH}


class RunBusy(RuntimeError):
    """Another process holds the run in a way that excludes what was asked."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holders(run_dir: str | Path) -> list[dict]:
    """The live processes that hold the run lock, as they described themselves."""
    d = Path(run_dir) / HOLDERS_DIR
    out = []
    for f in sorted(d.glob("*.json")) if d.exists() else []:
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(info.get("pid", -1)):
            out.append(info)
    return out


def exclusively_held(run_dir: str | Path) -> bool:
    """Whether some process holds the run lock exclusively now (a server, or an offline deletion): asked of the
    kernel's lock itself, not of the holders' description files."""
    f = Path(run_dir) / LOCK_FILE
    if not f.exists():
        return False
    if os.path.realpath(run_dir) in _held:
        return ROLES[_held[os.path.realpath(run_dir)].role] == fcntl.LOCK_EX
    fd = os.open(f, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _describe(h: dict, run_dir: Path) -> str:
    if h.get("role") == "serve":
        return (f"run {run_dir} is served by `s3t serve` (pid {h['pid']}, gateway {h.get('url', '?')}); "
                f"send deletions through it: `s3t delete {run_dir} --ids ...` (without --offline)")
    return f"run {run_dir} is in use by `{h.get('command', '?')}` (pid {h['pid']}, role {h.get('role')})"


class RunLock:
    def __init__(self, run_dir: Path, role: str, fd: int, holder_file: Path):
        self.run_dir, self.role, self._fd, self._holder_file = run_dir, role, fd, holder_file

    def describe(self, **info) -> None:
        """Add facts for refusals (e.g. the gateway's URL once it is known)."""
        data = json.loads(self._holder_file.read_text())
        data.update(info)
        tmp = self._holder_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._holder_file)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self._holder_file.unlink()
        _held.pop(os.path.realpath(self.run_dir), None)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_held: dict[str, RunLock] = {}


@contextlib.contextmanager
def hold(run_dir: str | Path, role: str, **info):
    """The run lock for ``role`` for the duration of the block; a no-op when this process already holds it
    exclusively or in the same role (a server's background retraining runs under the server's lock)."""
    key = os.path.realpath(run_dir)
    mine = _held.get(key)
    if mine is not None and mine.role == "serve" and role == "delete":
        raise RunBusy(f"this process serves {run_dir}: deletions go through its gateway (an offline deletion would "
                      "change the stored run without switching the engine)")
    if mine is not None and (ROLES[mine.role] == fcntl.LOCK_EX or mine.role == role):
        yield mine
        return
    if mine is not None:
        raise RunBusy(f"this process holds {run_dir} as {mine.role!r} and cannot also take it as {role!r}")
    lock = acquire(run_dir, role, **info)
    try:
        yield lock
    finally:
        lock.release()


def acquire(run_dir: str | Path, role: str, **info) -> RunLock:
    """Take the run lock for ``role`` without waiting; :class:`RunBusy` names whoever holds it.
    Release it with ``.release()`` (or use :func:`hold`)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: use one of {sorted(ROLES)}")
    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    if key in _held:
        raise RunBusy(f"this process already holds {run_dir} as {_held[key].role!r}")
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, ROLES[role] | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        live = holders(run_dir)
        why = "; ".join(_describe(h, run_dir) for h in live) or f"run {run_dir} is locked by another process"
        raise RunBusy(f"cannot {role}: {why}") from None
    d = run_dir / HOLDERS_DIR
    d.mkdir(exist_ok=True)
    for f in d.glob("*.json"):  # descriptions left by killed holders
        with contextlib.suppress(OSError, ValueError):
            if not pid_alive(json.loads(f.read_text()).get("pid", -1)):
                f.unlink()
    hf = d / f"{os.getpid()}-{role}-{threading.get_ident()}.json"
    hf.write_text(json.dumps({"pid": os.getpid(), "role": role, "command": " ".join(sys.argv[:3]),
                              "since": time.time(), **info}))
    lock = RunLock(run_dir, role, fd, hf)
    _held[key] = lock
    return lock


_writer_locks: dict[str, threading.RLock] = {}
_registry_lock = threading.Lock()


def writer_lock(run_dir: str | Path) -> threading.RLock:
    """The one in-process writer lock of a run directory (re-entrant)."""
    key = os.path.realpath(run_dir)
    with _registry_lock:
        return _writer_locks.setdefault(key, threading.RLock())
