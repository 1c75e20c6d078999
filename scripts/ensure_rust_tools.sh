#!/usr/bin/env sh
# Make sure one Rust lint component (`rustfmt` or `clippy`, the only argument) works before
# `make test` runs it: a rustup toolchain may lack it, so it is added with rustup when missing.
# Exit 0: the component works. Exit 3: it cannot be had on this machine (no rustup, or rustup
# cannot reach its server); a loud banner says so and the Makefile skips that check.
set -u
component="$1"
case "$component" in
    rustfmt) probe="fmt" ;;
    clippy) probe="clippy" ;;
    *) echo "usage: $0 rustfmt|clippy" >&2; exit 2 ;;
esac
if cargo "$probe" --version >/dev/null 2>&1; then
    exit 0
fi
if command -v rustup >/dev/null 2>&1; then
    echo "cargo $probe is missing: rustup component add $component" >&2
    rustup component add "$component" >&2 || true
    if cargo "$probe" --version >/dev/null 2>&1; then
        exit 0
    fi
fi
cat >&2 <<MSG
################################################################################
# WARNING: the Rust component '$component' is missing and cannot be installed here
# (no rustup, or rustup cannot reach its server): 'cargo $probe' is SKIPPED.
# Install it (rustup component add $component) and run make test again.
################################################################################
MSG
exit 3
