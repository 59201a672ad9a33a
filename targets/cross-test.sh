#!/usr/bin/env bash
# Cross-builds daain-edge for aarch64 with its default features (FFmpeg and V4L2) and runs
# every runtime test under qemu-user with an emulated Cortex-A72 (see
# qemu-aarch64-runner.sh): the unit tests and all of tests/, which run the real ESPNet on
# the shipped footage. Then builds the runtime for armv7 without default features (built
# only, not run). Installs what is missing first (cross-setup.sh). Arguments go to the
# aarch64 `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
targets/cross-setup.sh || status=$?
if [ "$status" -eq 2 ]; then
    echo "cross-test: skipped, no aarch64 Rust standard library could be installed" >&2
    exit 0
elif [ "$status" -ne 0 ]; then
    exit "$status"
fi
source targets/cross-env.sh

SECONDS=0
cargo test --target aarch64-unknown-linux-gnu --no-run
build_seconds=$SECONDS
SECONDS=0
cargo test --target aarch64-unknown-linux-gnu "$@"
echo "cross-test: aarch64 build ${build_seconds} s, tests under qemu ${SECONDS} s"

if rustup target list --installed 2>/dev/null | grep -qx armv7-unknown-linux-gnueabihf; then
    SECONDS=0
    cargo build --target armv7-unknown-linux-gnueabihf --no-default-features
    echo "cross-test: armv7 build ${SECONDS} s"
else
    echo "cross-test: armv7 build skipped, its Rust standard library is not installed" >&2
fi
