"""One owner per output folder, and an orderly stop on SIGTERM: what lets a run survive retries and schedulers.

Ownership. Every verb that writes a run or output folder (finetune, pretrain, evaluate linear/knn/fewshot/vtab) holds
`own_folder(OUT)` while it works: an exclusive POSIX record lock (fcntl.lockf, i.e. fcntl F_SETLK) on OUT/.lock,
taken before any data or model is loaded. A second process that asks for the same folder is refused at once with
the owner's pid, host and command, which the owner writes into the lock file. The kernel drops the lock when its
process ends in any way (kill -9 included), so a killed run never leaves a stale lock: the next run takes it over
and, being the only writer, deletes the temporary files (`*.partial`) that the dead one left behind.

Why POSIX record locks and not flock(): record locks are the ones that NFS carries between machines (NFSv4 in the
protocol, NFSv3 through lockd), as do GPFS/Spectrum Scale and Lustre mounted with `-o flock`; flock() is node-local
on NFS outside Linux (Linux emulates it there with record locks). Record locks are also not inherited by forked
children, so a DataLoader worker never keeps a dead run's folder locked. Where it cannot work:
- some mounts keep locks node-local by configuration (NFS mounted with `nolock`, Lustre with `-o localflock`,
  BeeGFS without `tuneUseGlobalFileLocks`): the lock then keeps out a second process on the same node only;
- a filesystem without lock support (Lustre mounted without `flock`, some FUSE and SMB mounts) fails the call: the
  run is refused with a message that says so. BIGTRANSFER_NO_LOCK=1 turns the guard off, for a user who makes sure
  of one owner by other means;
- Windows has no fcntl: refused likewise, with the same way out.

Stopping. `StopOnSignal` turns SIGTERM (what schedulers send before they kill) into a request that the training
loop honours at its next step boundary: it saves the state there and raises `StopRequested`, which the command
line reports with a resume hint and exit status 143 (128 + SIGTERM), as a process killed by SIGTERM would have.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .atomic import remove_partials
from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks; own_folder() says so when asked for one
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
NO_LOCK_ENV = "BIGTRANSFER_NO_LOCK"
SIGTERM_EXIT = 128 + signal.SIGTERM

# Folders this process owns. POSIX locks are per process: a second acquisition from this process would succeed
# silently, and closing any descriptor of the lock file would drop the lock, so the process keeps its own list.
_owned: set[str] = set()
_owned_guard = threading.Lock()


class FolderBusy(UserError):
    """Another process (or another part of this one) owns the folder."""


def own_folder(folder: str | os.PathLike, what: str = "run folder") -> contextlib.AbstractContextManager[Path]:
    """Hold the exclusive lock on `folder` (created if missing) for the `with` block; raise FolderBusy if taken.

    On leaving, the lock file is removed, and so are the folders this call created if the run left them empty (a
    run refused for bad input leaves nothing behind).
    """
    if os.environ.get(NO_LOCK_ENV, "") not in ("", "0"):
        warnings.warn(f"{NO_LOCK_ENV} is set: {folder} is not locked; make sure no other process writes into it",
                      stacklevel=2)
        return _unlocked(Path(folder))
    return _locked(Path(folder).expanduser().absolute(), what)


@contextlib.contextmanager
def _unlocked(folder: Path) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    yield folder


@contextlib.contextmanager
def _locked(folder: Path, what: str) -> Iterator[Path]:
    key = os.path.realpath(folder)
    with _owned_guard:
        if key in _owned:
            raise FolderBusy(f"{folder}: this process already uses this {what}; choose another --out")
        _owned.add(key)
    fd = None
    # The folders this call creates, innermost first: removed again if the run leaves them empty.
    created = list(itertools.takewhile(lambda p: not p.exists(), (folder, *folder.parents)))
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # read-only, no permission: one clear line, on every rank of a distributed run
            raise UserError(f"{folder}: cannot create this {what} ({e.strerror})") from None
        fd = _lock(folder, what)
        remove_partials(folder)  # the owner is the only writer: these are a killed writer's leftovers
        yield folder
    finally:
        if fd is not None:
            # Unlinked while still locked, so that no other process can have locked this very file meanwhile.
            with contextlib.suppress(OSError):
                os.unlink(folder / LOCK_FILE)
            os.close(fd)
        for made in created:
            try:
                made.rmdir()  # only succeeds when nothing was written
            except OSError:
                break
        with _owned_guard:
            _owned.discard(key)


def _lock(folder: Path, what: str) -> int:
    """Lock folder/.lock (fcntl F_SETLK, exclusive, not waiting); return its descriptor, which holds the lock."""
    path = folder / LOCK_FILE
    if fcntl is None:
        raise UserError(f"{folder}: cannot lock this {what}: this platform has no POSIX file locks (fcntl); set "
                        f"{NO_LOCK_ENV}=1 to run without the one-owner guard")
    for _ in range(100):
        opened = _open_lock_file(path)
        if opened is None:  # its owner removed it just now
            continue
        fd, new = opened
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)  # safe: this process holds no lock on the file
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise FolderBusy(_busy_message(folder, what)) from None
            if new:  # nobody can hold a lock here: leave the folder as it was
                path.unlink(missing_ok=True)
            raise UserError(f"{folder}: cannot lock {path} ({os.strerror(e.errno or 0)}): this filesystem does not "
                            f"support POSIX locks (e.g. Lustre without -o flock); set {NO_LOCK_ENV}=1 to run without "
                            "the one-owner guard, if you make sure that one process at a time writes here") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            _write_owner(fd)
            return fd
        os.close(fd)  # the previous owner removed that file as we locked it: lock the one there now
    raise RuntimeError(f"{path}: the lock file keeps being replaced; is another program deleting it?")


def _open_lock_file(path: Path) -> tuple[int, bool] | None:
    """(descriptor, whether this call created the file), or None when the file vanished between two calls."""
    try:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            return os.open(path, os.O_RDWR), False
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"{path}: cannot open the lock file for writing ({e.strerror})") from None


def _write_owner(fd: int) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
             "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)


def read_owner(folder: str | os.PathLike) -> dict[str, Any]:
    """What the folder's current (or last) owner wrote into its lock file; {} when unreadable."""
    try:
        owner = json.loads((Path(folder) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _busy_message(folder: Path, what: str) -> str:
    owner = read_owner(folder)
    who = (f"pid {owner.get('pid')} on host {owner.get('host')}, since {owner.get('since')}: {owner.get('command')}"
           if owner else "an owner that is just starting")
    return (f"{folder}: this {what} is in use by another process ({who}); one process at a time may write into it. "
            "Wait for it to end (or stop it), or choose another --out")


# How long a DataLoader worker outlives a SIGTERM (see `defer_sigterm`).
WORKER_SIGTERM_GRACE_S = 20.0


def defer_sigterm(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: leave SIGTERM to the training process, which stops the workers after saving.

    A scheduler signals every process of a job; a worker that died of it at once would make the training process
    fail mid-step instead of saving at the step boundary. The worker still ends WORKER_SIGTERM_GRACE_S later:
    ignoring the signal for good hung the parent at exit, since multiprocessing's exit handler terminates
    left-over workers with SIGTERM and then waits for them (`bigtransfer.data.loaders` stops its loaders' workers
    before that, so a run that ends normally does not wait for the grace period).
    """
    def end_later(signum: int, frame: object) -> None:
        timer = threading.Timer(WORKER_SIGTERM_GRACE_S, os._exit, (0,))
        timer.daemon = True  # a worker the loader shuts down meanwhile exits at once
        timer.start()

    signal.signal(signal.SIGTERM, end_later)


class StopRequested(Exception):
    """The run stopped at a step boundary on a signal, with its state saved; the same command continues it."""

    exit_status = SIGTERM_EXIT

    def __init__(self, signal_name: str, step: int, total: int, state: Path, report: bool = True) -> None:
        super().__init__(f"stopped by {signal_name} after step {step} of {total}; the state is saved in {state}: "
                         "run the same command to continue")
        self.step, self.total, self.state, self.report = step, total, state, report


class StopOnSignal:
    """Inside the `with` block (main thread only), SIGTERM ends the process at once until `arm()`, and from then on
    sets `requested`, which the training loop polls at each step boundary.

    Leaving the block on a Ctrl-C (KeyboardInterrupt) says how to resume: from `state` when it exists, else afresh.
    """

    def __init__(self, state: Path, report: bool = True) -> None:
        self.state, self.report = Path(state), report
        self.requested: str | None = None
        self._armed = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if not self._armed:  # nothing to save yet: end as if there were no handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signal.Signals(signum).name

    def arm(self) -> None:
        """From now on a SIGTERM waits for the loop's next step boundary."""
        self._armed = True

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python lets only the main thread set handlers
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        if exc_type is KeyboardInterrupt and self.report:
            if self.state.is_file():
                print(f"interrupted; the last saved state is in {self.state}: run the same command to continue",
                      file=sys.stderr, flush=True)
            else:
                print(f"interrupted before any state was saved in {self.state.parent}: the same command starts the "
                      "run again from its first step", file=sys.stderr, flush=True)

    def stopped(self, step: int, total: int) -> StopRequested:
        """The exception that ends the run after the state of `step` was saved."""
        return StopRequested(self.requested or "SIGTERM", step, total, self.state, self.report)
