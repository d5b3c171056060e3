#!/usr/bin/env bash
# Wall time of `transmla sweep` against one `transmla convert` plus one
# `transmla eval`, side by side in alternating rounds, with medians.
# usage: scripts/bench_sweep.sh [ROUNDS=1]
# Environment: MODEL (default ../shared/models/llama-gqa-25m), CALIB and DATA
# (heldout.txt, wiki.test.raw), WINDOWS (64), CTX (1024), DCS (the sweep's
# widths, 32,64,128,192,256,320,448), SINGLE_DC (192), OUT_DIR (keeps the
# last sweep's results and plots; default: a temporary directory).
set -euo pipefail
rounds=${1:-1}
root=$(cd "$(dirname "$0")/.." && pwd)
shared=$root/../shared
model=${MODEL:-$shared/models/llama-gqa-25m}
calib=${CALIB:-$shared/data/calibration/heldout.txt}
data=${DATA:-$shared/data/wikitext-2-raw/wiki.test.raw}
windows=${WINDOWS:-64}
ctx=${CTX:-1024}
dcs=${DCS:-32,64,128,192,256,320,448}
single_dc=${SINGLE_DC:-192}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=${OUT_DIR:-$work/sweep}
bin=$work/transmla
CGO_ENABLED=0 go build -C "$root" -o "$bin" ./cmd/transmla

now() { date +%s.%N; }
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

echo "model $model; calibrated on $(basename "$calib"); $windows windows of $ctx of $(basename "$data"); $(nproc) cores"
: >"$work/single" && : >"$work/sweep"
for r in $(seq "$rounds"); do
	t0=$(now)
	"$bin" convert "$model" --dc "$single_dc" --calib "$calib" -o "$work/one" --force >/dev/null
	"$bin" eval "$work/one" --data "$data" --ctx "$ctx" --max-windows "$windows" --json >"$work/one.json"
	t1=$(now)
	"$bin" sweep "$model" --dc "$dcs" --calib "$calib" --data "$data" --ctx "$ctx" --max-windows "$windows" -o "$out" --force >"$work/table.md" 2>/dev/null
	t2=$(now)
	single=$(echo "$t1 - $t0" | bc)
	sweep=$(echo "$t2 - $t1" | bc)
	echo "$single" >>"$work/single"
	echo "$sweep" >>"$work/sweep"
	printf 'round %d: convert --dc %s + eval %.1f s, sweep of %s %.1f s, ratio %.2f\n' "$r" "$single_dc" "$single" "$dcs" "$sweep" "$(echo "$sweep / $single" | bc -l)"
done
single=$(median <"$work/single")
sweep=$(median <"$work/sweep")
printf 'median of %d: convert + eval %.1f s, sweep %.1f s, ratio %.2f\n\n' "$rounds" "$single" "$sweep" "$(echo "$sweep / $single" | bc -l)"
cat "$work/table.md"
