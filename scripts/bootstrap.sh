#!/usr/bin/env bash
# Create ./.venv (if missing) and install gvsl with its dependencies into it.
# PyTorch: an existing torch is kept (bring your own CUDA/MPS build); where none is
# present the CPU build torch==2.13.0 is installed first, so pip never pulls a CUDA build.
#   scripts/bootstrap.sh          # runtime dependencies
#   scripts/bootstrap.sh test     # plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install --quiet --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
    echo "Installing PyTorch (CPU build 2.13.0); use your own build for a GPU."
    "$VPY" -m pip install --quiet torch==2.13.0
fi
extras=""
if [ "${1:-}" = "test" ]; then extras="[test]"; fi
"$VPY" -m pip install --quiet -e ".${extras}"
echo "Environment ready: $(pwd)/.venv ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
