#!/usr/bin/env bash
# Builds crashmon.sys, the Windows driver, on Linux, and packages it with its INF.
#
#   windows-driver/build.sh           build; the last line printed is the path of crashmon.sys
#   windows-driver/build.sh --clippy  the same through clippy, warnings denied
#
# Output, in ${CARGO_TARGET_DIR:-<repo>/target}/windows-driver/package/:
#   crashmon.sys  the driver (PE32+, AMD64, NATIVE subsystem)
#   crashmon.inf  the INF that installs it for the card
#   crashmon.pdb  its debug symbols; crashmon.map  the linker's map (the PE test reads it)
#
# No Windows target is installed, and rustup cannot fetch one here, so `core` and
# `compiler_builtins` are built from source with -Zbuild-std (allowed on a stable toolchain by
# RUSTC_BOOTSTRAP=1) and linked by the toolchain's own rust-lld in its lld-link flavour. The
# library source must match rustc exactly; it comes from, in order:
#   1. $CRASHMON_RUST_SRC, a folder holding library/ (for example a rustc source tree);
#   2. the toolchain's rust-src component, if installed (rustup component add rust-src);
#   3. Debian's rust-src package of the same version, downloaded with apt in the Debian trixie
#      tree that `crashmon-harness provision-qemu` builds in <cache>/qemu (trixie-backports
#      carries the current Rust releases), unpacked into <cache>/windows-driver/. That step runs
#      chroot, so as root. <cache> is $CRASHMON_CACHE_DIR or <repo>/.cache, as for the harness.
# The toolchain itself is never modified: in cases 1 and 3 rustc is run with --sysroot pointing
# to a folder in <cache>/windows-driver/ that links to the real sysroot plus the source.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
# The project's cache folder, as crashmon-harness has it ($CRASHMON_CACHE_DIR or <repo>/.cache).
CACHE_ROOT="${CRASHMON_CACHE_DIR:-$ROOT/.cache}"
mkdir -p "$CACHE_ROOT"
CACHE_ROOT="$(cd "$CACHE_ROOT" && pwd)"
CACHE="$CACHE_ROOT/windows-driver"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/windows-driver"
PACKAGE="$TARGET_DIR/package"
TREE="$CACHE_ROOT/qemu/root"
TRIPLE=x86_64-pc-windows-msvc

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'windows-driver/build.sh: %s\n' "$*" >&2; exit 1; }

if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs) first"

# The caller's flags are for the host build; they must not leak into the driver's.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS RUSTC_WRAPPER CARGO_BUILD_TARGET \
    RUSTC RUSTC_WORKSPACE_WRAPPER CARGO_BUILD_RUSTC CARGO_BUILD_RUSTC_WRAPPER

# The toolchain that cargo picks in the driver's folder (a rust-toolchain file there would win).
cd "$HERE/driver"
SYSROOT="$(rustc --print sysroot)"
REAL_RUSTC="$SYSROOT/bin/rustc"
VERSION="$("$REAL_RUSTC" -vV | sed -n 's/^release: //p')"
HOST="$("$REAL_RUSTC" -vV | sed -n 's/^host: //p')"
[ -n "$VERSION" ] && [ -n "$HOST" ] || die "cannot read the version of $REAL_RUSTC"
[ -x "$SYSROOT/lib/rustlib/$HOST/bin/rust-lld" ] ||
    die "$SYSROOT/lib/rustlib/$HOST/bin/rust-lld is missing (rustup toolchains ship it)"

mkdir -p "$CACHE"
# One build at a time (the PE test may run while someone builds by hand).
exec 9>"$CACHE/lock"
flock 9

# Unpacks Debian's rust-src $VERSION into $CACHE/rust-src-$VERSION, using apt in the trixie tree.
fetch_debian_rust_src() {
    local dest="$CACHE/rust-src-$VERSION"
    [ -f "$dest/library/core/src/lib.rs" ] && { echo "$dest"; return; }
    if [ ! -f "$CACHE_ROOT/qemu/crashmon-provisioned" ]; then
        local harness="${CARGO_TARGET_DIR:-$ROOT/target}/release/crashmon-harness"
        [ -x "$harness" ] || die "no Debian trixie tree in $CACHE_ROOT/qemu: run ./crashmon setup first (it provisions it)"
        say "provisioning the Debian trixie tree ($harness provision-qemu)"
        "$harness" provision-qemu >&2
    fi
    [ "$(id -u)" -eq 0 ] || die "fetching Debian's rust-src $VERSION runs apt-get in a chroot: run as root once (or set CRASHMON_RUST_SRC)"
    local chroot_cmd
    chroot_cmd="$(PATH="$PATH:/usr/sbin:/sbin" command -v chroot)" || die "chroot not found"
    in_tree() {
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C DEBIAN_FRONTEND=noninteractive \
            "$chroot_cmd" "$TREE" "$@"
    }
    # The Debian version of rust-src whose upstream version is rustc's ("1.95.0+dfsg1-2~bpo13+1").
    pick() { in_tree apt-cache madison rust-src | awk -F'|' -v v="$VERSION" '{ gsub(/ /, "", $2); if (index($2, v "+") == 1 || $2 == v) { print $2; exit } }'; }
    local debver
    debver="$(pick)"
    if [ -z "$debver" ]; then
        say "no rust-src $VERSION in the tree's package lists: apt-get update (in the tree)"
        in_tree apt-get update >&2
        debver="$(pick)"
    fi
    [ -n "$debver" ] || die "Debian has no rust-src $VERSION (rustc is $VERSION; available: $(in_tree apt-cache madison rust-src | awk -F'|' '{gsub(/ /,"",$2); printf "%s ", $2}')). Set CRASHMON_RUST_SRC to a rust $VERSION source tree, or use a toolchain Debian packages."
    say "downloading Debian's rust-src $debver with apt (in the trixie tree)"
    local work="/tmp/crashmon-rust-src.$$"
    rm -rf "$TREE$work" && mkdir -p "$TREE$work" && chmod 777 "$TREE$work"
    # apt-get download checks the package against the signed package lists; lists older than
    # the mirror may name a file that is gone, so a failure refreshes them once.
    if ! in_tree sh -c "cd '$work' && apt-get download -q 'rust-src=$debver'" >&2; then
        say "that failed: apt-get update (in the tree), then trying again"
        in_tree apt-get update >&2
        debver="$(pick)"
        [ -n "$debver" ] || die "Debian no longer has rust-src $VERSION"
        in_tree sh -c "cd '$work' && apt-get download -q 'rust-src=$debver'" >&2
    fi
    in_tree sh -c "dpkg-deb -x '$work'/rust-src_*.deb '$work/x'"
    local src="$TREE$work/x/usr/src/rustc-$VERSION"
    [ -f "$src/library/core/src/lib.rs" ] || die "rust-src $debver has no usr/src/rustc-$VERSION/library"
    rm -rf "$dest.tmp" "$dest"
    mkdir -p "$dest.tmp"
    mv "$src/library" "$dest.tmp/library"
    printf 'Debian rust-src %s, for rustc %s\n' "$debver" "$VERSION" >"$dest.tmp/SOURCE"
    rm -rf "$TREE$work"
    mv "$dest.tmp" "$dest"
    echo "$dest"
}

RUSTC_FOR_CARGO="$REAL_RUSTC"
if [ -n "${CRASHMON_RUST_SRC:-}" ]; then
    [ -f "$CRASHMON_RUST_SRC/library/core/src/lib.rs" ] || die "CRASHMON_RUST_SRC=$CRASHMON_RUST_SRC has no library/core"
    SRC="$(cd "$CRASHMON_RUST_SRC" && pwd)"
elif [ -f "$SYSROOT/lib/rustlib/src/rust/library/core/src/lib.rs" ]; then
    SRC=""
    say "library source: the toolchain's rust-src component"
else
    SRC="$(fetch_debian_rust_src)"
fi

if [ -n "$SRC" ]; then
    say "library source: $SRC"
    # A sysroot that is the real one plus lib/rustlib/src/rust -> $SRC: links only, rebuilt on
    # every run (it is cheap), per toolchain.
    OVERLAY="$CACHE/sysroot-$VERSION-$(printf '%s' "$SYSROOT" | cksum | cut -d' ' -f1)"
    rm -rf "$OVERLAY"
    mkdir -p "$OVERLAY/lib/rustlib/src"
    for entry in "$SYSROOT"/*; do
        [ "$(basename "$entry")" = lib ] || ln -s "$entry" "$OVERLAY/"
    done
    for entry in "$SYSROOT"/lib/*; do
        [ "$(basename "$entry")" = rustlib ] || ln -s "$entry" "$OVERLAY/lib/"
    done
    for entry in "$SYSROOT"/lib/rustlib/*; do
        [ "$(basename "$entry")" = src ] || ln -s "$entry" "$OVERLAY/lib/rustlib/"
    done
    ln -s "$SRC" "$OVERLAY/lib/rustlib/src/rust"
    # Cargo finds the library source at $(rustc --print sysroot)/lib/rustlib/src/rust, so rustc
    # is run with --sysroot (sysroot-rustc/rustc passes it on every call, including that query; it is
    # named rustc so that clippy-driver, as cargo clippy's wrapper, knows it for the compiler).
    export CRASHMON_REAL_RUSTC="$REAL_RUSTC" CRASHMON_SYSROOT="$OVERLAY"
    RUSTC_FOR_CARGO="$HERE/sysroot-rustc/rustc"
fi

say "cargo build --release (target $TRIPLE, -Zbuild-std) in windows-driver/driver"
# Source paths end up in panic locations: name them relative to the checkout, so that the image
# does not depend on where the repository is. (Two builds differ only in the PE timestamp,
# checksum and PDB GUID, which lld derives from the PDB, and the PDB names rustc's randomly
# named temporary objects.)
if [ "${1:-}" = --clippy ]; then
    # The same build through clippy (cargo runs the driver's own crates through clippy-driver;
    # the library crates still build with the project's sysroot): ./crashmon test runs it.
    say "cargo clippy --release (target $TRIPLE) in windows-driver/driver"
    RUSTC_BOOTSTRAP=1 RUSTC="$RUSTC_FOR_CARGO" CARGO_TARGET_DIR="$TARGET_DIR" \
        SYSROOT="${CRASHMON_SYSROOT:-}" CARGO_ENCODED_RUSTFLAGS="--remap-path-prefix=$ROOT=crashmon" \
        cargo clippy --release --locked -- -D warnings >&2
    exit 0
fi
RUSTC_BOOTSTRAP=1 RUSTC="$RUSTC_FOR_CARGO" CARGO_TARGET_DIR="$TARGET_DIR" \
    CARGO_ENCODED_RUSTFLAGS="--remap-path-prefix=$ROOT=crashmon" \
    cargo build --release --locked >&2

OUT="$TARGET_DIR/$TRIPLE/release"
[ -f "$OUT/crashmon.exe" ] || die "the build produced no $OUT/crashmon.exe"
rm -rf "$PACKAGE.tmp"
mkdir -p "$PACKAGE.tmp"
cp "$OUT/crashmon.exe" "$PACKAGE.tmp/crashmon.sys"
cp "$OUT/deps/crashmon.map" "$PACKAGE.tmp/crashmon.map"
[ -f "$OUT/crashmon.pdb" ] && cp "$OUT/crashmon.pdb" "$PACKAGE.tmp/crashmon.pdb"
cp "$HERE/crashmon.inf" "$PACKAGE.tmp/crashmon.inf"
rm -rf "$PACKAGE"
mv "$PACKAGE.tmp" "$PACKAGE"
say "built $PACKAGE/crashmon.sys"
echo "$PACKAGE/crashmon.sys"
