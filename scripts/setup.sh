#!/usr/bin/env bash
# Create .venv in the repository and install headlens into it with the test and GGUF extras.
# torch is installed first, pinned to the CPU build: a bare "torch" requirement would pull a
# multi-GB CUDA build. Set TORCH_SPEC to install another build (e.g. TORCH_SPEC="torch" on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "headlens needs Python 3.11 or newer; $("$python" --version) found. Set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# Some machines configure pip with extra package locations that do not exist; hide only those warnings.
pip_install() {
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}
# A stamp of what was installed lets a second run skip pip when nothing changed.
stamp=.venv/.headlens-installed
wanted="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) ${TORCH_SPEC:-torch==2.13.0}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  pip_install --upgrade pip
  pip_install "${TORCH_SPEC:-torch==2.13.0}"
  pip_install -e ".[dev,gguf]"
  echo "$wanted" > "$stamp"
fi
.venv/bin/python -c 'import torch, zarr, lightning, transformer_lens, extract, lensio, train' \
  || { echo "setup failed: the packages above did not install; see pip's messages" >&2; exit 1; }
echo "headlens installed in $(pwd)/.venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
