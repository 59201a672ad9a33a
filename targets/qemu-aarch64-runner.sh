#!/bin/sh
# Cargo runner for aarch64-unknown-linux-gnu: runs a cross-built test or binary under
# qemu-user. The default emulated CPU has SVE, which would hide the NEON code paths, so
# a Cortex-A72 is emulated unless QEMU_CPU requests another. Under qemu, tract reads the
# host's /proc/cpuinfo, so its kernel family is forced to match the emulated CPU.
export QEMU_CPU="${QEMU_CPU:-cortex-a72}"
export TRACT_CPU_AARCH64_KIND="${TRACT_CPU_AARCH64_KIND:-$QEMU_CPU}"
# The guest's loader and C library come from the cross C library, the same the binaries
# were linked against. Debian's multiarch aarch64 C library (libc6:arm64, which the
# FFmpeg packages and libstd-rust-web-dev:arm64 pull in) is newer, and a process that
# loads it with the cross loader hangs at its first thread spawn. LD_LIBRARY_PATH puts
# the cross C library first, and the multiarch FFmpeg libraries are still found in
# /usr/lib/aarch64-linux-gnu. QEMU_LD_PREFIX rather than -L, so that child processes
# started through this runner get the same prefix.
export QEMU_LD_PREFIX="${QEMU_LD_PREFIX:-/usr/aarch64-linux-gnu}"
# Without binfmt_misc, an emulated process cannot execute an aarch64 binary itself
# (qemu-user hands execve to the host kernel), so tests that start the daain binary
# start it through this runner.
DAAIN_TEST_RUNNER="$(readlink -f "$0")"
export DAAIN_TEST_RUNNER
exec qemu-aarch64 -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib ${DAAIN_QEMU_ARGS:-} "$@"
