"""The store format: writing and reopening stores, layout planning, and the position reader."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
import zarr

from lensio.errors import BadInputError, StoreFormatError, StoreMismatchError, StoreNotFoundError
from lensio.reader import LayerBatches
from lensio.schema import (
    ATTRS_KEY,
    FORMAT_VERSION,
    Compressor,
    LogitsMode,
    StoreDtype,
    StoreLayout,
    validation_split,
    z_path,
)
from lensio.store import decode_activations, open_store
from lensio.writer import prepare_store, write_block
from tests.helpers_pipeline import CHUNK_SEQUENCES, CONTEXT, extract_store

# A synthetic store: 10 sequences in chunks of 2 and shards of 2 chunks, so blocks [0,4), [4,8), [8,10).
N_SEQ, SYN_CONTEXT, N_HEADS, D_HEAD, D_MODEL, D_VOCAB = 10, 4, 2, 3, 5, 7
LAYERS = (0, 2)
VAL_START = 8


def synthetic_layout(dtype: StoreDtype) -> StoreLayout:
    return StoreLayout(n_sequences=N_SEQ, context=SYN_CONTEXT, n_heads=N_HEADS, d_head=D_HEAD, d_model=D_MODEL,
                       d_vocab=D_VOCAB, layers=LAYERS, dtype=dtype, logits=LogitsMode.FACTORED, top_k=0,
                       seqs_per_chunk=2, chunks_per_shard=2)


def synthetic_meta(layout: StoreLayout) -> dict:
    return {
        "format_version": FORMAT_VERSION, "model": {"name": "synthetic", "n_layers": 3}, "seed": 7,
        "layout": layout.to_dict(), "final_norm": {"kind": "layernorm", "eps": 1e-5},
        "split": {"rule": "last sequences held out", "val_start": VAL_START, "n_val": N_SEQ - VAL_START},
    }


def synthetic_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    params = {f"W_O/{layer}": rng.standard_normal((N_HEADS, D_HEAD, D_MODEL)) for layer in LAYERS}
    params.update({f"b_O/{layer}": rng.standard_normal(D_MODEL) for layer in LAYERS})
    params["W_U"] = rng.standard_normal((D_MODEL, D_VOCAB))
    params["b_U"] = rng.standard_normal(D_VOCAB)
    return params


def encode(values: np.ndarray, dtype: StoreDtype) -> np.ndarray:
    """Values as the store keeps them: bfloat16 as its uint16 bit pattern."""
    if dtype is StoreDtype.BFLOAT16:
        return torch.from_numpy(values).to(torch.bfloat16).view(torch.uint16).numpy()
    return values.astype(dtype.numpy_dtype)


def synthetic_data() -> dict[str, np.ndarray]:
    """Float32 values of every sequence-indexed array except tokens."""
    rng = np.random.default_rng(2)
    data = {z_path(layer): rng.standard_normal((N_SEQ, SYN_CONTEXT, N_HEADS, D_HEAD)).astype(np.float32)
            for layer in LAYERS}
    data["final/scale"] = rng.uniform(0.5, 2.0, (N_SEQ, SYN_CONTEXT)).astype(np.float32)
    data["final/normalized"] = rng.standard_normal((N_SEQ, SYN_CONTEXT, D_MODEL)).astype(np.float32)
    return data


def synthetic_tokens() -> np.ndarray:
    return np.arange(N_SEQ * SYN_CONTEXT, dtype=np.int32).reshape(N_SEQ, SYN_CONTEXT) % D_VOCAB


def block_arrays(layout: StoreLayout, data: dict[str, np.ndarray], block: int) -> dict[str, np.ndarray]:
    start, end = layout.block_range(block)
    stored = {}
    for path, values in data.items():
        if path.startswith("layers/"):
            stored[path] = encode(values[start:end], layout.dtype)
        elif path == "final/normalized":
            stored[path] = values[start:end].astype(np.float16)
        else:
            stored[path] = values[start:end]
    return stored


def create_synthetic(url: str, dtype: StoreDtype, blocks: tuple[int, ...] = (0, 1, 2)) -> StoreLayout:
    layout = synthetic_layout(dtype)
    prepared = prepare_store(url, synthetic_meta(layout), synthetic_tokens(), synthetic_params(), Compressor.NONE,
                             overwrite=False)
    data = synthetic_data()
    try:
        for block in blocks:
            write_block(prepared.store, block, block_arrays(layout, data, block))
    finally:
        prepared.lock.release()
    return layout


# --- writing and reopening -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(StoreDtype))
def test_store_round_trip_arrays(tmp_path, dtype):
    url = str(tmp_path / "s.zarr")
    create_synthetic(url, dtype)
    store = open_store(url)
    data = synthetic_data()

    assert np.array_equal(store.group["tokens"][:], synthetic_tokens())
    for layer in LAYERS:
        expected = encode(data[z_path(layer)], dtype)
        assert np.array_equal(store.z(layer)[:], expected)
    assert np.array_equal(store.group["final/scale"][:], data["final/scale"])
    assert np.array_equal(store.group["final/normalized"][:], data["final/normalized"].astype(np.float16))


@pytest.mark.parametrize("dtype", list(StoreDtype))
def test_store_array_dtypes_and_chunks(tmp_path, dtype):
    url = str(tmp_path / "s.zarr")
    create_synthetic(url, dtype)
    group = open_store(url).group

    assert group["tokens"].dtype == np.int32
    assert group[z_path(0)].dtype == dtype.numpy_dtype
    assert group["final/scale"].dtype == np.float32
    assert group["final/normalized"].dtype == np.float16
    assert group[z_path(2)].shape == (N_SEQ, SYN_CONTEXT, N_HEADS, D_HEAD)
    assert group[z_path(2)].chunks == (2, SYN_CONTEXT, N_HEADS, D_HEAD)
    assert group[z_path(2)].shards == (4, SYN_CONTEXT, N_HEADS, D_HEAD)
    assert group["final/normalized"].chunks == (2, SYN_CONTEXT, D_MODEL)


def test_store_uint16_holds_bfloat16(tmp_path):
    url = str(tmp_path / "s.zarr")
    create_synthetic(url, StoreDtype.BFLOAT16)
    store = open_store(url)

    assert store.z(0).dtype == np.uint16
    assert store.layout.dtype is StoreDtype.BFLOAT16
    assert store.meta["layout"]["dtype"] == "bfloat16"


def test_store_attributes_and_layout(tmp_path):
    url = str(tmp_path / "s.zarr")
    layout = create_synthetic(url, StoreDtype.FLOAT16)
    store = open_store(url)

    assert store.meta == synthetic_meta(layout)
    assert store.layout == layout
    assert store.layers == LAYERS


def test_store_params_round_trip(tmp_path):
    url = str(tmp_path / "s.zarr")
    create_synthetic(url, StoreDtype.FLOAT16)
    params = open_store(url).params
    expected = synthetic_params()

    assert sorted(params) == sorted(expected)
    for name, value in expected.items():
        assert params[name].dtype == torch.float32
        assert torch.equal(params[name], torch.from_numpy(value.astype(np.float32)))


def test_store_progress_partial(tmp_path):
    url = str(tmp_path / "s.zarr")
    create_synthetic(url, StoreDtype.FLOAT16, blocks=(0, 2))
    store = open_store(url)

    assert store.blocks_done.tolist() == [True, False, True]
    assert store.n_written == 4 + 2
    assert store.complete is False


def test_store_progress_complete(tmp_path):
    url = str(tmp_path / "s.zarr")
    create_synthetic(url, StoreDtype.FLOAT16)
    store = open_store(url)

    assert store.blocks_done.tolist() == [True, True, True]
    assert store.n_written == N_SEQ
    assert store.complete is True


def test_store_validation_split_ranges(tmp_path):
    url = str(tmp_path / "s.zarr")
    create_synthetic(url, StoreDtype.FLOAT16)
    store = open_store(url)

    assert store.train_range == (0, VAL_START)
    assert store.val_range == (VAL_START, N_SEQ)


@pytest.mark.parametrize(("n_sequences", "expected"), [
    (0, (0, 0)), (1, (1, 0)), (2, (1, 1)), (10, (9, 1)), (40, (38, 2)), (100, (95, 5)), (1000, (950, 50)),
])
def test_validation_split_sizes(n_sequences, expected):
    assert validation_split(n_sequences) == expected


@pytest.mark.parametrize("dtype", list(StoreDtype))
def test_read_activations_decodes_to_float32(tmp_path, dtype):
    url = str(tmp_path / "s.zarr")
    create_synthetic(url, dtype)
    store = open_store(url)
    values = synthetic_data()[z_path(2)]
    expected = torch.from_numpy(values).to({StoreDtype.FLOAT16: torch.float16, StoreDtype.BFLOAT16: torch.bfloat16,
                                            StoreDtype.FLOAT32: torch.float32}[dtype]).float().numpy()

    decoded = store.read_activations(z_path(2), 3, 7)

    assert decoded.dtype == np.float32
    assert np.array_equal(decoded, expected[3:7])


def test_decode_bfloat16_known_values():
    # Exactly representable in bfloat16 (8 significant bits), so decoding must give them back exactly.
    values = np.array([0.0, -0.0, 1.0, -2.25, 3.140625, 13 / 8192, 65536.0, -(2.0**127), np.inf, -np.inf],
                      dtype=np.float32)
    bits = torch.from_numpy(values).to(torch.bfloat16).view(torch.uint16).numpy()

    decoded = decode_activations(bits, StoreDtype.BFLOAT16)

    assert decoded.dtype == np.float32
    assert np.array_equal(decoded, values)
    assert np.signbit(decoded[1])


def test_decode_bfloat16_matches_torch():
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100
    bf16 = torch.from_numpy(values).to(torch.bfloat16)

    decoded = decode_activations(bf16.view(torch.uint16).numpy(), StoreDtype.BFLOAT16)

    assert np.array_equal(decoded, bf16.float().numpy())


def test_decode_bfloat16_hand_bits():
    # 0x3F80 is 1.0, 0xC000 is -2.0, 0x4049 is 3.140625, 0x7FC0 is a quiet NaN.
    bits = np.array([0x3F80, 0xC000, 0x4049, 0x7FC0], dtype=np.uint16)

    decoded = decode_activations(bits, StoreDtype.BFLOAT16)

    assert decoded[:3].tolist() == [1.0, -2.0, 3.140625]
    assert np.isnan(decoded[3])


def test_decode_float16_passes_values():
    raw = np.array([1.5, -0.25, 65504.0], dtype=np.float16)

    decoded = decode_activations(raw, StoreDtype.FLOAT16)

    assert decoded.dtype == np.float32
    assert decoded.tolist() == [1.5, -0.25, 65504.0]


# --- rejecting what is not a store of this version ---------------------------------------------------


def test_open_store_missing_path(tmp_path):
    with pytest.raises(StoreNotFoundError) as caught:
        open_store(str(tmp_path / "absent.zarr"))

    assert "absent.zarr" in caught.value.message


def test_open_store_folder_of_other_files(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a store\n")

    with pytest.raises(StoreFormatError) as caught:
        open_store(str(folder))

    assert "notes" in caught.value.message


def test_open_store_plain_zarr_group(tmp_path):
    url = str(tmp_path / "plain.zarr")
    zarr.open_group(url, mode="w")

    with pytest.raises(StoreFormatError) as caught:
        open_store(url)

    assert "not a headlens store" in caught.value.message


def test_open_store_zarr_array(tmp_path):
    url = str(tmp_path / "array.zarr")
    zarr.create_array(url, shape=(2,), dtype="int32")

    with pytest.raises(StoreFormatError):
        open_store(url)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_open_store_other_format_version(tmp_path, version):
    url = str(tmp_path / "s.zarr")
    layout = create_synthetic(url, StoreDtype.FLOAT16)
    group = zarr.open_group(url, mode="r+")
    group.attrs[ATTRS_KEY] = {**synthetic_meta(layout), "format_version": version}

    with pytest.raises(StoreFormatError) as caught:
        open_store(url)

    assert repr(version) in caught.value.message


def test_prepare_store_keeps_folder_of_other_files(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("keep me\n")
    layout = synthetic_layout(StoreDtype.FLOAT16)

    with pytest.raises(StoreFormatError):
        prepare_store(str(folder), synthetic_meta(layout), synthetic_tokens(), synthetic_params(), Compressor.NONE,
                      overwrite=False)

    assert (folder / "readme.txt").read_text() == "keep me\n"


def test_prepare_store_resumes_pending_blocks(tmp_path):
    url = str(tmp_path / "s.zarr")
    layout = create_synthetic(url, StoreDtype.FLOAT16, blocks=(1,))

    prepared = prepare_store(url, synthetic_meta(layout), synthetic_tokens(), synthetic_params(), Compressor.NONE,
                             overwrite=False)
    prepared.lock.release()

    assert prepared.resumed is True
    assert prepared.pending_blocks == [0, 2]


def test_prepare_store_rejects_other_run(tmp_path):
    url = str(tmp_path / "s.zarr")
    layout = create_synthetic(url, StoreDtype.FLOAT16, blocks=(0,))
    other = {**synthetic_meta(layout), "seed": 8}

    with pytest.raises(StoreMismatchError) as caught:
        prepare_store(url, other, synthetic_tokens(), synthetic_params(), Compressor.NONE, overwrite=False)

    assert "seed" in caught.value.message


def test_write_block_rejects_wrong_length(tmp_path):
    url = str(tmp_path / "s.zarr")
    layout = synthetic_layout(StoreDtype.FLOAT16)
    prepared = prepare_store(url, synthetic_meta(layout), synthetic_tokens(), synthetic_params(), Compressor.NONE,
                             overwrite=False)
    arrays = block_arrays(layout, synthetic_data(), 0)
    arrays["final/scale"] = arrays["final/scale"][:3]

    with pytest.raises(ValueError, match="final/scale"):
        write_block(prepared.store, 0, arrays)
    prepared.lock.release()

    assert open_store(url).blocks_done.tolist() == [False, False, False]


# --- layout planning -------------------------------------------------------------------------------


def test_layout_plan_gpt2_small_sizes():
    # GPT-2 small, 12 stored layers, fp16: z is 128 * 12 * 64 * 2 = 196608 bytes per sequence, so 5
    # sequences fit in 1 MiB. 1000 sequences need 200 chunks, so shards get the maximum of 16 chunks.
    layout = StoreLayout.plan(n_sequences=1000, context=128, n_heads=12, d_head=64, d_model=768, d_vocab=50257,
                              layers=tuple(range(12)), dtype=StoreDtype.FLOAT16, logits=LogitsMode.FACTORED)

    assert layout.seqs_per_chunk == 5
    assert layout.chunks_per_shard == 16
    assert layout.seqs_per_shard == 80
    assert layout.n_blocks == 13  # ceil(1000 / 80)
    assert layout.block_range(12) == (960, 1000)
    assert layout.n_tokens == 128_000
    # 4 (token) + 12 * 12 * 64 * 2 (z) + 768 * 2 + 4 (normalized and scale)
    assert layout.bytes_per_token == 4 + 18432 + 1540
    assert layout.total_bytes == 19976 * 128_000


def test_layout_plan_float32_halves_chunk():
    layout = StoreLayout.plan(n_sequences=1000, context=128, n_heads=12, d_head=64, d_model=768, d_vocab=50257,
                              layers=(0,), dtype=StoreDtype.FLOAT32, logits=LogitsMode.FACTORED)

    assert layout.seqs_per_chunk == 2  # 1 MiB // 393216 bytes per sequence


def test_layout_plan_small_store_is_one_chunk():
    layout = StoreLayout.plan(n_sequences=3, context=16, n_heads=4, d_head=8, d_model=32, d_vocab=512,
                              layers=(0, 1), dtype=StoreDtype.FLOAT16, logits=LogitsMode.FACTORED)

    assert layout.seqs_per_chunk == 3
    assert layout.chunks_per_shard == 1
    assert layout.n_blocks == 1
    assert layout.block_range(0) == (0, 3)


def test_layout_plan_huge_sequence_gets_own_chunk():
    # One sequence of z is 4096 * 32 * 128 * 2 = 32 MiB, more than a chunk's target.
    layout = StoreLayout.plan(n_sequences=20, context=4096, n_heads=32, d_head=128, d_model=4096, d_vocab=32000,
                              layers=(0,), dtype=StoreDtype.BFLOAT16, logits=LogitsMode.FACTORED)

    assert layout.seqs_per_chunk == 1
    assert layout.chunks_per_shard == 16
    assert layout.n_blocks == 2


@pytest.mark.parametrize(("logits", "top_k", "final_bytes"), [
    (LogitsMode.FACTORED, 0, 32 * 2 + 4),
    (LogitsMode.FULL, 0, 512 * 2 + 4),
    (LogitsMode.TOPK, 8, 8 * 8 + 4 + 4),
])
def test_layout_final_bytes_per_token(logits, top_k, final_bytes):
    layout = StoreLayout.plan(n_sequences=10, context=16, n_heads=4, d_head=8, d_model=32, d_vocab=512,
                              layers=(0,), dtype=StoreDtype.FLOAT16, logits=logits, top_k=top_k)

    assert layout.final_bytes_per_token == final_bytes


def test_layout_dict_round_trip():
    layout = synthetic_layout(StoreDtype.BFLOAT16)

    assert StoreLayout.from_dict(layout.to_dict()) == layout


# --- the position reader ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reader_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> str:
    """A real 40-sequence GPT-2 store in 10 chunks of 4 sequences (5 blocks)."""
    return extract_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir)


def positions_of(batches) -> list[tuple[int, int]]:
    pairs = []
    for batch in batches:
        pairs.extend(zip(batch.sequence.tolist(), batch.position.tolist()))
    return pairs


def all_positions(start: int, end: int, context: int = CONTEXT) -> list[tuple[int, int]]:
    return [(seq, pos) for seq in range(start, end) for pos in range(context)]


def test_reader_store_has_several_chunks(reader_store):
    store = open_store(reader_store)

    assert store.layout.seqs_per_chunk == CHUNK_SEQUENCES
    assert store.layout.n_sequences == 40
    assert store.train_range == (0, 38)


@pytest.mark.parametrize("sequences", [(0, 38), (5, 23), (38, 40)])
def test_reader_epoch_visits_each_position_once(reader_store, sequences):
    dataset = LayerBatches(reader_store, 1, sequences, batch_tokens=24, shuffle=True, seed=3, shuffle_chunks=2)

    pairs = positions_of(dataset)

    assert len(pairs) == len(all_positions(*sequences))
    assert sorted(pairs) == all_positions(*sequences)
    assert len(pairs) == dataset.tokens_per_epoch()


def test_reader_shuffle_mixes_chunks(reader_store):
    dataset = LayerBatches(reader_store, 0, (0, 38), batch_tokens=64, shuffle=True, seed=0)

    pairs = positions_of(dataset)

    assert pairs != sorted(pairs)
    first_batch_sequences = {seq for seq, _ in pairs[:64]}
    assert len(first_batch_sequences) > 4  # more than one chunk's sequences


def test_reader_epochs_differ(reader_store):
    dataset = LayerBatches(reader_store, 0, (0, 38), batch_tokens=32, shuffle=True, seed=0)

    first = positions_of(dataset)
    second = positions_of(dataset)

    assert first != second
    assert sorted(first) == sorted(second)


def test_reader_set_epoch_changes_order(reader_store):
    epoch0 = LayerBatches(reader_store, 0, (0, 38), batch_tokens=32, shuffle=True, seed=0)
    epoch1 = LayerBatches(reader_store, 0, (0, 38), batch_tokens=32, shuffle=True, seed=0)
    epoch1.set_epoch(1)

    assert positions_of(epoch0) != positions_of(epoch1)


def test_reader_same_seed_same_order(reader_store):
    first = LayerBatches(reader_store, 0, (0, 38), batch_tokens=32, shuffle=True, seed=5)
    second = LayerBatches(reader_store, 0, (0, 38), batch_tokens=32, shuffle=True, seed=5)

    assert positions_of(first) == positions_of(second)


def test_reader_unshuffled_is_in_order(reader_store):
    dataset = LayerBatches(reader_store, 0, (5, 23), batch_tokens=32, shuffle=False)

    assert positions_of(dataset) == all_positions(5, 23)


@pytest.mark.parametrize(("batch_tokens", "shuffle"), [(24, True), (24, False), (64, True), (608, True), (1000, True)])
def test_reader_batch_sizes(reader_store, batch_tokens, shuffle):
    dataset = LayerBatches(reader_store, 0, (0, 38), batch_tokens=batch_tokens, shuffle=shuffle, shuffle_chunks=3)
    total = 38 * CONTEXT

    sizes = [len(batch) for batch in dataset]

    assert sum(sizes) == total
    assert all(size == batch_tokens for size in sizes[:-1])
    assert sizes[-1] == (total % batch_tokens or batch_tokens)


def test_reader_rows_match_store(reader_store):
    store = open_store(reader_store)
    z = store.read_activations(z_path(1), 0, 40)
    scale = store.group["final/scale"][:]
    normalized = store.group["final/normalized"][:]
    tokens = store.group["tokens"][:]
    dataset = LayerBatches(reader_store, 1, (0, 38), batch_tokens=50, shuffle=True, seed=1)

    batch = next(iter(dataset))
    seq, pos = batch.sequence.numpy(), batch.position.numpy()

    assert batch.z.dtype == torch.float32
    assert batch.z.shape == (50, 4, 8)
    assert np.array_equal(batch.z.numpy(), z[seq, pos])
    assert np.array_equal(batch.scale.numpy(), scale[seq, pos])
    assert np.array_equal(batch.tokens.numpy(), tokens[seq, pos])
    assert np.array_equal(batch.target["normalized"].numpy(), normalized[seq, pos])


@pytest.mark.parametrize("world_size", [2, 3])
def test_reader_ranks_disjoint_and_cover(reader_store, world_size):
    shares = [positions_of(LayerBatches(reader_store, 0, (0, 38), batch_tokens=32, shuffle=True, seed=2, rank=rank,
                                        world_size=world_size)) for rank in range(world_size)]
    counts = Counter(pair for share in shares for pair in share)

    assert all(len(share) > 0 for share in shares)
    assert max(counts.values()) == 1
    assert sorted(counts) == all_positions(0, 38)


@pytest.mark.parametrize(("max_tokens", "batch_tokens"), [(100, 32), (96, 32), (5, 32), (608, 32), (5000, 32)])
def test_reader_max_tokens(reader_store, max_tokens, batch_tokens):
    dataset = LayerBatches(reader_store, 0, (0, 38), batch_tokens=batch_tokens, shuffle=True, max_tokens=max_tokens)
    expected = min(max_tokens, 38 * CONTEXT)

    pairs = positions_of(dataset)

    assert len(pairs) == expected
    assert len(set(pairs)) == expected
    assert dataset.tokens_per_epoch() == expected


def test_reader_max_tokens_split_over_ranks(reader_store):
    shares = [positions_of(LayerBatches(reader_store, 0, (0, 38), batch_tokens=16, shuffle=True, max_tokens=100,
                                        rank=rank, world_size=2)) for rank in range(2)]

    assert [len(share) for share in shares] == [50, 50]
    assert not set(shares[0]) & set(shares[1])


@pytest.mark.parametrize("shuffle", [True, False])
def test_reader_last_position_only(reader_store, shuffle):
    store = open_store(reader_store)
    normalized = store.group["final/normalized"][:]
    dataset = LayerBatches(reader_store, 0, (0, 38), batch_tokens=8, shuffle=shuffle, last_position_only=True)

    batches = list(dataset)
    pairs = positions_of(batches)

    assert sorted(pairs) == [(seq, CONTEXT - 1) for seq in range(38)]
    assert dataset.tokens_per_epoch() == 38
    assert np.array_equal(batches[0].target["normalized"].numpy(),
                          normalized[batches[0].sequence.numpy(), CONTEXT - 1])


def test_reader_chunk_ranges_clip_to_range(reader_store):
    dataset = LayerBatches(reader_store, 0, (5, 23), batch_tokens=8)

    assert dataset.chunk_ranges() == [(5, 8), (8, 12), (12, 16), (16, 20), (20, 23)]


def test_reader_rejects_layer_not_in_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir):
    url = extract_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir, layers="1")
    dataset = LayerBatches(url, 0, (0, 38), batch_tokens=8)

    with pytest.raises(BadInputError) as caught:
        next(iter(dataset))

    assert "layer 0 is not in store" in caught.value.message


def test_reader_epoch_count_matches_ceil(reader_store):
    dataset = LayerBatches(reader_store, 0, (0, 38), batch_tokens=100, shuffle=True)

    assert len(list(dataset)) == math.ceil(38 * CONTEXT / 100)
