"""Shared helpers of the pipeline tests: small extractions and reference models, built once per session.

Test modules call ``extract_store`` with the options they need. Each distinct set of options is
extracted once per session and reused by every module that requests it, so the suite pays for
each tiny extraction only once.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from extract.config import ExtractConfig
from extract.loop import run
from extract.models import LoadedModel, load_model, parse_model_source
from lensio.schema import Compressor, LogitsMode, StoreDtype

# Small enough to keep each extraction well under a second on one CPU core.
CONTEXT = 16
TOKENS = 640  # 40 sequences of CONTEXT tokens
CHUNK_SEQUENCES = 4
CHUNKS_PER_SHARD = 2

_STORES: dict[tuple, str] = {}


def extract_store(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, corpus_dir: Path,
                  **options: Any) -> str:
    """Extract a store from ``model_dir`` over ``corpus_dir`` once per session and return its path.

    ``options`` override ``ExtractConfig`` fields; strings are accepted for the enum fields. The
    defaults give 40 sequences of 16 tokens in chunks of 4 sequences and shards of 2 chunks, all
    layers, float32 activations and factored logits.
    """
    settings: dict[str, Any] = {
        "layers": "all", "context": CONTEXT, "tokens": TOKENS, "dtype": "float32", "logits": "factored",
        "chunk_sequences": CHUNK_SEQUENCES, "chunks_per_shard": CHUNKS_PER_SHARD, "seed": 0,
    }
    settings.update(options)
    key = (str(model_dir), str(corpus_dir), tuple(sorted(settings.items())))
    if key not in _STORES:
        out = tmp_path_factory.mktemp("store") / "acts.zarr"
        config = ExtractConfig(
            model=str(model_dir), dataset=str(corpus_dir), out=str(out), progress=False,
            **{**settings, "dtype": StoreDtype(settings["dtype"]), "logits": LogitsMode(settings["logits"]),
               "compressor": Compressor(settings.get("compressor", "none"))},
        )
        run(config)
        _STORES[key] = str(out)
    return _STORES[key]


@functools.lru_cache(maxsize=4)
def reference_model(model_dir: str) -> LoadedModel:
    """The model saved in ``model_dir``, loaded the way extraction loads it."""
    return load_model(parse_model_source(model_dir))


@torch.inference_mode()
def run_with_cache(model: LoadedModel, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [seq, pos, d_vocab] and every hook's activation for token ids [seq, pos]."""
    logits, cache = model.bridge.run_with_cache(tokens.long())
    return logits.float(), {name: value.float() for name, value in cache.items()}


@functools.lru_cache(maxsize=4)
def plain_hf_model(model_dir: str) -> torch.nn.Module:
    """The model in ``model_dir`` loaded by transformers alone, never wrapped by TransformerBridge.

    TransformerBridge replaces the submodules of the model it wraps, so only a separate copy gives
    a reference that does not go through TransformerLens.
    """
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def attention_module(hf_model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The attention module of ``layer`` of a GPT-2 or Llama model."""
    if hasattr(hf_model, "transformer"):
        return hf_model.transformer.h[layer].attn
    return hf_model.model.layers[layer].self_attn


@torch.inference_mode()
def plain_hf_outputs(model_dir: str, tokens: torch.Tensor, layers: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
    """Logits [seq, pos, d_vocab] and the attention output [seq, pos, d_model] of each layer, from transformers."""
    hf_model = plain_hf_model(model_dir)
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def keep(module, args, output, layer=layer):
            outputs[layer] = (output[0] if isinstance(output, tuple) else output).float()

        handles.append(attention_module(hf_model, layer).register_forward_hook(keep))
    try:
        logits = hf_model(tokens.long()).logits.float()
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs
