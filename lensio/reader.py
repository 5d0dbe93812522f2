"""Torch datasets over a store: batches of token positions for one layer, read chunk by chunk.

Shuffling is chunk-aware: each epoch visits the chunks of the sequence range in a seeded random
order, fills a buffer of ``shuffle_chunks`` chunks, and emits its positions in random order. Chunks
are split between distributed ranks first and data-loader workers second, so no position is read
twice in an epoch. Workers open the store themselves, so the dataset pickles (spawn start method).

Under distributed training every rank yields the same number of batches per epoch, because a rank
that runs out early leaves the others waiting in a collective (DDP's gradient all-reduce). Ranks
with fewer positions split some of their batches in two instead of dropping or repeating positions,
so every position is still read exactly once per epoch. Only the batch sizes at the end of an epoch
differ between ranks.

Setting the environment variable ``HEADLENS_RECORD_BATCHES`` to a folder makes every rank and worker
append the sequence and position of each batch it yields to a JSON-lines file there. It is a debug
aid for checking how positions are distributed, and slows reading down.
"""

import itertools
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lensio.errors import BadInputError
from lensio.schema import LogitsMode, z_path
from lensio.store import Store, open_store

logger = logging.getLogger(__name__)

RECORD_BATCHES_ENV = "HEADLENS_RECORD_BATCHES"


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


@dataclass(frozen=True)
class EpochShare:
    """The sequence ranges and batch sizes of one data-loader worker of one rank in an epoch."""

    ranges: list[tuple[int, int]]
    """Sequence ranges ``[start, end)``, in reading order."""
    batch_sizes: list[int]
    """Positions per yielded batch; they sum to the positions this share reads."""


def split_ranges(ranges: list[tuple[int, int]], min_count: int) -> list[tuple[int, int]]:
    """Split ranges into contiguous parts so that there are ``min_count`` of them, or one per sequence if fewer.

    Used when a range has fewer chunks than there are ranks and workers, so that no rank is left
    without data. Each new part goes to the range whose parts are longest, so parts stay about equal.
    Two ranks then read parts of the same chunk.
    """
    if len(ranges) >= min_count or not ranges:
        return list(ranges)
    lengths = [end - start for start, end in ranges]
    parts = [1] * len(ranges)
    for _ in range(min(min_count, sum(lengths)) - len(ranges)):
        splittable = [i for i in range(len(ranges)) if parts[i] < lengths[i]]
        widest = max(splittable, key=lambda i: lengths[i] / parts[i])
        parts[widest] += 1
    pieces: list[tuple[int, int]] = []
    for (start, end), n_parts in zip(ranges, parts):
        bounds = [start + (end - start) * i // n_parts for i in range(n_parts + 1)]
        pieces.extend(zip(bounds[:-1], bounds[1:]))
    return pieces


def natural_batch_sizes(n_positions: int, batch_tokens: int) -> list[int]:
    """Full batches, then the remainder."""
    sizes = [batch_tokens] * (n_positions // batch_tokens)
    if n_positions % batch_tokens:
        sizes.append(n_positions % batch_tokens)
    return sizes


def split_batches(sizes: list[int], count: int) -> list[int]:
    """Halve the largest batches, the later first, until there are ``count`` batches of at least one position."""
    sizes = list(sizes)
    while len(sizes) < count:
        largest = max(sizes)
        if largest < 2:
            raise ValueError(f"cannot split {sum(sizes)} positions into {count} batches")
        index = len(sizes) - 1 - sizes[::-1].index(largest)
        sizes[index:index + 1] = [largest - largest // 2, largest // 2]
    return sizes


class LayerBatches(IterableDataset):
    """Batches of ``batch_tokens`` positions of ``layer`` from sequences ``[start, end)`` of a store.

    Args:
        url: store path or URL.
        layer: stored layer to read.
        sequences: ``(start, end)`` sequence range, e.g. ``store.train_range``.
        batch_tokens: positions per batch. The last batch of an epoch may be smaller, and under
            distributed training a rank may split some batches in two so that all ranks yield as many.
        shuffle: visit chunks and positions in a seeded random order.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        last_position_only: keep only the last position of each sequence.
        shuffle_chunks: chunks held in the shuffle buffer at once.
        rank, world_size: this process's share of the chunks under distributed training.
        max_tokens: stop after about this many positions per epoch across all ranks and workers (each
            of them reads at most ``ceil(max_tokens / shares)``); None for all.
    """

    def __init__(self, url: str, layer: int, sequences: tuple[int, int], batch_tokens: int, shuffle: bool = True,
                 seed: int = 0, last_position_only: bool = False, shuffle_chunks: int = 8, rank: int = 0,
                 world_size: int = 1, max_tokens: int | None = None):
        super().__init__()
        if not 0 <= rank < world_size:
            raise BadInputError(f"rank {rank} is out of range for world size {world_size}; pass the trainer's "
                                "global rank (0 to world size - 1) and its world size")
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

    def plan_epoch(self, epoch: int, num_workers: int = 1) -> dict[tuple[int, int], EpochShare]:
        """Plan what every ``(rank, worker)`` reads in ``epoch``, given ``num_workers`` data-loader workers per rank.

        Every rank computes the same plan, so the ranks agree on the batch count without talking.

        Raises:
            BadInputError: a rank has too few positions to yield as many batches as the others, which
                happens when the range has fewer sequences than ranks times workers.
        """
        ranges = self.chunk_ranges()
        if self.shuffle:
            order = np.random.default_rng(self.seed + epoch).permutation(len(ranges))
            ranges = [ranges[i] for i in order]
        shares = self.world_size * num_workers
        ranges = split_ranges(ranges, shares)
        per_sequence = 1 if self.last_position_only else self.store.layout.context
        limit = math.ceil(self.max_tokens / shares) if self.max_tokens else None

        assigned: dict[tuple[int, int], list[tuple[int, int]]] = {}
        positions: dict[tuple[int, int], int] = {}
        for rank in range(self.world_size):
            for worker in range(num_workers):
                share_ranges = ranges[rank::self.world_size][worker::num_workers]
                available = sum(end - start for start, end in share_ranges) * per_sequence
                assigned[rank, worker] = share_ranges
                positions[rank, worker] = min(available, limit) if limit is not None else available

        sizes = {key: natural_batch_sizes(count, self.batch_tokens) for key, count in positions.items()}
        if self.world_size > 1:
            batches_per_rank = max(sum(len(sizes[rank, worker]) for worker in range(num_workers))
                                   for rank in range(self.world_size))
            for rank in range(self.world_size):
                self._even_out_rank(rank, num_workers, batches_per_rank, positions, sizes)
        return {key: EpochShare(assigned[key], sizes[key]) for key in assigned}

    def _even_out_rank(self, rank: int, num_workers: int, batches_per_rank: int,
                       positions: dict[tuple[int, int], int], sizes: dict[tuple[int, int], list[int]]) -> None:
        """Split batches of ``rank``'s workers, the first worker first, until the rank has ``batches_per_rank``."""
        missing = batches_per_rank - sum(len(sizes[rank, worker]) for worker in range(num_workers))
        for worker in range(num_workers):
            key = (rank, worker)
            added = min(missing, positions[key] - len(sizes[key]))
            if added > 0:
                sizes[key] = split_batches(sizes[key], len(sizes[key]) + added)
                missing -= added
        if missing > 0:
            rank_positions = sum(positions[rank, worker] for worker in range(num_workers))
            start, end = self.sequences
            batches = f"{batches_per_rank} batch" if batches_per_rank == 1 else f"{batches_per_rank} batches"
            raise BadInputError(
                f"sequences {start}-{end - 1} of store {self.url!r} give rank {rank} only {rank_positions} positions, "
                f"but each of the {self.world_size} ranks must yield {batches} per epoch; use fewer devices or "
                "data-loader workers, or a store with more sequences")

    def my_chunks(self, epoch: int | None = None) -> list[tuple[int, int]]:
        """This rank's and this worker's sequence ranges for an epoch (default: the current one), in visiting order."""
        epoch = self.epoch if epoch is None else epoch
        worker_id, num_workers = _worker_share()
        return self.plan_epoch(epoch, num_workers)[self.rank, worker_id].ranges

    def batches_per_epoch(self, epoch: int | None = None, num_workers: int = 1) -> int:
        """Batches this rank yields in an epoch (default: the current one), summed over its workers."""
        epoch = self.epoch if epoch is None else epoch
        plan = self.plan_epoch(epoch, num_workers)
        return sum(len(plan[self.rank, worker].batch_sizes) for worker in range(num_workers))

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
        worker_id, num_workers = _worker_share()
        share = self.plan_epoch(epoch, num_workers)[self.rank, worker_id]
        rng = np.random.default_rng((self.seed, epoch, self.rank, worker_id))
        record = _record_file(self.rank, worker_id)
        ranges = iter(share.ranges)
        buffer: ActivationBatch | None = None
        for size in share.batch_sizes:
            # The batch sizes sum to the positions of the share's ranges (or fewer under max_tokens),
            # so the ranges never run out before the buffer contains the next batch.
            while buffer is None or len(buffer) < size:
                parts = [self._read(start, end) for start, end in itertools.islice(ranges, self.shuffle_chunks)]
                if not parts:
                    raise RuntimeError(f"rank {self.rank}, worker {worker_id} ran out of sequences before its "
                                       f"batch of {size} positions in epoch {epoch}")
                if buffer is not None and len(buffer):
                    parts.insert(0, buffer)
                buffer = collate_batches(parts)
                if self.shuffle:
                    buffer = _take(buffer, torch.from_numpy(rng.permutation(len(buffer))))
            batch = _take(buffer, slice(0, size))
            buffer = _take(buffer, slice(size, len(buffer)))
            if record is not None:
                self._record(record, epoch, worker_id, batch)
            yield batch

    def _record(self, path: Path, epoch: int, worker_id: int, batch: ActivationBatch) -> None:
        entry = {"sequences": list(self.sequences), "epoch": epoch, "rank": self.rank, "worker": worker_id,
                 "sequence": batch.sequence.tolist(), "position": batch.position.tolist()}
        with path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")


def _worker_share() -> tuple[int, int]:
    """This data-loader worker's id and the number of workers, ``(0, 1)`` outside a worker."""
    worker = get_worker_info()
    return (worker.id, worker.num_workers) if worker is not None else (0, 1)


def _record_file(rank: int, worker_id: int) -> Path | None:
    """Return the batch record file of this rank and worker, or None when ``HEADLENS_RECORD_BATCHES`` is unset."""
    folder = os.environ.get(RECORD_BATCHES_ENV)
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"batches-rank{rank}-worker{worker_id}.jsonl"


def _take(batch: ActivationBatch, index) -> ActivationBatch:
    return ActivationBatch(batch.z[index], batch.scale[index], {k: v[index] for k, v in batch.target.items()},
                           batch.tokens[index], batch.sequence[index], batch.position[index])
