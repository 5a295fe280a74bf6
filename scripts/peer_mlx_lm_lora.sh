#!/usr/bin/env bash
# Install the benchmark peer, mlx-lm-lora, into its own venv (default .venv-peer), CPU only.
#   scripts/peer_mlx_lm_lora.sh [VENV_DIR]
# mlx-lm-lora 5.10.2 needs mlx-lm 0.32.2 -> mlx 0.32.4; on Linux mlx needs the `cpu` extra
# (mlx-cpu) to have a backend. Its dependency tree holds no torch, so nothing CUDA is pulled
# (checked with `pip install --dry-run`; the script re-checks and refuses otherwise).
# Idempotent: an existing venv with the pinned versions is left as is.
# Run it through scripts/mlx_lm_lora_linux.py (loads OpenBLAS, stubs the Metal-only calls).
set -euo pipefail

PEER_VERSION="5.10.2"
MLX_VERSION="0.32.4"
VENV="${1:-.venv-peer}"
PYTHON="${PYTHON:-python3}"
REQS=("mlx-lm-lora==${PEER_VERSION}" "mlx[cpu]==${MLX_VERSION}")

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

installed_ok() {
    "$PY" - "$PEER_VERSION" "$MLX_VERSION" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
assert version("mlx-lm-lora") == sys.argv[1]
assert version("mlx") == sys.argv[2] and version("mlx-cpu") == sys.argv[2]
PYEOF
}

if installed_ok; then
    echo "mlx-lm-lora ${PEER_VERSION} already installed in $VENV" >&2
else
    plan="$("$PY" -m pip install --dry-run "${REQS[@]}" 2>&1 | grep '^Would install' || true)"
    if echo "$plan" | tr ' ' '\n' | grep -i -E '^(torch|nvidia-|triton)' >&2; then
        echo "refusing: the plan above would pull torch/CUDA packages" >&2
        exit 1
    fi
    "$PY" -m pip install -q "${REQS[@]}"
    installed_ok || { echo "install check failed" >&2; exit 1; }
fi

if [ ! -e /usr/lib/x86_64-linux-gnu/libopenblas.so.0 ] && [ "$(uname -s)" = Linux ]; then
    echo "warning: no /usr/lib/x86_64-linux-gnu/libopenblas.so.0 (apt install libopenblas0-pthread);" \
         "MLX CPU matmul will be ~30x slower" >&2
fi

"$PY" -c 'import os, sys; print(os.path.abspath(sys.executable))'
