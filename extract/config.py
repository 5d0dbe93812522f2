"""Settings of one ``lens-extract`` run."""

from dataclasses import dataclass
from pathlib import Path

from lensio.errors import BadInputError
from lensio.schema import Compressor, LogitsMode, StoreDtype


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
    compressor: Compressor = Compressor.NONE
    seed: int = 0
    revision: str | None = None
    overwrite: bool = False
    progress: bool = True
    chunk_sequences: int | None = None
    """Sequences per chunk; None picks about 1 MiB of one layer's z per chunk."""
    chunks_per_shard: int | None = None

    def __post_init__(self) -> None:
        for name in ("tokens", "context", "batch_size", "chunk_sequences", "chunks_per_shard"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise BadInputError(f"--{name.replace('_', '-')} must be positive, got {value}")

    def check_output_path(self) -> None:
        """Reject an output path that is an existing plain file (no I/O for URLs)."""
        if "://" in self.out:
            return
        if Path(self.out).is_file():
            raise BadInputError(f"--out {self.out!r} is a file; pass a folder path for the store")
