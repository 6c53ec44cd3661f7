#!/usr/bin/env bash
# hangar's benchmarks: builds in release mode, finds or installs what it measures against
# (nginx from Debian, oha from crates.io, matplotlib for the plot), runs every
# benchmark against the real server, and writes BENCHMARKS.md and docs/benchmarks.png.
# P6 starts a private PostgreSQL cluster (scripts/pg/cluster.sh installs Debian's
# postgresql when it is missing).
# Extra flags go to the benchmark (e.g. --rounds 1 --seconds 2 for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

nginx=$(command -v nginx || true)
[ -n "$nginx" ] || [ ! -x /usr/sbin/nginx ] || nginx=/usr/sbin/nginx
if [ -z "$nginx" ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx
  nginx=/usr/sbin/nginx
fi

if ! command -v wrk >/dev/null 2>&1; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk
fi

oha=$(command -v oha || true)
if [ -z "$oha" ]; then
  oha=target/bench-tools/bin/oha
  [ -x "$oha" ] || cargo install oha --version 1.16.0 --locked --root target/bench-tools
fi

venv=target/bench-venv
if ! "$venv/bin/python" -c "import matplotlib" >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check matplotlib==3.9.2
fi

cargo build --release --locked -p cli -p testkit -p bench --bins
target/release/hangar-bench --hangar target/release/hangar --oha "$oha" --nginx "$nginx" \
  --wrk "$(command -v wrk)" --out BENCHMARKS.md --json target/bench/results.json "$@"
# --p1-only, --p5-only, --slurm-only, --stores-only and --failover-only print their
# figures and write nothing to plot.
for arg in "$@"; do
  case $arg in --p1-only | --p5-only | --slurm-only | --stores-only | --failover-only) exit 0 ;; esac
done
"$venv/bin/python" bench/plot.py target/bench/results.json docs/benchmarks.png
