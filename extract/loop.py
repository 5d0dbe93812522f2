"""The extraction loop: run the frozen model over packed sequences and write a store."""

import hashlib
import itertools
import logging
import time
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
import torch
from tqdm.auto import tqdm

from extract.config import ExtractConfig
from extract.models import LoadedModel, load_model, parse_model_source
from extract.packing import pack_documents
from extract.text import iter_documents, parse_text_source
from lensio.errors import BadInputError, DatasetError, ModelLoadError, NumericsError
from lensio.layers import parse_layers
from lensio.schema import FORMAT_VERSION, LogitsMode, StoreDtype, StoreLayout, validation_split, z_path
from lensio.writer import BlockWriter, prepare_store

logger = logging.getLogger(__name__)


class _StopAfterFinalNorm(Exception):
    """Raised from the final norm's hook so the model never runs its unembedding."""


@dataclass
class ExtractionResult:
    """Summary of one ``lens-extract`` run."""

    store_url: str
    n_sequences: int
    tokens_written: int
    seconds: float
    resumed: bool
    n_written: int
    """Sequences of the store written so far by every shard, this one included."""
    complete: bool
    """Whether every block of the store is written, by this shard or others."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_written / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class BatchActivations:
    """Activations of one batch of sequences, as float32 numpy arrays keyed by store path."""

    arrays: dict[str, np.ndarray]


def hook_names(layers: tuple[int, ...]) -> list[str]:
    return [f"blocks.{layer}.attn.hook_z" for layer in layers] + ["ln_final.hook_out", "ln_final.hook_scale"]


def run_batch(model: LoadedModel, tokens: torch.Tensor, layers: tuple[int, ...], logits_mode: LogitsMode,
              top_k: int) -> BatchActivations:
    """Run one batch [batch, pos] and return every stored array for it.

    In factored mode the forward pass stops inside the final norm's hook, so the unembedding matmul
    (a fifth of a small model's FLOPs) is never run.

    Raises:
        ModelLoadError: a requested hook did not fire.
    """
    captured: dict[str, torch.Tensor] = {}
    stop_early = logits_mode is LogitsMode.FACTORED

    def capture_as(name: str):
        # Keyed by the requested name: the bridge resolves aliases such as hook_z, so hook.name may differ.
        def capture(tensor: torch.Tensor, hook) -> None:
            captured[name] = tensor.detach()
            if stop_early and name == "ln_final.hook_out" and "ln_final.hook_scale" in captured:
                raise _StopAfterFinalNorm

        return capture

    names = hook_names(layers)
    logits = None
    with torch.inference_mode():
        try:
            logits = model.bridge.run_with_hooks(tokens, fwd_hooks=[(name, capture_as(name)) for name in names])
        except _StopAfterFinalNorm:
            pass

    missing = [name for name in names if name not in captured]
    if missing:
        raise ModelLoadError(f"hooks {', '.join(missing)} did not fire for model {model.source.name!r}; this "
                           "architecture is not supported by the extraction hooks")

    arrays: dict[str, np.ndarray] = {}
    for layer in layers:
        arrays[z_path(layer)] = captured[f"blocks.{layer}.attn.hook_z"].float().cpu().numpy()  # [batch, pos, head, d_head]
    arrays["final/scale"] = captured["ln_final.hook_scale"].float().reshape(tokens.shape).cpu().numpy()
    if logits_mode is LogitsMode.FACTORED:
        arrays["final/normalized"] = captured["ln_final.hook_out"].float().cpu().numpy()  # [batch, pos, d_model]
    else:
        logits = logits.float()  # [batch, pos, d_vocab], soft-capped by the model where it has a cap
        if logits_mode is LogitsMode.FULL:
            arrays["final/logits"] = logits.cpu().numpy()
        else:
            log_z = torch.logsumexp(logits, dim=-1)
            values, ids = torch.topk(logits, top_k, dim=-1)
            arrays["final/topk_logprobs"] = (values - log_z[..., None]).cpu().numpy()
            arrays["final/topk_ids"] = ids.to(torch.int32).cpu().numpy()
            arrays["final/logsumexp"] = log_z.cpu().numpy()
    return BatchActivations(arrays)


def check_numerics(arrays: dict[str, np.ndarray], dtype: StoreDtype, first_sequence: int) -> None:
    """Reject NaN, inf, or values the storage dtype cannot hold, naming where they are.

    Raises:
        NumericsError: with the array, head (for ``z``) and sequence index of the first bad value.
    """
    for path, data in arrays.items():
        if data.dtype.kind != "f":
            continue
        limit = dtype.max_finite if path.startswith("layers/") else 65504.0 if path in (
            "final/normalized", "final/logits") else np.inf
        bad = ~np.isfinite(data) | (np.abs(data) > limit)
        if not bad.any():
            continue
        index = np.unravel_index(int(np.argmax(bad)), data.shape)
        value = data[index]
        where = f"{path}, sequence {first_sequence + int(index[0])}, position {int(index[1])}"
        if path.startswith("layers/"):
            layer = path.split("/")[1]
            where = f"layer {layer}, head {int(index[2])}, sequence {first_sequence + int(index[0])}, position {int(index[1])}"
        if np.isfinite(value) and path.startswith("layers/"):
            raise NumericsError(f"value {value:.4g} in {where} overflows {dtype.value}; rerun with --dtype float32 "
                                "(or bfloat16)")
        if np.isfinite(value):
            # final/normalized and final/logits are stored as float16 whatever --dtype is.
            raise NumericsError(f"value {value:.4g} in {where} overflows float16; rerun with --logits topk, which "
                                "keeps the final distribution in float32")
        raise NumericsError(f"{value} in {where}: the model produced non-finite activations; check the model "
                            "weights, or rerun with --dtype float32")


def to_storage(arrays: dict[str, np.ndarray], dtype: StoreDtype) -> dict[str, np.ndarray]:
    """Cast float32 arrays to their stored dtypes; bfloat16 becomes its uint16 bit pattern (round to nearest even)."""
    stored: dict[str, np.ndarray] = {}
    for path, data in arrays.items():
        if path.startswith("layers/"):
            if dtype is StoreDtype.BFLOAT16:
                stored[path] = torch.from_numpy(data).to(torch.bfloat16).view(torch.uint16).numpy()
            else:
                stored[path] = data.astype(dtype.numpy_dtype)
        elif path in ("final/normalized", "final/logits"):
            stored[path] = data.astype(np.float16)
        else:
            stored[path] = data
    return stored


def shard_blocks(n_blocks: int, num_shards: int, shard_index: int) -> range:
    """Return the blocks that shard ``shard_index`` of ``num_shards`` writes.

    Each shard owns one contiguous range of whole blocks (so of whole Zarr shards), and the range
    sizes differ by at most one block. Shards beyond the block count own nothing.
    """
    return range(n_blocks * shard_index // num_shards, n_blocks * (shard_index + 1) // num_shards)


def run(config: ExtractConfig) -> ExtractionResult:
    """Extract activations with the settings in ``config`` and return a summary of the run."""
    torch.manual_seed(config.seed)
    source = parse_model_source(config.model, config.revision)
    text_source = parse_text_source(config.dataset, config.split, config.text_column)
    config.check_output_path()
    parse_layers(config.layers, None)  # the syntax now; the range once the model is loaded
    documents = iter_documents(text_source, config.seed)
    # Local files are read (and their text column checked) here, before the model's slow load.
    first_document = next(documents, None)
    documents = itertools.chain([] if first_document is None else [first_document], documents)

    model = load_model(source, config.device)
    layers = parse_layers(config.layers, model.n_layers)
    if config.context > model.max_context:
        raise BadInputError(f"--context {config.context} is longer than model {source.name!r} supports "
                            f"({model.max_context} positions); lower --context")
    if config.logits is LogitsMode.TOPK and not 0 < config.top_k <= model.d_vocab:
        raise BadInputError(f"--top-k {config.top_k} must be between 1 and the vocabulary size {model.d_vocab}")

    try:
        tokens = pack_documents(model.tokenizer, documents, config.context, config.tokens)
    except DatasetError as error:
        raise DatasetError(f"dataset {config.dataset!r}: {error}") from None
    layout = StoreLayout.plan(
        n_sequences=len(tokens), context=config.context, n_heads=model.n_heads, d_head=model.d_head,
        d_model=model.d_model, d_vocab=model.d_vocab, layers=layers, dtype=config.dtype, logits=config.logits,
        top_k=config.top_k if config.logits is LogitsMode.TOPK else 0,
    )
    if config.chunk_sequences or config.chunks_per_shard:
        layout = StoreLayout(**{**layout.__dict__, "seqs_per_chunk": config.chunk_sequences or layout.seqs_per_chunk,
                                "chunks_per_shard": config.chunks_per_shard or layout.chunks_per_shard})
    val_start, n_val = validation_split(len(tokens))
    norm_record, _ = model.final_norm()
    meta = {
        "format_version": FORMAT_VERSION,
        "tool_version": version("headlens"),
        "model": model.model_record(),
        "tokenizer": model.tokenizer_record(),
        "dataset": text_source.record(),
        "context": config.context,
        "dtype": config.dtype.value,
        "layers": list(layers),
        "logits": {"mode": config.logits.value, "top_k": layout.top_k},
        "final_norm": norm_record,
        "logit_softcap": model.logit_softcap,
        "split": {"rule": "last sequences held out", "val_start": val_start, "n_val": n_val},
        "seed": config.seed,
        "compressor": config.compressor.value,
        "layout": layout.to_dict(),
        "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
    }
    prepared = prepare_store(config.out, meta, tokens, model.params(layers), config.compressor, config.overwrite,
                             shard_index=config.shard_index, num_shards=config.num_shards)
    store = prepared.store
    logger.info("extracting layers %s of %s: %d sequences x %d tokens, %d bytes per token before compression",
                ",".join(map(str, layers)), source.name, layout.n_sequences, layout.context, layout.bytes_per_token)

    owned = shard_blocks(layout.n_blocks, config.num_shards, config.shard_index)
    pending_blocks = [block for block in prepared.pending_blocks if block in owned]
    if config.num_shards > 1:
        logger.info("shard %d of %d writes blocks %d-%d of %d (%d still pending)", config.shard_index,
                    config.num_shards, owned.start, owned.stop - 1, layout.n_blocks, len(pending_blocks))
        if not owned:
            logger.warning("shard %d of %d owns no blocks: the store has only %d; use at most %d shards",
                           config.shard_index, config.num_shards, layout.n_blocks, layout.n_blocks)
    owned_tokens = sum(end - start for start, end in map(layout.block_range, owned)) * layout.context
    pending_tokens = sum(end - start for start, end in map(layout.block_range, pending_blocks)) * layout.context
    writer = BlockWriter(store, lock=prepared.lock)
    started = time.perf_counter()
    progress = tqdm(total=owned_tokens, initial=owned_tokens - pending_tokens, unit="tok", unit_scale=True,
                    desc="extract", disable=not config.progress)
    try:
        for block in pending_blocks:
            start, end = layout.block_range(block)
            parts: list[dict[str, np.ndarray]] = []
            for batch_start in range(start, end, config.batch_size):
                batch_end = min(batch_start + config.batch_size, end)
                batch = torch.from_numpy(tokens[batch_start:batch_end]).long().to(config.device)
                activations = run_batch(model, batch, layers, config.logits, layout.top_k).arrays
                check_numerics(activations, config.dtype, batch_start)
                parts.append(to_storage(activations, config.dtype))
                progress.update(batch.numel())
            writer.submit(block, {path: np.concatenate([part[path] for part in parts]) for path in parts[0]})
    finally:
        progress.close()
        writer.close()
    seconds = time.perf_counter() - started
    result = ExtractionResult(config.out, layout.n_sequences, pending_tokens, seconds, prepared.resumed,
                              n_written=store.n_written, complete=store.complete)
    logger.info("wrote %d tokens to %s in %.1f s (%.0f tokens/s)", pending_tokens, config.out, seconds,
                result.tokens_per_second)
    return result
