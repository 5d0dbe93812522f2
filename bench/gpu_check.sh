#!/usr/bin/env bash
# E1, T2 and T3 on a CUDA GPU, at GPU sizes and in bfloat16; prints one JSON object.
#
# Usage: bash bench/gpu_check.sh
#
# Installs nothing. It needs a CUDA GPU and a Python ($PYTHON, else .venv/bin/python, else python3)
# that imports torch with CUDA and headlens's requirements (zarr, numcodecs, transformer-lens,
# transformers, lightning). On a machine where pip cannot reach an index, carry those as wheels.
# The model is $HEADLENS_BENCH_MODEL, else the SmolLM2 GGUF at $HEADLENS_BENCH_GGUF or
# demo-out/model/, else a random-weight model with SmolLM2-135M's shapes built here
# (bench/synthetic_model.py): speed depends on the shapes, not on the weights.
# Each step has its own time limit, and the whole script stays under 8 minutes.
# NOTE: run only on a CPU at tiny sizes so far. The time limits are estimates for an H200 and have not
# been checked on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench/gpu_check.sh: torch sees no CUDA GPU")'

if [ -z "${HEADLENS_BENCH_MODEL:-}" ]; then
    gguf=${HEADLENS_BENCH_GGUF:-demo-out/model/SmolLM2-135M-Instruct.Q4_1.gguf}
    if [ -f "$gguf" ]; then
        export HEADLENS_BENCH_MODEL=$gguf
    else
        echo "no GGUF at $gguf: building a random-weight SmolLM2-135M-shaped model" >&2
        timeout 120 "$PYTHON" -m bench.synthetic_model "$work/model" >&2
        export HEADLENS_BENCH_MODEL=$work/model
    fi
fi
if [ -z "${HEADLENS_BENCH_CORPUS:-}" ] && [ ! -e demo-out/corpus ]; then
    timeout 60 "$PYTHON" scripts/make_corpus.py "$work/corpus" >&2
    export HEADLENS_BENCH_CORPUS=$work/corpus
fi

# E1: 6 batches of 32 x 512 tokens, all 30 layers stored in bfloat16, both sides under bf16 autocast.
timeout 200 "$PYTHON" -m bench.extract_speed --device cuda --autocast bfloat16 --store-dtype bfloat16 \
    --batches 6 --batch-size 32 --context 512 --layers all --keep-store "$work/acts.zarr" >"$work/e1.json"

# T2 and T3: steps of 4096 tokens in bf16 autocast, 2 GB logits blocks; T2 reads the store E1 wrote.
timeout 200 "$PYTHON" -m bench.train_speed --device cuda --dtype bfloat16 --tokens 4096 --block-mb 2048 \
    --store "$work/acts.zarr" --layer 15 --skip-m1 >"$work/t.json"

"$PYTHON" - "$work/e1.json" "$work/t.json" <<'EOF'
import json
import sys

e1, train = (json.load(open(path)) for path in sys.argv[1:3])
keys = ("E1_plain_forward_tokens_per_s", "E1_extraction_tokens_per_s", "E1_ratio")
table = {"benchmark": "gpu_check", "machine": train["machine"], "model": e1["model"],
         **{key: e1[key] for key in keys}, "E3": e1["E3"],
         **{key: value for key, value in train.items() if key.startswith(("T2", "T3", "matmul"))}}
print(json.dumps(table, indent=2))
EOF
