"""One process per run directory: an exclusive `flock` on run_dir/lock, which holds the owner's PID.

The kernel drops the lock when its process dies, however it dies, so a lock file left by a killed
run is stale by construction: the next run takes it over (and says whose it was). A second live
process gets a one-line error naming the first.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path


class RunDirError(RuntimeError):
    """A run directory that is in use, unwritable or full; one line that says what to do."""


def os_error(run_dir: Path, err: OSError) -> RunDirError:
    """An OSError met while writing the run directory, as the one-line error a user can act on."""
    if err.errno == errno.ENOSPC:
        return RunDirError(f"no space left on the device of run_dir '{run_dir}'; free disk space and run the same "
                           f"command again (the last checkpoint is kept)")
    return RunDirError(f"cannot write to run_dir '{run_dir}' ({err.strerror}); choose a writable run_dir")


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "lock"
        self.fd: int | None = None
        self.previous: int | None = None  # PID of a killed owner whose lock this one took over

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise os_error(self.path.parent, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"run_dir '{self.path.parent}' is in use by process {owner} (lock file '{self.path}'); "
                              f"wait for it to finish, stop it, or choose another run_dir") from None
        old = os.pread(fd, 32, 0).decode(errors="replace").strip()
        self.previous = int(old) if old.isdigit() and int(old) != os.getpid() else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
