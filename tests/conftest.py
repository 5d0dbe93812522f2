"""Session fixtures: tiny offline GPT-2 and Llama models, their tokenizer, and a text corpus."""

import os

# Offline mode makes any accidental Hub lookup fail at once with an error, instead of reaching
# the network. It must be set before huggingface_hub is imported, which is why it comes first.
# A value already set in the environment is kept.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.fixtures import MODEL_KINDS, build_tiny_model, write_text_corpus  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny random GPT-2 and its tokenizer, saved with ``save_pretrained``."""
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a tiny random Llama (grouped-query attention) and its tokenizer."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session", params=list(MODEL_KINDS))
def tiny_model_dir(request: pytest.FixtureRequest) -> Path:
    """Directory of each tiny model in turn. ``request.param`` is the kind, "gpt2" or "llama"."""
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="session")
def text_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of .txt, .jsonl and (with pyarrow) .parquet files of English text."""
    return write_text_corpus(tmp_path_factory.mktemp("corpus"))
