"""Settings of one ``lens-train`` run."""

from dataclasses import dataclass
from pathlib import Path

from lensio.errors import BadInputError
from train.lenses import LENS_REGISTRY
from train.loss import DEFAULT_BLOCK_BYTES, Objective


def default_lens_dir(layer: int, lens: str) -> str:
    return str(Path("lenses") / f"layer{layer:02d}-{lens}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``lens-train`` needs; checked on creation, without I/O."""

    store: str
    """Store path or URL written by lens-extract."""
    layer: int
    lenses: tuple[str, ...] = ("translator",)
    """Lens kinds to train, each into its own folder."""
    out: str | None = None
    """Lens folder; None means lenses/layer{L:02d}-{lens}. With several kinds, a parent folder."""
    objective: Objective = Objective.PER_HEAD
    lr: float = 1e-3
    batch_tokens: int = 512
    """Token positions per optimizer step (per device)."""
    max_steps: int = 500
    val_every: int = 100
    """Training steps between validations on held-out sequences."""
    val_tokens: int | None = 4096
    """Held-out positions per validation; None for all."""
    seed: int = 0
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_workers: int = 0
    rank: int = 16
    """Rank of the lowrank lens's correction."""
    temperature: float = 1.0
    last_position_only: bool = False
    block_mb: int = DEFAULT_BLOCK_BYTES >> 20
    """Memory bound of one block of float32 logits in the loss, in MiB."""
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [lens for lens in self.lenses if lens not in LENS_REGISTRY]
        if unknown or not self.lenses:
            raise BadInputError(f"unknown lens {(unknown or [''])[0]!r}; choose from {', '.join(sorted(LENS_REGISTRY))} "
                                "(several as a comma list)")
        for name in ("batch_tokens", "max_steps", "val_every", "num_nodes", "rank", "block_mb"):
            if getattr(self, name) <= 0:
                raise BadInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            if getattr(self, name) <= 0:
                raise BadInputError(f"--{name} must be positive, got {getattr(self, name)}")
        devices = str(self.devices).strip()
        if devices != "auto" and not all(part.strip().lstrip("-").isdigit() for part in devices.split(",")):
            raise BadInputError(f"--devices {self.devices!r} must be a count, a list of device indices such as "
                                "'0,1', or 'auto'; Lightning picks the GPU accelerator when one is visible")
        if self.num_workers < 0:
            raise BadInputError(f"--num-workers must be 0 or more, got {self.num_workers}")
        if self.val_tokens is not None and self.val_tokens < 0:
            raise BadInputError(f"--val-tokens must be 0 (all held-out positions) or more, got {self.val_tokens}")
        if self.layer < 0:
            raise BadInputError(f"--layer must be a layer index of at least 0, got {self.layer}")

    def lens_dir(self, lens: str) -> str:
        if self.out is None:
            return default_lens_dir(self.layer, lens)
        if len(self.lenses) == 1:
            return self.out
        return str(Path(self.out) / f"layer{self.layer:02d}-{lens}")
