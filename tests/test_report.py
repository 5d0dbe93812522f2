"""lens-eval side by side, bits per byte, head top tokens and the HTML report, on a tiny GPT-2."""

import base64
import io
import json
import logging
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lensio.reader import LayerBatches
from lensio.store import open_store
from tests.helpers_pipeline import CONTEXT, extract_store
from train.cli import eval_main
from train.config import TrainConfig
from train.evaluate import evaluate_details, lens_labels, token_byte_lengths, write_reports
from train.fit import run as train_run
from train.inspect import load_tokenizer
from train.report import write_html_report
from train.saving import load_lens

REPO = Path(__file__).resolve().parents[1]
OLD_KEYS = {"layer", "head", "lens", "kl_nats", "top1_agreement"}
NEW_KEYS = {"kl_bits_per_byte", "ce_nats", "ce_bits_per_byte", "n_next_tokens", "n_bytes", "kind", "lens_path"}


def train(store: str, layer: int, lenses: tuple[str, ...], out: Path, seed: int = 0) -> None:
    train_run(TrainConfig(store=store, layer=layer, lenses=lenses, out=str(out), max_steps=3, val_every=3,
                          batch_tokens=32, val_tokens=32, rank=2, seed=seed, devices=1, progress=False))


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> str:
    return extract_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir)


@pytest.fixture(scope="module")
def lens_root(tmp_path_factory, store_path) -> Path:
    """Lenses of one store: translator and lowrank on layer 1 (one call), translator on layer 0, and a
    second translator on layer 1 in another run folder."""
    root = tmp_path_factory.mktemp("lenses")
    train(store_path, 1, ("translator", "lowrank"), root / "runA")
    train(store_path, 0, ("translator",), root / "runA" / "layer00-translator")
    train(store_path, 1, ("translator",), root / "runB" / "layer01-translator", seed=1)
    return root


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, store_path, lens_root) -> Path:
    out = tmp_path_factory.mktemp("report")
    runs = lens_root / "runA"
    result = CliRunner().invoke(eval_main, [
        "--store", store_path, "--lens", str(runs / "layer01-translator"), str(runs / "layer01-lowrank"),
        str(runs / "layer00-translator"), "--out", str(out), "--report", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def rows(report_dir) -> list[dict]:
    return json.loads((report_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def html_text(report_dir) -> str:
    return (report_dir / "report.html").read_text(encoding="utf-8")


def embedded_pngs(html_text: str) -> list[bytes]:
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html_text)
    prefix = "data:image/png;base64,"
    assert all(source.startswith(prefix) for source in sources)
    return [base64.b64decode(source[len(prefix):], validate=True) for source in sources]


# --- side by side ----------------------------------------------------------------------------------


def test_side_by_side_rows_per_lens(rows):
    names = sorted({(row["layer"], row["lens"]) for row in rows})

    assert names == [(0, "dla"), (0, "translator"), (1, "dla"), (1, "lowrank"), (1, "translator")]
    assert len(rows) == 5 * 4
    assert len({(row["layer"], row["lens"], row["head"]) for row in rows}) == len(rows)


def test_side_by_side_records_lens_paths(rows, lens_root):
    paths = {(row["layer"], row["lens"]): row["lens_path"] for row in rows}

    assert paths[(1, "lowrank")] == str(lens_root / "runA" / "layer01-lowrank")
    assert paths[(0, "translator")] == str(lens_root / "runA" / "layer00-translator")
    assert paths[(1, "dla")] is None


def test_side_by_side_same_positions(rows):
    assert {row["n_positions"] for row in rows} == {2 * CONTEXT}  # the 2 held-out sequences
    assert {row["n_next_tokens"] for row in rows} == {2 * (CONTEXT - 1)}


def test_metrics_keep_old_keys_and_add_new(rows):
    for row in rows:
        assert OLD_KEYS <= set(row)
        assert NEW_KEYS <= set(row)


def test_same_kind_same_layer_named_apart(store_path, lens_root):
    store = open_store(store_path)
    paths = [lens_root / "runA" / "layer01-translator", lens_root / "runB" / "layer01-translator"]
    lenses = [load_lens(path, store) for path in paths]

    evaluation = evaluate_details(store, lenses, paths=paths, max_tokens=8, progress=False, tokenizer=None)
    names = sorted({row.lens for row in evaluation.rows})

    assert names == ["dla", "translator:runA/layer01-translator", "translator:runB/layer01-translator"]
    kl = {(row.lens, row.head): row.kl_nats for row in evaluation.rows}
    assert kl[("translator:runA/layer01-translator", 0)] != kl[("translator:runB/layer01-translator", 0)]


@pytest.mark.parametrize(("paths", "expected"), [
    (["a/x", "b/x"], ["translator:a/x", "translator:b/x"]),
    (["a/x", "a/y"], ["translator:x", "translator:y"]),
    (None, ["translator#1", "translator#2"]),
    (["a/x", None], ["translator#1", "translator#2"]),
    (["a/x", "a/x"], ["translator#1", "translator#2"]),
])
def test_lens_labels_table(store_path, lens_root, paths, expected):
    lens = load_lens(lens_root / "runA" / "layer01-translator", store_path)

    assert lens_labels([lens, lens], paths) == expected


def test_lens_labels_kind_when_unique(store_path, lens_root):
    lenses = [load_lens(lens_root / "runA" / "layer01-translator", store_path),
              load_lens(lens_root / "runA" / "layer00-translator", store_path)]

    assert lens_labels(lenses, ["p", "q"]) == ["translator", "translator"]


def test_eval_rejects_same_folder_twice(tmp_path, store_path, lens_root):
    lens = str(lens_root / "runA" / "layer01-lowrank")

    result = CliRunner().invoke(eval_main, ["--store", store_path, "--lens", lens, lens + "/", "--out",
                                            str(tmp_path / "out"), "--quiet"])

    assert result.exit_code == 2
    assert "is given twice" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


# --- cross-entropy and bits per byte ---------------------------------------------------------------


@pytest.fixture(scope="module")
def direct(store_path, lens_root):
    """Per-head KL and cross-entropy of the layer-1 translator, the model's cross-entropy, and the byte
    count of the next tokens, computed from the store without train.evaluate."""
    store = open_store(store_path)
    lens = load_lens(lens_root / "runA" / "layer01-translator", store)
    tokenizer = load_tokenizer(store)
    batch = next(iter(LayerBatches(store_path, 1, store.val_range, 10_000, shuffle=False)))
    with torch.no_grad():
        lens_logp = torch.log_softmax(lens(batch.z, batch.scale), -1)  # [tok, head, d_vocab]
    model_logp = torch.log_softmax(batch.target["normalized"].float() @ lens.W_U + lens.b_U, -1)  # [tok, d_vocab]
    kl = (model_logp.exp().unsqueeze(1) * (model_logp.unsqueeze(1) - lens_logp)).sum(-1)  # [tok, head]

    tokens = torch.from_numpy(np.asarray(store.group["tokens"][slice(*store.val_range)], dtype=np.int64))
    following = tokens[:, 1:].reshape(-1)  # [seq * (pos - 1)]
    known = (batch.position < CONTEXT - 1)
    lens_ce = -lens_logp[known].gather(-1, following[:, None, None].expand(-1, 4, 1)).squeeze(-1)  # [tok, head]
    model_ce = -model_logp[known].gather(-1, following[:, None]).squeeze(-1)
    n_bytes = sum(len(tokenizer.decode(row[1:].tolist(), skip_special_tokens=True).encode("utf-8")) for row in tokens)
    return {"kl_next": kl[known].sum(0), "ce": lens_ce, "model_ce": model_ce, "n_bytes": n_bytes}


def test_bytes_match_decoded_text(rows, direct):
    assert {row["n_bytes"] for row in rows} == {direct["n_bytes"]}


def test_cross_entropy_matches_direct(rows, direct):
    by_head = {row["head"]: row for row in rows if row["layer"] == 1 and row["lens"] == "translator"}

    for head in range(4):
        assert by_head[head]["ce_nats"] == pytest.approx(direct["ce"][:, head].mean().item(), rel=1e-4)


def test_bits_per_byte_match_direct(rows, direct):
    by_head = {row["head"]: row for row in rows if row["layer"] == 1 and row["lens"] == "translator"}

    for head in range(4):
        kl_bpb = direct["kl_next"][head].item() / math.log(2) / direct["n_bytes"]
        ce_bpb = direct["ce"][:, head].sum().item() / math.log(2) / direct["n_bytes"]
        assert by_head[head]["kl_bits_per_byte"] == pytest.approx(kl_bpb, rel=1e-4)
        assert by_head[head]["ce_bits_per_byte"] == pytest.approx(ce_bpb, rel=1e-4)


def test_model_reference_cross_entropy(store_path, lens_root, direct):
    store = open_store(store_path)
    lens = load_lens(lens_root / "runA" / "layer01-translator", store)

    evaluation = evaluate_details(store, [lens], progress=False)
    reference = evaluation.model[0]

    assert reference.layer == 1
    assert reference.ce_nats == pytest.approx(direct["model_ce"].mean().item(), rel=1e-4)
    assert reference.ce_bits_per_byte == pytest.approx(
        direct["model_ce"].sum().item() / math.log(2) / direct["n_bytes"], rel=1e-4)


def test_no_tokenizer_leaves_out_bits_per_byte(store_path, lens_root, caplog):
    store = open_store(store_path)
    lens = load_lens(lens_root / "runA" / "layer01-lowrank", store)

    with caplog.at_level(logging.WARNING, logger="train.evaluate"):
        evaluation = evaluate_details(store, [lens], max_tokens=16, progress=False, tokenizer=None)

    assert all(row.kl_bits_per_byte is None for row in evaluation.rows)
    assert all(row.ce_bits_per_byte is None for row in evaluation.rows)
    assert all(row.ce_nats is not None for row in evaluation.rows)
    assert "bits per byte are left out" in caplog.text


def test_unloadable_tokenizer_falls_back(tmp_path, store_path, lens_root, monkeypatch, caplog):
    store = open_store(store_path)
    store.meta = {**store.meta, "model": {**store.meta["model"], "path": str(tmp_path / "gone"), "source": "local"}}
    lens = load_lens(lens_root / "runA" / "layer01-lowrank", store)

    with caplog.at_level(logging.WARNING):
        evaluation = evaluate_details(store, [lens], max_tokens=16, progress=False)

    assert all(row.kl_bits_per_byte is None for row in evaluation.rows)
    assert "could not load the tokenizer" in caplog.text
    assert all(share.token.startswith("<") for entry in evaluation.top_tokens for share in entry.tokens)


def test_empty_cells_for_missing_values(tmp_path, store_path, lens_root):
    store = open_store(store_path)
    lens = load_lens(lens_root / "runA" / "layer01-lowrank", store)
    evaluation = evaluate_details(store, [lens], max_tokens=16, progress=False, tokenizer=None)

    paths = write_reports(evaluation.rows, tmp_path)
    header, first = paths["csv"].read_text().splitlines()[:2]
    cells = dict(zip(header.split(","), first.split(",")))

    assert cells["kl_bits_per_byte"] == ""
    assert cells["n_bytes"] == ""
    assert json.loads(paths["json"].read_text())[0]["kl_bits_per_byte"] is None


def test_token_bytes_special_and_padding(store_path):
    tokenizer = load_tokenizer(open_store(store_path))
    lengths = token_byte_lengths(tokenizer, len(tokenizer) + 3)

    assert lengths[tokenizer.eos_token_id] == 0
    assert lengths[len(tokenizer):].tolist() == [0, 0, 0]


@pytest.mark.parametrize("text", ["The café opens at nine.", "Bread \U0001f35e and tea \u2192 breakfast"])
def test_token_bytes_sum_to_text_bytes(store_path, text):
    tokenizer = load_tokenizer(open_store(store_path))
    lengths = token_byte_lengths(tokenizer, len(tokenizer))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


# --- head top tokens -------------------------------------------------------------------------------


def test_top_tokens_match_argmax_counts(store_path, lens_root):
    store = open_store(store_path)
    lens = load_lens(lens_root / "runA" / "layer01-lowrank", store)
    evaluation = evaluate_details(store, [lens], progress=False, baseline=False, top_n=3)
    batch = next(iter(LayerBatches(store_path, 1, store.val_range, 10_000, shuffle=False)))
    with torch.no_grad():
        first = lens(batch.z, batch.scale).argmax(-1)  # [tok, head]

    for entry in evaluation.top_tokens:
        counts = torch.bincount(first[:, entry.head], minlength=lens.d_vocab)
        assert [share.id for share in entry.tokens][:1] == [int(counts.argmax())]
        assert entry.tokens[0].share == pytest.approx(counts.max().item() / len(first))
        assert len(entry.tokens) <= 3


# --- report.html -----------------------------------------------------------------------------------


def test_report_has_no_web_references(html_text):
    assert "http://" not in html_text
    assert "https://" not in html_text
    assert "<script" not in html_text
    assert "<link" not in html_text
    assert "url(" not in html_text


def test_report_images_are_real_plots(html_text):
    images = embedded_pngs(html_text)

    assert len(images) == 3  # KL, top-1 agreement, lens minus baseline
    for png in images:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(png) > 10_000
        image = Image.open(io.BytesIO(png)).convert("RGB")
        assert image.width >= 400
        assert image.height >= 150
        colours = image.getcolors(maxcolors=1 << 20)
        assert len(colours) > 50


def test_report_lists_top_tokens_per_head(html_text, rows):
    for layer, lens in sorted({(row["layer"], row["lens"]) for row in rows}):
        for head in range(4):
            assert re.search(rf"<tr><td class=\"text\">{lens}</td><td>{layer}</td><td>{head}</td>", html_text)


def test_report_summary_rows(html_text):
    assert "model itself" in html_text
    assert "KL (bits/byte)" in html_text
    assert html_text.count('alt="') == 3


def test_report_without_baseline_has_two_plots(tmp_path, store_path, lens_root):
    store = open_store(store_path)
    lens = load_lens(lens_root / "runA" / "layer01-lowrank", store)
    evaluation = evaluate_details(store, [lens], max_tokens=16, progress=False, baseline=False)

    path = write_html_report(evaluation, tmp_path)

    assert len(embedded_pngs(path.read_text(encoding="utf-8"))) == 2


def test_report_renders_in_chromium(report_dir, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    out = tmp_path / "shot.png"

    result = subprocess.run(["bash", str(REPO / "scripts" / "screenshot_report.sh"), str(report_dir), str(out)],
                            capture_output=True, text=True, timeout=180, check=False)

    assert result.returncode == 0, result.stderr
    image = Image.open(out).convert("RGB")
    assert image.size == (1200, 1600)
    pixels = np.asarray(image, dtype=np.float32)
    assert pixels.std() > 10  # not a blank page
    assert len(image.getcolors(maxcolors=1 << 20)) > 100  # text and plots, not a flat fill


def test_screenshot_script_rejects_missing_report(tmp_path):
    result = subprocess.run(["bash", str(REPO / "scripts" / "screenshot_report.sh"), str(tmp_path),
                             str(tmp_path / "x.png")], capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 2
    assert "report.html not found" in result.stderr
