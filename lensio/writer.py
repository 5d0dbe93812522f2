"""Writing a store: creation, resume checks, and a background thread that writes whole shards.

Each block of ``layout.seqs_per_shard`` sequences is written as whole shards of every array, and only
then is its flag in ``progress/done`` set. Zarr's local store writes each file through a temporary
file and a rename, so a process killed at any moment leaves every flag either unset or backed by
complete data; a resumed run rewrites the unflagged blocks and ends with the same arrays.
"""

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from lensio.errors import StoreFormatError, StoreMismatchError, StoreWriteError
from lensio.schema import ATTRS_KEY, FORMAT_VERSION, Compressor, StoreLayout
from lensio.store import Store, compressor_codecs, open_group, open_store, sequence_arrays

logger = logging.getLogger(__name__)

# Settings whose change makes an existing store belong to another run; resuming across them is rejected.
RUN_IDENTITY_KEYS = ("model", "dataset", "layout", "seed", "tokens_sha256", "compressor")


def _first_difference(old: Any, new: Any, prefix: str) -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{prefix}.{key}")
            if diff:
                return diff
        return None
    if old != new:
        return f"{prefix} (store has {old!r}, this run has {new!r})"
    return None


def _store_exists(url: str) -> bool:
    try:
        zarr.open_group(url, mode="r")
    except Exception:  # noqa: BLE001 - any failure to open means there is no group to resume
        return False
    return True


@dataclass
class PreparedStore:
    """A store ready for writing, and which blocks still need data."""

    store: Store
    pending_blocks: list[int]
    resumed: bool


def prepare_store(url: str, meta: dict[str, Any], tokens: np.ndarray, params: dict[str, np.ndarray],
                  compressor: Compressor, overwrite: bool) -> PreparedStore:
    """Create the store at ``url``, or reopen it to resume the same run.

    ``meta`` is the group attribute record (it must contain ``layout``); ``tokens`` is the packed
    [seq, pos] token array, written here in full; ``params`` maps paths below ``params/`` to arrays.

    Raises:
        StoreMismatchError: the existing store was written by a run with other settings.
        StoreFormatError: the location holds something that is not a headlens store.
    """
    layout = StoreLayout.from_dict(meta["layout"])
    if not overwrite and _store_exists(url):
        existing = open_group(url, mode="r").attrs.get(ATTRS_KEY)
        if not isinstance(existing, dict):
            raise StoreFormatError(f"{url!r} already holds data that is not a headlens store; choose another --out "
                                   "or pass --overwrite to replace it")
        if existing.get("format_version") != FORMAT_VERSION:
            raise StoreFormatError(f"store {url!r} has format version {existing.get('format_version')!r}; pass "
                                   "--overwrite to replace it with a version-1 store")
        for key in RUN_IDENTITY_KEYS:
            diff = _first_difference(existing.get(key), meta.get(key), key)
            if diff:
                raise StoreMismatchError(f"cannot resume {url!r}: setting {diff} differs; rerun with the original "
                                         "settings, or pass --overwrite to start afresh")
        store = open_store(url)
        store.group = open_group(url, mode="r+")
        pending = [int(block) for block in np.flatnonzero(~store.blocks_done)]
        logger.info("resuming %s: %d of %d blocks already written", url, layout.n_blocks - len(pending),
                    layout.n_blocks)
        return PreparedStore(store=store, pending_blocks=pending, resumed=True)

    group = zarr.open_group(url, mode="w")
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
    group.create_array("progress/done", shape=(layout.n_blocks,), dtype=np.uint8, chunks=(1,), fill_value=0)

    group["tokens"][...] = tokens
    group.attrs[ATTRS_KEY] = meta
    store = open_store(url)
    store.group = group
    logger.info("created store %s: %d sequences x %d tokens, %.1f MiB uncompressed (%d bytes per token)", url,
                layout.n_sequences, layout.context, layout.total_bytes / 2**20, layout.bytes_per_token)
    return PreparedStore(store=store, pending_blocks=list(range(layout.n_blocks)), resumed=False)


class BlockWriter:
    """Write blocks of sequences from a background thread while the caller computes the next ones.

    At most ``max_pending`` blocks wait in memory; ``submit`` blocks when the queue is full, so memory
    stays bounded when the disk is slower than the model. An error in the thread is raised by the
    next ``submit`` or by ``close``.
    """

    def __init__(self, store: Store, max_pending: int = 2):
        self.store = store
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="headlens-writer", daemon=True)
        self._thread.start()

    def submit(self, block: int, arrays: dict[str, np.ndarray]) -> None:
        """Queue block ``block``: ``arrays`` maps every sequence-indexed path except ``tokens`` to its data."""
        self._raise_if_failed()
        self._queue.put((block, arrays))

    def close(self) -> None:
        """Wait for every queued block to be on disk, then raise the first write error, if any."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error = self._error
            raise StoreWriteError(f"writing to store {self.store.url!r} failed: {error}; completed blocks are kept, "
                                  "so free space or fix the cause and rerun the same command to resume") from error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain without writing, so the producer never blocks on a full queue
            block, arrays = item
            try:
                write_block(self.store, block, arrays)
            except BaseException as error:  # noqa: BLE001 - reported to the producer thread
                self._error = error


def write_block(store: Store, block: int, arrays: dict[str, np.ndarray]) -> None:
    """Write one block's arrays, then mark it done: the flag is set only after all data is stored."""
    start, end = store.layout.block_range(block)
    for path, data in arrays.items():
        if data.shape[0] != end - start:
            raise ValueError(f"block {block} of {path} has {data.shape[0]} sequences, expected {end - start}")
        store.group[path][start:end] = data
    store.group["progress/done"][block] = 1
