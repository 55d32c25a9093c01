"""Write files so that a reader never sees a half-written one."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

PARTIAL_SUFFIX = ".partial"
# Test-only hook, never for real runs: "NAME:N" makes this process kill itself (SIGKILL) in its N-th atomic write
# of a file named NAME, after the temporary file is written and before it is renamed, so that tests can place a
# kill exactly inside a save (tests/test_runs_survive.py).
KILL_IN_WRITE_ENV = "BIGTRANSFER_TEST_KILL_IN_WRITE"
_writes: Counter[str] = Counter()
# What torch's zip writer raises when the disk fills up under it (it reports no errno).
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed")


class DiskFullError(UserError, OSError):
    """An output could not be written for lack of space; the file it would have replaced is unchanged."""


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILED)


def _named(e: OSError, target: Path) -> OSError:
    """The same kind of error, naming the destination instead of a temporary file beside it."""
    return type(e)(e.errno, e.strerror or str(e), str(target)) if e.errno else e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Errors name `path`, not the temporary file; a full disk raises DiskFullError and leaves `path` as it was.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent)
    except OSError as e:
        raise _named(e, target) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            # mkstemp makes 0600 files (and writers may recreate them); give the result a plain open()'s permissions.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
            _test_kill_point(target.name)
            os.replace(tmp_path, target)
        except (OSError, RuntimeError) as e:
            if _disk_full(e):
                free = _free_space(target.parent)
                raise DiskFullError(f"{target}: no space left on device ({free} free there); nothing was written, "
                                    f"any earlier {target.name} is unchanged") from None
            if isinstance(e, OSError) and e.filename == str(tmp_path):
                raise _named(e, target) from None
            raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _free_space(folder: Path) -> str:
    """Free space on `folder`'s file system, for messages ('?' when it cannot be read)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return "?"
    return f"{st.f_bavail * st.f_frsize / 1024**2:.1f} MiB"


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_group(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Temporaries for files that belong together (features and their row list): renamed into place together.

    The targets are checked first and every temporary is complete before the first rename, so a failure while
    writing leaves the old files (or none), never a new file beside an old or missing partner. Only a crash in
    the microseconds between two renames could still split a group.
    """
    for p in paths:
        if Path(p).is_dir():
            raise UserError(f"{p}: is a folder; cannot write a file there")
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(p)) for p in paths]


def remove_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writers left directly in `folder`; return what was deleted.

    Only the folder's owner may call this (see `bigtransfer.core.runfolder`): a live writer's temporary file looks
    the same as a dead one's.
    """
    removed = []
    for p in Path(folder).glob(f".*{PARTIAL_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _test_kill_point(name: str) -> None:
    spec = os.environ.get(KILL_IN_WRITE_ENV)
    if not spec:
        return
    wanted, _, count = spec.rpartition(":")
    if name == wanted:
        _writes[name] += 1
        if _writes[name] == int(count):
            os.kill(os.getpid(), signal.SIGKILL)
