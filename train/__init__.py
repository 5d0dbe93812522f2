"""Lens architectures, training with Lightning, evaluation and inspection."""

import importlib

# Names load on first use, so that ``lens-train --help`` and the light modules do not import Lightning.
_EXPORTS = {"LENS_REGISTRY": "train.lenses", "Lens": "train.lenses", "LightningLens": "train.module",
            "Objective": "train.loss", "load_lens": "train.saving"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
