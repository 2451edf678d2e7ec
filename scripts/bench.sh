#!/usr/bin/env bash
# Builds the release binaries and runs Drover's benchmarks; their figures go in
# BENCHMARKS.md. Pass one name (launch, scheduling, memory, docker, plugin, artifacts, envs) to run only that one.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p drover-cli -p drover-bench
exec target/release/drover-bench "${1:-all}"
