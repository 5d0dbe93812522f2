"""E1 and E3: extraction throughput against the model's plain forward pass, and proof that extraction
skips the unembedding.

Usage: .venv/bin/python -m bench.extract_speed [--batches 4] [--batch-size 8] [--context 128]
       [--layers 10,20,28] [--device cpu] [--autocast bfloat16] [--store-dtype float16] [--keep-store PATH]

E1 runs the same token batches through (a) the bridge's plain forward pass, logits included, and
(b) headlens's extraction step (hooks, numerics check, dtype cast, and background writes of whole
shards to a real store on disk), alternating a and b so drift hits both. E3 profiles one
extraction batch with torch.profiler and reports whether any matmul produced d_vocab columns.
``--autocast`` runs both sides under torch.autocast at that dtype (the GPU check uses bfloat16);
``--keep-store`` keeps the written store for the reader benchmark.
"""

import argparse
import contextlib
import shutil
import tempfile

import numpy as np
import torch

from bench.common import Timer, corpus_path, emit, model_source
from extract.loop import check_numerics, run_batch, to_storage
from extract.models import load_model, parse_model_source
from extract.packing import pack_documents
from extract.text import iter_documents, parse_text_source
from lensio.layers import parse_layers
from lensio.schema import Compressor, LogitsMode, StoreDtype, StoreLayout, validation_split
from lensio.writer import BlockWriter, prepare_store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--layers", default="10,20,28")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], default=None)
    parser.add_argument("--store-dtype", choices=[d.value for d in StoreDtype], default=StoreDtype.FLOAT16.value)
    parser.add_argument("--keep-store", default=None, help="folder to copy the written store to")
    args = parser.parse_args()
    store_dtype = StoreDtype(args.store_dtype)

    def precision():
        if args.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=args.device.split(":")[0], dtype=getattr(torch, args.autocast))

    model = load_model(parse_model_source(model_source()), args.device)
    layers = parse_layers(args.layers, model.n_layers)
    n_seq = args.batches * args.batch_size
    tokens = pack_documents(model.tokenizer, iter_documents(parse_text_source(str(corpus_path())), 0), args.context,
                            n_seq * args.context)
    batches = [torch.from_numpy(tokens[i:i + args.batch_size]).long().to(args.device)
               for i in range(0, n_seq, args.batch_size)]

    with tempfile.TemporaryDirectory() as tmp:
        layout = StoreLayout.plan(n_sequences=n_seq, context=args.context, n_heads=model.n_heads, d_head=model.d_head,
                                  d_model=model.d_model, d_vocab=model.d_vocab, layers=layers,
                                  dtype=store_dtype, logits=LogitsMode.FACTORED)
        # One block per batch, so every batch's data is written while the next one computes.
        layout = StoreLayout(**{**layout.__dict__, "seqs_per_chunk": args.batch_size, "chunks_per_shard": 1})
        meta = {"format_version": 1, "model": model.model_record(), "layout": layout.to_dict(),
                "split": dict(zip(("val_start", "n_val"), validation_split(n_seq))), "final_norm": model.final_norm()[0]}
        prepared = prepare_store(f"{tmp}/bench.zarr", meta, tokens, model.params(layers), Compressor.NONE, True)

        with torch.inference_mode(), precision():
            run_batch(model, batches[0], layers, LogitsMode.FACTORED, 0)  # warm-up
            model.bridge(batches[0])
        plain_seconds = extract_seconds = 0.0
        writer = BlockWriter(prepared.store)
        for block, batch in enumerate(batches):
            with torch.inference_mode(), precision(), Timer() as plain:
                model.bridge(batch)
            plain_seconds += plain.seconds
            with precision(), Timer() as extract:
                arrays = run_batch(model, batch, layers, LogitsMode.FACTORED, 0).arrays
                check_numerics(arrays, store_dtype, block * args.batch_size)
                writer.submit(block, to_storage(arrays, store_dtype))
            extract_seconds += extract.seconds
        with Timer() as drain:
            writer.close()
        extract_seconds += drain.seconds

        profile = profile_batch(model, batches[0], layers)
        if args.keep_store:
            shutil.rmtree(args.keep_store, ignore_errors=True)
            shutil.copytree(f"{tmp}/bench.zarr", args.keep_store)

    n_tokens = n_seq * args.context
    emit("extract_speed", {
        "model": model.source.name, "tokens": n_tokens, "layers": list(layers), "device": args.device,
        "autocast": args.autocast, "store_dtype": store_dtype.value,
        "E1_plain_forward_tokens_per_s": n_tokens / plain_seconds,
        "E1_extraction_tokens_per_s": n_tokens / extract_seconds,
        "E1_ratio": plain_seconds / extract_seconds,
        "E3": profile,
    })


def profile_batch(model, batch: torch.Tensor, layers) -> dict:
    """Matmul shapes of one extraction batch: is any output d_vocab wide (an unembedding)?"""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run_batch(model, batch, layers, LogitsMode.FACTORED, 0)
    vocab_wide, matmuls = [], 0
    for event in prof.events():
        if event.name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
            matmuls += 1
            shapes = [s for s in event.input_shapes if s]
            if any(model.d_vocab in shape for shape in shapes):
                vocab_wide.append({"op": event.name, "shapes": shapes})
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as plain:
        model.bridge(batch)
    plain_vocab = sum(1 for e in plain.events() if e.name in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")
                      and any(model.d_vocab in s for s in e.input_shapes if s))
    return {"matmul_ops_in_extraction": matmuls, "vocab_wide_matmuls_in_extraction": len(vocab_wide),
            "vocab_wide_matmuls_in_plain_forward": plain_vocab, "examples": vocab_wide[:3]}


if __name__ == "__main__":
    main()
