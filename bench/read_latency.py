"""R1: time to read one random batch from a store of at least 2 GB, cold (page cache dropped) against warm.

Usage: .venv/bin/python -m bench.read_latency [--gigabytes 2.0] [--batch-tokens 4096] [--dir /tmp]

Writes a synthetic store with SmolLM2 shapes (30 layers of z, 9 heads x 64, fp16) filled with random
values, evicts its files from the page cache with posix_fadvise(DONTNEED), reads one shuffled batch
of one layer through ``LayerBatches``, then reads the same batch again warm. The store is deleted.
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import emit
from lensio.reader import LayerBatches
from lensio.schema import Compressor, LogitsMode, StoreDtype, StoreLayout, validation_split
from lensio.writer import prepare_store, write_block

SHAPES = {"n_heads": 9, "d_head": 64, "d_model": 576, "d_vocab": 49152, "n_layers": 30}


def evict(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def build_store(url: str, gigabytes: float, context: int = 128) -> StoreLayout:
    probe = StoreLayout.plan(n_sequences=1, context=context, n_heads=SHAPES["n_heads"], d_head=SHAPES["d_head"],
                             d_model=SHAPES["d_model"], d_vocab=SHAPES["d_vocab"],
                             layers=tuple(range(SHAPES["n_layers"])), dtype=StoreDtype.FLOAT16,
                             logits=LogitsMode.FACTORED)
    n_seq = int(gigabytes * 1e9 / (probe.bytes_per_token * context)) + 1
    layout = StoreLayout.plan(n_sequences=n_seq, context=context, n_heads=SHAPES["n_heads"], d_head=SHAPES["d_head"],
                              d_model=SHAPES["d_model"], d_vocab=SHAPES["d_vocab"], layers=probe.layers,
                              dtype=StoreDtype.FLOAT16, logits=LogitsMode.FACTORED)
    val_start, n_val = validation_split(n_seq)
    meta = {"format_version": 1, "model": {"name": "synthetic"}, "layout": layout.to_dict(),
            "split": {"val_start": val_start, "n_val": n_val}, "final_norm": {"kind": "rmsnorm", "eps": 1e-5}}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, SHAPES["d_vocab"], size=(n_seq, context), dtype=np.int32)
    prepared = prepare_store(url, meta, tokens, {}, Compressor.NONE, overwrite=True)
    for block in range(layout.n_blocks):
        start, end = layout.block_range(block)
        n = end - start
        arrays = {f"layers/{layer}/z": rng.standard_normal((n, context, SHAPES["n_heads"], SHAPES["d_head"]),
                                                           dtype=np.float32).astype(np.float16)
                  for layer in layout.layers}
        arrays["final/normalized"] = rng.standard_normal((n, context, SHAPES["d_model"]), dtype=np.float32).astype(np.float16)
        arrays["final/scale"] = np.ones((n, context), dtype=np.float32)
        write_block(prepared.store, block, arrays)
    return layout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(dir=args.dir))
    url = str(folder / "big.zarr")
    try:
        start = time.perf_counter()
        layout = build_store(url, args.gigabytes)
        build_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file())
        evict(Path(url))
        timings = {}
        for state in ("cold", "warm"):
            batches = LayerBatches(url, 15, (0, layout.n_sequences), args.batch_tokens, shuffle=True, seed=1,
                                   shuffle_chunks=4)
            start = time.perf_counter()
            next(iter(batches))
            timings[state] = time.perf_counter() - start
        emit("read_latency", {"store_bytes": size, "store_write_s": build_s, "batch_tokens": args.batch_tokens,
                              "R1_cold_s": timings["cold"], "R1_warm_s": timings["warm"],
                              "R1_cold_over_warm": timings["cold"] / timings["warm"]})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
