"""Torch datasets over a store: batches of token positions for one layer, read chunk by chunk.

Shuffling is chunk-aware: each epoch visits the chunks of the sequence range in a seeded random
order, fills a buffer of ``shuffle_chunks`` chunks, and emits its positions in random order. Chunks
are split between distributed ranks first and data-loader workers second, so no position is read
twice in an epoch. Workers open the store themselves, so the dataset pickles (spawn start method).
"""

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lensio.schema import LogitsMode, z_path
from lensio.store import Store, open_store

logger = logging.getLogger(__name__)


@dataclass
class ActivationBatch:
    """One batch of token positions of one layer. Every tensor's first axis is the position."""

    z: torch.Tensor  # [tok, head, d_head], float32
    scale: torch.Tensor  # [tok], the final norm's scale
    target: dict[str, torch.Tensor]  # what rebuilds the model's distribution, by store path below final/
    tokens: torch.Tensor  # [tok] int64, the input token at each position
    sequence: torch.Tensor  # [tok] int64, sequence index in the store
    position: torch.Tensor  # [tok] int64

    def __len__(self) -> int:
        return self.z.shape[0]

    def to(self, device: torch.device | str) -> "ActivationBatch":
        return ActivationBatch(self.z.to(device), self.scale.to(device),
                               {k: v.to(device) for k, v in self.target.items()}, self.tokens.to(device),
                               self.sequence.to(device), self.position.to(device))


def target_paths(logits: LogitsMode) -> tuple[str, ...]:
    if logits is LogitsMode.FACTORED:
        return ("final/normalized",)
    if logits is LogitsMode.FULL:
        return ("final/logits",)
    return ("final/topk_logprobs", "final/topk_ids")


def collate_batches(items: list[ActivationBatch]) -> ActivationBatch:
    """Pass through the single pre-batched item a loader with ``batch_size=None`` delivers."""
    return items[0] if len(items) == 1 else ActivationBatch(
        torch.cat([i.z for i in items]), torch.cat([i.scale for i in items]),
        {k: torch.cat([i.target[k] for i in items]) for k in items[0].target}, torch.cat([i.tokens for i in items]),
        torch.cat([i.sequence for i in items]), torch.cat([i.position for i in items]))


class LayerBatches(IterableDataset):
    """Batches of ``batch_tokens`` positions of ``layer`` from sequences ``[start, end)`` of a store.

    Args:
        url: store path or URL.
        layer: stored layer to read.
        sequences: ``(start, end)`` sequence range, e.g. ``store.train_range``.
        batch_tokens: positions per batch; the last batch of an epoch may be smaller.
        shuffle: visit chunks and positions in a seeded random order.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        last_position_only: keep only the last position of each sequence.
        shuffle_chunks: chunks held in the shuffle buffer at once.
        rank, world_size: this process's share of the chunks under distributed training.
        max_tokens: stop after this many positions per epoch (across all ranks), None for all.
    """

    def __init__(self, url: str, layer: int, sequences: tuple[int, int], batch_tokens: int, shuffle: bool = True,
                 seed: int = 0, last_position_only: bool = False, shuffle_chunks: int = 8, rank: int = 0,
                 world_size: int = 1, max_tokens: int | None = None):
        super().__init__()
        self.url, self.layer, self.sequences = url, layer, sequences
        self.batch_tokens, self.shuffle, self.seed = batch_tokens, shuffle, seed
        self.last_position_only, self.shuffle_chunks = last_position_only, shuffle_chunks
        self.rank, self.world_size, self.max_tokens = rank, world_size, max_tokens
        self.epoch = 0
        self._passes = 0  # iterations started in this process: the epoch when the loader persists workers
        self._store: Store | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_store"] = None  # each worker reopens the store instead of sharing Zarr handles
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.url)
            self._store.z(self.layer)  # raises a clear error for a layer the store lacks
        return self._store

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """Sequence ranges of the chunks that overlap the requested range, clipped to it."""
        per_chunk = self.store.layout.seqs_per_chunk
        start, end = self.sequences
        first, last = start // per_chunk, math.ceil(end / per_chunk)
        return [(max(c * per_chunk, start), min((c + 1) * per_chunk, end)) for c in range(first, last)
                if min((c + 1) * per_chunk, end) > max(c * per_chunk, start)]

    def my_chunks(self, epoch: int | None = None) -> list[tuple[int, int]]:
        """This rank's and this worker's chunks for an epoch (default: the current one), in visiting order."""
        epoch = self.epoch if epoch is None else epoch
        chunks = self.chunk_ranges()
        if self.shuffle:
            order = np.random.default_rng(self.seed + epoch).permutation(len(chunks))
            chunks = [chunks[i] for i in order]
        chunks = chunks[self.rank::self.world_size]
        worker = get_worker_info()
        if worker is not None:
            chunks = chunks[worker.id::worker.num_workers]
        return chunks

    def tokens_per_epoch(self) -> int:
        start, end = self.sequences
        per_sequence = 1 if self.last_position_only else self.store.layout.context
        total = (end - start) * per_sequence
        return min(total, self.max_tokens) if self.max_tokens else total

    def _read(self, start: int, end: int) -> ActivationBatch:
        store = self.store
        layout = store.layout
        z = store.read_activations(z_path(self.layer), start, end)  # [seq, pos, head, d_head]
        scale = store.group["final/scale"][start:end]  # [seq, pos]
        tokens = store.group["tokens"][start:end]
        targets = {path.removeprefix("final/"): store.group[path][start:end] for path in target_paths(layout.logits)}
        n_seq, context = tokens.shape
        sequence = np.repeat(np.arange(start, end), context).reshape(n_seq, context)
        position = np.tile(np.arange(context), n_seq).reshape(n_seq, context)
        if self.last_position_only:
            z, scale, tokens, sequence, position = (a[:, -1:] for a in (z, scale, tokens, sequence, position))
            targets = {k: v[:, -1:] for k, v in targets.items()}

        def flat(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array.reshape(-1, *array.shape[2:])))

        return ActivationBatch(flat(z), flat(scale.astype(np.float32)), {k: flat(v) for k, v in targets.items()},
                               flat(tokens.astype(np.int64)), flat(sequence), flat(position))

    def __iter__(self) -> Iterator[ActivationBatch]:
        epoch = self.epoch + self._passes
        self._passes += 1
        rng = np.random.default_rng((self.seed, epoch, self.rank, getattr(get_worker_info(), "id", 0)))
        limit = None
        if self.max_tokens:
            shares = self.world_size * (get_worker_info().num_workers if get_worker_info() else 1)
            limit = math.ceil(self.max_tokens / shares)
        emitted = 0
        pending: ActivationBatch | None = None
        chunks = self.my_chunks(epoch)
        for group_start in range(0, len(chunks), self.shuffle_chunks):
            parts = [self._read(s, e) for s, e in chunks[group_start:group_start + self.shuffle_chunks]]
            if pending is not None:
                parts.insert(0, pending)
            buffer = collate_batches(parts)
            if self.shuffle:
                buffer = _take(buffer, torch.from_numpy(rng.permutation(len(buffer))))
            n_full = len(buffer) // self.batch_tokens
            for i in range(n_full):
                batch = _take(buffer, slice(i * self.batch_tokens, (i + 1) * self.batch_tokens))
                if limit is not None and emitted + len(batch) > limit:
                    batch = _take(batch, slice(0, limit - emitted))
                if len(batch):
                    yield batch
                emitted += len(batch)
                if limit is not None and emitted >= limit:
                    return
            rest = len(buffer) - n_full * self.batch_tokens
            pending = _take(buffer, slice(len(buffer) - rest, len(buffer))) if rest else None
        if pending is not None and len(pending):
            if limit is not None:
                pending = _take(pending, slice(0, max(0, limit - emitted)))
            if len(pending):
                yield pending


def _take(batch: ActivationBatch, index) -> ActivationBatch:
    return ActivationBatch(batch.z[index], batch.scale[index], {k: v[index] for k, v in batch.target.items()},
                           batch.tokens[index], batch.sequence[index], batch.position[index])
