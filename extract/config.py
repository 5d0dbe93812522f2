"""Settings of one ``lens-extract`` run."""

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lensio.errors import BadInputError
from lensio.schema import Compressor, LogitsMode, StoreDtype

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """Everything ``lens-extract`` needs; built once from the command line and checked on creation."""

    model: str
    """Model name, local Hugging Face directory, or .gguf file."""
    layers: str
    """Layer spec such as ``0-11``, ``0,3,5-7`` or ``all``; checked against the model once it is loaded."""
    dataset: str
    """Hugging Face dataset name, or a local .txt/.jsonl/.parquet file or folder."""
    out: str = "acts.zarr"
    """Store path or fsspec URL."""
    split: str = "train"
    text_column: str = "text"
    tokens: int | None = None
    """Upper bound on tokens extracted; None extracts the whole corpus."""
    context: int = 128
    """Tokens per packed sequence."""
    batch_size: int = 8
    """Sequences per forward pass."""
    dtype: StoreDtype = StoreDtype.FLOAT16
    device: str = "cpu"
    logits: LogitsMode = LogitsMode.FACTORED
    top_k: int = 64
    """Log-probs kept per position with ``logits=topk``."""
    compressor: Compressor = Compressor.ZSTD
    """Chunk codec. zstd level 1 stores SmolLM2 activations in 15% less space than none, and its write
    speed (27k tokens/s in bench/store_size.py on a 2-core CPU) is 100x the model's extraction speed."""
    seed: int = 0
    revision: str | None = None
    overwrite: bool = False
    progress: bool = True
    chunk_sequences: int | None = None
    """Sequences per chunk; None picks about 1 MiB of one layer's z per chunk."""
    chunks_per_shard: int | None = None
    num_shards: int = 1
    """Processes that write the store together; each writes a contiguous range of whole blocks."""
    shard_index: int = 0
    """This process's shard, from 0 to ``num_shards - 1``. Shard 0 creates the store."""

    def __post_init__(self) -> None:
        for name in ("tokens", "context", "batch_size", "chunk_sequences", "chunks_per_shard", "num_shards"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise BadInputError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if not 0 <= self.shard_index < self.num_shards:
            raise BadInputError(f"--shard-index {self.shard_index} must be between 0 and --num-shards - 1 "
                                f"({self.num_shards - 1})")
        if self.overwrite and self.num_shards > 1:
            # A shard that joined the old store could finish before shard 0 replaces it, losing its blocks.
            raise BadInputError(f"--overwrite cannot be combined with --num-shards {self.num_shards}; delete "
                                f"{self.out!r} first, then start the shards without --overwrite")
        if self.tokens is not None and self.tokens < self.context:
            raise BadInputError(f"--tokens {self.tokens} is less than one sequence of --context {self.context}; "
                                "raise --tokens or lower --context")

    def check_output_path(self) -> None:
        """Reject an output path that is an existing plain file (no I/O for URLs)."""
        if "://" in self.out:
            return
        if Path(self.out).is_file():
            raise BadInputError(f"--out {self.out!r} is a file; pass a folder path for the store")


def resolve_shards(num_shards: int | None, shard_index: int | None,
                   environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """Return ``(num_shards, shard_index)`` from the options, or from a launcher's ``WORLD_SIZE`` and ``RANK``.

    The environment is read only when ``--num-shards`` is not given. torchrun sets ``WORLD_SIZE`` and
    ``RANK``. Under SLURM pass ``--num-shards $SLURM_NTASKS --shard-index $SLURM_PROCID``: the SLURM
    variables are not read, because a batch script that runs one process sees the job's task count too.

    Raises:
        BadInputError: one option is given without the other, or a variable is not an integer.
    """
    if num_shards is not None:
        if shard_index is None:
            raise BadInputError(f"--num-shards {num_shards} needs --shard-index, the shard this process writes "
                                f"(0 to {num_shards - 1})")
        return num_shards, shard_index
    if shard_index is not None:
        raise BadInputError(f"--shard-index {shard_index} needs --num-shards, the number of processes writing "
                            "the store")
    if "WORLD_SIZE" not in environ or "RANK" not in environ:
        return 1, 0
    values = []
    for name in ("WORLD_SIZE", "RANK"):
        try:
            values.append(int(environ[name]))
        except ValueError:
            raise BadInputError(f"environment variable {name}={environ[name]!r} is not an integer; unset it or "
                                "pass --num-shards and --shard-index") from None
    logger.info("writing shard %d of %d, from the environment (RANK=%s, WORLD_SIZE=%s)", values[1], values[0],
                environ["RANK"], environ["WORLD_SIZE"])
    return values[0], values[1]
