#!/usr/bin/env bash
# Cross-builds daain-edge for aarch64 with its default features (FFmpeg and V4L2) and runs
# its tests under qemu-user with an emulated Cortex-A72 (see qemu-aarch64-runner.sh).
# With DAAIN_CROSS_ARMV7=1, then builds the runtime for armv7 without default features and
# runs its unit tests, flow_kernels and reference_vectors under qemu-arm. CI leaves armv7
# out: it is a second full tract build (about 13 minutes here), and `rustup target add`
# for it took minutes here or failed, in which case the Debian compiler it falls back to
# has only been checked, never linked.
# Installs what is missing first (cross-setup.sh). Arguments go to the aarch64
# `cargo test`.
#
# Every test file runs under emulation, where one ESPNet frame takes 10 to 50 s. detection,
# plan and int8 score at most DAAIN_TEST_FRAMES frames per test (2 unless set), the other
# files at most 25, and the tests of stalls scale their watchdog with the measured frame
# time.
# Without the arm64 FFmpeg packages only the unit tests, bundle, flow_kernels and
# reference_vectors run, since the others decode the shipped clip.
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
targets/cross-setup.sh || status=$?
features=()
if [ "$status" -eq 2 ]; then
    echo "cross-test: skipped, no aarch64 Rust standard library could be installed" >&2
    exit 0
elif [ "$status" -eq 3 ]; then
    echo "cross-test: no arm64 FFmpeg packages, so aarch64 builds without default" \
        "features and the tests that decode video are not run" >&2
    features=(--no-default-features)
elif [ "$status" -ne 0 ]; then
    exit "$status"
fi
source targets/cross-env.sh

select_rust_toolchain aarch64-unknown-linux-gnu
if ((${#features[@]})); then
    tests=(--lib --bins --test bundle --test flow_kernels --test reference_vectors)
else
    tests=(--lib --bins --tests)
fi
export DAAIN_TEST_FRAMES="${DAAIN_TEST_FRAMES:-2}"
SECONDS=0
cargo test --target aarch64-unknown-linux-gnu "${features[@]}" "${tests[@]}" --no-run
build_seconds=$SECONDS
SECONDS=0
cargo test --target aarch64-unknown-linux-gnu "${features[@]}" "${tests[@]}" "$@"
echo "cross-test: aarch64 build ${build_seconds} s, tests under qemu ${SECONDS} s"

if [ "${DAAIN_CROSS_ARMV7:-}" != 1 ]; then
    echo "cross-test: armv7 build skipped (DAAIN_CROSS_ARMV7=1 runs it)" >&2
elif select_rust_toolchain armv7-unknown-linux-gnueabihf; then
    SECONDS=0
    cargo build --target armv7-unknown-linux-gnueabihf --no-default-features
    # The scalar flow kernel (armv7 has no vector one), the reference vectors and the
    # library's unit tests, under qemu-arm.
    cargo test --target armv7-unknown-linux-gnueabihf --no-default-features \
        --lib --test flow_kernels --test reference_vectors
    echo "cross-test: armv7 build and tests ${SECONDS} s"
else
    echo "cross-test: armv7 build skipped" >&2
fi
