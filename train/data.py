"""The Lightning data module: training and held-out batches of one layer from a store."""

import lightning as L
from torch.utils.data import DataLoader

from lensio.errors import BadInputError
from lensio.reader import LayerBatches
from lensio.store import open_store


class LensDataModule(L.LightningDataModule):
    """Batches of ``batch_tokens`` positions of ``layer``; validation reads the store's held-out sequences.

    Args:
        val_tokens: held-out positions used for each validation pass (None for all of them).
        num_workers: data-loader processes per rank (started with spawn, which Zarr's threads need).
        last_position_only: train and validate on the last position of each sequence only.
    """

    def __init__(self, store: str, layer: int, batch_tokens: int = 512, seed: int = 0, num_workers: int = 0,
                 val_tokens: int | None = 4096, last_position_only: bool = False):
        super().__init__()
        self.store_url, self.layer, self.batch_tokens, self.seed = store, layer, batch_tokens, seed
        self.num_workers, self.val_tokens, self.last_position_only = num_workers, val_tokens, last_position_only
        self.train_set: LayerBatches | None = None
        self.val_set: LayerBatches | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.num_workers and self.store_url.startswith("memory://"):
            # Spawned workers are new processes, and a memory:// store exists only in this one.
            raise BadInputError(f"store {self.store_url!r} lives in this process's memory, so data-loader workers "
                                "cannot read it; pass --num-workers 0 or a store on disk or object storage")
        store = open_store(self.store_url)
        store.z(self.layer)
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        self.train_set = LayerBatches(self.store_url, self.layer, store.train_range, self.batch_tokens, shuffle=True,
                                      seed=self.seed, last_position_only=self.last_position_only, rank=rank,
                                      world_size=world)
        self.val_set = LayerBatches(self.store_url, self.layer, store.val_range, self.batch_tokens, shuffle=False,
                                    last_position_only=self.last_position_only, rank=rank, world_size=world,
                                    max_tokens=self.val_tokens)

    def _loader(self, dataset: LayerBatches) -> DataLoader:
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          multiprocessing_context="spawn" if self.num_workers else None,
                          persistent_workers=bool(self.num_workers))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)
