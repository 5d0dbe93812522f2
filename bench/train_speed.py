"""T2, T3 and M1: how close a lens training step gets to the machine's matmul speed, whether the reader
keeps up with it, and its peak memory.

Usage: .venv/bin/python -m bench.train_speed [--store demo-out/acts.zarr] [--layer 28]
       [--tokens 256] [--m1-tokens 4096] [--skip-m1] [--dtype float32] [--block-mb 256] [--device cpu]

T3 times optimizer steps of the ``full`` and ``translator`` lenses on SmolLM2 shapes (9 heads,
d_model 576, d_vocab 49152) and divides the FLOP/s they achieve by the FLOP/s of a plain matmul
measured in the same run. T2 divides the reader's shuffled throughput on a real store by the
tokens/s of the ``full`` step. M1 runs one ``full`` step at --m1-tokens in a child process and
divides its peak resident memory growth by parameters + Adam state + one logits block.
"""

import argparse
import json
import subprocess
import sys
import time

import torch

from bench.common import REPO, Timer, emit, matmul_flops
from lensio.schema import FinalNorm
from train.lenses import LENS_REGISTRY, FrozenParts
from train.loss import DEFAULT_BLOCK_BYTES, blocked_head_kl, targets_from_batch

SMOLLM2 = {"n_heads": 9, "d_head": 64, "d_model": 576, "d_vocab": 49152}


def synthetic_parts(dtype: torch.dtype, device: str, n_heads: int, d_head: int, d_model: int, d_vocab: int) -> FrozenParts:
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(device=device, dtype=dtype)

    return FrozenParts(W_O=rand(n_heads, d_head, d_model, scale=0.05), b_O=rand(d_model, scale=0.01),
                       W_U=rand(d_model, d_vocab, scale=0.05), b_U=rand(d_vocab, scale=0.01),
                       norm_weight=torch.ones(d_model, device=device, dtype=dtype),
                       norm_bias=torch.zeros(d_model, device=device, dtype=dtype), norm_kind=FinalNorm.RMSNORM,
                       norm_eps=1e-5)


def step_flops(kind: str, n_tok: int, n_heads: int, d_model: int, d_vocab: int) -> float:
    """Matmul FLOPs one training step must do: target logits, the projection and its needed gradients."""
    target = 2 * n_tok * d_model * d_vocab
    projection = 2 * n_tok * n_heads * d_model * d_vocab
    if kind == "full":  # forward, and the weight gradient (head outputs need none)
        return target + 2 * projection
    trunk = 3 * 2 * n_tok * n_heads * d_model * d_model  # the affine map, forward and two gradients
    return target + 2 * projection + trunk  # forward, and the feature gradient (W_U is frozen)


def make_optimizer(params):
    try:
        return torch.optim.Adam(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=1e-4, foreach=False)


def time_step(kind: str, n_tok: int, device: str, dtype: torch.dtype, block_bytes: int, repeats: int = 2) -> float:
    """Seconds of one optimizer step (median of ``repeats`` after a warm-up)."""
    dims = SMOLLM2
    parts = synthetic_parts(torch.float32, device, **dims)
    lens = LENS_REGISTRY[kind](parts).to(device)
    optimizer = make_optimizer([p for p in lens.parameters() if p.requires_grad])
    z = torch.randn(n_tok, dims["n_heads"], dims["d_head"], device=device)
    normalized = torch.randn(n_tok, dims["d_model"], device=device)
    times = []
    for _ in range(repeats + 1):
        with Timer() as timer, torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            targets = targets_from_batch({"normalized": normalized}, lens.W_U, lens.b_U, None)
            features = lens.features(lens.head_outputs(z), None)
            loss, _ = blocked_head_kl(lens, features, targets, block_bytes=block_bytes)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(timer.seconds)
    return sorted(times[1:])[len(times[1:]) // 2]


def reader_tokens_per_s(store: str, layer: int, batch_tokens: int) -> float:
    from lensio.reader import LayerBatches
    from lensio.store import open_store

    opened = open_store(store)
    batches = LayerBatches(store, layer, opened.train_range, batch_tokens, shuffle=True)
    seen = 0
    start = time.perf_counter()
    for batch in batches:
        seen += len(batch)
    return seen / (time.perf_counter() - start)


def peak_memory_child(n_tok: int, device: str) -> dict:
    """Run inside a child process: one ``full`` step, peak RSS growth over the state before the lens existed."""
    def rss_kib(field: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])
        raise RuntimeError(f"{field} missing from /proc/self/status")

    dims = SMOLLM2
    parts = synthetic_parts(torch.float32, device, **dims)
    z = torch.randn(n_tok, dims["n_heads"], dims["d_head"])
    normalized = torch.randn(n_tok, dims["d_model"])
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak resident size (VmHWM) to the current one
    baseline = rss_kib("VmRSS:")
    lens = LENS_REGISTRY["full"](parts)
    optimizer = make_optimizer([lens.weight, lens.bias])
    targets = targets_from_batch({"normalized": normalized}, lens.W_U, lens.b_U, None)  # built per block
    loss, _ = blocked_head_kl(lens, lens.features(lens.head_outputs(z), None), targets)
    loss.backward()
    optimizer.step()
    peak = (rss_kib("VmHWM:") - baseline) * 1024
    params = sum(p.numel() * p.element_size() for p in (lens.weight, lens.bias))
    budget = params * 3 + DEFAULT_BLOCK_BYTES
    return {"tokens": n_tok, "peak_growth_bytes": peak, "params_bytes": params, "adam_state_bytes": 2 * params,
            "logits_block_bytes": DEFAULT_BLOCK_BYTES, "M1_ratio": peak / budget}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default=str(REPO / "demo-out" / "acts.zarr"))
    parser.add_argument("--layer", type=int, default=28)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--m1-tokens", type=int, default=4096)
    parser.add_argument("--skip-m1", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--block-mb", type=int, default=DEFAULT_BLOCK_BYTES >> 20,
                        help="memory bound of one block of float32 logits in the loss")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--m1-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.m1_child:
        print(json.dumps(peak_memory_child(args.m1_tokens, args.device)))
        return

    dtype = getattr(torch, args.dtype)
    dims = SMOLLM2
    results: dict = {"device": args.device, "dtype": args.dtype, "tokens_per_step": args.tokens,
                     "block_mb": args.block_mb}
    peak_matmul = matmul_flops(dtype, args.device)
    results["matmul_flops"] = peak_matmul
    for kind in ("full", "translator"):
        seconds = time_step(kind, args.tokens, args.device, dtype, args.block_mb << 20)
        flops = step_flops(kind, args.tokens, dims["n_heads"], dims["d_model"], dims["d_vocab"]) / seconds
        results[f"T3_{kind}_step_s"] = seconds
        results[f"T3_{kind}_tokens_per_s"] = args.tokens / seconds
        results[f"T3_{kind}_flops"] = flops
        results[f"T3_{kind}_ratio"] = flops / peak_matmul
    try:
        reader = reader_tokens_per_s(args.store, args.layer, args.tokens)
        results["T2_reader_tokens_per_s"] = reader
        results["T2_ratio"] = reader / results["T3_full_tokens_per_s"]
    except Exception as error:  # noqa: BLE001 - a missing store only skips T2
        results["T2_error"] = str(error)
    if not args.skip_m1 and args.device == "cpu":
        child = subprocess.run([sys.executable, "-m", "bench.train_speed", "--m1-child", "--m1-tokens",
                                str(args.m1_tokens)], capture_output=True, text=True, check=True, cwd=REPO)
        results["M1"] = json.loads(child.stdout.strip().splitlines()[-1])
    emit("train_speed", results)


if __name__ == "__main__":
    main()
