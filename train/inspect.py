"""``lens-inspect``: the top-k tokens each head's lens predicts at one position of one sequence."""

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lensio.errors import BadInputError
from lensio.layers import parse_layers
from lensio.store import Store, open_store
from train.lenses import Lens, softcap
from train.loss import targets_from_batch
from train.saving import load_lens, read_lens_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InspectConfig:
    """Settings of one ``lens-inspect`` call."""

    lens_dir: str
    store: str | None = None
    example: int | None = None
    position: int = -1
    heads: str | None = None
    top_k: int = 5
    prompt: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.top_k <= 0:
            raise BadInputError(f"--top-k must be positive, got {self.top_k}")
        if (self.prompt is None) != (self.model is None):
            raise BadInputError("--prompt and --model go together: pass both to inspect a new prompt, or neither")


def load_tokenizer(store: Store) -> Any | None:
    """The store's tokenizer, loaded from the recorded model location, or None when it cannot be loaded."""
    from pathlib import Path

    from transformers import AutoTokenizer

    model = store.meta["model"]
    try:
        if model["source"] == "gguf":
            return AutoTokenizer.from_pretrained(str(Path(model["path"]).parent), gguf_file=Path(model["path"]).name)
        return AutoTokenizer.from_pretrained(model["path"] or model["name"])
    except Exception as error:  # noqa: BLE001 - any failure only means tokens are shown as ids
        logger.warning("could not load the tokenizer of %s (%s); showing token ids", model["name"], error)
        return None


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(f"<{i}>" for i in ids)


def _top(probs: torch.Tensor, k: int, tokenizer) -> list[dict[str, Any]]:
    values, ids = probs.topk(k)
    return [{"token": _decode(tokenizer, [int(i)]), "id": int(i), "prob": round(float(v), 5)} for v, i in zip(values, ids)]


def _inputs_from_store(store: Store, lens: Lens, example: int, position: int):
    n = store.layout.n_sequences
    if not 0 <= example < n:
        raise BadInputError(f"--example {example} is out of range: the store holds sequences 0-{n - 1}")
    z = torch.from_numpy(store.read_activations(f"layers/{lens.layer}/z", example, example + 1)[0])  # [pos, head, d_head]
    scale = torch.from_numpy(store.group["final/scale"][example])  # [pos]
    target = {path.removeprefix("final/"): torch.from_numpy(np.asarray(store.group[path][example]))
              for path in ("final/normalized", "final/logits", "final/topk_logprobs", "final/topk_ids")
              if path in store.group}
    tokens = store.group["tokens"][example].tolist()
    return z, scale, target, tokens


def _inputs_from_prompt(config: InspectConfig, lens: Lens):
    # The one place headlens loads the base model after extraction.
    from extract.loop import run_batch
    from extract.models import load_model, parse_model_source
    from lensio.schema import LogitsMode

    model = load_model(parse_model_source(config.model))
    ids = model.tokenizer(config.prompt, add_special_tokens=False)["input_ids"]
    if model.tokenizer.bos_token_id is not None and model.tokenizer.bos_token_id != model.tokenizer.eos_token_id:
        ids = [model.tokenizer.bos_token_id] + ids
    if not ids:
        raise BadInputError("--prompt is empty after tokenization; pass some text")
    arrays = run_batch(model, torch.tensor([ids]), (lens.layer,), LogitsMode.FACTORED, 0).arrays
    z = torch.from_numpy(arrays[f"layers/{lens.layer}/z"][0])
    scale = torch.from_numpy(arrays["final/scale"][0])
    target = {"normalized": torch.from_numpy(arrays["final/normalized"][0])}
    return z, scale, target, ids, model.tokenizer


@torch.no_grad()
def run(config: InspectConfig) -> dict[str, Any]:
    """Collect the model's and each head's lens top-k at one position."""
    store = open_store(config.store or read_lens_config(config.lens_dir)["store"]["url"])
    lens = load_lens(config.lens_dir, store)
    if config.prompt is not None:
        z, scale, target, tokens, tokenizer = _inputs_from_prompt(config, lens)
        example = None
    else:
        example = store.val_range[0] if config.example is None else config.example
        if example >= store.layout.n_sequences:
            example = 0
        z, scale, target, tokens = _inputs_from_store(store, lens, example, config.position)
        tokenizer = load_tokenizer(store)

    length = len(tokens)
    position = config.position + length if config.position < 0 else config.position
    if not 0 <= position < length:
        raise BadInputError(f"--position {config.position} is out of range for a sequence of {length} tokens")
    heads = parse_layers(config.heads, lens.n_heads) if config.heads else tuple(range(lens.n_heads))
    k = min(config.top_k, lens.d_vocab)

    probs = lens.predict(z[position:position + 1], scale[position:position + 1])[0]  # [head, d_vocab]
    targets = targets_from_batch({key: value[position:position + 1] for key, value in target.items()},
                                 lens.W_U, lens.b_U, lens.logit_softcap)
    if targets.probs is not None:
        model_top = _top(targets.probs[0], k, tokenizer)
    else:
        model_top = [{"token": _decode(tokenizer, [int(i)]), "id": int(i), "prob": round(float(p), 5)}
                     for p, i in zip(targets.topk_logprobs[0].exp()[:k], targets.topk_ids[0][:k])]
    return {
        "lens": lens.kind, "layer": lens.layer, "example": example, "position": position,
        "context": _decode(tokenizer, tokens[max(0, position - 24):position + 1]),
        "next_token": _decode(tokenizer, [tokens[position + 1]]) if position + 1 < length else None,
        "model_top": model_top,
        "heads": [{"head": head, "top": _top(probs[head], k, tokenizer)} for head in heads],
    }


def format_table(result: dict[str, Any]) -> str:
    """Render ``run``'s result as a plain-text table: one row per head, one column per rank."""
    def cell(entry: dict[str, Any]) -> str:
        return f"{entry['token']!r} {entry['prob']:.3f}"

    where = f"example {result['example']}" if result["example"] is not None else "prompt"
    lines = [f"{result['lens']} lens, layer {result['layer']}, {where}, position {result['position']}",
             f"context: {result['context']!r}"]
    if result["next_token"] is not None:
        lines.append(f"actual next token: {result['next_token']!r}")
    rows = [("model", [cell(e) for e in result["model_top"]])]
    rows += [(f"head {h['head']}", [cell(e) for e in h["top"]]) for h in result["heads"]]
    width = max(len(c) for _, cells in rows for c in cells)
    for label, cells in rows:
        lines.append(f"{label:<8} " + "  ".join(c.ljust(width) for c in cells))
    return "\n".join(lines)
