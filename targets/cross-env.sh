# Environment for cross-building daain-edge for the Arm targets on an x86_64 Debian
# machine prepared by cross-setup.sh. cross-test.sh sources it; source it in a shell to
# run cargo for these targets by hand:
#
#     source targets/cross-env.sh
#     cargo test --target aarch64-unknown-linux-gnu
#
# Every variable is scoped to one target triple, so build scripts that run for the host
# (and the native build) keep the host's pkg-config and clang settings.

# pkg-config reads only the arm64 .pc files of Debian's multiarch packages
# (libavcodec-dev:arm64 and the others). They name /usr/include/aarch64-linux-gnu and
# /usr/lib/aarch64-linux-gnu, so the sysroot is the root of this machine.
export PKG_CONFIG_ALLOW_CROSS_aarch64_unknown_linux_gnu=1
export PKG_CONFIG_LIBDIR_aarch64_unknown_linux_gnu=/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig
export PKG_CONFIG_SYSROOT_DIR_aarch64_unknown_linux_gnu=/
export PKG_CONFIG_ALLOW_CROSS_armv7_unknown_linux_gnueabihf=1
export PKG_CONFIG_LIBDIR_armv7_unknown_linux_gnueabihf=/usr/lib/arm-linux-gnueabihf/pkgconfig:/usr/share/pkgconfig
export PKG_CONFIG_SYSROOT_DIR_armv7_unknown_linux_gnueabihf=/

# bindgen (FFmpeg's and V4L2's bindings) parses the target's C headers: the cross C
# library and kernel headers of libc6-dev-*-cross and linux-libc-dev-*-cross under the
# sysroot, and the multiarch FFmpeg headers.
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--target=aarch64-linux-gnu --sysroot=/usr/aarch64-linux-gnu -isystem /usr/include/aarch64-linux-gnu"
export BINDGEN_EXTRA_CLANG_ARGS_armv7_unknown_linux_gnueabihf="--target=arm-linux-gnueabihf --sysroot=/usr/arm-linux-gnueabihf -isystem /usr/include/arm-linux-gnueabihf"

# C code that build scripts compile for the target (tract's assembly kernels, FFmpeg's
# feature probe) uses the cross compilers.
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc

# Selects the Rust compiler for cargo commands that build TARGET: rustup's toolchain when
# it has TARGET's standard library, otherwise Debian's rustc-web when
# libstd-rust-web-dev for TARGET is installed (cross-setup.sh installs it when rustup
# cannot fetch the target). DAAIN_CROSS_RUST=debian selects Debian's compiler even where
# rustup has the target. Debian's compiler writes to its own target directory, so that
# its artifacts do not mix with rustup's.
select_rust_toolchain() {
    local target=$1
    unset RUSTC RUSTDOC DAAIN_RUST_TOOLCHAIN
    export CARGO_TARGET_DIR="${DAAIN_CARGO_TARGET_DIR:-target}"
    if [ "${DAAIN_CROSS_RUST:-}" != debian ] &&
        rustup target list --installed 2>/dev/null | grep -qx "$target"; then
        export DAAIN_RUST_TOOLCHAIN=rustup
    elif [ -d "/usr/lib/rustlib/$target/lib" ]; then
        export DAAIN_RUST_TOOLCHAIN=debian
        export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
        export CARGO_TARGET_DIR="$CARGO_TARGET_DIR/debian-rustc"
    else
        echo "cross-env: no Rust standard library for $target; run targets/cross-setup.sh" >&2
        return 1
    fi
}
