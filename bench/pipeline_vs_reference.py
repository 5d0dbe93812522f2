"""T1: training lenses for several layers and lens kinds from one store, extraction included, against
the reference way (the model runs at every training step, one run per layer and lens kind, no store).

Usage: .venv/bin/python -m bench.pipeline_vs_reference [--layers 7,14,21,28] [--kinds translator,lowrank]
       [--steps 3] [--batch-tokens 128]

Both sides use the same lens code, loss, batches (same sequences, same order), optimizer and float32
precision, and a plain training loop, so the difference is only where the activations come from.
The model is loaded once and its load time is left out of both sides. The script also reports the
ideal ratio computed from the measured parts, (extraction + training) / (forwards + training), and
the same with the target logits that headlens's steps rebuild from the final-norm output (the
reference gets them from its forward pass).
"""

import argparse
import tempfile

import numpy as np
import torch

from bench.common import Timer, corpus_path, emit, model_source
from extract.loop import run_batch, to_storage
from extract.models import load_model, parse_model_source
from extract.packing import pack_documents
from extract.text import iter_documents, parse_text_source
from lensio.layers import parse_layers
from lensio.reader import ActivationBatch
from lensio.schema import Compressor, LogitsMode, StoreDtype, StoreLayout, validation_split, z_path
from lensio.store import open_store
from lensio.writer import prepare_store, write_block
from train.lenses import LENS_REGISTRY, frozen_parts_from_store
from train.loss import blocked_head_kl, targets_from_batch


def train_steps(lens, batches: list[ActivationBatch]) -> None:
    optimizer = torch.optim.Adam([p for p in lens.parameters() if p.requires_grad], lr=1e-3)
    for batch in batches:
        targets = targets_from_batch(batch.target, lens.W_U, lens.b_U, lens.logit_softcap)
        loss, _ = blocked_head_kl(lens, lens.features(lens.head_outputs(batch.z.float()), batch.scale), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def batch_from_arrays(arrays: dict[str, np.ndarray], layer: int) -> ActivationBatch:
    def flat(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array.reshape(-1, *array.shape[2:])))

    z = arrays[z_path(layer)]
    n = z.shape[0] * z.shape[1]
    zeros = torch.zeros(n, dtype=torch.long)
    return ActivationBatch(flat(z).float(), flat(arrays["final/scale"]),
                           {"normalized": flat(arrays["final/normalized"]).float()}, zeros, zeros, zeros)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", default="7,14,21,28")
    parser.add_argument("--kinds", default="translator,lowrank")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=128)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    seqs_per_step = max(1, args.batch_tokens // args.context)
    n_seq = seqs_per_step * args.steps

    model = load_model(parse_model_source(model_source()))
    layers = parse_layers(args.layers, model.n_layers)
    tokens = pack_documents(model.tokenizer, iter_documents(parse_text_source(str(corpus_path())), 0), args.context,
                            n_seq * args.context)
    step_tokens = [torch.from_numpy(tokens[i:i + seqs_per_step]).long() for i in range(0, n_seq, seqs_per_step)]

    with tempfile.TemporaryDirectory() as tmp:
        # headlens: one extraction into a store, then every (layer, kind) run reads it.
        layout = StoreLayout.plan(n_sequences=n_seq, context=args.context, n_heads=model.n_heads, d_head=model.d_head,
                                  d_model=model.d_model, d_vocab=model.d_vocab, layers=layers,
                                  dtype=StoreDtype.FLOAT16, logits=LogitsMode.FACTORED)
        layout = StoreLayout(**{**layout.__dict__, "seqs_per_chunk": seqs_per_step, "chunks_per_shard": 1})
        meta = {"format_version": 1, "model": model.model_record(), "layout": layout.to_dict(),
                "split": dict(zip(("val_start", "n_val"), validation_split(n_seq))),
                "final_norm": model.final_norm()[0]}
        prepared = prepare_store(f"{tmp}/t1.zarr", meta, tokens, model.params(layers), Compressor.NONE, True)
        with Timer() as extract_timer, torch.inference_mode():
            for block, batch in enumerate(step_tokens):
                arrays = run_batch(model, batch, layers, LogitsMode.FACTORED, 0).arrays
                write_block(prepared.store, block, to_storage(arrays, StoreDtype.FLOAT16))
        store = open_store(f"{tmp}/t1.zarr")

        # The factored store moves the unembedding from the model's forward pass into each training step
        # (targets = normalized @ W_U + b_U); time it once per step batch to split the gap below.
        target_s = 0.0
        parts = frozen_parts_from_store(store, layers[0])
        for block in range(len(step_tokens)):
            start, end = layout.block_range(block)
            normalized = torch.from_numpy(store.group["final/normalized"][start:end]).reshape(-1, model.d_model)
            with Timer() as target_timer:
                targets_from_batch({"normalized": normalized}, parts.W_U, parts.b_U, parts.logit_softcap).dense()
            target_s += target_timer.seconds * len(layers) * len(kinds)

        store_train_s = 0.0
        for layer in layers:
            with Timer() as read_timer:  # reading the store counts on headlens's side
                batches = []
                for block in range(len(step_tokens)):
                    start, end = layout.block_range(block)
                    arrays = {path: store.group[path][start:end]
                              for path in (z_path(layer), "final/scale", "final/normalized")}
                    batches.append(batch_from_arrays(arrays, layer))
            store_train_s += read_timer.seconds
            for kind in kinds:
                torch.manual_seed(0)
                lens = LENS_REGISTRY[kind](frozen_parts_from_store(store, layer))
                with Timer() as timer:
                    train_steps(lens, batches)
                store_train_s += timer.seconds

        # Reference: for every (layer, kind), run the model at every step, then the same lens step.
        reference_forward_s = reference_train_s = 0.0
        for layer in layers:
            for kind in kinds:
                torch.manual_seed(0)
                lens = LENS_REGISTRY[kind](frozen_parts_from_store(store, layer))
                optimizer = torch.optim.Adam([p for p in lens.parameters() if p.requires_grad], lr=1e-3)
                for batch_tokens in step_tokens:
                    with Timer() as forward, torch.inference_mode():
                        arrays = run_batch(model, batch_tokens, (layer,), LogitsMode.FULL, 0).arrays
                    reference_forward_s += forward.seconds
                    batch = batch_from_arrays({z_path(layer): arrays[z_path(layer)], "final/scale": arrays["final/scale"],
                                               "final/normalized": np.zeros((1, 1, 1), np.float32)}, layer)
                    batch.target = {"logits": torch.from_numpy(arrays["final/logits"].reshape(-1, model.d_vocab))}
                    with Timer() as step:
                        targets = targets_from_batch(batch.target, lens.W_U, lens.b_U, lens.logit_softcap)
                        loss, _ = blocked_head_kl(lens, lens.features(lens.head_outputs(batch.z), batch.scale), targets)
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    reference_train_s += step.seconds

    ours = extract_timer.seconds + store_train_s
    reference = reference_forward_s + reference_train_s
    emit("pipeline_vs_reference", {
        "layers": list(layers), "kinds": kinds, "steps": args.steps, "batch_tokens": seqs_per_step * args.context,
        "headlens_extract_s": extract_timer.seconds, "headlens_train_s": store_train_s, "headlens_total_s": ours,
        "reference_forward_s": reference_forward_s, "reference_train_s": reference_train_s,
        "reference_total_s": reference,
        "headlens_target_logits_s": target_s,
        "T1_ratio": ours / reference,
        "T1_ideal_ratio": (extract_timer.seconds + reference_train_s) / (reference_forward_s + reference_train_s),
        "T1_ideal_ratio_with_target_logits": ((extract_timer.seconds + reference_train_s + target_s)
                                              / (reference_forward_s + reference_train_s)),
    })


if __name__ == "__main__":
    main()
