#!/usr/bin/env bash
# Installs what cross-building and emulating daain-edge for the Arm targets needs on an
# x86_64 Debian machine: the cross C toolchains, qemu-user, the arm64 builds of FFmpeg's
# development packages (Debian multiarch) and the Rust standard libraries of
# aarch64-unknown-linux-gnu and, with DAAIN_CROSS_ARMV7=1, armv7-unknown-linux-gnueabihf.
# Safe to run again: installed parts are skipped.
#
# The Rust standard libraries come from rustup. When rustup cannot fetch one (no rustup,
# or no access to its server), Debian's rustc-web with libstd-rust-web-dev for that
# architecture is installed instead, and select_rust_toolchain in cross-env.sh switches
# cargo to that compiler for that target. DAAIN_CROSS_RUST=debian installs and selects
# Debian's compiler even where rustup works.
#
# Exit status 2 means that no aarch64 standard library could be installed, and 3 that
# everything but the arm64 FFmpeg packages was.
set -euo pipefail

# shellcheck source=tools/apt.sh
source "$(dirname "$0")/../tools/apt.sh"
apt_updated=false

# Installs the Debian packages in "$@" that are not installed yet.
install_packages() {
    local missing=()
    local package
    for package in "$@"; do
        package_installed "$package" || missing+=("$package")
    done
    ((${#missing[@]})) || return 0
    if ! $apt_updated; then
        apt_update
        apt_updated=true
    fi
    apt_install "${missing[@]}"
}

# Adds a foreign architecture to dpkg, so that its library packages can be installed next
# to the host's (multiarch).
add_architecture() {
    if ! dpkg --print-foreign-architectures | grep -qx "$1"; then
        $SUDO dpkg --add-architecture "$1"
        apt_updated=false
    fi
}

# Cross toolchains, the emulator, and clang for bindgen.
install_packages pkg-config clang libclang-dev qemu-user \
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
    gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
# FFmpeg for the `ffmpeg` feature. apt keeps the arm64 packages at the version of the
# amd64 ones (a Multi-Arch: same requirement), upgrading the host's when they are older.
# Where they cannot be installed (no arm64 package index, say), the aarch64 build goes
# without FFmpeg and the exit status is 3.
ffmpeg_installed=true
add_architecture arm64
if ! install_packages libavcodec-dev:arm64 libavformat-dev:arm64 libavutil-dev:arm64 \
    libswscale-dev:arm64 libswresample-dev:arm64 libavdevice-dev:arm64 \
    libavfilter-dev:arm64; then
    echo "cross-setup: the arm64 FFmpeg packages could not be installed" >&2
    ffmpeg_installed=false
fi

# Installs the Rust standard library for TARGET, whose Debian architecture is ARCH. It
# keeps one that is installed already (rustup's or Debian's), else runs `rustup target
# add`, else installs Debian's rustc-web with libstd-rust-web-dev:ARCH. Returns 1 when
# all of them fail.
install_rust_std() {
    local target=$1 arch=$2
    if [ "${DAAIN_CROSS_RUST:-}" != debian ] && command -v rustup >/dev/null 2>&1; then
        rustup target list --installed | grep -qx "$target" && return 0
        [ -d "/usr/lib/rustlib/$target/lib" ] && return 0
        rustup target add "$target" && return 0
    fi
    echo "cross-setup: installing Debian's rustc-web and its $target standard library" >&2
    add_architecture "$arch"
    install_packages rustc-web "libstd-rust-web-dev:$arch" || return 1
    command -v cargo >/dev/null 2>&1 || install_packages cargo-web
}

if ! install_rust_std aarch64-unknown-linux-gnu arm64; then
    echo "cross-setup: no aarch64 Rust standard library from rustup or Debian" >&2
    exit 2
fi
if [ "${DAAIN_CROSS_ARMV7:-}" != 1 ]; then
    echo "cross-setup: armv7 skipped (DAAIN_CROSS_ARMV7=1 installs its standard library)" >&2
elif ! install_rust_std armv7-unknown-linux-gnueabihf armhf; then
    echo "cross-setup: no armv7 Rust standard library; the armv7 build is skipped" >&2
fi
$ffmpeg_installed || exit 3
