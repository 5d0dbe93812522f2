"""Held-out evaluation of lenses and the DLA baseline, per head, and the metrics files.

Per head and lens: KL(model || lens) and top-1 agreement with the model on every held-out position,
the cross-entropy of the lens against the token that actually follows, and both KL and cross-entropy
in bits per UTF-8 byte of the text those next tokens spell (as tuned-lens reports them), so results
compare across tokenizers. The last position of each stored sequence has no next token in its row of
``tokens``, so cross-entropy and bits per byte leave it out. ``kl_nats`` and ``top1_agreement`` include it.
Special tokens (BOS, EOS) spell no text and count 0 bytes.
"""

import csv
import json
import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lensio.reader import ActivationBatch, LayerBatches
from lensio.store import Store
from train.lenses import DLALens, Lens, frozen_parts_from_store, softcap
from train.loss import DEFAULT_BLOCK_BYTES, Targets, _topk_kl, block_tokens_for, targets_from_batch

logger = logging.getLogger(__name__)

BASELINE = "dla"
# Default of ``evaluate``'s ``tokenizer`` argument: load the tokenizer recorded in the store.
FROM_STORE = "store"


@dataclass
class HeadMetrics:
    """Held-out metrics of one head under one lens.

    ``lens`` names the lens uniquely within its layer: the lens kind, followed by the end of its folder
    path when two lenses of one kind were evaluated on the same layer. The bits-per-byte fields are
    None when the tokenizer could not be loaded, and every cross-entropy field is None when no position
    has a known next token.
    """

    layer: int
    head: int
    lens: str
    kl_nats: float
    kl_bits: float
    top1_agreement: float
    n_positions: int
    ce_nats: float | None = None
    """Cross-entropy of the lens against the actual next token, in nats per token."""
    kl_bits_per_byte: float | None = None
    ce_bits_per_byte: float | None = None
    n_next_tokens: int = 0
    """Positions with a known next token: the ones cross-entropy and bits per byte average over."""
    n_bytes: int | None = None
    """UTF-8 bytes of the text those next tokens spell."""
    kind: str = ""
    lens_path: str | None = None
    """The lens folder, or None for the DLA baseline that evaluation adds itself."""


@dataclass
class TokenShare:
    """A token and the fraction of evaluated positions at which it came first."""

    id: int
    token: str
    share: float


@dataclass
class HeadTopTokens:
    """The tokens one head's lens most often ranks first on the held-out positions."""

    layer: int
    head: int
    lens: str
    tokens: list[TokenShare]


@dataclass
class ModelReference:
    """The model's own numbers on the positions evaluated for one layer: the floor lenses approach.

    ``ce_nats`` is None for stores with ``--logits topk``, which do not keep every token's probability.
    """

    layer: int
    ce_nats: float | None
    ce_bits_per_byte: float | None
    top_tokens: list[TokenShare]


@dataclass
class Evaluation:
    """Everything ``lens-eval`` computes: the metric rows, each head's favourite tokens, the model's own."""

    rows: list[HeadMetrics]
    top_tokens: list[HeadTopTokens]
    model: list[ModelReference]
    store_url: str
    model_name: str


@dataclass
class _Entry:
    label: str
    lens: Lens
    path: str | None


@dataclass
class _LensTally:
    """Running sums of one lens over one layer's held-out positions."""

    kl_sum: torch.Tensor  # [head]
    kl_sum_next: torch.Tensor  # [head], over positions with a known next token only
    ce_sum: torch.Tensor  # [head], same positions
    top1_matches: torch.Tensor  # [head]
    first_counts: torch.Tensor  # [head, d_vocab], positions at which each token is the lens's most likely

    @classmethod
    def zeros(cls, n_heads: int, d_vocab: int) -> "_LensTally":
        return cls(*(torch.zeros(n_heads, dtype=torch.float64) for _ in range(4)),
                   torch.zeros(n_heads, d_vocab, dtype=torch.int64))


@dataclass
class _PositionTally:
    """Running sums over one layer's held-out positions that do not depend on the lens."""

    d_vocab: int
    n_positions: int = 0
    n_next: int = 0
    n_bytes: int = 0
    model_ce_sum: float | None = 0.0
    model_first_counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.model_first_counts = torch.zeros(self.d_vocab, dtype=torch.int64)


def token_byte_lengths(tokenizer: Any, d_vocab: int) -> torch.Tensor:
    """UTF-8 bytes of text each token id spells, [d_vocab] int64.

    Byte-level BPE pieces (GPT-2, SmolLM2) map one character to one byte. SentencePiece byte-fallback
    pieces such as ``<0xE2>`` are one byte, and ``▁`` is a space. Other pieces are decoded alone.
    Special and added special tokens, and ids beyond the tokenizer's vocabulary (padded embedding rows),
    count 0 bytes.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    lengths = torch.zeros(d_vocab, dtype=torch.int64)
    n_ids = min(d_vocab, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(n_ids)))
    special = set(tokenizer.all_special_ids)
    special.update(i for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items() if added.special)
    byte_alphabet = set(ByteLevel.alphabet()) if _is_byte_level(tokenizer) else None
    for token_id, piece in enumerate(pieces):
        if token_id in special or piece is None:
            continue
        if byte_alphabet is not None and set(piece) <= byte_alphabet:
            lengths[token_id] = len(piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            lengths[token_id] = 1
        elif "\u2581" in piece:
            lengths[token_id] = len(piece.replace("\u2581", " ").encode("utf-8"))
        else:
            lengths[token_id] = len(tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8"))
    return lengths


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def lens_labels(lenses: list[Lens], paths: list[str | Path | None] | None = None) -> list[str]:
    """Name each lens uniquely within its layer: its kind, plus the end of its path where kinds repeat.

    The path suffix grows by one folder at a time until the names differ (``translator:runA/layer01-translator``).
    Without paths, or with one path given twice, repeated kinds are numbered in order (``translator#2``).
    """
    paths = list(paths) if paths is not None else [None] * len(lenses)
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for index, lens in enumerate(lenses):
        groups[(lens.layer, lens.kind)].append(index)
    labels = [lens.kind for lens in lenses]
    for (_, kind), members in groups.items():
        if len(members) == 1:
            continue
        suffixes = _distinct_suffixes([paths[i] for i in members])
        for number, (i, suffix) in enumerate(zip(members, suffixes), start=1):
            labels[i] = f"{kind}:{suffix}" if suffix is not None else f"{kind}#{number}"
    return labels


def _distinct_suffixes(paths: list[str | Path | None]) -> list[str | None]:
    """Return the shortest path endings that tell the paths apart, or Nones when some path is missing or repeated."""
    if any(path is None for path in paths):
        return [None] * len(paths)
    parts = [Path(path).resolve().parts for path in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        suffixes = ["/".join(p[-depth:]) for p in parts]
        if len(set(suffixes)) == len(suffixes):
            return suffixes
    return [None] * len(paths)


def evaluate(store: Store, lenses: list[Lens], **options: Any) -> list[HeadMetrics]:
    """Evaluate per-head metrics on the store's held-out sequences; ``evaluate_details`` lists the options."""
    return evaluate_details(store, lenses, **options).rows


@torch.no_grad()
def evaluate_details(store: Store, lenses: list[Lens], *, paths: list[str | Path | None] | None = None,
                     max_tokens: int | None = None, batch_tokens: int = 512, baseline: bool = True,
                     progress: bool = True, tokenizer: Any = FROM_STORE, top_n: int = 5,
                     block_bytes: int = DEFAULT_BLOCK_BYTES) -> Evaluation:
    """Evaluate lenses per head on the store's held-out sequences, with the DLA baseline of each layer.

    Args:
        lenses: lenses with a ``layer`` attribute (``load_lens`` sets it), of any kinds and layers.
        paths: each lens's folder, to name lenses of one kind and layer apart and record in the rows.
        max_tokens: held-out positions per layer, None for all. Every layer is evaluated on the same positions.
        baseline: add the DLA lens of each layer that has no dla lens among ``lenses``.
        tokenizer: for bits per byte and token text: ``FROM_STORE`` loads the store's tokenizer, None
            skips bits per byte and shows token ids.
        top_n: tokens listed per head in ``top_tokens``.
        block_bytes: memory bound of one block of float32 logits [head, tok, d_vocab].
    """
    if isinstance(tokenizer, str) and tokenizer == FROM_STORE:
        from train.inspect import load_tokenizer

        tokenizer = load_tokenizer(store)
    byte_lengths = token_byte_lengths(tokenizer, store.layout.d_vocab) if tokenizer is not None else None
    if byte_lengths is None:
        logger.warning("no tokenizer for store %s: bits per byte are left out of the metrics", store.url)

    by_layer: dict[int, list[_Entry]] = defaultdict(list)
    for label, lens, path in zip(lens_labels(lenses, paths), lenses, paths or [None] * len(lenses)):
        by_layer[lens.layer].append(_Entry(label, lens, str(path) if path is not None else None))
    if baseline:
        for layer, entries in by_layer.items():
            if all(entry.lens.kind != BASELINE for entry in entries):
                entries.append(_Entry(BASELINE, DLALens(frozen_parts_from_store(store, layer)).eval(), None))

    evaluation = Evaluation([], [], [], store.url, store.meta["model"]["name"])
    for layer, entries in sorted(by_layer.items()):
        _evaluate_layer(store, layer, entries, evaluation, byte_lengths, tokenizer, max_tokens=max_tokens,
                        batch_tokens=batch_tokens, progress=progress, top_n=top_n, block_bytes=block_bytes)
    return evaluation


def _evaluate_layer(store: Store, layer: int, entries: list[_Entry], evaluation: Evaluation,
                    byte_lengths: torch.Tensor | None, tokenizer: Any, *, max_tokens: int | None, batch_tokens: int,
                    progress: bool, top_n: int, block_bytes: int) -> None:
    """Tally one layer's lenses over the held-out positions and append their rows to ``evaluation``."""
    first, last = store.val_range
    tokens = torch.from_numpy(np.asarray(store.group["tokens"][first:last], dtype=np.int64))  # [seq, pos]
    batches = LayerBatches(store.url, layer, store.val_range, batch_tokens, shuffle=False, max_tokens=max_tokens)
    positions = _PositionTally(store.layout.d_vocab)
    tallies = {entry.label: _LensTally.zeros(entry.lens.n_heads, entry.lens.d_vocab) for entry in entries}

    bar = tqdm(total=batches.tokens_per_epoch(), unit="tok", desc=f"eval layer {layer}", disable=not progress)
    for batch in batches:
        reference = entries[0].lens
        # Built once per batch and shared by every lens of the layer: [tok x d_vocab], 0.1 GB at 512 tokens.
        targets = targets_from_batch(batch.target, reference.W_U, reference.b_U, reference.logit_softcap).dense()
        next_ids, has_next = next_token_ids(batch, tokens, first)
        _tally_positions(positions, targets, next_ids, has_next, byte_lengths)
        for entry in entries:
            _tally_lens(entry.lens, batch, targets, next_ids, has_next, tallies[entry.label], block_bytes)
        bar.update(len(batch))
    bar.close()
    if positions.n_positions == 0:
        raise ValueError(f"store {store.url!r} has no held-out positions to evaluate layer {layer} on")

    has_bytes = byte_lengths is not None and positions.n_bytes > 0
    for entry in entries:
        tally = tallies[entry.label]
        evaluation.rows.extend(_head_rows(layer, entry, tally, positions, has_bytes))
        for head in range(entry.lens.n_heads):
            shares = top_token_shares(tally.first_counts[head], positions.n_positions, top_n, tokenizer)
            evaluation.top_tokens.append(HeadTopTokens(layer, head, entry.label, shares))
    model_ce = (positions.model_ce_sum / positions.n_next
                if positions.model_ce_sum is not None and positions.n_next else None)
    evaluation.model.append(ModelReference(
        layer, model_ce, bits_per_byte(positions.model_ce_sum, positions.n_bytes) if has_bytes and model_ce is not None
        else None, top_token_shares(positions.model_first_counts, positions.n_positions, top_n, tokenizer)))


def next_token_ids(batch: ActivationBatch, tokens: torch.Tensor, first_sequence: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Look up the token that follows each position of ``batch`` [tok], and whether it is known [tok] bool.

    ``tokens`` [seq, pos] contains the sequences from ``first_sequence`` on. The last position of a
    sequence gets a placeholder id and False.
    """
    context = tokens.shape[1]
    has_next = batch.position < context - 1
    following = (batch.position + 1).clamp(max=context - 1)
    return tokens[batch.sequence - first_sequence, following], has_next


def _tally_positions(tally: _PositionTally, targets: Targets, next_ids: torch.Tensor, has_next: torch.Tensor,
                     byte_lengths: torch.Tensor | None) -> None:
    tally.n_positions += len(next_ids)
    tally.n_next += int(has_next.sum())
    if byte_lengths is not None:
        tally.n_bytes += int(byte_lengths[next_ids[has_next]].sum())
    tally.model_first_counts += torch.bincount(targets.top1, minlength=tally.d_vocab)
    if targets.probs is None or tally.model_ce_sum is None:
        tally.model_ce_sum = None
        return
    next_probs = targets.probs.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)  # [tok]
    tally.model_ce_sum += float(-(next_probs[has_next].double().clamp_min(1e-30).log()).sum())


def _tally_lens(lens: Lens, batch: ActivationBatch, targets: Targets, next_ids: torch.Tensor, has_next: torch.Tensor,
                tally: _LensTally, block_bytes: int) -> None:
    """Add one batch to a lens's sums, one block of tokens at a time so that logits stay within ``block_bytes``."""
    features = lens.features(lens.head_outputs(batch.z.float()), batch.scale.float())  # [tok, head, d_in]
    rows = block_tokens_for(lens.n_heads, lens.d_vocab, block_bytes)
    for start in range(0, len(batch), rows):
        block = slice(start, start + rows)
        block_targets = targets.block(block)
        logits = softcap(lens.project(features[block]), lens.logit_softcap)  # [head, tok, d_vocab]
        log_z = torch.logsumexp(logits, dim=-1)  # [head, tok]
        kl = _block_kl(block_targets, logits, log_z)  # [head, tok]
        block_next = next_ids[block].expand(lens.n_heads, -1).unsqueeze(-1)  # [head, tok, 1]
        ce = log_z - logits.gather(-1, block_next).squeeze(-1)  # [head, tok]
        known = has_next[block].double()  # [tok]
        lens_first = logits.argmax(-1)  # [head, tok]

        tally.kl_sum += kl.double().sum(-1)
        tally.kl_sum_next += (kl.double() * known).sum(-1)
        tally.ce_sum += (ce.double() * known).sum(-1)
        tally.top1_matches += (lens_first == block_targets.top1.unsqueeze(0)).sum(-1)
        tally.first_counts.scatter_add_(1, lens_first, torch.ones_like(lens_first))


def _block_kl(targets: Targets, logits: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
    """KL(model || lens) [head, tok] in nats, as the training loss computes it."""
    if targets.probs is None:
        return _topk_kl(targets, logits, 1.0)
    # sum p log p - sum p log q, with log q = logits - log_z
    return targets.neg_entropy - torch.einsum("htv,tv->ht", logits, targets.probs) + log_z


def bits_per_byte(nats_sum: float, n_bytes: int) -> float:
    """Convert a sum of nats over positions to bits per byte of the text those positions predict."""
    return nats_sum / math.log(2) / n_bytes


def _head_rows(layer: int, entry: _Entry, tally: _LensTally, positions: _PositionTally,
               has_bytes: bool) -> list[HeadMetrics]:
    rows = []
    for head in range(entry.lens.n_heads):
        kl = float(tally.kl_sum[head]) / positions.n_positions
        has_next = positions.n_next > 0
        rows.append(HeadMetrics(
            layer=layer, head=head, lens=entry.label, kl_nats=kl, kl_bits=kl / math.log(2),
            top1_agreement=float(tally.top1_matches[head]) / positions.n_positions,
            n_positions=positions.n_positions,
            ce_nats=float(tally.ce_sum[head]) / positions.n_next if has_next else None,
            kl_bits_per_byte=bits_per_byte(float(tally.kl_sum_next[head]), positions.n_bytes) if has_bytes else None,
            ce_bits_per_byte=bits_per_byte(float(tally.ce_sum[head]), positions.n_bytes) if has_bytes else None,
            n_next_tokens=positions.n_next, n_bytes=positions.n_bytes if has_bytes else None,
            kind=entry.lens.kind, lens_path=entry.path,
        ))
    return rows


def top_token_shares(counts: torch.Tensor, n_positions: int, top_n: int, tokenizer: Any) -> list[TokenShare]:
    """List the ``top_n`` most frequent tokens of ``counts`` [d_vocab] with their share of ``n_positions``."""
    from train.inspect import decode_tokens

    values, ids = counts.topk(min(top_n, counts.numel()))
    return [TokenShare(int(i), decode_tokens(tokenizer, [int(i)]), int(v) / n_positions)
            for v, i in zip(values, ids) if v > 0]


def write_reports(rows: list[HeadMetrics], out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.json``, ``metrics.csv`` and ``heatmap.png`` (layers x heads, one panel per lens).

    Fields that are None appear as null in the JSON and as empty cells in the CSV.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [asdict(row) for row in rows]
    paths = {"json": out / "metrics.json", "csv": out / "metrics.csv", "heatmap": out / "heatmap.png"}
    paths["json"].write_text(json.dumps(records, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    plot_heatmap(rows, paths["heatmap"])
    return paths


def lens_order(rows: list[HeadMetrics]) -> list[str]:
    """Lens names in display order: trained lenses alphabetically, the DLA baseline last."""
    return sorted({row.lens for row in rows}, key=lambda name: (name == BASELINE, name))


def plot_heatmap(rows: list[HeadMetrics], path: Path) -> None:
    """Save the KL (nats) of every head as a layers x heads heatmap, one panel per lens."""
    from train.report import figure_png, heatmap_figure

    path.write_bytes(figure_png(heatmap_figure(rows, "kl_nats", "KL (nats)")))
