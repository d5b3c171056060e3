#!/usr/bin/env bash
# Per-layer cost of --refine at Llama-3-8B's shape: a one-layer
# `transmla synth --shape llama3-8b` checkpoint converted at d_c 448 + d_r 64
# without and with --refine, on TOKENS calibration tokens (default 8192:
# 16 sequences of 512, 8 of them held back) and STEPS Adam steps (default
# 4), printing wall time, peak RSS and the refinement's report. The
# per-step cost of the default batch is the report's seconds less the
# fixed part (recording targets, scoring); BenchmarkSequence in
# internal/mlafit times one sequence's forward and backward alone.
#
# usage: scripts/refine_cost_8b.sh CALIB [WORK_DIR]
set -euo pipefail
calib=${1:?usage: refine_cost_8b.sh CALIB [WORK_DIR]}
work=${2:-$(mktemp -d)}
tokens=${TOKENS:-8192}
steps=${STEPS:-4}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"
bin="$work/transmla"
CGO_ENABLED=0 go build -C "$root" -o "$bin" ./cmd/transmla
src="$work/llama3-8b-1layer"
[ -d "$src" ] || "$bin" synth --shape llama3-8b --layers 1 -o "$src" >/dev/null
common=(--dc 448 --rope-dim 64 --calib "$calib" --calib-tokens "$tokens" --force --json)
/usr/bin/time -f '%e %M' -o "$work/plain.time" "$bin" convert "$src" -o "$work/plain" "${common[@]}" >"$work/plain.json"
/usr/bin/time -f '%e %M' -o "$work/refined.time" "$bin" convert "$src" -o "$work/refined" "${common[@]}" \
  --refine --refine-steps "$steps" >"$work/refined.json"
python3 - "$work" <<'EOF'
import json, sys
w = sys.argv[1]
for k in ("plain", "refined"):
    wall, rss = open(f"{w}/{k}.time").read().split()
    print(f"{k}: {float(wall):.1f} s, peak RSS {int(rss) // 1024} MiB")
r = json.load(open(f"{w}/refined.json"))["layers"][0]["refine"]
print("refinement of the layer:", json.dumps(r))
EOF
