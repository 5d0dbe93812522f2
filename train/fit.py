"""The training run behind ``lens-train``: fit, keep the best checkpoint by held-out KL, save the lens."""

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lensio.store import open_store
from train.config import TrainConfig
from train.data import LensDataModule
from train.lenses import DLALens, frozen_parts_from_store
from train.module import LightningLens
from train.saving import lens_config, save_lens

logger = logging.getLogger(__name__)


@dataclass
class TrainedLens:
    """One lens folder written by a run."""

    lens: str
    path: str
    best_val_kl: float | None
    steps: int
    seconds: float


def checkpoint_dir(lens_dir: str) -> Path:
    path = Path(lens_dir)
    return path.parent / f".{path.name}.checkpoints"


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
    ckpt_dir = checkpoint_dir(out)
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/kl", mode="min", save_top_k=1,
                           save_last=True)
    trainer = L.Trainer(
        max_steps=config.max_steps, val_check_interval=min(config.val_every, config.max_steps),
        check_val_every_n_epoch=None, devices=config.devices, num_nodes=config.num_nodes, strategy=config.strategy,
        precision=config.precision, default_root_dir=ckpt_dir, logger=CSVLogger(ckpt_dir, name="logs"),
        callbacks=[best], enable_model_summary=False, enable_progress_bar=config.progress,
        log_every_n_steps=max(1, min(50, config.val_every)), num_sanity_val_steps=0,
    )
    resume = ckpt_dir / "last.ckpt"
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume.is_file() else None)
    if resume.is_file() and trainer.global_step == 0:
        logger.info("resumed from %s", resume)

    best_kl = float(best.best_model_score) if best.best_model_score is not None else None
    if best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    seconds = time.perf_counter() - started
    if trainer.global_rank == 0:
        metrics = {"best_val_kl_nats": best_kl, "steps": trainer.global_step}
        training = {"lr": config.lr, "batch_tokens": config.batch_tokens, "max_steps": config.max_steps,
                    "seed": config.seed, "precision": config.precision, "seconds": round(seconds, 1)}
        save_lens(module.lens, out, lens_config(module.lens, layer=config.layer, objective=config.objective.value,
                                                store=store, metrics=metrics, training=training))
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return TrainedLens(kind, out, best_kl, trainer.global_step, seconds)


def run(config: TrainConfig) -> list[TrainedLens]:
    """Train every lens kind of ``config`` on one layer of the store."""
    store = open_store(config.store)
    store.z(config.layer)
    return [_train_one(config, kind, store) for kind in config.lenses]
