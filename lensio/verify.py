"""Checking a store: metadata against arrays, progress against data, values, and optionally the model.

``verify_store`` returns every problem it finds as one line of text; an empty list means the store is
complete and consistent. It never writes to the store.
"""

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from lensio.errors import BadInputError
from lensio.schema import StoreDtype, StoreLayout
from lensio.store import Store, decode_activations, open_store, sequence_arrays

logger = logging.getLogger(__name__)

# Recomputed activations may differ from stored ones by float rounding. Another batch composition
# changes float32 sums in the last bits, so a value near a float16 rounding boundary can round to the
# neighbouring float16 (a relative step of 2**-10, or 2**-7 for bfloat16). These bounds allow a few
# such steps and still catch another model, other weights or corrupted data.
RELATIVE_TOLERANCE = {StoreDtype.FLOAT16: 1e-2, StoreDtype.BFLOAT16: 3e-2, StoreDtype.FLOAT32: 1e-4}
# Absolute slack, as a fraction of the largest magnitude in the compared array, for values near zero.
SCALE_TOLERANCE = 1e-3
# Share of top-k token ids that may differ from a recomputation, because of near-ties in the logits.
TOPK_ID_MISMATCH_LIMIT = 0.01


@dataclass
class VerifyReport:
    """The outcome of ``verify_store``: one line per problem, and what was checked."""

    url: str
    problems: list[str] = field(default_factory=list)
    n_sequences: int = 0
    n_written: int = 0
    arrays_checked: int = 0
    sequences_recomputed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(url: str, model: str | None = None, sample: int = 4, seed: int = 0,
                 device: str = "cpu") -> VerifyReport:
    """Check the store at ``url``; with ``model``, also recompute ``sample`` written sequences with it.

    Raises:
        StoreNotFoundError, StoreFormatError: ``url`` contains no headlens store of this format version.
        BadInputError: ``sample`` is not positive.
        ModelLoadError: ``model`` cannot be loaded.
    """
    if sample <= 0:
        raise BadInputError(f"--sample must be positive, got {sample}")
    store = open_store(url)
    report = VerifyReport(url=url)
    try:
        layout = store.layout
    except (KeyError, TypeError, ValueError) as error:
        report.problems.append(f"attribute layout is invalid ({type(error).__name__}: {error}); re-extract the store")
        return report
    report.n_sequences = layout.n_sequences

    report.problems += check_metadata(store, layout)
    structure = check_arrays(store, layout)
    report.problems += structure
    report.arrays_checked = len(sequence_arrays(layout))
    if structure:
        return report  # values cannot be read against a layout the arrays do not have

    done = np.asarray(store.group["progress/done"][:]).astype(bool)
    report.n_written = sum(end - start for start, end in map(layout.block_range, np.flatnonzero(done)))
    report.problems += check_progress(store, layout, done)
    report.problems += check_values(store, layout, done)
    if model is not None:
        problems, recomputed = check_against_model(store, layout, done, model, sample, seed, device)
        report.problems += problems
        report.sequences_recomputed = recomputed
    return report


def check_metadata(store: Store, layout: StoreLayout) -> list[str]:
    """Compare the group attributes with each other and the tokens with their recorded hash."""
    meta = store.meta
    problems = []
    expected = {
        "layers": list(layout.layers), "context": layout.context, "dtype": layout.dtype.value,
        "logits.mode": layout.logits.value, "model.n_heads": layout.n_heads, "model.d_head": layout.d_head,
        "model.d_model": layout.d_model, "model.d_vocab": layout.d_vocab,
    }
    for key, value in expected.items():
        recorded = _lookup(meta, key)
        if recorded != value:
            problems.append(f"attribute {key} is {recorded!r}, but the layout says {value!r}; re-extract the store")
    n_layers = _lookup(meta, "model.n_layers")
    if isinstance(n_layers, int) and any(layer >= n_layers for layer in layout.layers):
        problems.append(f"layout.layers {list(layout.layers)} names a layer outside the model's {n_layers} layers; "
                        "re-extract the store")
    val_start = _lookup(meta, "split.val_start")
    if not isinstance(val_start, int) or not 0 <= val_start <= layout.n_sequences:
        problems.append(f"attribute split.val_start is {val_start!r}, outside 0-{layout.n_sequences}; "
                        "re-extract the store")
    if "tokens" in store.group:
        tokens = np.asarray(store.group["tokens"][:])
        if tokens.dtype == np.int32 and hashlib.sha256(tokens.tobytes()).hexdigest() != meta.get("tokens_sha256"):
            problems.append("array tokens does not match attribute tokens_sha256; the token ids were changed after "
                            "extraction, so re-extract the store")
    return problems


def _lookup(meta: dict[str, Any], dotted: str) -> Any:
    value: Any = meta
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def expected_params(layout: StoreLayout) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter array, by path below ``params/``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in layout.layers:
        shapes[f"W_O/{layer}"] = (layout.n_heads, layout.d_head, layout.d_model)
        shapes[f"b_O/{layer}"] = (layout.d_model,)
    shapes["W_U"] = (layout.d_model, layout.d_vocab)
    shapes["b_U"] = (layout.d_vocab,)
    shapes["final_norm/weight"] = (layout.d_model,)
    shapes["final_norm/bias"] = (layout.d_model,)
    return shapes


def check_arrays(store: Store, layout: StoreLayout) -> list[str]:
    """Check that every array the layout implies exists with its shape, dtype and chunking."""
    problems = []
    group = store.group
    expected = {path: (shape, dtype) for path, (shape, dtype) in sequence_arrays(layout).items()}
    expected.update({f"params/{path}": (shape, np.dtype("float32")) for path, shape in expected_params(layout).items()})
    expected["progress/done"] = ((layout.n_blocks,), np.dtype("uint8"))
    for path, (shape, dtype) in expected.items():
        try:
            array = group[path]
        except KeyError:
            problems.append(f"array {path} is missing; re-extract the store")
            continue
        if not isinstance(array, zarr.Array):
            problems.append(f"{path} is a group, expected an array; re-extract the store")
            continue
        if tuple(array.shape) != tuple(shape):
            problems.append(f"array {path} has shape {tuple(array.shape)}, expected {tuple(shape)} from the layout; "
                            "re-extract the store")
        if array.dtype != dtype:
            problems.append(f"array {path} has dtype {array.dtype}, expected {dtype}; re-extract the store")
        if path in sequence_arrays(layout):
            problems += _check_chunking(path, array, layout)
    return problems


def _check_chunking(path: str, array: zarr.Array, layout: StoreLayout) -> list[str]:
    problems = []
    if array.chunks[0] != layout.seqs_per_chunk:
        problems.append(f"array {path} has {array.chunks[0]} sequences per chunk, expected {layout.seqs_per_chunk}; "
                        "re-extract the store")
    shards = array.shards
    if shards is None or shards[0] != layout.seqs_per_shard:
        problems.append(f"array {path} has shards of {shards[0] if shards else None} sequences, expected "
                        f"{layout.seqs_per_shard}; re-extract the store")
    return problems


def _shard_exists(array: zarr.Array, block: int) -> bool:
    coords = (block,) + (0,) * (array.ndim - 1)
    key = f"{array.path}/{array.metadata.encode_chunk_key(coords)}"
    return bool(sync(array.store_path.store.exists(key)))


def check_progress(store: Store, layout: StoreLayout, done: np.ndarray) -> list[str]:
    """Check that every block marked done has data in every array, and report unwritten blocks."""
    problems = []
    raw = np.asarray(store.group["progress/done"][:])
    if not np.isin(raw, (0, 1)).all():
        problems.append(f"array progress/done holds values {sorted(set(raw.tolist()) - {0, 1})} besides 0 and 1; "
                        "re-extract the store")
    data_paths = [path for path in sequence_arrays(layout) if path != "tokens"]
    for block in np.flatnonzero(done):
        start, end = layout.block_range(int(block))
        for path in data_paths:
            if not _shard_exists(store.group[path], int(block)):
                problems.append(f"block {block} (sequences {start}-{end - 1}) is marked done, but array {path} has "
                                "no data for it; re-extract the store with --overwrite")
    missing = np.flatnonzero(~done)
    if len(missing):
        first_start = layout.block_range(int(missing[0]))[0]
        n_missing = sum(end - start for start, end in map(layout.block_range, missing))
        problems.append(f"{n_missing} of {layout.n_sequences} sequences are not written yet ({len(missing)} of "
                        f"{layout.n_blocks} blocks, the first from sequence {first_start}); rerun the same "
                        "lens-extract command to finish the store")
    return problems


def check_values(store: Store, layout: StoreLayout, done: np.ndarray) -> list[str]:
    """Scan the written blocks for NaN and inf, and the tokens for ids outside the vocabulary."""
    problems = []
    for path, (_shape, dtype) in sequence_arrays(layout).items():
        array = store.group[path]
        if dtype.kind in "iu" and not path.startswith("layers/"):  # tokens and top-k ids
            problems += _check_ids(path, array, layout)
            continue
        count, first = 0, None
        for block in np.flatnonzero(done):
            start, end = layout.block_range(int(block))
            values = np.asarray(array[start:end])
            if path.startswith("layers/"):
                values = decode_activations(values, layout.dtype)
            bad = ~np.isfinite(values)
            if bad.any():
                count += int(bad.sum())
                if first is None:
                    first = (start,) + tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
        if count:
            problems.append(f"array {path} has {count} NaN or inf values, the first at {_where(path, first)}; "
                            "re-extract the store with --dtype float32")
    return problems


def _check_ids(path: str, array: zarr.Array, layout: StoreLayout) -> list[str]:
    ids = np.asarray(array[:])
    outside = (ids < 0) | (ids >= layout.d_vocab)
    if not outside.any():
        return []
    index = np.unravel_index(int(np.argmax(outside)), ids.shape)
    return [f"array {path} has {int(outside.sum())} token ids outside the vocabulary of {layout.d_vocab}, the first "
            f"{int(ids[index])} at sequence {int(index[0])}, position {int(index[1])}; re-extract the store"]


def _where(path: str, first: tuple[int, ...]) -> str:
    """Describe an index into a sequence-indexed array: ``first`` is (block start, seq in block, pos, ...)."""
    sequence, position = first[0] + first[1], first[2]
    if path.startswith("layers/"):
        return f"layer {path.split('/')[1]}, head {first[3]}, sequence {sequence}, position {position}"
    return f"sequence {sequence}, position {position}"


def check_against_model(store: Store, layout: StoreLayout, done: np.ndarray, model: str, sample: int, seed: int,
                        device: str) -> tuple[list[str], int]:
    """Recompute ``sample`` written sequences with ``model`` and compare them with the store.

    Returns the problems and the number of sequences recomputed.
    """
    # Imported here because lensio must not depend on extract (and its model stack) to read stores.
    import torch

    from extract.loop import run_batch, to_storage
    from extract.models import load_model, parse_model_source

    loaded = load_model(parse_model_source(model), device)
    problems = _compare_model_shapes(store, loaded, model)
    if problems:
        return problems, 0

    written = np.concatenate([np.arange(*layout.block_range(int(block))) for block in np.flatnonzero(done)]
                             or [np.zeros(0, dtype=np.int64)])
    if len(written) == 0:
        return [], 0
    chosen = np.sort(np.random.default_rng(seed).choice(written, size=min(sample, len(written)), replace=False))
    tokens = torch.from_numpy(np.asarray(store.group["tokens"].get_orthogonal_selection((chosen,)))).long()
    with torch.inference_mode():
        computed = run_batch(loaded, tokens.to(device), layout.layers, layout.logits, layout.top_k).arrays
    computed = to_storage(computed, layout.dtype)
    for path, fresh in computed.items():
        stored = np.asarray(store.group[path].get_orthogonal_selection((chosen,)))
        problem = _compare(path, stored, fresh, chosen, layout)
        if problem:
            problems.append(problem)
    return problems, len(chosen)


def _compare_model_shapes(store: Store, loaded: Any, model: str) -> list[str]:
    recorded = store.meta.get("model", {})
    actual = loaded.model_record()
    for key in ("architecture", "n_layers", "n_heads", "d_model", "d_head", "d_vocab"):
        if recorded.get(key) != actual.get(key):
            return [f"--model {model!r} has {key} {actual.get(key)!r}, but the store was extracted from "
                    f"{recorded.get('name')!r} with {recorded.get(key)!r}; pass the store's model"]
    stored_w_u = np.asarray(store.group["params/W_U"][...])
    model_w_u = loaded.params(())["W_U"]
    if stored_w_u.shape != model_w_u.shape or not np.array_equal(stored_w_u, model_w_u):
        return [f"--model {model!r} has another unembedding (W_U) than the store's model {recorded.get('name')!r}; "
                "pass the model the store was extracted from"]
    return []


def _compare(path: str, stored: np.ndarray, fresh: np.ndarray, sequences: np.ndarray,
             layout: StoreLayout) -> str | None:
    """Compare one array of the sampled sequences; return a problem line, or None when they match."""
    if stored.dtype.kind in "iu" and not path.startswith("layers/"):
        mismatched = stored != fresh
        if mismatched.mean() > TOPK_ID_MISMATCH_LIMIT:
            first = int(sequences[np.argwhere(mismatched)[0][0]])
            return (f"array {path} differs from the recomputation with --model in {mismatched.mean():.1%} of entries, "
                    f"the first in sequence {first}; the store does not match this model, so re-extract it")
        return None
    dtype = layout.dtype if path.startswith("layers/") else StoreDtype.FLOAT32
    if path in ("final/normalized", "final/logits"):
        dtype = StoreDtype.FLOAT16
    stored_values = decode_activations(stored, layout.dtype) if path.startswith("layers/") else stored.astype(np.float32)
    fresh_values = decode_activations(fresh, layout.dtype) if path.startswith("layers/") else fresh.astype(np.float32)
    scale = float(np.max(np.abs(fresh_values))) if fresh_values.size else 0.0
    allowed = RELATIVE_TOLERANCE[dtype] * np.abs(fresh_values) + SCALE_TOLERANCE * scale
    excess = np.abs(stored_values - fresh_values) - allowed
    if not (excess > 0).any() and np.isfinite(stored_values).all():
        return None
    index = np.unravel_index(int(np.argmax(np.where(np.isfinite(excess), excess, np.inf))), excess.shape)
    difference = abs(float(stored_values[index]) - float(fresh_values[index]))
    where = f"sequence {int(sequences[index[0]])}, position {int(index[1])}"
    if path.startswith("layers/"):
        where = f"layer {path.split('/')[1]}, head {int(index[2])}, " + where
    return (f"array {path} differs from the recomputation with --model at {where} by {difference:.4g} (stored "
            f"{float(stored_values[index]):.4g}, recomputed {float(fresh_values[index]):.4g}); the store does not "
            "match this model, so re-extract it")


def format_summary(report: VerifyReport) -> str:
    """Describe in one line what a clean verification checked."""
    line = (f"store {report.url!r} is consistent: {report.n_written} of {report.n_sequences} sequences written, "
            f"{report.arrays_checked} arrays checked, no NaN or inf")
    if report.sequences_recomputed:
        line += f", {report.sequences_recomputed} sampled sequences match the model"
    return line

