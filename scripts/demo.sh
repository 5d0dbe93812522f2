#!/usr/bin/env bash
# Set up .venv (see setup.sh), then run the end-to-end demo on SmolLM2-135M and real text, offline.
# Extra arguments go to scripts/demo.py (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python scripts/demo.py "$@"
