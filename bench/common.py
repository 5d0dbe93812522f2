"""Shared pieces of the benchmarks: the real model, real text, machine facts and JSON output.

Every benchmark prints one JSON object. Ratios compare two measurements taken side by side in the
same process and run, so machine-speed drift affects both sides alike.
"""

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GGUF = REPO / "demo-out" / "model" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CORPUS = REPO / "demo-out" / "corpus"


def gguf_path() -> Path:
    """Return the SmolLM2 GGUF file: $HEADLENS_BENCH_GGUF, else the demo's copy (run scripts/demo.sh once first)."""
    path = Path(os.environ.get("HEADLENS_BENCH_GGUF", DEFAULT_GGUF))
    if not path.is_file():
        sys.exit(f"model file {path} not found: run scripts/demo.sh once, or set HEADLENS_BENCH_GGUF")
    return path


def model_source() -> str:
    """Return the model to benchmark: $HEADLENS_BENCH_MODEL (any ``--model`` value, such as a folder written by
    ``bench.synthetic_model``), else the SmolLM2 GGUF file."""
    return os.environ.get("HEADLENS_BENCH_MODEL") or str(gguf_path())


def corpus_path() -> Path:
    path = Path(os.environ.get("HEADLENS_BENCH_CORPUS", DEFAULT_CORPUS))
    if not path.exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_corpus.py"), str(path)], check=True)
    return path


def machine() -> dict:
    """Facts that make a number reproducible: CPU, cores, torch build and threads, GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def emit(name: str, results: dict) -> None:
    print(json.dumps({"benchmark": name, "machine": machine(), **results}, indent=2))


class Timer:
    """Wall-clock seconds of a block, synchronising CUDA when it is in use."""

    def __enter__(self) -> "Timer":
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def matmul_flops(dtype: torch.dtype, device: str, m: int = 1024, k: int = 576, n: int = 12288, repeats: int = 5,
                 rounds: int = 3) -> float:
    """Measured FLOP/s of one dense matmul of this shape: the machine's practical ceiling for the lens projection.

    The best of ``rounds`` timings of ``repeats`` products: a ceiling should not be lowered by a
    moment of contention, and a higher ceiling only makes the ratios against it stricter."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(rounds):
        with Timer() as timer:
            for _ in range(repeats):
                a @ b
        best = min(best, timer.seconds)
    return 2 * m * k * n * repeats / best
