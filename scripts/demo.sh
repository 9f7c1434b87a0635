#!/usr/bin/env bash
# The main job: serve the default model and stream one completion through
# prefill -> decode, printing the text as it arrives. Stops the server after.
set -euo pipefail
cd "$(dirname "$0")/.."

prompt=${1:-"Beautiful is better than"}
http=${HTTP_PORT:-8000} grpc=${GRPC_PORT:-8001} metrics=${METRICS_PORT:-8002}
log=$(mktemp -t hetserve-demo.XXXXXX.log)

.venv/bin/hetserve serve --http-port "$http" --grpc-port "$grpc" --metrics-port "$metrics" >"$log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT

echo "demo: starting tritonserver (log: $log)" >&2
until grep -q "hetserve INFO: ready in" "$log"; do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "demo: the server failed to start:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  sleep 1
done
grep -E "built-in|ready in" "$log" | sed 's/^/demo: /' >&2
echo "demo: prompt: $prompt" >&2
.venv/bin/hetserve generate "$prompt" --max-tokens 48 --url "127.0.0.1:$grpc"
