"""Writing a store: creation, resume checks, and a background thread that writes whole shards.

Each block of ``layout.seqs_per_shard`` sequences is written as whole shards of every array, and only
then is its flag in ``progress/done`` set. Zarr's local store writes each file through a temporary
file and a rename, so a process killed at any moment leaves every flag either unset or backed by
complete data; a resumed run rewrites the unflagged blocks and ends with the same arrays.

NOTE: Zarr 3.1's local store renames without fsync, so this holds for a killed process but not for a
power loss, after which the last flags set may point at data that never reached the disk.

A writer holds the store's lock (``lensio.lock``) from ``prepare_store`` until ``BlockWriter.close``,
so a second process cannot write the same blocks at the same time.

Several processes (shards) may write one store at once, each its own blocks. They touch disjoint
files, because a block is a whole Zarr shard of every array and ``progress/done`` has one chunk per
block. Shard 0 creates the store and the others wait for it, so no two processes create it at once.
"""

import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from lensio.errors import (
    BadInputError,
    HeadlensError,
    StoreFormatError,
    StoreMismatchError,
    StoreNotFoundError,
    StoreWriteError,
)
from lensio.lock import StoreLock, acquire_store_lock, is_lock_file, local_store_path
from lensio.schema import ATTRS_KEY, FORMAT_VERSION, Compressor, StoreLayout
from lensio.store import Store, compressor_codecs, open_group, open_store, sequence_arrays, zarr_location

logger = logging.getLogger(__name__)

# How long a shard other than 0 waits for shard 0 to create the store, and how often it looks. Every
# shard loads the model and packs the text before that point, so shard 0 may start creating late.
JOIN_TIMEOUT_S = 1800.0
JOIN_POLL_S = 1.0

# Settings whose change makes an existing store belong to another run; resuming across them is rejected.
RUN_IDENTITY_KEYS = ("model", "dataset", "layout", "seed", "tokens_sha256", "compressor")

# The lens-extract option behind each run-identity setting, by the first component that differs.
_OPTION_OF_SETTING = {
    "model": "--model", "dataset": "--dataset", "dataset.text_column": "--text-column", "dataset.split": "--split",
    "layout.layers": "--layers", "layout.context": "--context", "layout.dtype": "--dtype",
    "layout.logits": "--logits", "layout.top_k": "--top-k", "layout.n_sequences": "--tokens",
    "layout.seqs_per_chunk": "--chunk-sequences", "layout.chunks_per_shard": "--chunks-per-shard",
    "seed": "--seed", "tokens_sha256": "--tokens, --context, --dataset or --seed", "compressor": "--compressor",
}


def _first_difference(old: Any, new: Any, prefix: str) -> tuple[str, Any, Any] | None:
    """Find the first setting, as a dotted path, where two attribute records differ; return it with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{prefix}.{key}")
            if diff:
                return diff
        return None
    if old != new:
        return prefix, old, new
    return None


def _option_of(setting: str) -> str:
    """Return the command-line option that sets ``setting`` (a dotted path such as ``layout.dtype``)."""
    parts = setting.split(".")
    for length in range(len(parts), 0, -1):
        option = _OPTION_OF_SETTING.get(".".join(parts[:length]))
        if option:
            return option
    return "the command line"


def _store_exists(url: str) -> bool:
    try:
        zarr.open_group(zarr_location(url), mode="r")
    except Exception:  # noqa: BLE001 - any failure to open means there is no group to resume
        return False
    return True


def _check_same_run(url: str, existing: Any, meta: dict[str, Any]) -> None:
    """Reject resuming a store that another kind of run wrote.

    Raises:
        StoreFormatError: the group is not a headlens store, or of another format version.
        StoreMismatchError: a run-identity setting differs; the message names its option.
    """
    if not isinstance(existing, dict):
        raise StoreFormatError(f"{url!r} already contains data that is not a headlens store; choose another --out "
                               "or pass --overwrite to replace it")
    if existing.get("format_version") != FORMAT_VERSION:
        raise StoreFormatError(f"store {url!r} has format version {existing.get('format_version')!r}; pass "
                               f"--overwrite to replace it with a version-{FORMAT_VERSION} store")
    for key in RUN_IDENTITY_KEYS:
        diff = _first_difference(existing.get(key), meta.get(key), key)
        if diff:
            setting, old, new = diff
            raise StoreMismatchError(f"cannot resume {url!r}: {_option_of(setting)} differs ({setting} is {old!r} "
                                     f"in the store, {new!r} in this run); rerun with the original settings, or pass "
                                     "--overwrite to start afresh")


def _clear_local_folder(url: str) -> None:
    """Empty the local store folder for a new store, keeping the lock files of this and other writers.

    Zarr's ``mode="w"`` would delete the whole folder, lock files included. A folder that contains
    files but no Zarr group is not emptied, so a mistyped ``--out`` cannot delete unrelated data.

    Raises:
        StoreFormatError: the folder contains files and is not a Zarr store.
    """
    folder = local_store_path(url)
    if not folder.is_dir():
        return
    entries = [entry for entry in folder.iterdir() if not is_lock_file(entry.name)]
    is_zarr = (folder / "zarr.json").is_file() or (folder / ".zgroup").is_file() or (folder / ".zarray").is_file()
    if entries and not is_zarr:
        raise StoreFormatError(f"--out {url!r} is a folder with other files ({entries[0].name}, ...) and not a "
                               "Zarr store; pass a new or empty folder for the store")
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@dataclass
class PreparedStore:
    """A store ready for writing, which blocks still need data, and the write lock held on it."""

    store: Store
    pending_blocks: list[int]
    resumed: bool
    lock: StoreLock | None = None


def prepare_store(url: str, meta: dict[str, Any], tokens: np.ndarray, params: dict[str, np.ndarray],
                  compressor: Compressor, overwrite: bool, *, shard_index: int = 0, num_shards: int = 1,
                  join_timeout_s: float | None = None) -> PreparedStore:
    """Take the store's write lock, then create the store at ``url`` or reopen it to resume the same run.

    ``meta`` is the group attribute record (it must contain ``layout``); ``tokens`` is the packed
    [seq, pos] token array, written here in full; ``params`` maps paths below ``params/`` to arrays.
    The returned ``lock`` stays held until ``BlockWriter.close`` (or ``lock.release``) frees it.

    With several shards, only shard 0 creates the store. Every other shard waits up to
    ``join_timeout_s`` (default ``JOIN_TIMEOUT_S``) for shard 0 to finish creating it, then joins it
    after checking that it belongs to the same run. ``pending_blocks`` lists the unwritten blocks of
    every shard; the caller writes only its own.

    Raises:
        BadInputError: ``overwrite`` with more than one shard.
        StoreLockedError: another live process writes the store (the same shard, or another shard count).
        StoreMismatchError: the existing store was written by a run with other settings.
        StoreFormatError: the location holds something that is not a headlens store.
        StoreNotFoundError: shard 0 did not create the store within ``join_timeout_s``.
        StoreWriteError: writing failed, for example because the disk is full.
    """
    if overwrite and num_shards > 1:
        raise BadInputError(f"overwriting store {url!r} with {num_shards} shards would let a shard join the old "
                            "store before shard 0 replaces it; delete the store first, then start the shards "
                            "without --overwrite")
    lock = acquire_store_lock(url, shard_index, num_shards)
    try:
        if shard_index == 0:
            prepared = _open_or_create(url, meta, tokens, params, compressor, overwrite)
        else:
            prepared = _join(url, meta, JOIN_TIMEOUT_S if join_timeout_s is None else join_timeout_s)
    except BaseException:
        lock.release()
        raise
    prepared.lock = lock
    return prepared


def _open_or_create(url: str, meta: dict[str, Any], tokens: np.ndarray, params: dict[str, np.ndarray],
                    compressor: Compressor, overwrite: bool) -> PreparedStore:
    layout = StoreLayout.from_dict(meta["layout"])
    try:
        if not overwrite and _store_exists(url):
            existing = open_group(url, mode="r")
            _check_same_run(url, existing.attrs.get(ATTRS_KEY), meta)
            if "progress/done" in existing:
                return _reopen(url, layout)
            # The progress array is created last, so a store without it was killed while being created.
            logger.warning("store %s was not completely created by an earlier run; creating it again", url)
        return _create(url, meta, tokens, params, compressor, layout)
    except HeadlensError:
        raise
    except OSError as error:
        raise StoreWriteError(f"preparing store {url!r} failed: {error}; free space or fix the cause, then rerun "
                              "the same command") from error


def _probe_created(url: str) -> tuple[Any, bool] | None:
    """Return the store's attribute record and whether its creation finished, or None while no group is there.

    Read errors count as "not there yet", because shard 0 may be emptying the folder right now.
    """
    try:
        group = zarr.open_group(zarr_location(url), mode="r")
        return group.attrs.get(ATTRS_KEY), "progress/done" in group
    except Exception:  # noqa: BLE001 - any failure to read means the store is not ready to join
        return None


def _join(url: str, meta: dict[str, Any], timeout_s: float) -> PreparedStore:
    """Wait until shard 0 has created the store of this run at ``url``, then reopen it for writing."""
    layout = StoreLayout.from_dict(meta["layout"])
    deadline = time.monotonic() + timeout_s
    logger.info("waiting up to %.0f s for shard 0 to create store %s", timeout_s, url)
    while True:
        probe = _probe_created(url)
        if probe is not None:
            existing, created = probe
            _check_same_run(url, existing, meta)
            if created:
                return _reopen(url, layout)
        if time.monotonic() >= deadline:
            raise StoreNotFoundError(f"store {url!r} was not created within {timeout_s:g} s; shard 0 creates it, "
                                     "so start lens-extract with --shard-index 0 (or read its log for an error), "
                                     "then rerun this shard")
        time.sleep(JOIN_POLL_S)


def _reopen(url: str, layout: StoreLayout) -> PreparedStore:
    store = open_store(url)
    store.group = open_group(url, mode="r+")
    pending = [int(block) for block in np.flatnonzero(~store.blocks_done)]
    logger.info("resuming %s: %d of %d blocks already written", url, layout.n_blocks - len(pending), layout.n_blocks)
    return PreparedStore(store=store, pending_blocks=pending, resumed=True)


def _create(url: str, meta: dict[str, Any], tokens: np.ndarray, params: dict[str, np.ndarray],
            compressor: Compressor, layout: StoreLayout) -> PreparedStore:
    """Create every array, write tokens and parameters, and create ``progress/done`` last.

    The group's attributes are written with the group, in one file, so any store a killed run leaves
    behind can be recognised and resumed. The existence of ``progress/done`` marks creation as finished.
    """
    if local_store_path(url) is not None:
        _clear_local_folder(url)
        group = zarr.open_group(zarr_location(url), mode="a", attributes={ATTRS_KEY: meta})
    else:
        group = zarr.open_group(url, mode="w", attributes={ATTRS_KEY: meta})
    codecs = compressor_codecs(compressor)
    for path, (shape, dtype) in sequence_arrays(layout).items():
        chunks = (layout.seqs_per_chunk, *shape[1:])
        shards = (layout.seqs_per_shard, *shape[1:])
        group.create_array(path, shape=shape, dtype=dtype, chunks=chunks, shards=shards, compressors=codecs,
                           fill_value=0)
    for path, value in params.items():
        value = np.asarray(value, dtype=np.float32)
        group.create_array(f"params/{path}", shape=value.shape, dtype=np.float32,
                           chunks=value.shape if value.ndim else (), compressors=codecs)[...] = value
    group["tokens"][...] = tokens
    group.create_array("progress/done", shape=(layout.n_blocks,), dtype=np.uint8, chunks=(1,), fill_value=0)

    store = open_store(url)
    store.group = group
    logger.info("created store %s: %d sequences x %d tokens, %.1f MiB uncompressed (%d bytes per token)", url,
                layout.n_sequences, layout.context, layout.total_bytes / 2**20, layout.bytes_per_token)
    return PreparedStore(store=store, pending_blocks=list(range(layout.n_blocks)), resumed=False)


class BlockWriter:
    """Write blocks of sequences from a background thread while the caller computes the next ones.

    At most ``max_pending`` blocks wait in memory; ``submit`` blocks when the queue is full, so memory
    stays bounded when the disk is slower than the model. An error in the thread is raised by the
    next ``submit`` or by ``close``; blocks queued after a failed one are dropped unwritten and
    unflagged. ``close`` releases ``lock``, the store's write lock, if one is given.
    """

    def __init__(self, store: Store, max_pending: int = 2, lock: StoreLock | None = None):
        self.store = store
        self.lock = lock
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._failed_block: int | None = None
        self._thread = threading.Thread(target=self._run, name="headlens-writer", daemon=True)
        self._thread.start()

    def submit(self, block: int, arrays: dict[str, np.ndarray]) -> None:
        """Queue block ``block``: ``arrays`` maps every sequence-indexed path except ``tokens`` to its data."""
        self._raise_if_failed()
        self._queue.put((block, arrays))

    def close(self) -> None:
        """Wait for every queued block to be on disk, release the lock, then raise the first write error, if any."""
        try:
            self._queue.put(None)
            self._thread.join()
        finally:
            if self.lock is not None:
                self.lock.release()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is None:
            return
        error = self._error
        start, end = self.store.layout.block_range(self._failed_block)
        remedy = "free space or fix the cause" if isinstance(error, OSError) else "fix the cause"
        raise StoreWriteError(f"writing sequences {start}-{end - 1} to store {self.store.url!r} failed: {error}; "
                              f"blocks already marked done are kept, so {remedy} and rerun the same command to "
                              "resume") from error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain without writing, so a producer blocked in submit is released
            block, arrays = item
            try:
                write_block(self.store, block, arrays)
            except BaseException as error:  # noqa: BLE001 - reported to the producer thread
                logger.debug("writing block %d of store %s failed: %s", block, self.store.url, error)
                self._failed_block = block
                self._error = error


def write_block(store: Store, block: int, arrays: dict[str, np.ndarray]) -> None:
    """Write one block's arrays, then mark it done: the flag is set only after all data is stored."""
    start, end = store.layout.block_range(block)
    for path, data in arrays.items():
        if data.shape[0] != end - start:
            raise ValueError(f"block {block} of {path} has {data.shape[0]} sequences, expected {end - start}")
        store.group[path][start:end] = data
    store.group["progress/done"][block] = 1
