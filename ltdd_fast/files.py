"""Run files: the one place where ltdd_fast reads and writes what a run keeps on disk.

- Reading never runs code from a file: JSON, numpy arrays without pickles, torch files with
  `weights_only=True` (tensors and plain containers). A file that cannot be read is one DataError naming
  the file and what was wrong.
- Writing is atomic: a temporary file beside the target, flushed to disk, then renamed over it. A failed
  write (a full disk included) removes the temporary file, keeps the previous file whole, and says which
  file and which disk.
- `RunLock` gives one process at a time a run directory: an OS lock (flock) that the kernel releases when
  its holder exits or is killed, so a stale lock never needs cleaning up.

This module imports nothing from ltdd_fast but errors.
"""
import errno
import json
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import torch

from .errors import DataError, LTDDError

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

LOCK_NAME = ".ltdd.lock"
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_LOW_SPACE = 1 << 20  # below this many free bytes a failed write is taken for a full disk


class DiskFullError(LTDDError):
    """A write failed for want of space; the previous file is kept and no temporary file is left."""


def first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else "no detail"


def free_bytes(path) -> int | None:
    """Free bytes on the file system that holds `path` (or its nearest existing parent), None if unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_failure(path, exc):
    """The one-line error for a failed write of `path`, or None when `exc` is not about the file system."""
    free = free_bytes(Path(path).parent)
    chain, cause = [], exc
    while cause is not None and len(chain) < 8:  # torch.save reports ENOSPC as a RuntimeError raised while handling it
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    full = any(getattr(e, "errno", None) in _DISK_FULL for e in chain) or (free is not None and free < _LOW_SPACE)
    if full:
        return DiskFullError(f"disk full writing {path} ({free} bytes free there); the previous file, if any, is "
                             f"kept: free some space and rerun to continue")
    if isinstance(exc, OSError):
        return LTDDError(f"cannot write {path} ({exc.strerror or first_line(exc)})")
    return None


def write_atomic(path, write) -> Path:
    """Call write(file) on a temporary binary file beside `path`, then rename it over `path`."""
    path = Path(path)
    ensure_dir(path.parent, "the folder of " + str(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        error = write_failure(path, exc)
        if error is None:
            raise
        raise error from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path, obj) -> Path:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    return write_atomic(path, lambda f: f.write(data))


def save_torch_atomic(path, obj) -> Path:
    return write_atomic(path, lambda f: torch.save(obj, f))


def append_line(path, text):
    """Append one line (a JSON record) to a log file; a full disk is one line, the lines before are kept."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text.rstrip("\n") + "\n")
    except OSError as exc:
        raise write_failure(path, exc) from None


def filter_log(path, keep):
    """Keep the JSON-lines records of `path` for which keep(record) holds; a line cut by a kill goes too.
    Used on resume, so a log continues without the records of work that will be done again."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and keep(record):
            kept.append(line)
    if len(kept) != len(lines):
        write_atomic(path, lambda f: f.write("".join(k + "\n" for k in kept).encode()))


def read_log(path, what="metrics log"):
    """The records of a JSON-lines log; a line cut by a kill is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} not found: expected a directory written by `ltdd distill` or `ltdd experts`")
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def ensure_dir(path, what="output directory") -> Path:
    """Create directory `path` (and parents); one line if it, or a parent, is a file or cannot be made."""
    path = Path(path)
    for part in [path, *path.parents]:
        if part.exists() and not part.is_dir():
            raise DataError(f"{what} {path} cannot be made: {part} is a file, expected a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LTDDError(f"{what} {path} cannot be made ({exc.strerror or first_line(exc)})") from None
    return path


def check_output_file(path, option):
    """Refuse, before any work, an output file path that is a directory or lies inside a file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{option} {path} is a directory: expected a file path")
    for part in path.parents:
        if part.exists() and not part.is_dir():
            raise DataError(f"{option} {path} lies inside {part}, which is a file: expected a path in a directory")


def check_output_dir(path, option):
    """Refuse, before any work, an output directory that is an existing file or lies inside one."""
    path = Path(path)
    for part in [path, *path.parents]:
        if part.exists() and not part.is_dir():
            raise DataError(f"{option} {path} cannot be a directory: {part} is a file")


# ---- reading ---------------------------------------------------------------------------------------------

def read_json(path, what="JSON file", kind=dict):
    """The JSON value in `path`, which must be a `kind`; any problem is one DataError naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} {path} not found") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a readable {what}: not UTF-8 text") from None
    except ValueError as exc:
        raise DataError(f"{path} is not a readable {what}: damaged JSON ({first_line(exc)})") from None
    except OSError as exc:
        raise DataError(f"{path} is not a readable {what} ({exc.strerror or first_line(exc)})") from None
    if kind is not None and not isinstance(value, kind):
        raise DataError(f"{path} is not a {what}: it holds a JSON {type(value).__name__}, expected a "
                        f"{kind.__name__}")
    return value


def load_torch(path, what="file", required=()):
    """A torch.save'd dict read with weights_only=True: tensors and plain values only, never code."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # a refusal is one line, without torch's warnings before it
            warnings.simplefilter("ignore")
            value = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{what} {path} not found") from None
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "Weights only load failed" in str(exc) and "GLOBAL" in str(exc):
            raise DataError(f"{path} is not a readable {what}: it holds objects other than tensors and plain values, "
                            f"and loading those could run code") from None
        raise DataError(f"{path} is not a readable {what} (damaged, or not a torch file)") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is not ours or is damaged
        raise DataError(f"{path} is not a readable {what} ({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} is not a {what}: it holds a {type(value).__name__}, expected a dict")
    missing = [k for k in required if k not in value]
    if missing:
        raise DataError(f"{path} is not a complete {what}: it lacks {', '.join(missing)}")
    return value


# ---- locking ---------------------------------------------------------------------------------------------

class RunLock:
    """An exclusive lock on a run directory for the life of one run: `with RunLock(out): ...`.

    A second holder (another process, or another open lock in this one) is refused at once with a line naming
    the process that holds it. The lock file stays (deleting it would race); the lock itself dies with its holder.
    """

    def __init__(self, directory, what="run directory"):
        self.directory = Path(directory)
        self.what = what
        self._file = None

    @property
    def path(self):
        return self.directory / LOCK_NAME

    def acquire(self):
        if fcntl is None or self._file is not None:
            return self
        ensure_dir(self.directory, self.what)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise LTDDError(f"{self.what} {self.directory} is in use by {holder}: wait for it to finish, or use "
                            f"another directory") from None
        f.seek(0)
        f.truncate()
        command = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv else "python"
        f.write(f"process {os.getpid()} ({command[:200]})")
        f.flush()
        self._file = f
        return self

    def release(self):
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    def check_free(self):
        """Refuse at once if a live run holds the directory (takes and drops the lock)."""
        if self.directory.is_dir():
            self.acquire()
            self.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
