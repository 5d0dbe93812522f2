"""Lens architectures, training with Lightning, evaluation and inspection."""

from train.lenses import LENS_REGISTRY, Lens
from train.module import LightningLens, Objective
from train.saving import load_lens

__all__ = ["LENS_REGISTRY", "Lens", "LightningLens", "Objective", "load_lens"]
