#!/usr/bin/env bash
# Builds hangar and the test app in release mode and runs the gateway benchmark,
# writing the figures to BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p cli -p testkit --bins
cargo run --release --locked -p bench -- --hangar target/release/hangar --out BENCHMARKS.md "$@"
