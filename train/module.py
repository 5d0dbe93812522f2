"""``LightningLens``: fits one layer's lenses from a store with PyTorch Lightning."""

import logging
from typing import Any

import lightning as L
import torch

from lensio.errors import StoreMismatchError
from lensio.reader import ActivationBatch
from lensio.store import open_store
from train.lenses import Lens, frozen_parts_from_store, resolve_lens_class
from train.loss import DEFAULT_BLOCK_BYTES, Objective, blocked_head_kl, kl_div_logits, targets_from_batch

logger = logging.getLogger(__name__)


class LightningLens(L.LightningModule):
    """Train the lenses of every head of one layer against the model's next-token distribution.

    Args:
        model_name: the model the store was extracted from; checked against the store in ``setup``
            (None skips the check).
        lens_cls: a ``Lens`` subclass or its registered name (``full``, ``translator``, ``lowrank``, ``dla``).
        layer_num: the layer whose heads are fitted.
        lr: Adam learning rate.
        store: store path or URL to read the frozen parameters from.
        objective: ``per-head`` (default) or ``layer-sum``.
        temperature: divides both the model's and the lens's logits before the KL.
        block_bytes: memory bound of one block of float32 logits in the loss.
        lens_options: keyword arguments of the lens class (``rank`` for ``lowrank``).
    """

    def __init__(self, model_name: str | None, lens_cls: str | type[Lens], layer_num: int, lr: float = 1e-3, *,
                 store: str, objective: str | Objective = Objective.PER_HEAD, temperature: float = 1.0,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, lens_options: dict[str, Any] | None = None):
        super().__init__()
        self.lens_cls = resolve_lens_class(lens_cls)
        self.save_hyperparameters({"model_name": model_name, "lens": self.lens_cls.kind, "layer_num": layer_num,
                                   "lr": lr, "store": store, "objective": Objective(objective).value,
                                   "temperature": temperature, "block_bytes": block_bytes,
                                   "lens_options": dict(lens_options or {})})
        self.model_name, self.layer_num, self.lr = model_name, layer_num, lr
        self.store_url, self.objective = store, Objective(objective)
        self.temperature, self.block_bytes = temperature, block_bytes
        self.lens_options = dict(lens_options or {})
        self.lens: Lens | None = None
        self._store = None

    def setup(self, stage: str | None = None) -> None:
        """Open the store, check it belongs to ``model_name``, and build the lens from its frozen parameters."""
        if self.lens is not None:
            return
        self._store = open_store(self.store_url)
        stored_name = self._store.meta["model"]["name"]
        if self.model_name is not None and self.model_name != stored_name:
            raise StoreMismatchError(f"store {self.store_url!r} was extracted from model {stored_name!r}, not "
                                     f"{self.model_name!r}; pass the matching store or model name")
        self.lens = self.lens_cls(frozen_parts_from_store(self._store, self.layer_num), **self.lens_options)
        logger.info("%s lens for layer %d: %d heads, %.2f M trainable parameters", self.lens.kind, self.layer_num,
                    self.lens.n_heads, self.lens.n_trainable / 1e6)

    @staticmethod
    def kl_loss(logits: torch.Tensor, lens_logits: torch.Tensor) -> torch.Tensor:
        """Mean KL(model || lens) in nats over positions; both arguments are logits over the vocabulary."""
        if lens_logits.dim() == logits.dim() + 1:  # [..., head, d_vocab] against [..., d_vocab]
            logits = logits.unsqueeze(-2).expand_as(lens_logits)
        return kl_div_logits(logits, lens_logits).mean()

    def forward(self, cache: dict[str, torch.Tensor] | ActivationBatch) -> torch.Tensor:
        """Lens logits [..., head, d_vocab] from a cache holding this layer's ``hook_z`` [..., head, d_head]
        (TransformerLens name ``blocks.{L}.attn.hook_z`` or ``z``); DLA also needs ``ln_final.hook_scale``."""
        if isinstance(cache, ActivationBatch):
            z, scale = cache.z, cache.scale
        else:
            z = cache.get(f"blocks.{self.layer_num}.attn.hook_z", cache.get("z"))
            scale = cache.get("ln_final.hook_scale", cache.get("scale"))
        lead = z.shape[:-2]
        flat_scale = None if scale is None else scale.reshape(-1).float()
        logits = self.lens(z.reshape(-1, *z.shape[-2:]).float(), flat_scale)
        return logits.reshape(*lead, *logits.shape[-2:])

    def _shared_step(self, batch: ActivationBatch, stage: str) -> torch.Tensor:
        lens = self.lens
        features = lens.features(lens.head_outputs(batch.z.float()), batch.scale.float())
        targets = targets_from_batch(batch.target, lens.W_U, lens.b_U, lens.logit_softcap, self.temperature)
        loss, summary = blocked_head_kl(lens, features, targets, layer_sum=self.objective is Objective.LAYER_SUM,
                                        temperature=self.temperature, block_bytes=self.block_bytes)
        n = summary.n_positions
        self.log(f"{stage}/kl", loss.detach(), prog_bar=True, batch_size=n, sync_dist=stage != "train")
        self.log(f"{stage}/top1", summary.top1_matches.mean() / n, batch_size=n, sync_dist=stage != "train")
        return loss

    def training_step(self, batch: ActivationBatch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: ActivationBatch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the lens's trainable parameters only; the base model's tensors are buffers."""
        params = [p for p in self.lens.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr)
