"""A lock that keeps two processes from writing the same part of one store.

For a local store the lock is a file inside the store folder, ``.headlens-lock-{index}-of-{count}``,
created with ``O_CREAT | O_EXCL`` so that exactly one process can take it. It records the holder's
pid, host name and start time as JSON. A lock whose process has died on this host (SIGKILL, power
loss of a container) is taken over with a logged warning. A lock from another host is never taken
over, because its pid cannot be checked from here.

Sharded writers (``--num-shards``) take one lock per shard index, so they can write disjoint parts of
one store at once. A writer whose shard count differs from a live lock's count is rejected, because
the two partitions may overlap.

Non-local URLs (``memory://``, ``s3://``, ...) are not locked: object stores have no exclusive create
that fsspec exposes uniformly, so the writer logs that and continues.
"""

import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from lensio.errors import BadInputError, StoreLockedError, StoreWriteError

logger = logging.getLogger(__name__)

LOCK_PREFIX = ".headlens-lock-"
_LOCK_NAME = re.compile(r"^\.headlens-lock-(\d+)-of-(\d+)$")

# A lock file that cannot be parsed may be one that its creator is still writing (the O_EXCL create and
# the write are two steps). Only after this many seconds is an unreadable lock file treated as abandoned.
UNREADABLE_LOCK_GRACE_S = 10.0

# Lock files created by this process and not released yet. A lock file naming this process's pid but
# missing here was left by an earlier holder of the same pid (or by a run in this process that crashed).
_held_paths: set[Path] = set()


def lock_name(shard_index: int = 0, num_shards: int = 1) -> str:
    """File name of the lock of one shard of a store."""
    return f"{LOCK_PREFIX}{shard_index}-of-{num_shards}"


def is_lock_file(name: str) -> bool:
    """Return whether ``name`` is the file name of a store lock."""
    return _LOCK_NAME.match(name) is not None


def local_store_path(url: str) -> Path | None:
    """Return the folder of a local store, or None for a URL that fsspec resolves to another file system."""
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    if "://" in url:
        return None
    return Path(url).expanduser()


@dataclass(frozen=True)
class LockRecord:
    """The holder record that a lock file stores."""

    pid: int
    hostname: str
    started: str
    """UTC start time of the lock, ISO 8601."""
    process_start_ticks: int | None
    """The holder's start time in clock ticks since boot (``/proc/PID/stat``), to detect a reused pid."""
    token: str
    """Random id of this acquisition, so a release never removes another process's lock."""
    shard_index: int = 0
    num_shards: int = 1

    def describe(self) -> str:
        return f"process {self.pid} on host {self.hostname!r}, started {self.started}"


def _process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces, so split after its end.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])  # field 22 overall: starttime


def _process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def process_is_running(pid: int, start_ticks: int | None = None) -> bool:
    """Check whether ``pid`` is a running process on this host (a zombie counts as dead).

    With ``start_ticks`` given, a process with that pid but another start time is a later process
    that reused the pid, so it also counts as dead.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # the process exists but belongs to another user
    if _process_state(pid) == "Z":
        return False
    if start_ticks is not None:
        current = _process_start_ticks(pid)
        if current is not None and current != start_ticks:
            return False
    return True


def _read_record(path: Path) -> LockRecord | None:
    """Parse a lock file; return None when it is empty or not valid JSON."""
    try:
        data = json.loads(path.read_text())
        return LockRecord(**data)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
        return None


class StoreLock:
    """The lock of one shard of one store. ``release`` (or leaving a ``with`` block) frees it."""

    def __init__(self, url: str, path: Path | None, record: LockRecord | None):
        self.url = url
        self.path = path
        self.record = record

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self.path is not None and self.path in _held_paths

    def release(self) -> None:
        """Remove the lock file if it is still this acquisition's; calling it twice is harmless."""
        if self.path is None or self.path not in _held_paths:
            return
        _held_paths.discard(self.path)
        current = _read_record(self.path) if self.path.exists() else None
        if current is None or current.token != self.record.token:
            logger.warning("lock %s of store %s was removed or taken over by another process while this one "
                           "held it; not removing it", self.path.name, self.url)
            return
        self.path.unlink(missing_ok=True)
        logger.debug("released lock %s", self.path)


def _new_record(shard_index: int, num_shards: int) -> LockRecord:
    return LockRecord(pid=os.getpid(), hostname=socket.gethostname(),
                      started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      process_start_ticks=_process_start_ticks(os.getpid()), token=uuid.uuid4().hex,
                      shard_index=shard_index, num_shards=num_shards)


def _try_create(path: Path, record: LockRecord) -> bool:
    """Create the lock file with O_EXCL; False when it already exists."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(asdict(record)))
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _holder_is_alive(path: Path, record: LockRecord | None) -> bool:
    """Check whether the lock at ``path`` belongs to a live process (or cannot be shown to be abandoned)."""
    if record is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        return age < UNREADABLE_LOCK_GRACE_S
    if record.hostname != socket.gethostname():
        return True  # its pid means nothing here, so it is presumed alive
    if record.pid == os.getpid():
        return path in _held_paths
    return process_is_running(record.pid, record.process_start_ticks)


def _locked_error(url: str, path: Path, record: LockRecord | None) -> StoreLockedError:
    if record is None:
        return StoreLockedError(f"store {url!r} is being locked by another process right now (lock file {path} is "
                                "not complete yet); wait and rerun")
    remedy = "wait for it to finish or stop it, then rerun"
    if record.hostname != socket.gethostname():
        remedy = f"wait for it to finish; if that process is gone, delete {path} and rerun"
    shard = f" (shard {record.shard_index} of {record.num_shards})" if record.num_shards > 1 else ""
    return StoreLockedError(f"store {url!r} is being written by {record.describe()}{shard}; {remedy}")


def _take_over(url: str, path: Path, observed: bytes, record: LockRecord | None) -> None:
    """Move an abandoned lock file aside, unless another process replaced it since it was read."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process moved it first; the caller retries the create
    if aside.read_bytes() != observed:
        # Another process took the lock over between the read and the rename: give it back.
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return
    aside.unlink(missing_ok=True)
    holder = record.describe() if record is not None else "a process that never finished writing it"
    logger.warning("store %s: took over the lock left by %s, which is no longer running; blocks it had not "
                   "marked done are written again", url, holder)


def _check_other_shard_counts(url: str, folder: Path, own: Path, num_shards: int) -> None:
    """Reject a live lock that partitions the store into another number of shards."""
    for other in folder.iterdir():
        match = _LOCK_NAME.match(other.name)
        if match is None or other == own or int(match.group(2)) == num_shards:
            continue
        record = _read_record(other)
        if _holder_is_alive(other, record):
            raise _locked_error(url, other, record)


def _acquire_local(url: str, folder: Path, shard_index: int, num_shards: int) -> StoreLock:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise BadInputError(f"store path {str(folder)!r} is a file, not a folder; pass a folder path for the "
                            "store") from error
    except OSError as error:
        raise StoreWriteError(f"cannot create store folder {str(folder)!r}: {error}; check the path and its "
                              "permissions") from error

    path = folder.resolve() / lock_name(shard_index, num_shards)
    record = _new_record(shard_index, num_shards)
    for _attempt in range(3):
        try:
            created = _try_create(path, record)
        except OSError as error:
            raise StoreWriteError(f"cannot create lock file {path}: {error}; check that the store folder is "
                                  "writable and the disk has space") from error
        if created:
            _held_paths.add(path)
            lock = StoreLock(url, path, record)
            try:
                _check_other_shard_counts(url, folder, path, num_shards)
            except BaseException:
                lock.release()
                raise
            logger.debug("locked store %s with %s", url, path)
            return lock
        try:
            observed = path.read_bytes()
        except FileNotFoundError:
            continue  # released between the create and the read
        holder = _read_record(path)
        if _holder_is_alive(path, holder):
            raise _locked_error(url, path, holder)
        _take_over(url, path, observed, holder)
    raise StoreLockedError(f"store {url!r}: could not take lock {path} after 3 attempts because other processes "
                           "kept taking it; make sure only one process writes each shard, then rerun")


@dataclass(frozen=True)
class LockStatus:
    """One lock file found in a store folder."""

    name: str
    record: LockRecord | None
    alive: bool

    def describe(self) -> str:
        if self.record is None:
            return f"{self.name}: unreadable lock file"
        shard = f", shard {self.record.shard_index} of {self.record.num_shards}" if self.record.num_shards > 1 else ""
        state = "" if self.alive else " (no longer running; the next writer takes the lock over)"
        return f"{self.record.describe()}{shard}{state}"


def store_locks(url: str) -> list[LockStatus]:
    """List the lock files of a local store and whether their holders are alive; empty for other URLs."""
    folder = local_store_path(url)
    if folder is None or not folder.is_dir():
        return []
    statuses = []
    for path in sorted(folder.iterdir()):
        if is_lock_file(path.name):
            record = _read_record(path)
            statuses.append(LockStatus(path.name, record, _holder_is_alive(path.resolve(), record)))
    return statuses


def acquire_store_lock(url: str, shard_index: int = 0, num_shards: int = 1) -> StoreLock:
    """Take the write lock of shard ``shard_index`` of ``num_shards`` of the store at ``url``.

    Returns the held lock; use it in a ``with`` block or call ``release``. For a non-local URL the
    returned lock holds nothing.

    Raises:
        StoreLockedError: a live process holds the same lock, or a lock with another shard count.
        StoreWriteError: the store folder or the lock file cannot be created.
    """
    folder = local_store_path(url)
    if folder is None:
        if url.startswith("memory://"):
            logger.debug("store %s is in this process's memory; no lock needed", url)
        else:
            logger.warning("locking is not available for store %s (not a local path); make sure no other process "
                           "writes the same shard", url)
        return StoreLock(url, None, None)
    return _acquire_local(url, folder, shard_index, num_shards)
