#!/bin/sh
# Cargo runner for aarch64-unknown-linux-gnu: runs a cross-built test or binary under
# qemu-user. The default emulated CPU has SVE, which would hide the NEON code paths, so
# a Cortex-A72 is emulated unless QEMU_CPU requests another. Under qemu, tract reads the
# host's /proc/cpuinfo, so its kernel family is forced to match the emulated CPU.
export QEMU_CPU="${QEMU_CPU:-cortex-a72}"
export TRACT_CPU_AARCH64_KIND="${TRACT_CPU_AARCH64_KIND:-$QEMU_CPU}"
# The library path points the dynamic loader at the cross libraries. Without it, on a
# machine that also has Debian's multiarch libc6:arm64 installed, qemu hangs at the first
# thread spawn. With only the cross packages installed, it changes nothing.
exec qemu-aarch64 -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib \
    ${DAAIN_QEMU_ARGS:-} "$@"
