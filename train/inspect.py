"""``lens-inspect``: the top-k tokens each head's lens predicts at one position of one sequence.

The sequence is a stored example, or a new prompt run through the base model (the one place
headlens loads the model after extraction, and the one place ``train`` imports ``extract``).
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lensio.errors import BadInputError, LensError
from lensio.layers import parse_layers
from lensio.store import Store, open_store
from train.lenses import Lens
from train.loss import Targets, targets_from_batch
from train.saving import load_lens, read_lens_config, tensor_sha256

logger = logging.getLogger(__name__)

# Tokens of text shown before and after the inspected position.
TOKENS_BEFORE = 24
TOKENS_AFTER = 8
# Marks around the inspected token in the ``context`` string.
MARK_OPEN, MARK_CLOSE = "[[", "]]"


@dataclass(frozen=True)
class InspectConfig:
    """Settings of one ``lens-inspect`` call.

    ``example`` None means the store's first held-out sequence. A negative ``position`` counts from the
    end. ``heads`` is a list such as ``0,3-5`` or ``all``, and None means all heads.
    """

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
        if self.prompt is not None and self.example is not None:
            raise BadInputError(f"--example {self.example} and --prompt exclude each other: pass one of them")


def load_tokenizer(store: Store) -> Any | None:
    """Load the tokenizer of the store's model from its recorded location, or return None when that fails."""
    from transformers import AutoTokenizer

    model = store.meta["model"]
    try:
        if model["source"] == "gguf":
            return AutoTokenizer.from_pretrained(str(Path(model["path"]).parent), gguf_file=Path(model["path"]).name)
        return AutoTokenizer.from_pretrained(model["path"] or model["name"])
    except Exception as error:  # noqa: BLE001 - any failure only means tokens are shown as ids
        logger.warning("could not load the tokenizer of model %s (%s)", model["name"], error)
        return None


def decode_tokens(tokenizer: Any | None, ids: list[int]) -> str:
    """Decode token ids to text, or to ``<id>`` placeholders when there is no tokenizer."""
    if tokenizer is None:
        return "".join(f"<{i}>" for i in ids)
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def parse_heads(spec: str | None, n_heads: int) -> tuple[int, ...]:
    """Parse ``--heads`` (``0,3-5``, ``all``; None for all) into sorted head indices below ``n_heads``."""
    if spec is None:
        return tuple(range(n_heads))
    # The bound lets parse_layers check only the syntax, so the range error below can speak of heads.
    bound = max(n_heads, _largest_number(spec) + 1)
    try:
        heads = parse_layers(spec, n_layers=bound)
    except BadInputError:
        raise BadInputError(f"invalid --heads {spec!r}; use a list such as '0,3-5' or 'all'") from None
    outside = [head for head in heads if head >= n_heads]
    if outside:
        raise BadInputError(f"head {outside[0]} is out of range: the lens has {n_heads} heads (0-{n_heads - 1})")
    return heads


def _largest_number(spec: str) -> int:
    numbers = [int(part) for part in spec.replace(",", " ").replace("-", " ").split() if part.isascii() and part.isdigit()]
    return max(numbers, default=0)


def _top(probs: torch.Tensor, k: int, tokenizer: Any | None) -> list[dict[str, Any]]:
    """List the k most likely tokens of probabilities [d_vocab], most likely first."""
    values, ids = probs.topk(k)
    return [_entry(int(i), float(p), tokenizer) for p, i in zip(values, ids)]


def _significant(prob: float) -> float:
    """Round to 6 significant digits: near-uniform lenses such as DLA give probabilities around 1/d_vocab."""
    return float(f"{prob:.6g}")


def _entry(token_id: int, prob: float, tokenizer: Any | None) -> dict[str, Any]:
    return {"token": decode_tokens(tokenizer, [token_id]), "id": token_id, "prob": _significant(prob)}


@dataclass
class _Inputs:
    """One sequence's activations for the lens's layer and what rebuilds the model's distribution."""

    z: torch.Tensor  # [pos, head, d_head]
    scale: torch.Tensor  # [pos]
    target: dict[str, torch.Tensor]  # by store path below final/, first axis the position
    tokens: list[int]
    tokenizer: Any | None


def _inputs_from_store(store: Store, lens: Lens, example: int) -> _Inputs:
    n = store.layout.n_sequences
    if not 0 <= example < n:
        raise BadInputError(f"--example {example} is out of range: the store contains sequences 0-{n - 1}")
    z = torch.from_numpy(store.read_activations(f"layers/{lens.layer}/z", example, example + 1)[0])
    scale = torch.from_numpy(np.asarray(store.group["final/scale"][example], dtype=np.float32))
    target = {path.removeprefix("final/"): torch.from_numpy(np.asarray(store.group[path][example]))
              for path in ("final/normalized", "final/logits", "final/topk_logprobs", "final/topk_ids")
              if path in store.group}
    tokens = store.group["tokens"][example].tolist()
    return _Inputs(z, scale, target, tokens, load_tokenizer(store))


def _inputs_from_prompt(config: InspectConfig, lens: Lens) -> _Inputs:
    from extract.loop import run_batch
    from extract.models import load_model, parse_model_source
    from lensio.schema import LogitsMode

    model = load_model(parse_model_source(config.model))
    _check_prompt_model(model, lens, config)
    tokenizer = model.tokenizer
    ids = tokenizer(config.prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise BadInputError("--prompt is empty after tokenization; pass some text")
    # Documents in a store start with BOS where the tokenizer has one distinct from EOS: do the same here.
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
        ids = [tokenizer.bos_token_id] + ids
    arrays = run_batch(model, torch.tensor([ids]), (lens.layer,), LogitsMode.FACTORED, 0).arrays
    return _Inputs(torch.from_numpy(arrays[f"layers/{lens.layer}/z"][0]), torch.from_numpy(arrays["final/scale"][0]),
                   {"normalized": torch.from_numpy(arrays["final/normalized"][0])}, ids, tokenizer)


def _check_prompt_model(model, lens: Lens, config: InspectConfig) -> None:
    """Raise LensError unless ``--model`` is the model the lens was trained on (same layer count and W_U)."""
    if lens.layer >= model.n_layers:
        raise LensError(f"lens {config.lens_dir!r} is for layer {lens.layer}, but --model {config.model!r} has "
                        f"{model.n_layers} layers; pass the model the lens was trained on")
    W_U = torch.from_numpy(model.params(())["W_U"])
    if tensor_sha256(W_U) != lens.config["W_U_sha256"]:
        raise LensError(f"lens {config.lens_dir!r} was trained for model {lens.config['store']['model']!r}, and "
                        f"--model {config.model!r} has another unembedding (W_U differs); pass the lens's model")


def _resolve_position(position: int, length: int) -> int:
    resolved = position + length if position < 0 else position
    if not 0 <= resolved < length:
        raise BadInputError(f"--position {position} is out of range for a sequence of {length} tokens "
                            f"(use 0-{length - 1}, or -1 for the last)")
    return resolved


def _text_around(tokens: list[int], position: int, tokenizer: Any | None) -> dict[str, str]:
    return {"before": decode_tokens(tokenizer, tokens[max(0, position - TOKENS_BEFORE):position]),
            "token": decode_tokens(tokenizer, [tokens[position]]),
            "after": decode_tokens(tokenizer, tokens[position + 1:position + 1 + TOKENS_AFTER])}


def _model_top(targets: Targets, k: int, tokenizer: Any | None) -> list[dict[str, Any]]:
    if targets.probs is not None:
        return _top(targets.probs[0], k, tokenizer)
    # --logits topk stores only the model's top tokens, most likely first.
    return [_entry(int(i), float(p), tokenizer)
            for p, i in zip(targets.topk_logprobs[0].exp()[:k], targets.topk_ids[0][:k])]


def _model_prob_of(targets: Targets, token_id: int | None) -> float | None:
    """Look up the model's probability of ``token_id``: None without an id or outside a stored top-k."""
    if token_id is None:
        return None
    if targets.probs is not None:
        return _significant(float(targets.probs[0, token_id]))
    matches = (targets.topk_ids[0] == token_id).nonzero()
    return _significant(float(targets.topk_logprobs[0, matches[0, 0]].exp())) if len(matches) else None


@torch.no_grad()
def run(config: InspectConfig) -> dict[str, Any]:
    """Collect the model's top-k and each selected head's lens top-k at one position.

    Returns the record ``lens-inspect --format json`` prints: the position, the text around it, the
    actual next token (None at the end of the sequence), ``model_top`` and one ``heads`` entry per head.
    Probabilities are rounded to 6 significant digits.
    """
    store = open_store(config.store or read_lens_config(config.lens_dir)["store"]["url"])
    lens = load_lens(config.lens_dir, store)
    heads = parse_heads(config.heads, lens.n_heads)
    if config.prompt is not None:
        example = None
        inputs = _inputs_from_prompt(config, lens)
    else:
        example = store.val_range[0] if config.example is None else config.example
        inputs = _inputs_from_store(store, lens, example)

    length = len(inputs.tokens)
    position = _resolve_position(config.position, length)
    next_id = inputs.tokens[position + 1] if position + 1 < length else None
    k = min(config.top_k, lens.d_vocab)
    probs = lens.predict(inputs.z[position:position + 1], inputs.scale[position:position + 1])[0]  # [head, d_vocab]
    targets = targets_from_batch({key: value[position:position + 1] for key, value in inputs.target.items()},
                                 lens.W_U, lens.b_U, lens.logit_softcap).dense()

    text = _text_around(inputs.tokens, position, inputs.tokenizer)
    return {
        "lens": lens.kind, "layer": lens.layer, "lens_dir": str(config.lens_dir), "example": example,
        "position": position, "length": length, "text": text,
        "context": f"{text['before']}{MARK_OPEN}{text['token']}{MARK_CLOSE}{text['after']}",
        "token_id": inputs.tokens[position],
        "next_token": decode_tokens(inputs.tokenizer, [next_id]) if next_id is not None else None,
        "next_token_id": next_id,
        "model_top": _model_top(targets, k, inputs.tokenizer),
        "model_next_token_prob": _model_prob_of(targets, next_id),
        "heads": [{"head": head, "top": _top(probs[head], k, inputs.tokenizer),
                   "next_token_prob": _significant(float(probs[head, next_id])) if next_id is not None else None}
                  for head in heads],
    }


def format_probability(prob: float) -> str:
    """Format a probability with 3 decimals, or in scientific notation below 0.001 (DLA lenses spread thinly)."""
    return f"{prob:.3f}" if prob >= 1e-3 or prob == 0 else f"{prob:.1e}"


def format_table(result: dict[str, Any]) -> str:
    """Render ``run``'s result as plain text: a header, the text around the position, then one row for the
    model and one per head, with a column per rank and, when the next token is known, its probability."""
    def cell(entry: dict[str, Any]) -> str:
        return f"{entry['token']!r} {format_probability(entry['prob'])}"

    where = f"example {result['example']}" if result["example"] is not None else "prompt"
    lines = [f"{result['lens']} lens, layer {result['layer']}, {where}, position {result['position']} "
             f"of {result['length']}",
             f"text: {result['context']!r}  (the token at the position is inside {MARK_OPEN} {MARK_CLOSE})"]
    has_next = result["next_token"] is not None
    if has_next:
        lines.append(f"actual next token: {result['next_token']!r}")

    rows = [("model", [cell(e) for e in result["model_top"]], result["model_next_token_prob"])]
    rows += [(f"head {h['head']}", [cell(e) for e in h["top"]], h["next_token_prob"]) for h in result["heads"]]
    width = max(len(c) for _, cells, _ in rows for c in cells)
    ranks = max(len(cells) for _, cells, _ in rows)
    header = " " * 9 + "  ".join(f"rank {rank + 1}".ljust(width) for rank in range(ranks))
    lines.append((header + ("  p(next)" if has_next else "")).rstrip())
    for label, cells, next_prob in rows:
        line = f"{label:<8} " + "  ".join(c.ljust(width) for c in cells)
        if has_next:
            line += "  " + (format_probability(next_prob) if next_prob is not None else "?")
        lines.append(line.rstrip())
    return "\n".join(lines)
