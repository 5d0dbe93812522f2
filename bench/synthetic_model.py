"""A model with SmolLM2-135M's shapes and random weights, saved as a local Hugging Face folder.

Usage: python -m bench.synthetic_model OUT_DIR

For machines the GGUF file cannot reach (the GPU machine takes at most 64 MiB of files, the GGUF is
98 MB): throughput depends on the shapes, not on the weights' values. The tokenizer is a byte-level
BPE trained here on standard-library docstrings, so the folder needs no network.
"""

import argparse
from pathlib import Path

import torch

# SmolLM2-135M-Instruct's configuration, as its GGUF header gives it.
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True}
TOKENIZER_VOCAB = 8192


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def stdlib_docstrings(limit: int = 2000) -> list[str]:
    import ast
    import sysconfig

    texts: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        texts.extend(d for d in (ast.get_docstring(n) for n in ast.walk(tree)
                                 if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))) if d)
        if len(texts) >= limit:
            break
    return texts


def build(out_dir: Path) -> Path:
    """Write the model and tokenizer to ``out_dir`` (created) and return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    model.save_pretrained(out_dir)
    train_tokenizer(stdlib_docstrings()).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a random-weight model with SmolLM2-135M's shapes.")
    parser.add_argument("out_dir", type=Path, help="folder to write the model and tokenizer to (about 540 MB)")
    print(build(parser.parse_args().out_dir))
