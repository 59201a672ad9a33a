#!/usr/bin/env bash
# Installs what daain-edge and daain-tools need on a Debian machine: FFmpeg and clang
# development packages, and libtorch from the slim PyTorch 2.13.0 wheel (the version
# tch 0.26 links against). Safe to run again: finished steps are skipped.
set -euo pipefail
# shellcheck source=tools/apt.sh
source "$(dirname "$0")/apt.sh"

LIBTORCH_PARENT="${DAAIN_TORCH_DIR:-$HOME/.cache/daain-torch}"
PACKAGES=(pkg-config clang libclang-dev ffmpeg
    libavformat-dev libavcodec-dev libavutil-dev libswscale-dev libswresample-dev
    libavdevice-dev libavfilter-dev)

missing=()
for package in "${PACKAGES[@]}"; do
    package_installed "$package" || missing+=("$package")
done
if ((${#missing[@]})); then
    apt_update
    apt_install "${missing[@]}"
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
    apt_update
    apt_install python3-pip
fi

if [ ! -f "$LIBTORCH_PARENT/torch/lib/libtorch_cpu.so" ]; then
    # The PyPI wheel is a CUDA build; without its dependencies it still gives a working
    # CPU libtorch, plus the two CUDA runtime libraries that libtorch_cuda.so links.
    # --target installs into a private folder, so Debian's externally-managed marker
    # (PEP 668) does not apply; the variable tells pip so.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --no-deps --target "$LIBTORCH_PARENT" \
        torch==2.13.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
fi
echo "libtorch: $LIBTORCH_PARENT/torch"
