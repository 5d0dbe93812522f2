"""Stores given as fsspec URLs: ``memory://`` and ``file://`` through extract, train and eval.

``memory://`` stores live in the memory of one process, so every step here runs in the test process.
Each store is compared with the same extraction into a plain local folder.
"""

import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from safetensors.torch import load_file

from extract.config import ExtractConfig
from extract.loop import run as extract_run
from lensio import writer
from lensio.errors import BadInputError, StoreNotFoundError
from lensio.schema import Compressor, LogitsMode, StoreDtype
from lensio.store import open_store
from tests.helpers_pipeline import CHUNK_SEQUENCES, CHUNKS_PER_SHARD, CONTEXT, TOKENS, extract_store
from train.cli import eval_main
from train.config import TrainConfig
from train.data import LensDataModule
from train.fit import run as train_run
from train.saving import load_lens

LAYER = 1
N_SEQUENCES = TOKENS // CONTEXT  # 40, in 5 blocks of 8 sequences


def extract_config(model_dir: Path, corpus_dir: Path, out: str, **options) -> ExtractConfig:
    """The settings of ``extract_store``'s default store, written to ``out``."""
    settings = {"layers": "all", "context": CONTEXT, "tokens": TOKENS, "dtype": StoreDtype.FLOAT32,
                "logits": LogitsMode.FACTORED, "compressor": Compressor.NONE, "chunk_sequences": CHUNK_SEQUENCES,
                "chunks_per_shard": CHUNKS_PER_SHARD, "seed": 0, "progress": False}
    return ExtractConfig(model=str(model_dir), dataset=str(corpus_dir), out=out, **{**settings, **options})


def store_arrays(url: str) -> dict[str, np.ndarray]:
    group = open_store(url).group
    return {path: np.asarray(node[...]) for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}


def assert_same_store(actual: str, expected: str) -> None:
    expected_arrays = store_arrays(expected)
    actual_arrays = store_arrays(actual)
    assert sorted(actual_arrays) == sorted(expected_arrays)
    for path, values in expected_arrays.items():
        np.testing.assert_array_equal(actual_arrays[path], values, err_msg=path)
    assert open_store(actual).meta == open_store(expected).meta


def new_memory_url() -> str:
    return f"memory://headlens-tests/{uuid.uuid4().hex}/acts.zarr"


def remove_memory_store(url: str) -> None:
    filesystem = fsspec.filesystem("memory")
    folder = url.removeprefix("memory://").rsplit("/", 1)[0]
    if filesystem.exists(folder):
        filesystem.rm(folder, recursive=True)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> str:
    return extract_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir)


@pytest.fixture(scope="module", params=["memory", "file"])
def url_store(request, tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> str:
    """The default test store extracted to a ``memory://`` URL, then to a ``file://`` URL."""
    if request.param == "memory":
        url = new_memory_url()
        request.addfinalizer(lambda: remove_memory_store(url))
    else:
        url = (tmp_path_factory.mktemp("file-url") / "acts.zarr").as_uri()
    extract_run(extract_config(tiny_gpt2_dir, text_corpus_dir, url))
    return url


@pytest.fixture
def memory_url():
    url = new_memory_url()
    yield url
    remove_memory_store(url)


# ---------------------------------------------------------------------------------------------------------------
# Extract


def test_url_store_matches_local(url_store, local_store):
    assert_same_store(url_store, local_store)


def test_url_store_complete(url_store):
    store = open_store(url_store)

    assert store.url == url_store
    assert store.complete is True
    assert store.n_written == N_SEQUENCES


def test_file_url_writes_local_folder(tmp_path, tiny_gpt2_dir, text_corpus_dir):
    folder = tmp_path / "acts.zarr"

    result = extract_run(extract_config(tiny_gpt2_dir, text_corpus_dir, folder.as_uri(), layers="0"))

    assert result.complete is True
    assert (folder / "zarr.json").is_file()
    assert (folder / "layers" / "0" / "z" / "zarr.json").is_file()
    assert not list(folder.glob(".headlens-lock-*"))


def test_file_url_resumes_same_run(tmp_path, tiny_gpt2_dir, text_corpus_dir):
    url = (tmp_path / "acts.zarr").as_uri()
    extract_run(extract_config(tiny_gpt2_dir, text_corpus_dir, url, layers="0"))

    again = extract_run(extract_config(tiny_gpt2_dir, text_corpus_dir, url, layers="0"))

    assert again.resumed is True
    assert again.tokens_written == 0


def test_memory_shards_in_turn_complete_store(memory_url, local_store, tiny_gpt2_dir, text_corpus_dir):
    first = extract_run(extract_config(tiny_gpt2_dir, text_corpus_dir, memory_url, num_shards=2, shard_index=0))
    after_first = open_store(memory_url)
    done_after_first = after_first.blocks_done.tolist()

    second = extract_run(extract_config(tiny_gpt2_dir, text_corpus_dir, memory_url, num_shards=2, shard_index=1))

    # Shard 0 of 2 owns blocks 0-1 (16 sequences); shard 1 owns blocks 2-4 (24 sequences).
    assert done_after_first == [True, True, False, False, False]
    assert first.tokens_written == 16 * CONTEXT
    assert first.n_written == 16
    assert first.complete is False
    assert second.tokens_written == 24 * CONTEXT
    assert second.n_written == N_SEQUENCES
    assert second.complete is True
    assert_same_store(memory_url, local_store)


def test_memory_shard_times_out_without_shard_zero(memory_url, tiny_gpt2_dir, text_corpus_dir, monkeypatch):
    monkeypatch.setattr(writer, "JOIN_TIMEOUT_S", 0.2)
    monkeypatch.setattr(writer, "JOIN_POLL_S", 0.05)

    with pytest.raises(StoreNotFoundError) as caught:
        extract_run(extract_config(tiny_gpt2_dir, text_corpus_dir, memory_url, num_shards=2, shard_index=1))

    assert f"store {memory_url!r} was not created within 0.2 s" in caught.value.message
    assert not fsspec.filesystem("memory").exists(memory_url.removeprefix("memory://"))


# ---------------------------------------------------------------------------------------------------------------
# Train and eval


def train_config(store: str, out: Path) -> TrainConfig:
    return TrainConfig(store=store, layer=LAYER, lenses=("translator",), out=str(out), batch_tokens=64, max_steps=3,
                       val_every=3, seed=1, devices=1, progress=False)


@pytest.fixture(scope="module")
def local_lens(tmp_path_factory, local_store) -> Path:
    out = tmp_path_factory.mktemp("local-lens") / "lens"
    train_run(train_config(local_store, out))
    return out


@pytest.fixture(scope="module")
def url_lens(tmp_path_factory, url_store) -> Path:
    out = tmp_path_factory.mktemp("url-lens") / "lens"
    train_run(train_config(url_store, out))
    return out


def test_url_store_lens_matches_local(url_lens, local_lens):
    trained = load_file(str(url_lens / "lens.safetensors"))
    expected = load_file(str(local_lens / "lens.safetensors"))

    assert sorted(trained) == sorted(expected)
    assert not torch.equal(expected["weight"], torch.eye(expected["weight"].shape[-1]).expand_as(expected["weight"]))
    for name, values in expected.items():
        torch.testing.assert_close(trained[name], values, atol=0, rtol=0, msg=name)


def test_url_store_lens_records_url(url_lens, url_store):
    config = json.loads((url_lens / "config.json").read_text())

    assert config["store"]["url"] == url_store


def test_url_store_lens_loads_from_recorded_url(url_lens):
    lens = load_lens(url_lens)

    assert lens.layer == LAYER
    assert lens.n_heads == 4


def test_url_store_eval_matches_local(url_store, url_lens, local_store, tmp_path):
    report = tmp_path / "report"
    local_report = tmp_path / "local-report"

    result = CliRunner().invoke(eval_main, ["--store", url_store, "--lens", str(url_lens), "--out", str(report),
                                            "--quiet"])
    local = CliRunner().invoke(eval_main, ["--store", local_store, "--lens", str(url_lens), "--out",
                                           str(local_report), "--quiet"])
    rows = json.loads((report / "metrics.json").read_text())
    local_rows = json.loads((local_report / "metrics.json").read_text())

    assert result.exit_code == 0, result.output
    assert local.exit_code == 0, local.output
    assert len(rows) == 8  # 4 heads, translator and the DLA baseline
    assert rows == local_rows


def test_memory_store_rejects_loader_workers():
    data = LensDataModule("memory://headlens-tests/any/acts.zarr", LAYER, num_workers=2)

    with pytest.raises(BadInputError) as caught:
        data.setup("fit")

    assert "data-loader workers cannot read it; pass --num-workers 0" in caught.value.message
