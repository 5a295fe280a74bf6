#!/usr/bin/env bash
# Refresh requirements.lock: resolve macft's dependencies afresh (no lock) in a throw-away
# virtual environment, run nothing, and write the versions pip chose, one `name==version` a line.
#   bash scripts/refresh_lock.sh            # then: ./run test, and commit requirements.lock if green
# The lock is a pip constraints file (./run setup installs with `-c requirements.lock`): it pins
# every package that an install on Linux (extras cpu + dev) or on Apple Silicon (mac + dev) pulls in.
# It is resolved on Linux; the only macOS-only package, mlx-metal, is pinned to MLX's version.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
MACFT_NO_LOCK=1 MACFT_VENV="$tmp/venv" ./run setup
{
    echo "# Resolved $(date -u +%Y-%m-%d) by scripts/refresh_lock.sh; installed by ./run setup as pip constraints."
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^macft' | sed 's/+cpu$//'
    mlx=$("$tmp/venv/bin/python" -c 'import importlib.metadata as m; print(m.version("mlx"))')
    echo "mlx-metal==$mlx; sys_platform == \"darwin\""
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) pins)"
