"""The training run behind ``lens-train``: fit, keep the best checkpoint by held-out KL, save the lens."""

import inspect
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lensio.errors import BadInputError, StoreFormatError, StoreMismatchError
from lensio.store import open_store
from train.config import TrainConfig
from train.data import LensDataModule
from train.lenses import DLALens, frozen_parts_from_store
from train.module import LightningLens
from train.saving import check_lens_destination, lens_config, save_lens

logger = logging.getLogger(__name__)


@dataclass
class TrainedLens:
    """One lens folder written by a run."""

    lens: str
    path: str
    best_val_kl: float | None
    steps: int
    seconds: float


def training_dir(lens_dir: str) -> Path:
    """Return the hidden folder beside a lens folder that contains its run's checkpoints and CSV logs."""
    path = Path(lens_dir)
    return path.parent / f".{path.name}.training"


def checkpoint_dir(lens_dir: str) -> Path:
    return training_dir(lens_dir) / "checkpoints"


class StepProgress(Callback):
    """One progress bar per lens in optimizer steps, with the latest training and held-out KL.

    Lightning's own bar counts epochs, and a run bounded by --max-steps has no epoch count ("Epoch 0/-2")."""

    def __init__(self, description: str):
        self.description = description
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, unit="step", desc=self.description)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if self.bar is None:
            return
        self.bar.update(trainer.global_step - self.bar.n)
        self._show_metrics(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self._show_metrics(trainer)

    def _show_metrics(self, trainer: L.Trainer) -> None:
        metrics = {name.replace("/", " "): f"{float(value):.3f}" for name, value in trainer.callback_metrics.items()
                 if name in ("train/kl", "val/kl")}
        self.bar.set_postfix(metrics)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# Hyperparameters of LightningLens that must match for a checkpoint to continue the same training.
RESUME_KEYS = ("model_name", "lens", "layer_num", "store", "objective", "lr", "temperature", "lens_options")


def resumable_checkpoint(ckpt_dir: Path, hparams: dict) -> Path | None:
    """Find the ``last.ckpt`` of an interrupted run of the same training; return None to start afresh.

    A checkpoint that cannot be read (for example a file truncated outside Lightning's atomic save) is
    moved aside with a warning, so the run starts afresh instead of failing.

    Raises:
        StoreMismatchError: the checkpoint was written by a run with another setting in ``RESUME_KEYS``.
    """
    path = ckpt_dir / "last.ckpt"
    if not path.is_file():
        return None
    try:
        # mmap keeps the lens weights on disk: only the hyperparameters and the step are read here.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        saved, step = checkpoint["hyper_parameters"], int(checkpoint["global_step"])
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for a damaged file
        aside = path.with_name(f"last.unreadable-{int(time.time())}.ckpt")
        try:
            path.rename(aside)
        except FileNotFoundError:
            pass  # another rank of a distributed run moved it first
        logger.warning("checkpoint %s cannot be read (%s); moved it to %s and starting afresh", path, error, aside.name)
        return None
    for key in RESUME_KEYS:
        if saved.get(key) != hparams.get(key):
            raise StoreMismatchError(f"cannot resume from checkpoint {path}: {key} is {saved.get(key)!r} there and "
                                     f"{hparams.get(key)!r} in this run; rerun with the original settings, or delete "
                                     f"{ckpt_dir} to start afresh")
    logger.info("resuming from checkpoint %s at step %d", path, step)
    return path


def lightning_strategy(name: str) -> str | Strategy:
    """Return the Lightning strategy for ``--strategy``. Names other than ``ddp`` go to Lightning unchanged.

    DDP broadcasts module buffers from rank 0 before every forward pass by default. The lens's
    buffers (W_U, W_O, the final norm) are frozen copies of the store's parameters, identical on
    every rank, and W_U alone is 154 MB for GPT-2, so ``ddp`` turns that broadcast off.
    """
    if name.startswith("fsdp") and not torch.cuda.is_available():
        # Lightning 2.6 raises a ValueError with a traceback for FSDP on CPU, so report it in one line instead.
        raise BadInputError(f"--strategy {name} needs CUDA GPUs and none is available; use --strategy ddp, "
                            "which runs on CPUs too")
    if name != "ddp":
        # NOTE: fsdp is passed to Lightning as is and has not been run on GPUs with this code.
        return name
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers and deprecated the old name.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DDPStrategy(forward_sync_buffers=False)
    return DDPStrategy(broadcast_buffers=False)


def _train_one(config: TrainConfig, kind: str, store) -> TrainedLens:
    out = config.lens_dir(kind)
    started = time.perf_counter()
    if kind == "dla":
        lens = DLALens(frozen_parts_from_store(store, config.layer))
        save_lens(lens, out, lens_config(lens, layer=config.layer, objective=config.objective.value, store=store))
        return TrainedLens(kind, out, None, 0, time.perf_counter() - started)

    L.seed_everything(config.seed, workers=True, verbose=False)
    module = LightningLens(store.meta["model"]["name"], kind, config.layer, config.lr, store=config.store,
                           objective=config.objective, temperature=config.temperature,
                           block_bytes=config.block_mb << 20,
                           lens_options={"rank": config.rank} if kind == "lowrank" else None)
    data = LensDataModule(config.store, config.layer, config.batch_tokens, config.seed, config.num_workers,
                          config.val_tokens, config.last_position_only)
    run_dir, ckpt_dir = training_dir(out), checkpoint_dir(out)
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/kl", mode="min", save_top_k=1,
                           save_last=True)
    callbacks: list[Callback] = [best]
    if config.progress:
        callbacks.append(StepProgress(f"train layer {config.layer} {kind}"))
    trainer = L.Trainer(
        max_steps=config.max_steps, val_check_interval=min(config.val_every, config.max_steps),
        check_val_every_n_epoch=None, devices=config.devices, num_nodes=config.num_nodes,
        strategy=lightning_strategy(config.strategy),
        precision=config.precision, default_root_dir=run_dir, logger=CSVLogger(run_dir, name="logs"),
        callbacks=callbacks, enable_model_summary=False, enable_progress_bar=False,
        log_every_n_steps=max(1, min(50, config.val_every)), num_sanity_val_steps=0,
    )
    resume = resumable_checkpoint(ckpt_dir, dict(module.hparams))
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume is not None else None)

    best_kl = float(best.best_model_score) if best.best_model_score is not None else None
    seconds = time.perf_counter() - started
    # Only rank 0 saves the lens. The other ranks must not read the checkpoint, which rank 0 deletes
    # below and which sits on rank 0's machine when the nodes share no file system.
    if trainer.global_rank == 0:
        if best.best_model_path:
            state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
            module.load_state_dict(state)
        metrics = {"best_val_kl_nats": best_kl, "steps": trainer.global_step}
        training = {"lr": config.lr, "batch_tokens": config.batch_tokens, "max_steps": config.max_steps,
                    "seed": config.seed, "precision": config.precision, "seconds": round(seconds, 1)}
        save_lens(module.lens, out, lens_config(module.lens, layer=config.layer, objective=config.objective.value,
                                                store=store, metrics=metrics, training=training))
        shutil.rmtree(run_dir, ignore_errors=True)
    return TrainedLens(kind, out, best_kl, trainer.global_step, seconds)


def run(config: TrainConfig) -> list[TrainedLens]:
    """Train every lens kind of ``config`` on one layer of the store."""
    if config.precision.startswith("bf16") and not torch.cuda.is_available():
        logger.warning("--precision %s on a CPU: bfloat16 matmuls run many times slower than float32 on CPUs "
                       "without native bfloat16 (AVX512-BF16 or AMX); use --precision 32-true there",
                       config.precision)
    store = open_store(config.store)
    store.z(config.layer)
    check_store_complete(store)
    for kind in config.lenses:
        check_lens_destination(config.lens_dir(kind))  # before training, not after it
    return [_train_one(config, kind, store) for kind in config.lenses]


def check_store_complete(store) -> None:
    """Reject a store whose extraction has not finished: its unwritten sequences hold zeros."""
    if not store.complete:
        raise StoreFormatError(f"store {store.url!r} is incomplete: {store.n_written} of {store.layout.n_sequences} "
                               "sequences written; rerun the same lens-extract command to finish it")
