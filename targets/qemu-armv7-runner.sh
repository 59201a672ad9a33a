#!/bin/sh
# Cargo runner for armv7-unknown-linux-gnueabihf under qemu-user (Cortex-A7 class CPU).
export QEMU_CPU="${QEMU_CPU:-cortex-a7}"
exec qemu-arm -L /usr/arm-linux-gnueabihf ${DAAIN_QEMU_ARGS:-} "$@"
