"""Bad input to every command: one line naming the value and the fix, a non-zero exit, no traceback,
and no change to existing data.

Each case is a row of ``CASES``: the command, its arguments (with ``{name}`` placeholders filled from
the workspace), and a text that the one output line must contain.
"""

import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner

from extract.cli import main as extract_main
from lensio.cli import main as store_main
from lensio.errors import LensError
from lensio.schema import ATTRS_KEY

# 10 sequences of 16 tokens: the smallest store whose validation split is not empty.
TOKENS = 160


def run_command(command, args: list[str]):
    return CliRunner().invoke(command, args)


def extract_into(out: Path, model_dir: Path, corpus_dir: Path, layers: str) -> Path:
    result = run_command(extract_main, ["--model", str(model_dir), "--layers", layers, "--dataset", str(corpus_dir),
                                        "--out", str(out), "--context", "16", "--tokens", str(TOKENS), "--dtype",
                                        "float32", "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def save_dla_lens(store_url: Path, layer: int, out: Path) -> Path:
    from lensio.store import open_store
    from train.lenses import DLALens, frozen_parts_from_store
    from train.saving import lens_config, save_lens

    store = open_store(str(store_url))
    lens = DLALens(frozen_parts_from_store(store, layer))
    save_lens(lens, out, lens_config(lens, layer=layer, objective="per-head", store=store))
    return out


def set_format_version(store: Path, version: int) -> None:
    metadata_path = store / "zarr.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["attributes"][ATTRS_KEY]["format_version"] = version
    metadata_path.write_text(json.dumps(metadata))


@dataclass
class Workspace:
    """Paths the cases refer to by name."""

    root: Path
    paths: dict[str, str]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_gpt2_dir, tiny_llama_dir, text_corpus_dir) -> Workspace:
    """Stores, lenses and broken inputs that the cases point at; none of them may change."""
    import shutil

    root = tmp_path_factory.mktemp("bad-input")
    gpt2_store = extract_into(root / "gpt2.zarr", tiny_gpt2_dir, text_corpus_dir, "all")
    layer0_store = extract_into(root / "gpt2-layer0.zarr", tiny_gpt2_dir, text_corpus_dir, "0")
    llama_store = extract_into(root / "llama.zarr", tiny_llama_dir, text_corpus_dir, "all")
    gpt2_lens = save_dla_lens(gpt2_store, 1, root / "lenses" / "gpt2-layer1-dla")

    future_store = root / "future.zarr"
    shutil.copytree(gpt2_store, future_store)
    set_format_version(future_store, 99)
    incomplete_store = root / "incomplete.zarr"
    shutil.copytree(gpt2_store, incomplete_store)
    zarr.open_group(str(incomplete_store), mode="r+")["progress/done"][0] = 0
    plain_group = zarr.open_group(str(root / "plain.zarr"), mode="w")
    plain_group.create_array("x", shape=(2,), dtype="int32")

    (root / "not-gguf.gguf").write_bytes(b"hello, this is text")
    (root / "truncated.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"short")
    random_bytes = random.Random(0).randbytes(300)
    (root / "garbled.gguf").write_bytes(b"GGUF" + random_bytes)
    (root / "a-file.txt").write_text("not a folder\n")
    (root / "short.txt").write_text("hi\n")

    paths = {
        "gpt2": str(tiny_gpt2_dir), "corpus": str(text_corpus_dir), "jsonl": str(text_corpus_dir / "records.jsonl"),
        "store": str(gpt2_store), "layer0_store": str(layer0_store), "llama_store": str(llama_store),
        "lens": str(gpt2_lens), "future": str(future_store), "plain": str(root / "plain.zarr"),
        "root": str(root), "new": str(root / "new.zarr"), "incomplete": str(incomplete_store),
    }
    return Workspace(root=root, paths=paths)


def workspace_snapshot(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def workspace_folders(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_dir()}


EXTRACT = ["--model", "{gpt2}", "--layers", "all", "--dataset", "{corpus}", "--out", "{new}", "--context", "16",
           "--tokens", "160", "--quiet"]


def with_options(base: list[str], changes: dict[str, str]) -> list[str]:
    """Return ``base`` arguments with some options replaced or added (keys use _ for -)."""
    args = list(base)
    for key, value in changes.items():
        option = "--" + key.replace("_", "-")
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    return args


def extract_with(**changes: str) -> list[str]:
    return with_options(EXTRACT, changes)


TRAIN = ["--store", "{store}", "--layer", "1", "--out", "{root}/lenses/new", "--max-steps", "1", "--quiet"]


def train_with(**changes: str) -> list[str]:
    return with_options(TRAIN, changes)


def commands():
    from train.cli import eval_main, inspect_main, train_main

    return {"extract": extract_main, "train": train_main, "eval": eval_main, "inspect": inspect_main,
            "store": store_main}


CASES = [
    # (id, command, arguments, text the line must contain)
    ("model name unknown", "extract", extract_with(model="no-such-model-xyz"), "'no-such-model-xyz'"),
    ("model path missing", "extract", extract_with(model="./missing/model"), "'./missing/model'"),
    ("model path nested missing", "extract", extract_with(model="missing/folder/model"), "not found; check the path"),
    ("model path under folder", "extract", extract_with(model="{root}/no-such-model"), "not found; check the path"),
    ("model file suffix typo", "extract", extract_with(model="model.ggf"), "not found; check the path"),
    ("device unknown", "extract", extract_with(device="tpu9"), "'tpu9'"),
    ("model file not gguf", "extract", extract_with(model="{root}/a-file.txt"), "a-file.txt"),
    ("gguf not gguf", "extract", extract_with(model="{root}/not-gguf.gguf"), "not-gguf.gguf"),
    ("gguf truncated", "extract", extract_with(model="{root}/truncated.gguf"), "truncated"),
    ("gguf garbled", "extract", extract_with(model="{root}/garbled.gguf"), "garbled"),
    ("layer out of range", "extract", extract_with(layers="5"), "layer 5"),
    ("layer spec backwards", "extract", extract_with(layers="5-2"), "'5-2'"),
    ("layer spec letter", "extract", extract_with(layers="a"), "'a'"),
    ("layer spec empty item", "extract", extract_with(layers="1,,2"), "'1,,2'"),
    ("layer spec empty", "extract", extract_with(layers=""), "''"),
    ("dataset missing", "extract", extract_with(dataset="./no/such.txt"), "'./no/such.txt'"),
    ("text column missing", "extract", extract_with(dataset="{jsonl}", text_column="body"), "'body'"),
    ("corpus too short", "extract", extract_with(dataset="{root}/short.txt"), "--context 16"),
    ("corpus too short named", "extract", extract_with(dataset="{root}/short.txt"), "short.txt"),
    ("tokens zero", "extract", extract_with(tokens="0"), "--tokens must be positive, got 0"),
    ("tokens negative", "extract", extract_with(tokens="-5"), "--tokens must be positive, got -5"),
    ("context zero", "extract", extract_with(context="0"), "--context must be positive, got 0"),
    ("batch size zero", "extract", extract_with(batch_size="0"), "--batch-size must be positive, got 0"),
    ("context too long", "extract", extract_with(context="100"), "--context 100"),
    ("out is a file", "extract", extract_with(out="{root}/a-file.txt"), "a-file.txt"),
    ("out future format", "extract", extract_with(out="{future}"), "format version 99"),
    ("out not headlens", "extract", extract_with(out="{plain}"), "plain.zarr"),
    ("train store missing", "train", train_with(store="{root}/missing.zarr"), "missing.zarr"),
    ("train store future format", "train", train_with(store="{future}"), "format version 99"),
    ("train store not headlens", "train", train_with(store="{plain}"), "plain.zarr"),
    ("train store plain folder", "train", train_with(store="{corpus}"), "{corpus}"),
    ("train layer not in store", "train", train_with(store="{layer0_store}"), "layer 1"),
    ("train layer negative", "train", train_with(layer="-1"), "-1"),
    ("train lens unknown", "train", train_with(lens="bogus"), "'bogus'"),
    ("train batch tokens zero", "train", train_with(batch_tokens="0"), "--batch-tokens must be positive, got 0"),
    ("train out is a file", "train", train_with(out="{root}/a-file.txt"), "a-file.txt"),
    ("train store is a file", "train", train_with(store="{root}/a-file.txt"), "is a file, not a headlens store"),
    ("train devices cuda", "train", train_with(devices="cuda"), "--devices 'cuda'"),
    ("train num workers negative", "train", train_with(num_workers="-1"), "--num-workers must be 0 or more, got -1"),
    ("train val tokens negative", "train", train_with(val_tokens="-5"), "--val-tokens must be 0"),
    ("train lr zero", "train", train_with(lr="0"), "--lr must be positive, got 0.0"),
    ("train out not a lens", "train", train_with(out="{root}/lenses"), "does not hold a lens"),
    ("train store incomplete", "train", train_with(store="{incomplete}"), "incomplete"),
    ("eval store incomplete", "eval", ["--store", "{incomplete}", "--lens", "{lens}", "--out", "{root}/report",
                                       "--quiet"], "incomplete"),
    ("eval lens other model", "eval", ["--store", "{llama_store}", "--lens", "{lens}", "--out", "{root}/report",
                                       "--quiet"], "W_U differs"),
    ("eval lens layer not in store", "eval", ["--store", "{layer0_store}", "--lens", "{lens}", "--out",
                                              "{root}/report", "--quiet"], "layer 1"),
    ("eval out is a file", "eval", ["--store", "{store}", "--lens", "{lens}", "--out", "{root}/a-file.txt", "--quiet"],
     "a-file.txt"),
    ("eval lens not a lens", "eval", ["--store", "{store}", "--lens", "{corpus}", "--out", "{root}/report", "--quiet"],
     "{corpus}"),
    ("inspect lens missing", "inspect", ["--lens", "{root}/lenses/missing", "--quiet"], "lenses/missing"),
    ("inspect example out of range", "inspect", ["--lens", "{lens}", "--example", "99", "--quiet"], "--example 99"),
    ("info store missing", "store", ["info", "{root}/missing.zarr"], "missing.zarr"),
    ("info store future format", "store", ["info", "{future}"], "format version 99"),
    ("info store not headlens", "store", ["info", "{plain}"], "plain.zarr"),
    ("verify store plain folder", "store", ["verify", "{corpus}"], "{corpus}"),
    ("verify sample zero", "store", ["verify", "{store}", "--sample", "0"], "--sample must be positive, got 0"),
    ("verify model unknown", "store", ["verify", "{store}", "--model", "./missing/model"], "'./missing/model'"),
]


@pytest.mark.parametrize(("command", "args", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_rejected(command, args, expected, workspace):
    args = [arg.format(**workspace.paths) for arg in args]
    expected = expected.format(**workspace.paths)
    files_before = workspace_snapshot(workspace.root)
    folders_before = workspace_folders(workspace.root)

    result = run_command(commands()[command], args)

    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code not in (0, None)
    assert "Traceback" not in result.output
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ")
    assert expected in lines[0]
    assert workspace_snapshot(workspace.root) == files_before
    assert workspace_folders(workspace.root) == folders_before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
def test_extract_cuda_without_gpu_rejected(workspace):
    result = run_command(extract_main, [arg.format(**workspace.paths) for arg in extract_with(device="cuda")])

    assert result.exit_code == 2
    assert result.output.startswith("Error: --device 'cuda': this torch")
    assert not Path(workspace.paths["new"]).exists()


@pytest.mark.parametrize(("changes", "expected"), [
    ({"layers": "a"}, "'a'"),
    ({"dataset": "{jsonl}", "text_column": "body"}, "'body'"),
    ({"dataset": "./no/such.txt"}, "'./no/such.txt'"),
], ids=["layer spec", "text column", "dataset path"])
def test_extract_checks_before_model_load(workspace, monkeypatch, changes, expected):
    import extract.loop

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(extract.loop, "load_model", load_model)
    args = [arg.format(**workspace.paths) for arg in extract_with(**changes)]

    result = run_command(extract_main, args)

    assert result.exit_code == 2, result.output
    assert expected in result.output


def test_bad_input_exit_code_is_two(workspace):
    # The exit code of every headlens error: scripts can tell bad input (2) from a failed check (1).
    result = run_command(extract_main, [arg.format(**workspace.paths) for arg in extract_with(layers="a")])
    assert result.exit_code == 2


def test_load_lens_for_other_layer_rejected(workspace):
    from train.saving import load_lens

    with pytest.raises(LensError) as caught:
        load_lens(workspace.paths["lens"], workspace.paths["store"], layer=0)
    message = caught.value.message
    assert "layer 1, not layer 0" in message
    assert "\n" not in message


def test_load_lens_for_other_model_rejected(workspace):
    from train.saving import load_lens

    with pytest.raises(LensError) as caught:
        load_lens(workspace.paths["lens"], workspace.paths["llama_store"])
    assert "W_U differs" in caught.value.message
