"""The console commands end to end on a tiny model: lens-extract, lens-train, lens-eval and lens-inspect."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from extract.cli import main as extract_main
from lensio.reader import LayerBatches
from lensio.store import open_store
from train.cli import eval_main, inspect_main, train_main
from train.loss import kl_div_logits
from train.saving import load_lens
from tests.helpers_pipeline import CONTEXT

LAYER = 1
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRIC_KEYS = {"layer", "head", "lens", "kl_nats", "kl_bits", "top1_agreement", "n_positions"}  # at least these


def invoke(command, args: list[str]):
    """Run a click command in-process and fail with its output when it does not exit with 0."""
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def store_path(workdir, tiny_gpt2_dir, text_corpus_dir) -> str:
    out = str(workdir / "acts.zarr")
    invoke(extract_main, ["--model", str(tiny_gpt2_dir), "--layers", "0-1", "--dataset", str(text_corpus_dir),
                          "--out", out, "--context", str(CONTEXT), "--tokens", "640", "--chunk-sequences", "4",
                          "--dtype", "float32", "--quiet"])
    return out


@pytest.fixture(scope="module")
def trained(workdir, store_path):
    """Train a translator lens with the default output path, from inside ``workdir``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        result = invoke(train_main, ["--store", store_path, "--layer", str(LAYER), "--lens", "translator",
                                     "--max-steps", "4", "--val-every", "2", "--batch-tokens", "32", "--quiet"])
    return result, workdir / "lenses" / f"layer{LAYER:02d}-translator"


@pytest.fixture(scope="module")
def report(workdir, store_path, trained):
    _, lens_dir = trained
    out = workdir / "report"
    result = invoke(eval_main, ["--store", store_path, "--lens", str(lens_dir), "--out", str(out), "--quiet"])
    return result, out


# --- lens-extract ----------------------------------------------------------------------------------


def test_extract_writes_complete_store(store_path):
    store = open_store(store_path)

    assert store.complete is True
    assert store.layers == (0, 1)
    assert store.layout.n_sequences == 640 // CONTEXT
    assert store.layout.seqs_per_chunk == 4


def test_extract_prints_summary(workdir, tiny_gpt2_dir, text_corpus_dir):
    out = str(workdir / "small.zarr")

    result = invoke(extract_main, ["--model", str(tiny_gpt2_dir), "--layers", "0", "--dataset",
                                   str(text_corpus_dir), "--out", out, "--context", str(CONTEXT), "--tokens", "64",
                                   "--quiet"])

    assert f"store {out}: 4 sequences; wrote 64 tokens" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--layers", "5-2"], "invalid layer spec '5-2'"),
    (["--layers", "7"], "layer 7 is out of range"),
    (["--context", "0"], "--context must be positive"),
    (["--dataset", "/no/such/corpus.jsonl"], "not found"),
])
def test_extract_rejects_bad_input(workdir, tiny_gpt2_dir, text_corpus_dir, args, message):
    base = {"--model": str(tiny_gpt2_dir), "--layers": "0", "--dataset": str(text_corpus_dir),
            "--out": str(workdir / "rejected.zarr"), "--context": str(CONTEXT), "--tokens": "64"}
    base.update(dict(zip(args[::2], args[1::2])))

    result = CliRunner().invoke(extract_main, [*(item for pair in base.items() for item in pair), "--quiet"])

    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (workdir / "rejected.zarr").exists()


# --- lens-train ------------------------------------------------------------------------------------


def test_train_default_output_folder(trained):
    result, lens_dir = trained

    assert lens_dir.is_dir()
    assert sorted(p.name for p in lens_dir.iterdir()) == ["config.json", "lens.safetensors"]
    assert str(Path("lenses") / "layer01-translator") in result.output


def test_train_config_records_run(trained, store_path):
    _, lens_dir = trained
    config = json.loads((lens_dir / "config.json").read_text())

    assert config["lens"] == "translator"
    assert config["layer"] == LAYER
    assert config["objective"] == "per-head"
    assert config["store"]["url"] == store_path
    assert config["metrics"]["steps"] == 4
    assert config["metrics"]["best_val_kl_nats"] >= 0.0
    assert config["training"]["batch_tokens"] == 32


def test_train_moves_lens_from_init(trained, store_path):
    _, lens_dir = trained
    lens = load_lens(lens_dir, store_path)

    assert not torch.equal(lens.weight, torch.eye(32).expand(4, -1, -1))


def test_train_leaves_no_checkpoints(trained):
    _, lens_dir = trained

    assert sorted(p.name for p in lens_dir.parent.iterdir()) == [lens_dir.name]


def test_train_lens_folder_readable_by_others(trained):
    _, lens_dir = trained
    umask = os.umask(0)
    os.umask(umask)

    assert lens_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("config.json", "lens.safetensors"):
        assert (lens_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("quiet", [False, True])
def test_train_output_through_script(workdir, store_path, quiet):
    """Lightning's banners and its epoch bar stay out; the step bar shows unless --quiet."""
    out = workdir / f"script-{quiet}"
    args = [str(Path(sys.executable).parent / "lens-train"), "--store", store_path, "--layer", "0", "--out", str(out),
            "--max-steps", "3", "--val-every", "3", "--batch-tokens", "32"] + (["--quiet"] if quiet else [])

    result = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)

    assert result.returncode == 0, result.stderr
    assert "Epoch" not in result.stderr
    assert "not empty" not in result.stderr
    assert ("GPU available" in result.stderr) is not quiet
    assert ("train layer 0 translator" in result.stderr) is not quiet
    if not quiet:
        assert "3/3" in result.stderr
    else:
        assert result.stderr.strip() == ""


def test_train_cli_import_skips_lightning():
    code = "import sys, train.cli; print('lightning' in sys.modules)"

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)

    assert result.stdout.strip() == "False"


def test_train_several_lenses_into_parent(workdir, store_path):
    out = workdir / "several"

    invoke(train_main, ["--store", store_path, "--layer", "0", "--lens", "lowrank,dla", "--rank", "2", "--out",
                        str(out), "--max-steps", "2", "--val-every", "2", "--batch-tokens", "32", "--quiet"])

    assert sorted(p.name for p in out.iterdir()) == ["layer00-dla", "layer00-lowrank"]
    assert load_lens(out / "layer00-lowrank", store_path).rank == 2
    assert load_lens(out / "layer00-dla", store_path).kind == "dla"


@pytest.mark.parametrize(("args", "message"), [
    (["--lens", "mirror"], "unknown lens 'mirror'"),
    (["--layer", "5"], "layer 5 is not in store"),
    (["--batch-tokens", "0"], "--batch-tokens must be positive"),
])
def test_train_rejects_bad_input(store_path, args, message):
    base = {"--store": store_path, "--layer": str(LAYER), "--max-steps": "1"}
    base.update(dict(zip(args[::2], args[1::2])))

    result = CliRunner().invoke(train_main, [*(item for pair in base.items() for item in pair), "--quiet"])

    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


# --- lens-eval -------------------------------------------------------------------------------------


def test_eval_metrics_json_rows(report):
    _, out = report
    rows = json.loads((out / "metrics.json").read_text())

    assert len(rows) == 8  # 4 heads, translator and the dla baseline
    assert all(METRIC_KEYS <= set(row) for row in rows)
    assert sorted((row["lens"], row["head"]) for row in rows) == [(lens, head) for lens in ("dla", "translator")
                                                                  for head in range(4)]
    assert all(row["layer"] == LAYER for row in rows)
    assert all(row["n_positions"] == 2 * CONTEXT for row in rows)  # the 2 held-out sequences
    for row in rows:
        assert row["kl_nats"] >= 0.0
        assert 0.0 <= row["top1_agreement"] <= 1.0
        assert row["kl_bits"] == pytest.approx(row["kl_nats"] / math.log(2))


def test_eval_kl_matches_direct_computation(report, trained, store_path):
    _, out = report
    _, lens_dir = trained
    rows = {(row["lens"], row["head"]): row for row in json.loads((out / "metrics.json").read_text())}
    store = open_store(store_path)
    lens = load_lens(lens_dir, store)
    batch = next(iter(LayerBatches(store_path, LAYER, store.val_range, 10_000, shuffle=False)))
    model_logits = batch.target["normalized"].float() @ lens.W_U + lens.b_U  # [tok, d_vocab]

    with torch.no_grad():
        lens_logits = lens(batch.z, batch.scale)  # [tok, head, d_vocab]
    kl = kl_div_logits(model_logits.unsqueeze(1).expand_as(lens_logits), lens_logits).mean(0)  # [head]
    top1 = (lens_logits.argmax(-1) == model_logits.argmax(-1, keepdim=True)).float().mean(0)

    for head in range(4):
        assert rows[("translator", head)]["kl_nats"] == pytest.approx(kl[head].item(), rel=1e-4)
        assert rows[("translator", head)]["top1_agreement"] == pytest.approx(top1[head].item())


def test_eval_csv_matches_json(report):
    _, out = report
    rows = json.loads((out / "metrics.json").read_text())

    with (out / "metrics.csv").open(newline="") as handle:
        csv_rows = list(csv.DictReader(handle))

    assert len(csv_rows) == len(rows)
    for json_row, csv_row in zip(rows, csv_rows):
        assert set(csv_row) == set(json_row)
        assert csv_row["lens"] == json_row["lens"]
        assert int(csv_row["layer"]) == json_row["layer"]
        assert int(csv_row["head"]) == json_row["head"]
        assert float(csv_row["kl_nats"]) == pytest.approx(json_row["kl_nats"])
        assert float(csv_row["top1_agreement"]) == pytest.approx(json_row["top1_agreement"])


def test_eval_heatmap_png(report):
    import matplotlib.image

    _, out = report
    path = out / "heatmap.png"

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3
    assert image.shape[0] >= 100
    assert image.shape[1] >= 200
    assert image.std() > 0.01  # not a blank canvas


def test_eval_prints_summary(report):
    result, out = report

    assert "layer 1 translator" in result.output
    assert "layer 1 dla" in result.output
    assert str(out / "metrics.json") in result.output


def test_eval_no_baseline(workdir, store_path, trained):
    _, lens_dir = trained
    out = workdir / "report-no-baseline"

    invoke(eval_main, ["--store", store_path, "--lens", str(lens_dir), "--out", str(out), "--no-baseline",
                       "--max-tokens", "8", "--quiet"])
    rows = json.loads((out / "metrics.json").read_text())

    assert {row["lens"] for row in rows} == {"translator"}
    assert {row["n_positions"] for row in rows} == {8}


# --- lens-inspect ----------------------------------------------------------------------------------


def test_inspect_table_row_per_head(trained, store_path):
    _, lens_dir = trained

    result = invoke(inspect_main, ["--lens", str(lens_dir), "--store", store_path, "--quiet"])
    lines = result.output.splitlines()

    assert [line.split()[1] for line in lines if line.startswith("head ")] == ["0", "1", "2", "3"]
    assert sum(1 for line in lines if line.startswith("model ")) == 1
    assert "translator lens, layer 1" in lines[0]


def test_inspect_selected_heads(trained, store_path):
    _, lens_dir = trained

    result = invoke(inspect_main, ["--lens", str(lens_dir), "--store", store_path, "--heads", "0,2", "--quiet"])

    assert [line.split()[1] for line in result.output.splitlines() if line.startswith("head ")] == ["0", "2"]


def test_inspect_json_matches_lens(trained, store_path):
    _, lens_dir = trained
    store = open_store(store_path)
    lens = load_lens(lens_dir, store)

    result = invoke(inspect_main, ["--lens", str(lens_dir), "--store", store_path, "--format", "json",
                                   "--top-k", "3", "--quiet"])
    data = json.loads(result.output)
    example, position = store.val_range[0], CONTEXT - 1
    z = torch.from_numpy(store.read_activations(f"layers/{LAYER}/z", example, example + 1))[0, position]
    probs = lens.predict(z.unsqueeze(0))[0]  # [head, d_vocab]

    assert data["example"] == example
    assert data["position"] == position
    assert len(data["heads"]) == 4
    assert len(data["model_top"]) == 3
    for head in data["heads"]:
        assert [entry["id"] for entry in head["top"]] == probs[head["head"]].topk(3).indices.tolist()


@pytest.mark.parametrize(("args", "message"), [
    (["--example", "999"], "--example 999 is out of range"),
    (["--top-k", "0"], "--top-k must be positive"),
    (["--position", "16"], "--position 16"),
])
def test_inspect_rejects_bad_input(trained, store_path, args, message):
    _, lens_dir = trained

    result = CliRunner().invoke(inspect_main, ["--lens", str(lens_dir), "--store", store_path, *args, "--quiet"])

    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


# --- installed scripts -----------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["lens-extract", "lens-train"])
def test_installed_script_help(script):
    path = Path(sys.executable).parent / script

    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: {script}")
    assert "--store" in result.stdout or "--model" in result.stdout
