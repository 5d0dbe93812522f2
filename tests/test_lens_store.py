"""``lens-store info`` and ``lens-store verify`` on real tiny stores, clean and damaged."""

import json
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from extract.cli import main as extract_main
from lensio.cli import main as store_main
from lensio.schema import ATTRS_KEY

# 10 sequences of 16 tokens in blocks of 2 chunks of 2 sequences: 3 blocks, the last one short.
TOKENS = 160
N_SEQUENCES = 10


def extract(out: Path, model_dir: Path, corpus_dir: Path, *extra: str) -> Path:
    result = CliRunner().invoke(extract_main, [
        "--model", str(model_dir), "--layers", "all", "--dataset", str(corpus_dir), "--out", str(out), "--context",
        "16", "--tokens", str(TOKENS), "--chunk-sequences", "2", "--chunks-per-shard", "2", "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return out


STORE_KINDS = {
    # name: extra lens-extract options
    "float32-factored": ["--dtype", "float32"],
    "float16-full": ["--dtype", "float16", "--logits", "full"],
    "bfloat16-topk": ["--dtype", "bfloat16", "--logits", "topk", "--top-k", "8"],
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lens-store")
    return {name: extract(root / f"{name}.zarr", tiny_gpt2_dir, text_corpus_dir, *extra)
            for name, extra in STORE_KINDS.items()}


@pytest.fixture()
def damaged(tmp_path, stores) -> Path:
    """A copy of the float32 store that a test may damage."""
    copy = tmp_path / "damaged.zarr"
    shutil.copytree(stores["float32-factored"], copy)
    return copy


def run_store(*args: str):
    return CliRunner().invoke(store_main, list(args))


def output_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def files_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# ---------------------------------------------------------------------------------------------------------------
# info


def test_info_reports_complete_store(stores):
    store = stores["float32-factored"]
    result = run_store("info", str(store))
    assert result.exit_code == 0, result.output
    text = result.output
    assert "format version:  1" in text
    assert "model:           tiny-gpt2" in text
    assert "layers:          0,1" in text
    assert f"sequences:       {N_SEQUENCES} of {N_SEQUENCES} written (100%), 16 tokens each" in text
    assert f"tokens:          {TOKENS} of {TOKENS} written" in text
    assert "dtype:           float32" in text
    assert "logits:          factored" in text
    assert f"({files_size(store)} bytes)" in text
    assert "writers:         none" in text


def test_info_json_counts_partial_store(damaged):
    group = zarr.open_group(str(damaged), mode="r+")
    group["progress/done"][1] = 0  # sequences 4-7 become unwritten
    result = run_store("info", str(damaged), "--format", "json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["sequences_written"] == N_SEQUENCES - 4
    assert info["tokens_written"] == (N_SEQUENCES - 4) * 16
    assert info["tokens_planned"] == TOKENS
    assert info["size_on_disk_bytes"] == files_size(damaged)
    assert info["params_size_bytes"] == files_size(damaged / "params")
    data_size = files_size(damaged) - files_size(damaged / "params")
    assert info["bytes_per_token_on_disk"] == round(data_size / ((N_SEQUENCES - 4) * 16), 1)
    # 4 (token id) + 2 layers * 4 heads * 8 * 4 bytes (z) + 32 * 2 (normalized) + 4 (scale)
    assert info["bytes_per_token_uncompressed"] == 4 + 2 * 4 * 8 * 4 + 32 * 2 + 4


def test_info_lists_stale_writer(damaged):
    import subprocess
    import sys

    from lensio.lock import LockRecord, lock_name

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    record = LockRecord(pid=finished.pid, hostname=socket.gethostname(), started="2026-01-01T00:00:00Z",
                        process_start_ticks=None, token="test")
    (damaged / lock_name()).write_text(json.dumps(asdict(record)))
    result = run_store("info", str(damaged))
    assert result.exit_code == 0, result.output
    writers = [line for line in output_lines(result.output) if line.startswith("writers:")]
    assert writers == [f"writers:         process {finished.pid} on host {socket.gethostname()!r}, started "
                       "2026-01-01T00:00:00Z (no longer running; the next writer takes the lock over)"]


@pytest.mark.parametrize("name", list(STORE_KINDS))
def test_info_names_dtype_and_logits(name, stores):
    result = run_store("info", str(stores[name]), "--format", "json")
    info = json.loads(result.output)
    dtype, logits = name.split("-")
    assert info["dtype"] == dtype
    assert info["logits"] == logits


# ---------------------------------------------------------------------------------------------------------------
# verify: clean stores


@pytest.mark.parametrize("name", list(STORE_KINDS))
def test_verify_clean_store_with_model(name, stores, tiny_gpt2_dir):
    result = run_store("verify", str(stores[name]), "--model", str(tiny_gpt2_dir), "--sample", "3", "--quiet")
    assert result.exit_code == 0, result.output
    lines = output_lines(result.output)
    assert len(lines) == 1, lines
    assert "is consistent" in lines[0]
    assert "3 sampled sequences match the model" in lines[0]


def test_verify_leaves_store_unchanged(stores):
    store = stores["float16-full"]
    before = {path: path.read_bytes() for path in store.rglob("*") if path.is_file()}
    result = run_store("verify", str(store))
    assert result.exit_code == 0, result.output
    after = {path: path.read_bytes() for path in store.rglob("*") if path.is_file()}
    assert after == before


# ---------------------------------------------------------------------------------------------------------------
# verify: damaged stores, one row per kind of damage


def put_nan_in_z(store: Path) -> None:
    z = zarr.open_group(str(store), mode="r+")["layers/0/z"]
    values = z[0:4]
    values[3, 2, 1, 5] = np.nan
    z[0:4] = values


def put_inf_in_scale(store: Path) -> None:
    scale = zarr.open_group(str(store), mode="r+")["final/scale"]
    values = scale[4:8]
    values[1, 0] = np.inf
    scale[4:8] = values


def delete_shard(store: Path) -> None:
    (store / "layers" / "1" / "z" / "c" / "1" / "0" / "0" / "0").unlink()


def unflag_block(store: Path) -> None:
    zarr.open_group(str(store), mode="r+")["progress/done"][2] = 0


def bad_flag_value(store: Path) -> None:
    zarr.open_group(str(store), mode="r+")["progress/done"][0] = 2


def edit_attrs(store: Path, key: str, value) -> None:
    metadata_path = store / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["attributes"][ATTRS_KEY][key] = value
    metadata_path.write_text(json.dumps(metadata))


def change_token(store: Path) -> None:
    tokens = zarr.open_group(str(store), mode="r+")["tokens"]
    tokens[0, 0] = 100_000


def retype_scale(store: Path) -> None:
    group = zarr.open_group(str(store), mode="r+")
    values = group["final/scale"][...]
    del group["final/scale"]
    group.create_array("final/scale", shape=values.shape, dtype="float64", chunks=(2, 16), shards=(4, 16))
    group["final/scale"][...] = values


def remove_normalized(store: Path) -> None:
    shutil.rmtree(store / "final" / "normalized")


DAMAGE = [
    # (id, damage, a text one output line must contain)
    ("nan in z", put_nan_in_z, "array layers/0/z has 1 NaN or inf values, the first at layer 0, head 1, sequence 3, "
                               "position 2"),
    ("inf in scale", put_inf_in_scale, "array final/scale has 1 NaN or inf values, the first at sequence 5, position 0"),
    ("flagged block without data", delete_shard, "block 1 (sequences 4-7) is marked done, but array layers/1/z has no "
                                                 "data"),
    ("unwritten block", unflag_block, "2 of 10 sequences are not written yet"),
    ("flag value", bad_flag_value, "progress/done holds values [2]"),
    ("layers attribute", lambda store: edit_attrs(store, "layers", [0]), "attribute layers is [0], but the layout "
                                                                          "says [0, 1]"),
    ("context attribute", lambda store: edit_attrs(store, "context", 32), "attribute context is 32"),
    ("token changed", change_token, "does not match attribute tokens_sha256"),
    ("token outside vocabulary", change_token, "1 token ids outside the vocabulary of 512, the first 100000 at "
                                               "sequence 0, position 0"),
    ("dtype", retype_scale, "array final/scale has dtype float64, expected float32"),
    ("missing array", remove_normalized, "array final/normalized is missing"),
]


@pytest.mark.parametrize(("damage", "expected"), [case[1:] for case in DAMAGE], ids=[case[0] for case in DAMAGE])
def test_verify_reports_damage(damage, expected, damaged):
    damage(damaged)
    result = run_store("verify", str(damaged))
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = output_lines(result.output)
    matching = [line for line in lines if expected in line]
    assert len(matching) == 1, lines


def test_verify_model_detects_changed_values(damaged, tiny_gpt2_dir):
    z = zarr.open_group(str(damaged), mode="r+")["layers/1/z"]
    values = z[4:8]
    values[2] *= 1.5  # sequence 6: finite, plausible, and wrong
    z[4:8] = values
    assert run_store("verify", str(damaged)).exit_code == 0  # without --model the damage is invisible

    result = run_store("verify", str(damaged), "--model", str(tiny_gpt2_dir), "--sample", str(N_SEQUENCES), "--quiet")
    assert result.exit_code == 1
    lines = output_lines(result.output)
    assert len(lines) == 1, lines
    assert lines[0].startswith("array layers/1/z differs from the recomputation with --model at layer 1")
    assert "sequence 6" in lines[0]


def test_verify_model_of_other_architecture(stores, tiny_llama_dir):
    result = run_store("verify", str(stores["float32-factored"]), "--model", str(tiny_llama_dir), "--quiet")
    assert result.exit_code == 1
    lines = output_lines(result.output)
    assert len(lines) == 1, lines
    assert "has architecture 'LlamaForCausalLM'" in lines[0]
