#!/usr/bin/env bash
# The unsloth device kit in one piece: `../shared/device/stage.sh unsloth` writes it in two halves
# (.device/unsloth-a and -b, each under a device call's 64 MiB), which take two calls chained
# within the machine's 30 s idle window, the first only to copy a half into /tmp; a call that
# loses its machine in between loses the staging. This installs the halves' wheels here for the
# GPU host (Python 3.12, x86-64), keeps bitsandbytes' library for the host's CUDA only, and packs
# the result into .device/unsloth-one (one xz archive, about 36 MB, and its install.sh):
#
#   bash ../shared/device/stage.sh unsloth && bash scripts/one_call_kit.sh
#   device call, carrying .device/unsloth-one and .device/tok:
#     source .device/unsloth-one/install.sh && bash scripts/gpu_figures.sh cuda-1b
#
# CUDA=130 (the default: the host's torch is built for CUDA 13.0) picks the bitsandbytes library.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA=${CUDA:-130}
for half in .device/unsloth-a .device/unsloth-b; do
    [ -d "$half" ] || { echo "one_call_kit: $half is missing; run: bash ../shared/device/stage.sh unsloth" >&2; exit 2; }
done
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --target "$build/site" --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    .device/unsloth-a/*.whl .device/unsloth-b/*.whl
# bitsandbytes ships a library per CUDA, ROCm and XPU release (124 MB); the host loads one.
find "$build/site/bitsandbytes" -maxdepth 1 -name 'libbitsandbytes_*.so' \
    ! -name 'libbitsandbytes_cpu.so' ! -name "libbitsandbytes_cuda$CUDA.so" -delete
out=.device/unsloth-one
rm -rf "$out.tmp" && mkdir -p "$out.tmp"
tar cJf "$out.tmp/site.tar.xz" -C "$build/site" .
cp .device/unsloth-b/peers_cuda.py "$out.tmp/"
cat >"$out.tmp/install.sh" <<'EOF'
# Sourced on the GPU host: source .device/unsloth-one/install.sh (scripts/one_call_kit.sh made it).
if [ ! -d /tmp/site-unsloth/unsloth ]; then
  mkdir -p /tmp/site-unsloth && tar xJf .device/unsloth-one/site.tar.xz -C /tmp/site-unsloth ||
    { echo "install: could not unpack .device/unsloth-one/site.tar.xz" >&2; return 4 2>/dev/null || exit 4; }
fi
export PYTHONPATH=/tmp/site-unsloth${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
EOF
rm -rf "$out" && mv "$out.tmp" "$out"
du -sh "$out"
