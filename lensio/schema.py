"""The store format, version 1: array paths, dtypes, choices and the layout of chunks and shards.

A store is one Zarr v3 group::

    tokens               [seq, pos] int32              token ids
    layers/{L}/z         [seq, pos, head, d_head]      attention output per head before W_O (hook_z)
    final/normalized     [seq, pos, d_model]           output of the final norm (factored logits)
    final/scale          [seq, pos] float32            the final norm's per-position scale
    final/logits         [seq, pos, d_vocab] float16   full logits (``--logits full`` only)
    final/topk_logprobs  [seq, pos, k] float32         top-k log-probs (``--logits topk`` only)
    final/topk_ids       [seq, pos, k] int32
    final/logsumexp      [seq, pos] float32            log-sum-exp of the logits (``topk`` only)
    params/...           float32                       W_O, b_O per stored layer; W_U, b_U; final norm
    progress/done        [block] uint8                 1 once a block of sequences is on disk

All sequence-indexed arrays share one chunk shape along the sequence axis and are written one shard
(``seqs_per_shard`` sequences) at a time. Read them back with ``lensio.open_store``.
"""

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

FORMAT_VERSION = 1
ATTRS_KEY = "headlens"

# A chunk of about 1 MiB keeps random reads cheap while the per-chunk overhead of Zarr stays small;
# 16 chunks to a shard keep the file count near one per 16 MiB.
TARGET_CHUNK_BYTES = 1 << 20
CHUNKS_PER_SHARD = 16


class StoreDtype(str, Enum):
    """Storage dtype of activations."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"

    @property
    def itemsize(self) -> int:
        return 4 if self is StoreDtype.FLOAT32 else 2

    @property
    def numpy_dtype(self) -> np.dtype:
        """The dtype Zarr stores: bfloat16 is kept as its uint16 bit pattern because Zarr has no bf16."""
        return {
            StoreDtype.FLOAT16: np.dtype("float16"),
            StoreDtype.BFLOAT16: np.dtype("uint16"),
            StoreDtype.FLOAT32: np.dtype("float32"),
        }[self]

    @property
    def max_finite(self) -> float:
        return {StoreDtype.FLOAT16: 65504.0, StoreDtype.BFLOAT16: 3.389e38, StoreDtype.FLOAT32: 3.402e38}[self]


class LogitsMode(str, Enum):
    """Form in which the model's final distribution is stored."""

    FACTORED = "factored"
    FULL = "full"
    TOPK = "topk"


class Compressor(str, Enum):
    """Lossless codec applied to every chunk."""

    ZSTD = "zstd"
    BLOSC_LZ4 = "blosc-lz4"
    NONE = "none"


class FinalNorm(str, Enum):
    """Kind of the model's final normalization, needed to rebuild logits and for translator lenses."""

    LAYERNORM = "layernorm"
    RMSNORM = "rmsnorm"


def z_path(layer: int) -> str:
    return f"layers/{layer}/z"


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and chunking of one store, fixed when it is created."""

    n_sequences: int
    context: int
    n_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    layers: tuple[int, ...]
    dtype: StoreDtype
    logits: LogitsMode
    top_k: int
    seqs_per_chunk: int
    chunks_per_shard: int

    @classmethod
    def plan(cls, *, n_sequences: int, context: int, n_heads: int, d_head: int, d_model: int, d_vocab: int,
             layers: tuple[int, ...], dtype: StoreDtype, logits: LogitsMode, top_k: int = 0) -> "StoreLayout":
        """Choose the chunk shape: about ``TARGET_CHUNK_BYTES`` of one layer's ``z`` per chunk."""
        z_bytes_per_sequence = context * n_heads * d_head * dtype.itemsize
        seqs_per_chunk = max(1, min(n_sequences, TARGET_CHUNK_BYTES // z_bytes_per_sequence))
        chunks_per_shard = max(1, min(CHUNKS_PER_SHARD, math.ceil(n_sequences / seqs_per_chunk)))
        return cls(n_sequences, context, n_heads, d_head, d_model, d_vocab, tuple(layers), dtype, logits, top_k,
                   seqs_per_chunk, chunks_per_shard)

    @property
    def seqs_per_shard(self) -> int:
        return self.seqs_per_chunk * self.chunks_per_shard

    @property
    def n_blocks(self) -> int:
        """Number of shard-sized blocks of sequences: the unit of writing and of progress."""
        return math.ceil(self.n_sequences / self.seqs_per_shard)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.seqs_per_shard
        return start, min(start + self.seqs_per_shard, self.n_sequences)

    @property
    def n_tokens(self) -> int:
        return self.n_sequences * self.context

    @property
    def final_bytes_per_token(self) -> int:
        """Uncompressed bytes per token of what rebuilds the model's distribution."""
        if self.logits is LogitsMode.FACTORED:
            return self.d_model * 2 + 4
        if self.logits is LogitsMode.FULL:
            return self.d_vocab * 2 + 4
        return self.top_k * 8 + 4 + 4

    @property
    def bytes_per_token(self) -> int:
        """Uncompressed bytes per token of the whole store, tokens included."""
        z_bytes = len(self.layers) * self.n_heads * self.d_head * self.dtype.itemsize
        return 4 + z_bytes + self.final_bytes_per_token

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.n_tokens

    def to_dict(self) -> dict:
        return {
            "n_sequences": self.n_sequences, "context": self.context, "n_heads": self.n_heads,
            "d_head": self.d_head, "d_model": self.d_model, "d_vocab": self.d_vocab, "layers": list(self.layers),
            "dtype": self.dtype.value, "logits": self.logits.value, "top_k": self.top_k,
            "seqs_per_chunk": self.seqs_per_chunk, "chunks_per_shard": self.chunks_per_shard,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "StoreLayout":
        return cls(
            n_sequences=int(data["n_sequences"]), context=int(data["context"]), n_heads=int(data["n_heads"]),
            d_head=int(data["d_head"]), d_model=int(data["d_model"]), d_vocab=int(data["d_vocab"]),
            layers=tuple(int(layer) for layer in data["layers"]), dtype=StoreDtype(data["dtype"]),
            logits=LogitsMode(data["logits"]), top_k=int(data["top_k"]),
            seqs_per_chunk=int(data["seqs_per_chunk"]), chunks_per_shard=int(data["chunks_per_shard"]),
        )


def validation_split(n_sequences: int, fraction: float = 0.05) -> tuple[int, int]:
    """Return ``(val_start, n_val)``: the held-out sequences are the last ``n_val`` of the store.

    Documents are shuffled with the run's seed before packing, so the tail is a random sample of
    documents; a contiguous tail keeps a document's sequences on one side of the split.
    """
    if n_sequences < 2:
        return n_sequences, 0
    n_val = max(1, round(n_sequences * fraction))
    return n_sequences - n_val, n_val
