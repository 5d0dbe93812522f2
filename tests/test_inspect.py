"""lens-inspect on a tiny GPT-2: stored examples, new prompts, head selection, output formats, bad input."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lensio.errors import BadInputError
from lensio.store import open_store
from tests.helpers_pipeline import CONTEXT, attention_module, extract_store, plain_hf_model
from train.cli import inspect_main
from train.config import TrainConfig
from train.fit import run as train_run
from train.inspect import (
    MARK_CLOSE,
    MARK_OPEN,
    InspectConfig,
    format_probability,
    format_table,
    load_tokenizer,
    parse_heads,
    run,
)
from train.saving import load_lens

LAYER = 1
PROMPT = "The baker opens the shop before the sun"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir) -> str:
    return extract_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir)


@pytest.fixture(scope="module")
def lens_dirs(tmp_path_factory, store_path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("inspect-lenses")
    train_run(TrainConfig(store=store_path, layer=LAYER, lenses=("translator", "dla"), out=str(root), max_steps=3,
                          val_every=3, batch_tokens=32, val_tokens=32, devices=1, progress=False))
    return {kind: str(root / f"layer{LAYER:02d}-{kind}") for kind in ("translator", "dla")}


@pytest.fixture(scope="module")
def tokenizer(store_path):
    return load_tokenizer(open_store(store_path))


def stored_inputs(store_path: str, example: int):
    """Tokens [pos], z [pos, head, d_head], scale [pos] and model probabilities [pos, d_vocab] of one example."""
    store = open_store(store_path)
    z = torch.from_numpy(store.read_activations(f"layers/{LAYER}/z", example, example + 1)[0])
    scale = torch.from_numpy(np.asarray(store.group["final/scale"][example], dtype=np.float32))
    normalized = torch.from_numpy(np.asarray(store.group["final/normalized"][example], dtype=np.float32))
    probs = torch.softmax(normalized @ store.params["W_U"] + store.params["b_U"], -1)
    return store.group["tokens"][example].tolist(), z, scale, probs


def invoke(args: list[str]):
    return CliRunner().invoke(inspect_main, [*args, "--quiet"])


# --- stored examples -------------------------------------------------------------------------------


def test_default_is_last_position_of_first_held_out(store_path, lens_dirs):
    result = run(InspectConfig(lens_dirs["translator"], store=store_path))

    assert result["example"] == open_store(store_path).val_range[0]
    assert result["position"] == CONTEXT - 1
    assert result["length"] == CONTEXT
    assert result["next_token"] is None
    assert result["next_token_id"] is None
    assert all(head["next_token_prob"] is None for head in result["heads"])


@pytest.mark.parametrize("kind", ["translator", "dla"])
def test_head_top_k_matches_lens(store_path, lens_dirs, kind):
    lens = load_lens(lens_dirs[kind], store_path)
    tokens, z, scale, _ = stored_inputs(store_path, 3)

    result = run(InspectConfig(lens_dirs[kind], store=store_path, example=3, position=5, top_k=4))
    probs = lens.predict(z[5:6], scale[5:6])[0]  # [head, d_vocab]

    assert [head["head"] for head in result["heads"]] == [0, 1, 2, 3]
    for head in result["heads"]:
        top = probs[head["head"]].topk(4)
        assert [entry["id"] for entry in head["top"]] == top.indices.tolist()
        assert [entry["prob"] for entry in head["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert head["next_token_prob"] == pytest.approx(probs[head["head"], tokens[6]].item(), abs=1e-5)


def test_model_top_k_matches_store(store_path, lens_dirs):
    tokens, _, _, probs = stored_inputs(store_path, 3)

    result = run(InspectConfig(lens_dirs["translator"], store=store_path, example=3, position=5, top_k=4))

    assert [entry["id"] for entry in result["model_top"]] == probs[5].topk(4).indices.tolist()
    assert result["model_next_token_prob"] == pytest.approx(probs[5, tokens[6]].item(), abs=1e-5)


def test_text_marks_position(store_path, lens_dirs, tokenizer):
    tokens, _, _, _ = stored_inputs(store_path, 3)

    result = run(InspectConfig(lens_dirs["translator"], store=store_path, example=3, position=5))
    text = result["text"]

    assert text["token"] == tokenizer.decode([tokens[5]])
    assert text["before"] == tokenizer.decode(tokens[:5])
    assert text["after"] == tokenizer.decode(tokens[6:14])
    assert result["context"] == f"{text['before']}{MARK_OPEN}{text['token']}{MARK_CLOSE}{text['after']}"
    assert result["token_id"] == tokens[5]
    assert result["next_token_id"] == tokens[6]
    assert result["next_token"] == tokenizer.decode([tokens[6]])


def test_negative_position_counts_from_end(store_path, lens_dirs):
    result = run(InspectConfig(lens_dirs["translator"], store=store_path, example=0, position=-3))

    assert result["position"] == CONTEXT - 3


def test_store_defaults_to_training_store(store_path, lens_dirs):
    result = run(InspectConfig(lens_dirs["translator"], example=2, position=4))

    assert result["token_id"] == stored_inputs(store_path, 2)[0][4]


def test_topk_store_model_column(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir, lens_dirs):
    topk_store = extract_store(tmp_path_factory, tiny_gpt2_dir, text_corpus_dir, logits="topk", top_k=8)
    store = open_store(topk_store)
    ids = store.group["final/topk_ids"][3, 5].tolist()
    logprobs = store.group["final/topk_logprobs"][3, 5]

    result = run(InspectConfig(lens_dirs["translator"], store=topk_store, example=3, position=5, top_k=5))

    assert [entry["id"] for entry in result["model_top"]] == ids[:5]
    assert [entry["prob"] for entry in result["model_top"]] == pytest.approx(np.exp(logprobs[:5]).tolist(), abs=1e-5)


# --- heads -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "expected"), [
    (None, (0, 1, 2, 3)),
    ("all", (0, 1, 2, 3)),
    ("2", (2,)),
    ("3,0", (0, 3)),
    ("1-3", (1, 2, 3)),
    (" 0 , 2 ", (0, 2)),
])
def test_parse_heads(spec, expected):
    assert parse_heads(spec, 4) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("4", "head 4 is out of range: the lens has 4 heads (0-3)"),
    ("0-9", "head 4 is out of range"),
    ("2-1", "invalid --heads '2-1'"),
    ("a", "invalid --heads 'a'"),
    ("", "invalid --heads ''"),
    ("0,,1", "invalid --heads '0,,1'"),
    ("-1", "invalid --heads '-1'"),
])
def test_parse_heads_rejects(spec, message):
    with pytest.raises(BadInputError) as caught:
        parse_heads(spec, 4)

    assert message in str(caught.value)


def test_selected_heads_only(store_path, lens_dirs):
    result = run(InspectConfig(lens_dirs["translator"], store=store_path, heads="1,3"))

    assert [head["head"] for head in result["heads"]] == [1, 3]


# --- output formats --------------------------------------------------------------------------------


def test_table_layout(store_path, lens_dirs):
    result = run(InspectConfig(lens_dirs["translator"], store=store_path, example=3, position=5, top_k=3))

    lines = format_table(result).splitlines()

    assert lines[0] == f"translator lens, layer {LAYER}, example 3, position 5 of {CONTEXT}"
    assert lines[1].startswith(f"text: {result['context']!r}")
    assert lines[2] == f"actual next token: {result['next_token']!r}"
    assert lines[3].split() == ["rank", "1", "rank", "2", "rank", "3", "p(next)"]
    assert lines[4].startswith("model ")
    assert lines[4].endswith(format_probability(result["model_next_token_prob"]))
    assert [line.split()[1] for line in lines[5:]] == ["0", "1", "2", "3"]
    for line, head in zip(lines[5:], result["heads"]):
        assert f"{head['top'][0]['token']!r} {format_probability(head['top'][0]['prob'])}" in line
        assert line.endswith(format_probability(head["next_token_prob"]))


@pytest.mark.parametrize(("prob", "text"), [(0.5, "0.500"), (0.001, "0.001"), (2.1e-05, "2.1e-05"), (0.0, "0.000")])
def test_format_probability(prob, text):
    assert format_probability(prob) == text


def test_table_without_next_token(store_path, lens_dirs):
    result = run(InspectConfig(lens_dirs["translator"], store=store_path, top_k=2))

    lines = format_table(result).splitlines()

    assert not any(line.startswith("actual next token") for line in lines)
    assert "p(next)" not in lines[2]


def test_cli_json_matches_run(store_path, lens_dirs):
    outcome = invoke(["--lens", lens_dirs["translator"], "--store", store_path, "--example", "1", "--position", "7",
                      "--heads", "0-1", "--top-k", "2", "--format", "json"])

    assert outcome.exit_code == 0, outcome.output
    expected = run(InspectConfig(lens_dirs["translator"], store=store_path, example=1, position=7, heads="0-1",
                                 top_k=2))
    assert json.loads(outcome.output) == json.loads(json.dumps(expected))


def test_cli_table_default(store_path, lens_dirs):
    outcome = invoke(["--lens", lens_dirs["dla"], "--store", store_path])

    assert outcome.exit_code == 0, outcome.output
    assert outcome.output.splitlines()[0].startswith(f"dla lens, layer {LAYER}, example ")


@pytest.mark.parametrize(("args", "message"), [
    (["--top-k", "0"], "--top-k must be positive, got 0"),
    (["--prompt", "hello"], "--prompt and --model go together"),
    (["--example", "999"], "--example 999 is out of range: the store contains sequences 0-39"),
    (["--example", "-1"], "--example -1 is out of range"),
    (["--position", str(CONTEXT)], f"--position {CONTEXT} is out of range for a sequence of {CONTEXT} tokens"),
    (["--position", str(-CONTEXT - 1)], f"--position {-CONTEXT - 1} is out of range"),
    (["--heads", "7"], "head 7 is out of range"),
    (["--heads", "x"], "invalid --heads 'x'"),
    (["--example", "0", "--prompt", "hi", "--model", "gpt2"], "--example 0 and --prompt exclude each other"),
    (["--format", "xml"], "Invalid value for '--format'"),
])
def test_cli_rejects_bad_input(store_path, lens_dirs, args, message):
    outcome = invoke(["--lens", lens_dirs["translator"], "--store", store_path, *args])

    assert outcome.exit_code == 2
    assert message in outcome.output
    assert "Traceback" not in outcome.output


# --- new prompts -----------------------------------------------------------------------------------


def hf_prompt_outputs(model_dir, ids: list[int]):
    """Logits [pos, d_vocab] and layer ``LAYER``'s per-head attention output before W_O [pos, head, d_head],
    from transformers alone (the input of GPT-2's c_proj)."""
    model = plain_hf_model(str(model_dir))
    captured = {}
    projection = attention_module(model, LAYER).c_proj
    handle = projection.register_forward_pre_hook(lambda module, args: captured.update(z=args[0].detach()))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
    finally:
        handle.remove()
    return logits, captured["z"][0].reshape(len(ids), 4, -1).float()


def test_prompt_matches_transformers(store_path, lens_dirs, tiny_gpt2_dir, tokenizer):
    lens = load_lens(lens_dirs["translator"], store_path)
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    logits, z = hf_prompt_outputs(tiny_gpt2_dir, ids)

    result = run(InspectConfig(lens_dirs["translator"], prompt=PROMPT, model=str(tiny_gpt2_dir), position=-2,
                               top_k=3))
    position = len(ids) - 2
    probs = lens.predict(z[position:position + 1])[0]  # [head, d_vocab]

    assert result["example"] is None
    assert result["length"] == len(ids)
    assert result["position"] == position
    assert result["next_token_id"] == ids[-1]
    assert [entry["id"] for entry in result["model_top"]] == logits[position].topk(3).indices.tolist()
    for head in result["heads"]:
        assert [entry["id"] for entry in head["top"]] == probs[head["head"]].topk(3).indices.tolist()
    assert format_table(result).splitlines()[0].startswith(f"translator lens, layer {LAYER}, prompt, position")


def test_prompt_rejects_other_model(store_path, lens_dirs, tiny_llama_dir):
    outcome = invoke(["--lens", lens_dirs["translator"], "--store", store_path, "--prompt", PROMPT, "--model",
                      str(tiny_llama_dir)])

    assert outcome.exit_code == 2
    assert "W_U differs" in outcome.output
    assert "Traceback" not in outcome.output
