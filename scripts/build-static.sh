#!/usr/bin/env bash
# Builds the spool binary as one statically linked file (what the container
# image ships) and checks that it is: no program interpreter, no shared
# library. Prints the binary's path on stdout; everything else on stderr.
#
#   scripts/build-static.sh                 # release build (the Dockerfile's)
#   scripts/build-static.sh --profile dev   # same target and flags, unoptimized
#                                           # (the test command's quicker check)
#   scripts/build-static.sh --check FILE    # only check an existing binary
#
# Why musl: Rust's musl target links its C library statically (the
# crt-static flag is in .cargo/config.toml), and musl resolves host names
# from /etc/hosts and /etc/resolv.conf itself. A static glibc binary would
# still load NSS modules at run time for any host-name lookup, which a
# `scratch`/distroless image does not have. spool itself binds IP
# addresses, so only a host name given to a client flag (`spool bench`,
# and a future --database-url host) resolves names at all.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly TARGET=x86_64-unknown-linux-musl

fail() {
    printf 'build-static: %s\n' "$*" >&2
    exit 1
}

# Succeeds only for a statically linked ELF executable: readelf lists no
# INTERP program header (the dynamic loader) and no NEEDED entry (a
# shared library), and it is an executable at all.
check_static() {
    local binary=$1
    [ -x "$binary" ] || fail "$binary: not an executable file"
    command -v readelf >/dev/null 2>&1 || fail "readelf not found (Debian package binutils)"
    local headers
    headers=$(readelf --file-header --program-headers --dynamic "$binary" 2>&1) ||
        fail "$binary: readelf could not read it: $headers"
    grep -Eq 'Type:[[:space:]]+(EXEC|DYN)' <<<"$headers" ||
        fail "$binary: not an ELF executable"
    if grep -q 'INTERP' <<<"$headers"; then
        fail "$binary: asks for a program interpreter (dynamically linked): $(grep -A1 INTERP <<<"$headers" | tr -s ' \n' ' ')"
    fi
    if grep -q '(NEEDED)' <<<"$headers"; then
        fail "$binary: needs shared libraries: $(grep '(NEEDED)' <<<"$headers" | tr -s ' \n' ' ')"
    fi
    printf 'build-static: %s is statically linked (no interpreter, no shared library)\n' "$binary" >&2
}

profile=release
case "${1:-}" in
    "") ;;
    --profile)
        profile=${2:?--profile needs a cargo profile name}
        ;;
    --check)
        check_static "${2:?--check needs a file}"
        exit 0
        ;;
    *)
        fail "unknown argument '$1' (expected --profile NAME or --check FILE)"
        ;;
esac

# Read whole: under pipefail `rustup ... | grep -q` fails when grep stops early.
installed_targets=$(rustup target list --installed 2>/dev/null || true)
if ! grep -qx "$TARGET" <<<"$installed_targets"; then
    printf 'build-static: adding the Rust target %s\n' "$TARGET" >&2
    rustup target add "$TARGET" >&2 ||
        fail "cannot add the Rust target $TARGET (rustup target add failed: is static.rust-lang.org reachable?)"
fi

cargo build --locked --profile "$profile" --target "$TARGET" -p spool --bin spool >&2

# cargo names the dev profile's directory `debug`.
profile_dir=$profile
[ "$profile" = dev ] && profile_dir=debug
binary="target/$TARGET/$profile_dir/spool"
check_static "$binary"
printf '%s\n' "$binary"
