"""Extraction: stored arrays rebuild the model's own attention output and logits, packing, and input errors."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from extract.config import ExtractConfig
from extract.loop import check_numerics, run, run_batch
from extract.packing import pack_documents
from extract.text import iter_documents, parse_text_source
from lensio.errors import BadInputError, DatasetError, ModelLoadError, NumericsError
from lensio.schema import Compressor, LogitsMode, StoreDtype, z_path
from lensio.store import open_store
from tests.helpers_pipeline import (
    CONTEXT,
    extract_store,
    plain_hf_outputs,
    reference_model,
    run_with_cache,
)

# Unit roundoff of each storage dtype: rounding to nearest changes a value by at most this fraction.
UNIT_ROUNDOFF = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# Smallest normal number of each dtype: below it rounding error is absolute, at most half the spacing.
ABSOLUTE_ROUNDOFF = {"float32": 0.0, "float16": 2.0**-25, "bfloat16": 2.0**-134}
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Slack for float32 arithmetic done in another order (summing heads, another matmul kernel).
FLOAT32_SLACK = 2e-6


def rounding_bound(reference: torch.Tensor, dtype: str) -> torch.Tensor:
    """Largest change rounding ``reference`` to ``dtype`` can make, element by element."""
    return reference.abs() * UNIT_ROUNDOFF[dtype] + ABSOLUTE_ROUNDOFF[dtype]


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def dtype_store(request, tmp_path_factory, tiny_model_dir, text_corpus_dir):
    """(dtype, store url, model dir) for every tiny model and storage dtype."""
    url = extract_store(tmp_path_factory, tiny_model_dir, text_corpus_dir, dtype=request.param)
    return request.param, url, tiny_model_dir


@pytest.fixture(scope="module")
def float32_store(tmp_path_factory, tiny_model_dir, text_corpus_dir):
    return extract_store(tmp_path_factory, tiny_model_dir, text_corpus_dir), tiny_model_dir


def stored_tokens(url: str) -> torch.Tensor:
    return torch.from_numpy(open_store(url).group["tokens"][:]).long()


@functools.lru_cache(maxsize=2)
def bridge_reference(url: str, model_dir: Path) -> dict[str, torch.Tensor]:
    """Every hook's activation of the model on the store's tokens; the last two stores' are kept."""
    _, cache = run_with_cache(reference_model(str(model_dir)), stored_tokens(url))
    return cache


# --- exactness -------------------------------------------------------------------------------------


def test_stored_z_is_hook_z_rounded(dtype_store):
    dtype, url, model_dir = dtype_store
    store = open_store(url)
    cache = bridge_reference(url, model_dir)

    for layer in store.layers:
        stored = torch.from_numpy(store.read_activations(z_path(layer), 0, store.layout.n_sequences))
        expected = cache[f"blocks.{layer}.attn.hook_z"].to(TORCH_DTYPE[dtype]).float()
        assert torch.equal(stored, expected), f"layer {layer}"


def test_attention_output_rebuilt_from_z(dtype_store):
    dtype, url, model_dir = dtype_store
    store = open_store(url)
    cache = bridge_reference(url, model_dir)
    _, hf_attention = plain_hf_outputs(str(model_dir), stored_tokens(url), store.layers)

    for layer in store.layers:
        W_O, b_O = store.params[f"W_O/{layer}"], store.params[f"b_O/{layer}"]  # [head, d_head, d_model], [d_model]
        z = torch.from_numpy(store.read_activations(z_path(layer), 0, store.layout.n_sequences))
        rebuilt = torch.einsum("sphd,hdm->spm", z, W_O) + b_O  # [seq, pos, d_model]
        z_error = rounding_bound(cache[f"blocks.{layer}.attn.hook_z"], dtype)
        bound = torch.einsum("sphd,hdm->spm", z_error, W_O.abs()) + FLOAT32_SLACK

        assert torch.all((rebuilt - cache[f"blocks.{layer}.hook_attn_out"]).abs() <= bound), f"layer {layer}, bridge"
        assert torch.all((rebuilt - hf_attention[layer]).abs() <= bound), f"layer {layer}, transformers"


def test_logits_rebuilt_from_normalized(dtype_store):
    _, url, model_dir = dtype_store
    store = open_store(url)
    cache = bridge_reference(url, model_dir)
    hf_logits, _ = plain_hf_outputs(str(model_dir), stored_tokens(url), ())
    W_U, b_U = store.params["W_U"], store.params["b_U"]

    normalized = torch.from_numpy(store.group["final/normalized"][:]).float()  # [seq, pos, d_model], stored fp16
    rebuilt = normalized @ W_U + b_U
    bound = rounding_bound(cache["ln_final.hook_out"], "float16") @ W_U.abs() + FLOAT32_SLACK

    assert torch.all((rebuilt - hf_logits).abs() <= bound)
    assert torch.equal(rebuilt.argmax(-1), hf_logits.argmax(-1))


def test_normalized_is_final_norm_output(dtype_store):
    _, url, model_dir = dtype_store
    store = open_store(url)
    cache = bridge_reference(url, model_dir)

    stored = torch.from_numpy(store.group["final/normalized"][:])

    assert stored.dtype == torch.float16
    assert torch.equal(stored, cache["ln_final.hook_out"].half())


def test_final_scale_is_hook_scale(dtype_store):
    _, url, model_dir = dtype_store
    store = open_store(url)
    cache = bridge_reference(url, model_dir)

    scale = torch.from_numpy(store.group["final/scale"][:])

    assert scale.dtype == torch.float32
    assert torch.equal(scale, cache["ln_final.hook_scale"].reshape(scale.shape))


def test_final_scale_divides_residual(dtype_store):
    # The final norm is (x - mean) / scale * weight + bias for LayerNorm and x / scale * weight for RMSNorm,
    # so the stored scale must turn the final residual into the stored normalized output.
    _, url, model_dir = dtype_store
    store = open_store(url)
    residual = bridge_reference(url, model_dir)["ln_final.hook_in"]  # [seq, pos, d_model]
    if store.final_norm["kind"] == "layernorm":
        residual = residual - residual.mean(-1, keepdim=True)
    scale = torch.from_numpy(store.group["final/scale"][:]).unsqueeze(-1)

    rebuilt = residual / scale * store.params["final_norm/weight"] + store.params["final_norm/bias"]
    normalized = torch.from_numpy(store.group["final/normalized"][:]).float()

    assert torch.all((rebuilt - normalized).abs() <= rounding_bound(rebuilt, "float16") + FLOAT32_SLACK)


def test_final_norm_params_match_model(float32_store):
    url, model_dir = float32_store
    store = open_store(url)
    hf_model = reference_model(str(model_dir)).hf_model
    norm = hf_model.transformer.ln_f if hasattr(hf_model, "transformer") else hf_model.model.norm

    assert torch.equal(store.params["final_norm/weight"], norm.weight.detach().float())
    expected_kind = "layernorm" if hasattr(hf_model, "transformer") else "rmsnorm"
    assert store.final_norm["kind"] == expected_kind


# --- tokens and packing ----------------------------------------------------------------------------


def corpus_texts(corpus_dir: Path) -> set[str]:
    """Every document of the test corpus: each .txt file whole, each .jsonl line, each .parquet row."""
    import pyarrow.parquet as pq

    texts = {path.read_text(encoding="utf-8") for path in corpus_dir.glob("*.txt")}
    for line in (corpus_dir / "records.jsonl").read_text(encoding="utf-8").splitlines():
        texts.add(json.loads(line)["text"])
    texts.update(pq.read_table(corpus_dir / "records.parquet").column("text").to_pylist())
    return texts


def test_tokens_packed_full_length(float32_store):
    url, _ = float32_store
    store = open_store(url)
    tokens = store.group["tokens"]

    assert tokens.dtype == np.int32
    assert tokens.shape == (640 // CONTEXT, CONTEXT)
    assert store.meta["context"] == CONTEXT


def test_tokens_are_whole_documents_between_eos(float32_store, text_corpus_dir):
    url, model_dir = float32_store
    tokenizer = reference_model(str(model_dir)).tokenizer
    eos = tokenizer.eos_token_id
    flat = open_store(url).group["tokens"][:].reshape(-1).tolist()
    boundaries = [i for i, token in enumerate(flat) if token == eos]
    documents = corpus_texts(text_corpus_dir)

    # The stream starts at a document's start; every segment closed by EOS is one whole document.
    starts = [0] + [b + 1 for b in boundaries[:-1]]
    segments = [flat[start:end] for start, end in zip(starts, boundaries)]

    assert len(boundaries) >= 2
    assert all(len(segment) > 0 for segment in segments)
    for segment in segments:
        assert tokenizer.decode(segment) in documents


def test_tokens_follow_seed(float32_store, tmp_path_factory, text_corpus_dir):
    url, model_dir = float32_store
    other = extract_store(tmp_path_factory, model_dir, text_corpus_dir, seed=1, layers="1")

    assert not np.array_equal(open_store(url).group["tokens"][:], open_store(other).group["tokens"][:])


def all_arrays(url: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(url, mode="r")
    return {name: node[...] for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}


def test_extraction_deterministic(float32_store, tmp_path, text_corpus_dir):
    url, model_dir = float32_store
    again = str(tmp_path / "again.zarr")
    run(ExtractConfig(model=str(model_dir), layers="all", dataset=str(text_corpus_dir), out=again, context=CONTEXT,
                      tokens=640, dtype=StoreDtype.FLOAT32, chunk_sequences=4, chunks_per_shard=2, progress=False,
                      compressor=Compressor.NONE))
    first, second = all_arrays(url), all_arrays(again)

    assert sorted(first) == sorted(second)
    for name in first:
        assert np.array_equal(first[name], second[name]), name
    assert open_store(url).meta == open_store(again).meta


def test_extraction_independent_of_batching(float32_store, tmp_path, text_corpus_dir):
    url, model_dir = float32_store
    other = str(tmp_path / "batched.zarr")
    run(ExtractConfig(model=str(model_dir), layers="all", dataset=str(text_corpus_dir), out=other, context=CONTEXT,
                      tokens=640, dtype=StoreDtype.FLOAT32, batch_size=3, chunk_sequences=5, chunks_per_shard=1,
                      progress=False))
    first, second = open_store(url), open_store(other)

    assert np.array_equal(first.group["tokens"][:], second.group["tokens"][:])
    assert second.layout.n_blocks == 8
    for layer in first.layers:
        assert np.allclose(first.z(layer)[:], second.z(layer)[:], rtol=0, atol=1e-6), f"layer {layer}"


class CharTokenizer:
    """A tokenizer stand-in: one id per character, with chosen BOS and EOS ids."""

    def __init__(self, bos: int | None, eos: int | None):
        self.bos_token_id, self.eos_token_id = bos, eos

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        assert add_special_tokens is False
        return {"input_ids": [[ord(char) for char in text] for text in texts]}


PACKING_CASES = [
    # (bos, eos, documents, context, max_tokens, expected rows); 97, 98, ... are "a", "b", ...
    (1, 2, ["ab", "cde"], 4, None, [[1, 97, 98, 2], [1, 99, 100, 101]]),
    (0, 0, ["ab", "cde"], 3, None, [[97, 98, 0], [99, 100, 101]]),
    (0, 0, ["ab", "cde"], 3, 5, [[97, 98, 0]]),
    (None, 2, ["abc", "d"], 2, None, [[97, 98], [99, 2], [100, 2]]),
    (1, 2, ["abcdefg"], 3, 6, [[1, 97, 98], [99, 100, 101]]),
]


@pytest.mark.parametrize(("bos", "eos", "documents", "context", "max_tokens", "expected"), PACKING_CASES)
def test_pack_documents_cases(bos, eos, documents, context, max_tokens, expected):
    packed = pack_documents(CharTokenizer(bos, eos), documents, context, max_tokens)

    assert packed.dtype == np.int32
    assert packed.tolist() == expected


@pytest.mark.parametrize(("documents", "context"), [([], 4), (["a"], 4), (["a", "b"], 8)])
def test_pack_documents_too_short(documents, context):
    with pytest.raises(DatasetError) as caught:
        pack_documents(CharTokenizer(1, 2), documents, context, None)

    assert f"--context {context}" in caught.value.message


def test_extract_rejects_too_short_corpus(tmp_path, tiny_gpt2_dir):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text(json.dumps({"text": "Too short."}) + "\n")

    with pytest.raises(DatasetError):
        run(ExtractConfig(model=str(tiny_gpt2_dir), layers="0", dataset=str(corpus), out=str(tmp_path / "s.zarr"),
                          context=CONTEXT, progress=False))

    assert not (tmp_path / "s.zarr").exists()


def test_chunks_per_shard_alone_applies(tmp_path, tiny_gpt2_dir, text_corpus_dir):
    out = str(tmp_path / "s.zarr")

    run(ExtractConfig(model=str(tiny_gpt2_dir), layers="0", dataset=str(text_corpus_dir), out=out, context=CONTEXT,
                      tokens=160, chunks_per_shard=3, progress=False))

    assert open_store(out).layout.chunks_per_shard == 3


def test_tokens_below_context_rejected():
    with pytest.raises(BadInputError) as caught:
        ExtractConfig(model="unused", layers="0", dataset="unused", context=CONTEXT, tokens=CONTEXT - 1)

    assert f"--tokens {CONTEXT - 1}" in caught.value.message


# --- full and top-k logits -------------------------------------------------------------------------


def test_full_logits_match_model(tmp_path_factory, tiny_model_dir, text_corpus_dir):
    url = extract_store(tmp_path_factory, tiny_model_dir, text_corpus_dir, layers="1", tokens=160, logits="full")
    store = open_store(url)
    hf_logits, _ = plain_hf_outputs(str(tiny_model_dir), stored_tokens(url), ())

    stored = torch.from_numpy(store.group["final/logits"][:])

    assert "final/normalized" not in store.group
    assert stored.dtype == torch.float16
    assert torch.all((stored.float() - hf_logits).abs() <= rounding_bound(hf_logits, "float16") + FLOAT32_SLACK)


def test_topk_logprobs_match_model(tmp_path_factory, tiny_model_dir, text_corpus_dir):
    url = extract_store(tmp_path_factory, tiny_model_dir, text_corpus_dir, layers="1", tokens=160, logits="topk",
                        top_k=8)
    store = open_store(url)
    hf_logits, _ = plain_hf_outputs(str(tiny_model_dir), stored_tokens(url), ())
    expected_logprobs, expected_ids = torch.log_softmax(hf_logits, -1).topk(8, dim=-1)

    logprobs = torch.from_numpy(store.group["final/topk_logprobs"][:])
    ids = torch.from_numpy(store.group["final/topk_ids"][:])
    logsumexp = torch.from_numpy(store.group["final/logsumexp"][:])

    assert store.layout.top_k == 8
    assert "final/normalized" not in store.group
    assert ids.dtype == torch.int32
    assert torch.equal(ids.long(), expected_ids)
    assert torch.allclose(logprobs, expected_logprobs, rtol=0, atol=1e-5)
    assert torch.allclose(logsumexp, torch.logsumexp(hf_logits, -1), rtol=0, atol=1e-5)
    assert torch.all(logprobs[..., :-1] >= logprobs[..., 1:])


def test_topk_larger_than_vocab_rejected(tmp_path, tiny_gpt2_dir, text_corpus_dir):
    config = ExtractConfig(model=str(tiny_gpt2_dir), layers="0", dataset=str(text_corpus_dir),
                           out=str(tmp_path / "s.zarr"), context=CONTEXT, tokens=160, logits=LogitsMode.TOPK,
                           top_k=513, progress=False)

    with pytest.raises(BadInputError) as caught:
        run(config)

    assert "513" in caught.value.message


# --- hooks and numerics ----------------------------------------------------------------------------


def test_missing_hook_raises(tiny_gpt2_dir, monkeypatch):
    model = reference_model(str(tiny_gpt2_dir))
    original = model.bridge.run_with_hooks

    def run_without_z_hook(tokens, fwd_hooks):
        kept = [(name, hook) for name, hook in fwd_hooks if name != "blocks.1.attn.hook_z"]
        return original(tokens, fwd_hooks=kept)

    monkeypatch.setattr(model.bridge, "run_with_hooks", run_without_z_hook)

    with pytest.raises(ModelLoadError, match=r"blocks\.1\.attn\.hook_z"):
        run_batch(model, torch.zeros((1, 4), dtype=torch.long), (0, 1), LogitsMode.FACTORED, 0)


def test_run_batch_fires_every_hook(tiny_gpt2_dir):
    model = reference_model(str(tiny_gpt2_dir))

    arrays = run_batch(model, torch.zeros((2, 4), dtype=torch.long), (0, 1), LogitsMode.FACTORED, 0).arrays

    assert sorted(arrays) == ["final/normalized", "final/scale", "layers/0/z", "layers/1/z"]
    assert arrays["layers/1/z"].shape == (2, 4, 4, 8)
    assert arrays["final/scale"].shape == (2, 4)


def numerics_arrays() -> dict[str, np.ndarray]:
    return {
        "layers/1/z": np.zeros((3, 6, 4, 8), dtype=np.float32),
        "final/normalized": np.zeros((3, 6, 32), dtype=np.float32),
        "final/scale": np.ones((3, 6), dtype=np.float32),
        "final/topk_ids": np.zeros((3, 6, 2), dtype=np.int32),
    }


NUMERICS_CASES = [
    # (path, index, value, storage dtype, texts the message must contain)
    ("layers/1/z", (2, 5, 3, 0), np.nan, StoreDtype.FLOAT32, ["nan", "layer 1", "sequence 12", "position 5", "head 3"]),
    ("layers/1/z", (0, 1, 2, 7), np.inf, StoreDtype.FLOAT16, ["inf", "layer 1", "sequence 10", "head 2"]),
    ("layers/1/z", (1, 0, 1, 4), -np.inf, StoreDtype.BFLOAT16, ["-inf", "layer 1", "sequence 11", "head 1"]),
    ("layers/1/z", (1, 2, 0, 0), 70000.0, StoreDtype.FLOAT16, ["7e+04", "overflows float16", "sequence 11", "head 0"]),
    ("layers/1/z", (2, 0, 3, 1), -65600.0, StoreDtype.FLOAT16, ["overflows float16", "sequence 12", "head 3"]),
    ("final/normalized", (0, 3, 5), 1.0e5, StoreDtype.FLOAT32, ["final/normalized", "overflows float16", "sequence 10"]),
    ("final/normalized", (1, 3, 5), np.nan, StoreDtype.FLOAT16, ["final/normalized", "sequence 11", "position 3"]),
    ("final/scale", (2, 4), np.inf, StoreDtype.FLOAT32, ["final/scale", "sequence 12", "position 4"]),
]


@pytest.mark.parametrize(("path", "index", "value", "dtype", "texts"), NUMERICS_CASES)
def test_check_numerics_rejects(path, index, value, dtype, texts):
    arrays = numerics_arrays()
    arrays[path][index] = value

    with pytest.raises(NumericsError) as caught:
        check_numerics(arrays, dtype, first_sequence=10)

    for text in texts:
        assert text in caught.value.message


@pytest.mark.parametrize(("path", "index", "value", "dtype"), [
    ("layers/1/z", (2, 5, 3, 0), 70000.0, StoreDtype.FLOAT32),
    ("layers/1/z", (2, 5, 3, 0), 70000.0, StoreDtype.BFLOAT16),
    ("layers/1/z", (2, 5, 3, 0), 65504.0, StoreDtype.FLOAT16),
    ("final/scale", (2, 5), 1.0e6, StoreDtype.FLOAT16),
])
def test_check_numerics_accepts_representable(path, index, value, dtype):
    arrays = numerics_arrays()
    arrays[path][index] = value

    check_numerics(arrays, dtype, first_sequence=0)


def test_extraction_stops_on_nan(tmp_path, tiny_gpt2_dir, text_corpus_dir, monkeypatch):
    import extract.loop

    real_run_batch = extract.loop.run_batch

    def poisoned(*args, **kwargs):
        activations = real_run_batch(*args, **kwargs)
        activations.arrays["layers/0/z"][1, 2, 3, 4] = np.nan
        return activations

    monkeypatch.setattr(extract.loop, "run_batch", poisoned)
    config = ExtractConfig(model=str(tiny_gpt2_dir), layers="0", dataset=str(text_corpus_dir),
                           out=str(tmp_path / "s.zarr"), context=CONTEXT, tokens=160, batch_size=4, progress=False)

    with pytest.raises(NumericsError) as caught:
        run(config)

    for text in ("layer 0", "head 3", "sequence 1", "position 2"):
        assert text in caught.value.message
    assert open_store(str(tmp_path / "s.zarr")).n_written == 0


# --- text sources ----------------------------------------------------------------------------------


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def read_all(value: str, text_column: str = "text", seed: int = 0) -> list[str]:
    return list(iter_documents(parse_text_source(value, text_column=text_column), seed))


def test_jsonl_reader(tmp_path):
    path = tmp_path / "d.jsonl"
    # A blank line is skipped, and so is a record whose text is only whitespace.
    path.write_text('{"text": "one"}\n\n{"text": "  "}\n{"text": "two", "id": 2}\n', encoding="utf-8")

    assert sorted(read_all(str(path))) == ["one", "two"]


def test_jsonl_reader_other_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "alpha"}, {"body": "beta"}])

    assert sorted(read_all(str(path), text_column="body")) == ["alpha", "beta"]


def test_jsonl_reader_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"body": "no text key"}])

    with pytest.raises(DatasetError) as caught:
        read_all(str(path))

    assert "'text'" in caught.value.message
    assert "d.jsonl:2" in caught.value.message


def test_jsonl_reader_invalid_json(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')

    with pytest.raises(DatasetError) as caught:
        read_all(str(path))

    assert "d.jsonl:2" in caught.value.message


def test_txt_reader_whole_file_is_document(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n\nsecond paragraph\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("other file\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")

    assert sorted(read_all(str(tmp_path))) == ["first file\n\nsecond paragraph\n", "other file\n"]


def test_parquet_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta", ""], "id": [1, 2, 3]}), path)

    assert sorted(read_all(str(path))) == ["alpha", "beta"]


def test_parquet_reader_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["alpha"]}), path)

    with pytest.raises(DatasetError) as caught:
        read_all(str(path))

    assert "'text'" in caught.value.message
    assert "body" in caught.value.message


def test_folder_reads_every_kind(text_corpus_dir):
    assert sorted(read_all(str(text_corpus_dir))) == sorted(corpus_texts(text_corpus_dir))


def test_document_order_follows_seed(text_corpus_dir):
    first, again, other = read_all(str(text_corpus_dir), seed=0), read_all(str(text_corpus_dir), seed=0), \
        read_all(str(text_corpus_dir), seed=1)

    assert first == again
    assert first != other
    assert sorted(first) == sorted(other)


@pytest.mark.parametrize(("name", "content", "text"), [
    ("notes.csv", "a,b\n", "unsupported type '.csv'"),
    ("missing.jsonl", None, "not found"),
    ("empty_folder", "", "contains no .txt"),
])
def test_text_source_rejects(tmp_path, name, content, text):
    path = tmp_path / name
    if content == "":
        path.mkdir()
    elif content is not None:
        path.write_text(content)

    with pytest.raises(DatasetError) as caught:
        parse_text_source(str(path))

    assert text in caught.value.message
