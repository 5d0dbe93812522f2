"""Build tiny offline models, a tokenizer and a text corpus for the test suite.

Everything here is deterministic and local: the tokenizer is trained on text defined in this
file, the models get random weights from a fixed seed, and nothing reads from the Hugging Face
Hub. The pytest fixtures in ``tests/conftest.py`` call these functions once per session.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

MODEL_KINDS = ("gpt2", "llama")
TINY_SEED = 0
TINY_VOCAB_SIZE = 512
TINY_CONTEXT_LENGTH = 64
ENDOFTEXT = "<|endoftext|>"

# Expected sizes of the tiny models. d_head is d_model / n_heads.
TINY_SIZES = {
    "gpt2": {"n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "d_model": 32, "d_head": 8, "d_mlp": 128},
    "llama": {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_model": 32, "d_head": 8, "d_mlp": 64},
}

# Hugging Face model class of each kind. TransformerBridge stores the same name in cfg.architecture.
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}

# Standard deviation of the noise added to norm weights and biases. Freshly initialized models
# have norm weights of exactly 1 and biases of exactly 0, so a bug that drops or misplaces one
# of them would not change any output.
NORM_AND_BIAS_NOISE_STD = 0.1

PROSE_PARAGRAPHS = [
    "The harbor wakes up slowly. Before the sun clears the hills, the first boats slide out "
    "past the stone wall, and the gulls follow them in loose circles. By the time the café on "
    "the corner opens its shutters, the water has turned from grey to a pale, uneven green.",
    "Baking bread takes patience more than skill. You mix flour, water, salt and a little "
    "yeast, then you wait. The dough rises while you do something else, and when you come "
    "back it has doubled in size. Folding it twice before it goes into the oven gives the "
    "crust its shape.",
    "The village library has only four rooms, but every shelf is full. Children sit on the "
    "carpet near the window and read picture books aloud to each other. In the back room, an "
    "old man is copying train timetables into a notebook, one column at a time.",
    "A long train journey changes how you count the hours. Towns appear and vanish, the light "
    "moves across the seats, and a conversation with a stranger can last for three stations. "
    "Nobody is in a hurry, because the train will arrive when it arrives.",
    "In spring the garden is mostly mud and promises. By June the beans have climbed their "
    "poles, the tomatoes need water every evening, and the weeds grow faster than anyone can "
    "pull them. In autumn the last apples fall into the long grass.",
    "The clockmaker works at a narrow bench under a bright lamp. He opens each watch with a "
    "thin blade, lifts out the tiny wheels with tweezers, and cleans them one by one. When a "
    "clock ticks evenly again, he writes the date on a small card and files it away.",
    "The path to the summit starts gently, between pine trees and small streams. After an "
    "hour the trees thin out, the wind gets colder, and the path turns into a line of "
    "painted stones. From the top you can see three lakes and, on a clear day, the sea.",
    "On market day the square fills with tables and voices. One farmer sells eggs and "
    "cheese, another sells honey in glass jars, and a woman with a red scarf sells knives "
    "that she sharpens while you wait. By two o'clock most of the tables are empty again.",
    "Tomorrow will start cloudy, with light rain along the coast. In the afternoon the wind "
    "will turn to the north, and the sky should clear before sunset. Temperatures will stay "
    "close to twelve degrees, a little cooler than today.",
    "A child learning to count will count anything: steps on a staircase, buttons on a coat, "
    "cars waiting at a red light. Seven is often skipped, and eleven sometimes comes right "
    "after nine, but the counting goes on with great confidence.",
    "Numbers have their own habits. An even number can always be split into two equal parts, "
    "and a prime number cannot be split into equal groups at all. Adding the first few odd "
    "numbers together always gives a square: one, four, nine, sixteen.",
    "The night shift at the bakery begins at eleven. Two people weigh the flour, one person "
    "cleans the trays, and the radio plays quietly in the corner. By five in the morning the "
    "shelves are full and the first customers are waiting outside the door.",
]

TIME_PHRASES = [
    "Early in the morning", "After the storm", "Last summer", "On Sunday", "Before dinner",
    "Every evening", "At noon", "During the festival", "Late at night", "Yesterday",
]
SUBJECTS = [
    "the baker", "a young teacher", "my neighbor", "the old captain", "a quiet student",
    "the gardener", "our team", "the farmer", "a tired traveler", "the river guide",
    "her brother", "the mayor",
]
VERBS = [
    "carried", "painted", "found", "repaired", "counted", "borrowed", "sold", "cleaned",
    "described", "followed", "opened", "measured",
]
OBJECTS = [
    "a wooden boat", "the heavy basket", "three green apples", "an old map", "the broken lamp",
    "a letter from home", "the morning bread", "a box of nails", "the small window",
    "a bright red kite", "the winter coats", "a jar of honey",
]
PLACES = [
    "near the harbor", "in the kitchen", "behind the station", "at the market",
    "under the bridge", "along the river", "in the garden", "on the hill",
    "inside the library", "by the school",
]
CLAUSES = [
    "because it was raining", "while the bells rang", "and nobody noticed",
    "so the children laughed", "but the door was locked", "before the light faded",
]

GENERATED_DOCUMENT_COUNT = 30
SENTENCES_PER_DOCUMENT = 8


def _generate_sentence(rng: random.Random) -> str:
    template = rng.randrange(3)
    time_phrase = rng.choice(TIME_PHRASES)
    subject = rng.choice(SUBJECTS)
    verb = rng.choice(VERBS)
    object_phrase = rng.choice(OBJECTS)
    place = rng.choice(PLACES)

    if template == 0:
        return f"{time_phrase}, {subject} {verb} {object_phrase} {place}."
    if template == 1:
        return f"{subject[0].upper()}{subject[1:]} {verb} {object_phrase} {rng.choice(CLAUSES)}."

    second_subject = rng.choice(SUBJECTS)
    second_verb = rng.choice(VERBS)
    second_object = rng.choice(OBJECTS)
    return (
        f"{time_phrase}, {subject} {verb} {object_phrase}, "
        f"and {second_subject} {second_verb} {second_object} {place}."
    )


def corpus_documents(seed: int = TINY_SEED) -> list[str]:
    """Return the built-in English documents: the prose paragraphs, then generated ones.

    The generated documents come from word lists with a seeded ``random.Random``, so the same
    seed always gives the same list.
    """
    rng = random.Random(seed)
    generated = []
    for _ in range(GENERATED_DOCUMENT_COUNT):
        sentences = [_generate_sentence(rng) for _ in range(SENTENCES_PER_DOCUMENT)]
        generated.append(" ".join(sentences))
    return list(PROSE_PARAGRAPHS) + generated


def build_tokenizer(path: str | Path, add_bos_token: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus_documents()`` and save it to ``path``.

    The vocabulary has ``TINY_VOCAB_SIZE`` entries, and ``<|endoftext|>`` (id 0) is the BOS,
    EOS and pad token. With ``add_bos_token`` the tokenizer prepends BOS to every encoded text,
    as Llama tokenizers do. Without it, the tokenizer adds no special tokens, as the GPT-2
    tokenizer does. The result reloads with ``AutoTokenizer.from_pretrained(path)``.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_documents(), trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        add_bos_token=add_bos_token,
        model_max_length=TINY_CONTEXT_LENGTH,
    )
    tokenizer.save_pretrained(path)
    return tokenizer


def tiny_config(kind: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """Return the config of a tiny ``kind`` model whose vocabulary matches ``tokenizer``."""
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if kind == "gpt2":
        # Dropout is off so that a model left in training mode still gives exact outputs.
        return GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=TINY_CONTEXT_LENGTH,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **special_ids,
        )
    if kind == "llama":
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=TINY_CONTEXT_LENGTH,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            **special_ids,
        )
    raise ValueError(f"Invalid model kind {kind!r}. Expected one of {MODEL_KINDS}.")


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


@torch.no_grad()
def _perturb_norms_and_biases(model: torch.nn.Module, std: float) -> None:
    """Add Gaussian noise to every norm weight and every bias, drawn from the global RNG."""
    for module in model.modules():
        if _is_norm(module) and getattr(module, "weight", None) is not None:
            module.weight.add_(torch.randn_like(module.weight) * std)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.nn.Parameter):
            bias.add_(torch.randn_like(bias) * std)


def build_tiny_model(kind: str, path: str | Path, seed: int = TINY_SEED) -> Path:
    """Save a tiny random ``kind`` model and its tokenizer together in ``path``.

    ``kind`` is ``"gpt2"`` or ``"llama"``. Weights come from ``seed``, with noise added to
    every norm weight and bias (GPT-2's attention output bias included), and the global torch
    RNG state is restored afterwards. The GPT-2 tokenizer adds no BOS and the Llama one
    prepends it, as the real tokenizers of those families do. Returns ``path`` as a Path, which
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` both load.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"Invalid model kind {kind!r}. Expected one of {MODEL_KINDS}.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(path, add_bos_token=(kind == "llama"))
    config = tiny_config(kind, tokenizer)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _perturb_norms_and_biases(model, NORM_AND_BIAS_NOISE_STD)

    model.eval()
    model.save_pretrained(path)
    return path


def read_model_kind(path: str | Path) -> str:
    """Return the kind ("gpt2" or "llama") of the model saved in ``path``, from its config.json."""
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    kind = config["model_type"]
    if kind not in MODEL_KINDS:
        raise ValueError(f"{path} contains a {kind!r} model. Expected one of {MODEL_KINDS}.")
    return kind


def write_text_corpus(path: str | Path) -> Path:
    """Write ``corpus_documents()`` to ``path`` as three .txt files, a .jsonl and a .parquet.

    Each .txt file contains several documents separated by blank lines. The .jsonl file has one
    ``{"id": ..., "text": ...}`` object per line. The .parquet file has ``id`` and ``text``
    columns and is written only when pyarrow is importable. Every document appears in exactly
    one file. Returns ``path`` as a Path.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    documents = corpus_documents()

    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        pyarrow = None

    # Split the documents into five groups: three .txt files, the .jsonl and the .parquet.
    # Without pyarrow the last group goes into the .jsonl file too.
    groups = [documents[i::5] for i in range(5)]
    for index, group in enumerate(groups[:3]):
        (path / f"part{index}.txt").write_text("\n\n".join(group) + "\n", encoding="utf-8")

    jsonl_documents = groups[3] if pyarrow is not None else groups[3] + groups[4]
    with open(path / "records.jsonl", "w", encoding="utf-8") as jsonl_file:
        for index, text in enumerate(jsonl_documents):
            jsonl_file.write(json.dumps({"id": index, "text": text}) + "\n")

    if pyarrow is not None:
        table = pyarrow.table({"id": list(range(len(groups[4]))), "text": groups[4]})
        pyarrow.parquet.write_table(table, path / "records.parquet")

    return path


def _model_sizes(model: object) -> dict[str, int | str | None]:
    """Read the architecture, layer count, head counts and width from a Hugging Face model or a
    TransformerLens model (anything with a ``cfg`` that has ``n_layers``)."""
    if isinstance(model, PreTrainedModel):
        config = model.config
        n_heads = config.num_attention_heads
        return {
            "architecture": type(model).__name__,
            "n_layers": config.num_hidden_layers,
            "n_heads": n_heads,
            "n_kv_heads": getattr(config, "num_key_value_heads", None) or n_heads,
            "d_model": config.hidden_size,
        }

    cfg = model.cfg
    # TransformerBridge sets cfg.architecture, HookedTransformer sets cfg.original_architecture.
    architecture = getattr(cfg, "architecture", None) or getattr(cfg, "original_architecture", None)
    return {
        "architecture": architecture,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        "d_model": cfg.d_model,
    }


def _assert_hf_weight_shapes(model: PreTrainedModel, kind: str) -> None:
    """Check the weight shapes themselves, in case a config field was ignored on load."""
    sizes = TINY_SIZES[kind]
    d_model = sizes["d_model"]
    kv_width = sizes["n_kv_heads"] * sizes["d_head"]

    if kind == "gpt2":
        blocks = model.transformer.h
        assert len(blocks) == sizes["n_layers"], f"gpt2 has {len(blocks)} blocks"
        # GPT-2 uses Conv1D, whose weight is [in_features, out_features].
        qkv_shape = tuple(blocks[0].attn.c_attn.weight.shape)
        assert qkv_shape == (d_model, 3 * d_model), f"gpt2 c_attn weight is {qkv_shape}"
        embedding_width = model.transformer.wte.weight.shape[1]
        assert embedding_width == d_model, f"gpt2 wte width is {embedding_width}"
        return

    layers = model.model.layers
    assert len(layers) == sizes["n_layers"], f"llama has {len(layers)} layers"
    attention = layers[0].self_attn
    q_shape = tuple(attention.q_proj.weight.shape)
    k_shape = tuple(attention.k_proj.weight.shape)
    v_shape = tuple(attention.v_proj.weight.shape)
    assert q_shape == (d_model, d_model), f"llama q_proj weight is {q_shape}"
    assert k_shape == (kv_width, d_model), f"llama k_proj weight is {k_shape}"
    assert v_shape == (kv_width, d_model), f"llama v_proj weight is {v_shape}"
    embedding_width = model.model.embed_tokens.weight.shape[1]
    assert embedding_width == d_model, f"llama embed_tokens width is {embedding_width}"


def assert_tiny_sizes(model: object, kind: str) -> None:
    """Assert that ``model`` has the sizes in ``TINY_SIZES[kind]``.

    ``model`` is a Hugging Face ``PreTrainedModel`` or a TransformerLens model or bridge. For a
    Hugging Face model the weight shapes are checked too, so a full-size model fails even if
    its config was edited to look tiny.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"Invalid model kind {kind!r}. Expected one of {MODEL_KINDS}.")
    expected = TINY_SIZES[kind]
    actual = _model_sizes(model)

    assert actual["architecture"] == ARCHITECTURES[kind], (
        f"{kind}: architecture is {actual['architecture']}"
    )
    assert actual["n_layers"] == expected["n_layers"], f"{kind}: n_layers is {actual['n_layers']}"
    assert actual["n_heads"] == expected["n_heads"], f"{kind}: n_heads is {actual['n_heads']}"
    assert actual["d_model"] == expected["d_model"], f"{kind}: d_model is {actual['d_model']}"
    assert actual["n_kv_heads"] == expected["n_kv_heads"], (
        f"{kind}: n_kv_heads is {actual['n_kv_heads']}"
    )

    if isinstance(model, PreTrainedModel):
        _assert_hf_weight_shapes(model, kind)
