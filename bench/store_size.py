"""E2 and the compressor choice: store bytes per token against the naive layout, and the size and speed
of each compressor on real activations.

Usage: .venv/bin/python -m bench.store_size [--store demo-out/acts.zarr] [--sequences 64]

E2 compares headlens's layout (fp16 z per head, fp16 final-norm output, fp32 scale, int32 tokens)
with the naive one (fp32 per-head hook_result for the same layers plus fp32 full logits) at GPT-2
small shapes (12 layers, 12 heads, d_head 64, d_model 768, d_vocab 50257). The compressor part
copies the first --sequences sequences of a real store into a new store per compressor and times
the write and a full read back.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, emit
from lensio.schema import Compressor, LogitsMode, StoreDtype, StoreLayout
from lensio.store import compressor_codecs, open_store

GPT2_SMALL = {"n_layers": 12, "n_heads": 12, "d_head": 64, "d_model": 768, "d_vocab": 50257}


def e2_ratios() -> dict:
    out = {}
    for n_layers in (1, GPT2_SMALL["n_layers"]):
        layout = StoreLayout.plan(n_sequences=1, context=1024, n_heads=GPT2_SMALL["n_heads"],
                                  d_head=GPT2_SMALL["d_head"], d_model=GPT2_SMALL["d_model"],
                                  d_vocab=GPT2_SMALL["d_vocab"], layers=tuple(range(n_layers)),
                                  dtype=StoreDtype.FLOAT16, logits=LogitsMode.FACTORED)
        naive = n_layers * GPT2_SMALL["n_heads"] * GPT2_SMALL["d_model"] * 4 + GPT2_SMALL["d_vocab"] * 4
        out[f"{n_layers}_layers"] = {"headlens_bytes_per_token": layout.bytes_per_token,
                                     "naive_bytes_per_token": naive,
                                     "E2_ratio": layout.bytes_per_token / naive,
                                     "E2_one_over": naive / layout.bytes_per_token}
    return out


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def compressor_table(store_url: str, n_seq: int) -> dict:
    import zarr

    source = open_store(store_url)
    n_seq = min(n_seq, source.layout.n_sequences)
    paths = ["tokens", "final/normalized", "final/scale"] + [f"layers/{layer}/z" for layer in source.layers]
    data = {path: source.group[path][:n_seq] for path in paths}
    n_tokens = n_seq * source.layout.context
    table = {}
    for compressor in Compressor:
        with tempfile.TemporaryDirectory() as tmp:
            group = zarr.open_group(f"{tmp}/copy.zarr", mode="w")
            start = time.perf_counter()
            for path, array in data.items():
                chunks = (source.layout.seqs_per_chunk, *array.shape[1:])
                group.create_array(path, shape=array.shape, dtype=array.dtype, chunks=chunks,
                                   compressors=compressor_codecs(compressor))[...] = array
            write_s = time.perf_counter() - start
            start = time.perf_counter()
            for path in data:
                np.asarray(group[path][...])
            read_s = time.perf_counter() - start
            size = folder_bytes(Path(tmp) / "copy.zarr")
        table[compressor.value] = {"bytes_per_token": size / n_tokens, "write_mb_per_s": size / write_s / 1e6,
                                   "write_tokens_per_s": n_tokens / write_s, "read_tokens_per_s": n_tokens / read_s}
    none = table["none"]["bytes_per_token"]
    for row in table.values():
        row["size_vs_none"] = row["bytes_per_token"] / none
    return {"store": store_url, "model": source.meta["model"]["name"], "tokens": n_tokens, "compressors": table}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default=str(REPO / "demo-out" / "acts.zarr"))
    parser.add_argument("--sequences", type=int, default=64)
    args = parser.parse_args()
    results = {"E2_gpt2_small": e2_ratios()}
    try:
        results["compression_on_real_activations"] = compressor_table(args.store, args.sequences)
    except Exception as error:  # noqa: BLE001 - the formula part still stands without a store
        results["compression_error"] = str(error)
    emit("store_size", results)


if __name__ == "__main__":
    main()
