#!/usr/bin/env bash
# Cross-builds the runtime library for aarch64 and runs its unit tests under qemu-user
# with an emulated Cortex-A72 (see qemu-aarch64-runner.sh). Installs the cross toolchain
# first when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
missing=()
for package in gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! rustup target list --installed | grep -qx "$TARGET"; then
    if ! rustup target add "$TARGET"; then
        # TODO: fall back to Debian's rustc-web with libstd-rust-web-dev:arm64.
        echo "cross-test: skipped, the $TARGET standard library could not be installed" >&2
        exit 0
    fi
fi
# The library's unit tests, the flow kernels (NEON under the emulated Cortex-A72, checked
# against the scalar kernel) and the FrEIA reference vectors.
cargo test --target "$TARGET" --no-default-features --lib \
    --test flow_kernels --test reference_vectors "$@"
