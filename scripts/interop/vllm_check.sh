#!/usr/bin/env bash
# The on-demand vLLM (CPU) check: sets up the harness's vllm venv, builds
# transmla, and prints the interop table of README ("Engines that load the
# export"): perplexity by transmla, transformers and vLLM on the first
# windows of wiki.test.raw, and greedy agreement, for the shared models and
# their exports. Heavy: about a minute per vLLM load on 2 cores.
# usage: scripts/interop/vllm_check.sh [WORK=/tmp/transmla-interop] [table.py options]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-/tmp/transmla-interop}
shift || true
python=$("$root/scripts/interop/setup.sh" vllm)
mkdir -p "$work"
CGO_ENABLED=0 go build -C "$root" -o "$work/transmla" ./cmd/transmla
exec "$python" "$root/scripts/interop/table.py" "$work/transmla" "$root/../shared" "$work" "$@"
