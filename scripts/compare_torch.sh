#!/usr/bin/env bash
# Side-by-side CPU throughput and perplexity: transmla eval vs a plain PyTorch
# forward pass on the same token ids, run one after the other on this machine.
# usage: scripts/compare_torch.sh MODEL DATA [CTX=1024] [WINDOWS=16]
set -euo pipefail
model=${1:?usage: compare_torch.sh MODEL DATA [CTX] [WINDOWS]}
data=${2:?usage: compare_torch.sh MODEL DATA [CTX] [WINDOWS]}
ctx=${3:-1024}
windows=${4:-16}
python=${PYTHON:-}
if [ -z "$python" ]; then
  # Debian's python3-torch lives in the system interpreter, which may not be first on PATH.
  for p in python3 /usr/bin/python3; do
    if "$p" -c 'import torch' 2>/dev/null; then python=$p; break; fi
  done
  [ -n "$python" ] || { echo "compare_torch.sh: no python3 with torch (apt-get install python3-torch, or set PYTHON)" >&2; exit 1; }
fi
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

CGO_ENABLED=0 go build -C "$root" -o "$work/transmla" ./cmd/transmla
"$work/transmla" tokenize "$model" --data "$data" --ids-out "$work/ids.json" >/dev/null
"$work/transmla" eval "$model" --data "$data" --ctx "$ctx" --max-windows "$windows" --json >"$work/go.json"
"$python" "$root/scripts/torch_eval.py" "$model" "$work/ids.json" --ctx "$ctx" --max-windows "$windows" >"$work/torch.json"

"$python" - "$work/go.json" "$work/torch.json" <<'PY'
import json, sys
g, t = (json.load(open(p)) for p in sys.argv[1:3])
print(f"{'':10} {'ppl':>10} {'tokens/s':>10} {'seconds':>8}")
print(f"{'transmla':10} {g['ppl']:10.4f} {g['tokens_per_second']:10.0f} {g['seconds']:8.1f}")
print(f"{'pytorch':10} {t['ppl']:10.4f} {t['tokens_per_second']:10.0f} {t['seconds']:8.1f}  (torch {t['torch']}, {t['threads']} threads)")
print(f"ratio transmla/pytorch tokens/s: {g['tokens_per_second'] / t['tokens_per_second']:.2f}")
print(f"ppl relative difference: {abs(g['ppl'] - t['ppl']) / t['ppl']:.2e}")
PY
