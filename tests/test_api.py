"""The README's Python API example, run as written, gives the numbers lens-inspect and lens-eval print."""

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lensio.store import open_store
from tests.helpers_pipeline import CONTEXT, extract_store
from train.cli import eval_main, inspect_main
from train.config import TrainConfig
from train.fit import run as train_run
from train.saving import load_lens

README = Path(__file__).resolve().parents[1] / "README.md"
# The example names these paths; the test builds them from a tiny GPT-2, whose layer 1 replaces layer 5.
STORE_NAME = "acts.zarr"
LENS_NAME = "lenses/layer05-translator"
LAYER = 1


def readme_example() -> str:
    """The first Python code block after the README's "Python API" heading."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Python API"):]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match is not None, "README has no python block under 'Python API'"
    return match.group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> Path:
    """A folder holding ``acts.zarr`` and ``lenses/layer05-translator``, as the README example expects."""
    store = extract_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir)
    root = tmp_path_factory.mktemp("api")
    (root / STORE_NAME).symlink_to(store)
    train_run(TrainConfig(store=str(root / STORE_NAME), layer=LAYER, lenses=("translator",), out=str(root / LENS_NAME),
                          max_steps=3, val_every=3, batch_tokens=32, val_tokens=32, devices=1, progress=False))
    return root


@pytest.fixture(scope="module")
def names(workdir) -> dict:
    """The variables the README example leaves behind, run from inside ``workdir``."""
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        exec(compile(readme_example(), str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    return namespace


def cli_json(workdir: Path, command, args: list[str]) -> str:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        result = CliRunner().invoke(command, [*args, "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_example_probabilities_shape(names):
    assert names["lens"].layer == LAYER
    assert names["probs"].shape == (CONTEXT, 4, names["lens"].d_vocab)
    assert torch.allclose(names["probs"].sum(-1), torch.ones(CONTEXT, 4), atol=1e-5)


def test_example_top_matches_inspect_command(names, workdir):
    output = cli_json(workdir, inspect_main, ["--lens", LENS_NAME, "--example", str(names["example"]), "--format",
                                              "json"])
    printed = json.loads(output)

    assert printed["position"] == CONTEXT - 1
    for head in printed["heads"]:
        assert [entry["id"] for entry in head["top"]] == names["top"].indices[head["head"]].tolist()
        assert [entry["prob"] for entry in head["top"]] == pytest.approx(
            names["top"].values[head["head"]].tolist(), abs=1e-5)


def test_example_run_matches_inspect_command(names, workdir):
    output = cli_json(workdir, inspect_main, ["--lens", LENS_NAME, "--example", str(names["example"]), "--format",
                                              "json"])

    assert json.loads(output) == json.loads(json.dumps(names["result"]))


def test_example_rows_match_eval_command(names, workdir):
    cli_json(workdir, eval_main, ["--store", STORE_NAME, "--lens", LENS_NAME, "--out", "report"])
    printed = json.loads((workdir / "report" / "metrics.json").read_text())

    assert len(names["rows"]) == len(printed)
    for row, expected in zip(names["rows"], printed):
        assert (row.lens, row.layer, row.head) == (expected["lens"], expected["layer"], expected["head"])
        assert row.kl_nats == pytest.approx(expected["kl_nats"], rel=1e-6)
        assert row.top1_agreement == expected["top1_agreement"]
        assert row.ce_bits_per_byte == pytest.approx(expected["ce_bits_per_byte"], rel=1e-6)


def test_predict_takes_head_results(workdir):
    store = open_store(str(workdir / STORE_NAME))
    lens = load_lens(workdir / LENS_NAME)
    z = torch.from_numpy(store.read_activations(f"layers/{LAYER}/z", 0, 1)[0])  # [pos, head, d_head]
    results = torch.einsum("phd,hdm->phm", z, lens.W_O)  # [pos, head, d_model]

    assert torch.allclose(lens.predict(results), lens.predict(z), atol=1e-6)
