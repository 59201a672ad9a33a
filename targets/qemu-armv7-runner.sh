#!/bin/sh
# Cargo runner for armv7-unknown-linux-gnueabihf under qemu-user (Cortex-A7 class CPU).
export QEMU_CPU="${QEMU_CPU:-cortex-a7}"
# As for aarch64 (see qemu-aarch64-runner.sh): Debian's multiarch armhf C library, which
# libstd-rust-web-dev:armhf pulls in, is newer than the cross one the binaries link
# against. A test binary loaded with it crashed (SIGSEGV) under qemu-arm, and it runs with
# the cross C library first.
exec qemu-arm -L /usr/arm-linux-gnueabihf -E LD_LIBRARY_PATH=/usr/arm-linux-gnueabihf/lib \
    ${DAAIN_QEMU_ARGS:-} "$@"
