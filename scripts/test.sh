#!/usr/bin/env bash
# Runs every check and test of hangar. On a fresh machine it first installs what the
# tests need and is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=
need_deb() { # need_deb COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 && return
  [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"
}

# The example apps and test apps are Python (standard library only) and shell; the
# dashboard's browser tests drive Debian's Chromium with playwright-core from npm.
need_deb python3 python3
need_deb chromium chromium
need_deb node nodejs
need_deb npm npm
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
# The queue is tested with the unmodified fal-client package from PyPI, in a
# virtualenv of its own.
fal_venv=target/fal-venv
if ! "$fal_venv/bin/python" -c "import fal_client" >/dev/null 2>&1; then
  python3 -m venv "$fal_venv" 2>/dev/null || {
    [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    rm -rf "$fal_venv"
    python3 -m venv "$fal_venv"
  }
  "$fal_venv/bin/pip" install --quiet --disable-pip-version-check -r tests/fal/requirements.txt
fi
for component in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done

cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests run the `hangar` binary and the test app (`hangar-testapp`, a
# binary of testkit), which a test run alone does not build.
cargo build --workspace --bins --locked
# A short run of each fuzz target (fuzz/, on top of its seed corpus), so that a
# change that makes the manifest parser or the archive unpacker panic, or break
# one of their promises, on inputs near the seeds fails here.
scripts/fuzz.sh 15
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked
else
  cargo test --workspace --locked
fi
