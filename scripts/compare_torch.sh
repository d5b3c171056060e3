#!/usr/bin/env bash
# Side-by-side CPU throughput and perplexity: transmla eval against Hugging Face
# transformers (float32, the pinned interop harness) on the same windows, run
# one after the other on this machine.
# usage: scripts/compare_torch.sh MODEL DATA [CTX=1024] [WINDOWS=16]
set -euo pipefail
model=${1:?usage: compare_torch.sh MODEL DATA [CTX] [WINDOWS]}
data=${2:?usage: compare_torch.sh MODEL DATA [CTX] [WINDOWS]}
ctx=${3:-1024}
windows=${4:-16}
root=$(cd "$(dirname "$0")/.." && pwd)
python=${TRANSMLA_INTEROP_PYTHON:-$("$root/scripts/interop/setup.sh" transformers)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

CGO_ENABLED=0 go build -C "$root" -o "$work/transmla" ./cmd/transmla
"$work/transmla" eval "$model" --data "$data" --ctx "$ctx" --max-windows "$windows" --json >"$work/go.json"
"$python" "$root/scripts/interop/hf.py" ppl "$model" --data "$data" --ctx "$ctx" --max-windows "$windows" >"$work/hf.json"

"$python" - "$work/go.json" "$work/hf.json" <<'PY'
import json, sys
g, t = (json.load(open(p)) for p in sys.argv[1:3])
print(f"{'':12} {'ppl':>10} {'tokens/s':>10} {'seconds':>8}")
print(f"{'transmla':12} {g['ppl']:10.4f} {g['tokens_per_second']:10.0f} {g['seconds']:8.1f}")
print(f"{'transformers':12} {t['ppl']:10.4f} {t['tokens_per_second']:10.0f} {t['seconds']:8.1f}  (transformers {t['transformers']}, torch {t['torch']}, {t['threads']} threads)")
print(f"ratio transmla/transformers tokens/s: {g['tokens_per_second'] / t['tokens_per_second']:.2f}")
print(f"ppl relative difference: {abs(g['ppl'] - t['ppl']) / t['ppl']:.2e}")
PY
