#!/usr/bin/env bash
# NVIDIA's genai-perf against a running hetserve server, from its own
# environment (genai-perf pulls ~1 GB; the project's environment stays as
# pinned). It drives the perf_analyzer that `hetserve bench setup` fetches.
#
#   bash scripts/genai-perf.sh MODEL GRPC_URL [genai-perf profile options...]
#   bash scripts/genai-perf.sh llm 127.0.0.1:8001 --concurrency 8 --request-count 64
#
# Requests go out as Triton's vLLM backend takes them (--backend vllm), with
# the numbers in sampling_parameters as strings. TOKENIZER (default: the
# default checkpoint's) must be the served model's tokenizer: genai-perf
# counts tokens with it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ $# -ge 2 ] || { sed -n 2,12p "$0"; exit 2; }
MODEL=$1 URL=$2
shift 2
ENV=${GENAI_PERF_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hetserve/genai-perf-0.0.16}
if [ ! -x "$ENV/bin/genai-perf" ]; then
  echo "genai-perf: building $ENV" >&2
  "$ROOT/.venv/bin/python" -m venv "$ENV"
  "$ENV/bin/pip" install -q genai-perf==0.0.16 numpy==1.26.4
fi
PA=$("$ROOT/.venv/bin/python" -c 'from hetserve.bench import perf; print(perf.install()[0].parent)')
TOKENIZER=${TOKENIZER:-$("$ROOT/.venv/bin/python" -c 'from hetserve.checkpoint import DEFAULT_MODEL, resolve_model; print(resolve_model(DEFAULT_MODEL))')}
export PATH="$PA:$PATH" LD_LIBRARY_PATH="$PA/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$ENV/bin/genai-perf" profile -m "$MODEL" --backend vllm --endpoint-type kserve --streaming -u "$URL" \
  --tokenizer "$TOKENIZER" "$@"
