"""Check the tiny models, tokenizer and text corpus that tests/fixtures.py builds."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from tests.fixtures import (
    ENDOFTEXT,
    TINY_CONTEXT_LENGTH,
    TINY_VOCAB_SIZE,
    assert_tiny_sizes,
    build_tiny_model,
    read_model_kind,
)

SENTENCE = "The old captain repaired the broken lamp near the harbor, and nobody noticed."


def test_tiny_model_loads_with_tiny_sizes(tiny_model_dir):
    kind = read_model_kind(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    assert_tiny_sizes(model, kind)
    assert model.config.vocab_size == TINY_VOCAB_SIZE


def test_tiny_model_runs_forward(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    input_ids = tokenizer(SENTENCE, return_tensors="pt").input_ids

    with torch.no_grad():
        logits = model(input_ids).logits

    assert logits.shape == (1, input_ids.shape[1], TINY_VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_tokenizer_round_trips_sentence(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    input_ids = tokenizer(SENTENCE).input_ids

    assert tokenizer.decode(input_ids, skip_special_tokens=True) == SENTENCE
    assert len(input_ids) < TINY_CONTEXT_LENGTH


def test_tokenizer_special_tokens(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    assert len(tokenizer) == TINY_VOCAB_SIZE
    assert tokenizer.bos_token == ENDOFTEXT
    assert tokenizer.eos_token == ENDOFTEXT
    assert tokenizer.pad_token == ENDOFTEXT
    assert tokenizer.bos_token_id == 0
    assert tokenizer.model_max_length == TINY_CONTEXT_LENGTH


def test_tokenizer_bos_matches_model_family(tiny_gpt2_dir, tiny_llama_dir):
    gpt2_ids = AutoTokenizer.from_pretrained(tiny_gpt2_dir)(SENTENCE).input_ids
    llama_ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(SENTENCE).input_ids

    assert gpt2_ids[0] != 0
    assert llama_ids[0] == 0
    assert llama_ids[1:] == gpt2_ids


def test_tokenizers_share_vocabulary(tiny_gpt2_dir, tiny_llama_dir):
    gpt2_vocab = AutoTokenizer.from_pretrained(tiny_gpt2_dir).get_vocab()
    llama_vocab = AutoTokenizer.from_pretrained(tiny_llama_dir).get_vocab()

    assert gpt2_vocab == llama_vocab


def test_gpt2_norms_and_biases_perturbed(tiny_gpt2_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    block = model.transformer.h[0]

    assert not torch.allclose(block.ln_1.weight, torch.ones_like(block.ln_1.weight))
    assert not torch.allclose(block.ln_1.bias, torch.zeros_like(block.ln_1.bias))
    assert not torch.allclose(block.attn.c_proj.bias, torch.zeros_like(block.attn.c_proj.bias))
    assert not torch.allclose(model.transformer.ln_f.weight, torch.ones_like(model.transformer.ln_f.weight))
    assert not torch.allclose(model.transformer.ln_f.bias, torch.zeros_like(model.transformer.ln_f.bias))


def test_llama_norms_perturbed_and_untied(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    layer = model.model.layers[0]

    assert not torch.allclose(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert not torch.allclose(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert model.config.tie_word_embeddings is False
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.config.rms_norm_eps == 1e-5
    assert model.config.max_position_embeddings == TINY_CONTEXT_LENGTH


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_build_tiny_model_is_deterministic(kind, tmp_path):
    rng_state_before = torch.get_rng_state()
    first = AutoModelForCausalLM.from_pretrained(build_tiny_model(kind, tmp_path / "first"))
    second = AutoModelForCausalLM.from_pretrained(build_tiny_model(kind, tmp_path / "second"))

    assert torch.equal(torch.get_rng_state(), rng_state_before)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_assert_tiny_sizes_rejects_extra_layer():
    config = GPT2Config(vocab_size=TINY_VOCAB_SIZE, n_positions=64, n_embd=32, n_layer=3, n_head=4)
    model = AutoModelForCausalLM.from_config(config)

    with pytest.raises(AssertionError, match="n_layers"):
        assert_tiny_sizes(model, "gpt2")


def test_assert_tiny_sizes_rejects_full_kv_heads():
    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = AutoModelForCausalLM.from_config(config)

    with pytest.raises(AssertionError, match="n_kv_heads"):
        assert_tiny_sizes(model, "llama")


def test_assert_tiny_sizes_rejects_wrong_kind(tiny_gpt2_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)

    with pytest.raises(AssertionError, match="architecture"):
        assert_tiny_sizes(model, "llama")


def test_text_corpus_files(text_corpus_dir):
    names = sorted(path.name for path in text_corpus_dir.iterdir())

    assert names.count("records.jsonl") == 1
    assert len([name for name in names if name.endswith(".txt")]) == 3
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        assert "records.parquet" not in names
    else:
        assert "records.parquet" in names


def test_text_corpus_token_count(text_corpus_dir, tiny_gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    texts = [path.read_text(encoding="utf-8") for path in sorted(text_corpus_dir.glob("*.txt"))]
    with open(text_corpus_dir / "records.jsonl", encoding="utf-8") as jsonl_file:
        texts += [json.loads(line)["text"] for line in jsonl_file]
    parquet_path = text_corpus_dir / "records.parquet"
    if parquet_path.exists():
        import pyarrow.parquet

        texts += pyarrow.parquet.read_table(parquet_path).column("text").to_pylist()

    token_count = sum(len(tokenizer(text).input_ids) for text in texts)

    assert all(text.strip() for text in texts)
    assert token_count >= 3000
