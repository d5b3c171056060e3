#!/usr/bin/env bash
# The cache-budget table: at each budget (values per token and layer), the
# conversion `transmla convert --cache` chooses on held-out calibration text
# against the fixed-d_r default of an earlier build, evaluated on a text.
#
# usage: scripts/budget_table.sh MODEL DATA CALIB [WINDOWS=0 (all)] [BUDGETS="128 192 256 320 512"]
#
# Both sides are `transmla sweep` runs over the same windows of DATA: the
# working tree's `sweep --cache BUDGETS --rope-dim 64` (series best and
# drR) and OLD_REF's (default e1f9e3c, the build before the search)
# `sweep --dc` at d_c = budget − R with its defaults; R is ROPE_DIM
# (default 64). FORMAT (default
# exact) is the export format of both, CTX (default 1024) the window,
# CALIB_SEQ (default 512) the calibration sequence length. Results stay in
# $OUT_DIR (default: a temp dir); the markdown table goes to stdout.
set -euo pipefail
usage="usage: budget_table.sh MODEL DATA CALIB [WINDOWS] [BUDGETS]"
model=${1:?$usage}
data=${2:?$usage}
calib=${3:?$usage}
windows=${4:-0}
budgets=${5:-128 192 256 320 512}
ctx=${CTX:-1024}
format=${FORMAT:-exact}
seq=${CALIB_SEQ:-512}
dr=${ROPE_DIM:-64}
old_ref=${OLD_REF:-e1f9e3c}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$work"

new="$work/transmla"
CGO_ENABLED=0 go build -C "$root" -o "$new" ./cmd/transmla
old="$work/transmla-$old_ref"
if [ ! -x "$old" ]; then
  src=$(mktemp -d)
  # The worktree goes even when the build fails.
  trap 'git -C "$root" worktree remove --force "$src/tree" 2>/dev/null; rm -rf "$src"' EXIT
  git -C "$root" worktree add --detach "$src/tree" "$old_ref" >/dev/null
  CGO_ENABLED=0 go build -C "$src/tree" -o "$old" ./cmd/transmla
fi

name=$(basename "$model")
common=(--calib "$calib" --calib-seq "$seq" --data "$data" --ctx "$ctx" --max-windows "$windows" --format "$format")
csv_budgets=$(echo $budgets | tr ' ' ',')
dcs=$(for b in $budgets; do echo $((b - dr)); done | paste -sd,)
start=$(date +%s)
"$new" sweep "$model" --cache "$csv_budgets" --rope-dim "$dr" "${common[@]}" -o "$work/$name-new" >/dev/null
mid=$(date +%s)
"$old" sweep "$model" --dc "$dcs" --rope-dim "$dr" "${common[@]}" -o "$work/$name-old" >/dev/null
end=$(date +%s)

python3 - "$work/$name-new/results.json" "$work/$name-old/results.json" "$name" "$(basename "$data")" "$dr" <<'EOF'
import json, sys
new, old = (json.load(open(p)) for p in sys.argv[1:3])
name, data, dr = sys.argv[3], sys.argv[4], int(sys.argv[5])
o = new["original"]
orig = o["ppl"]
assert abs(old["original"]["ppl"] - orig) < 1e-6 * orig, "the two builds disagree on the original (beyond the 1e-6 of summation order)"
by = {}
for p in new["points"]:
    by[(p["method"], p["cache_budget"])] = p
olds = {p["dc"] + p["rope_dim"]: p for p in old["points"]}
print(f"**{name}** on {data}, {o['windows']} windows of {new['setup']['ctx']} (original {orig:.4f})\n")
print(f"| cache/token/layer | chosen d_c + d_r | stride | freqfold | held-out ppl | ppl | Δ | best at d_r {dr} | Δ | old default d_c+{dr} | Δ |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for b in sorted({k[1] for k in by}):
    best, dr64, dflt = by.get(("best", b)), by.get((f"dr{dr}", b)), olds.get(b)
    d = lambda p: f"{p['ppl']:.4f} | {100 * (p['ppl'] / orig - 1):+.2f}%" if p else "— | —"
    print(f"| {b} | {best['dc']} + {best['rope_dim']} | {best['rope_stride']:g} | {best['freqfold']} | {best['held_out_ppl']:.4f} | {d(best)} | {d(dr64)} | {d(dflt)} |")
EOF
echo
echo "sweep --cache (search + evaluations): $((mid - start)) s; old sweep --dc: $((end - mid)) s; results in $work"
