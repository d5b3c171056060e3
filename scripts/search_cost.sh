#!/usr/bin/env bash
# What `convert --cache` costs over one plain conversion: both convert the
# same model with the same calibration, alternating in each round (the
# order flips every round), and the seconds of each run are printed, then
# medians and the difference. The plain conversion is the split the search
# chooses, given with --dc and --rope-dim.
#
# usage: scripts/search_cost.sh MODEL CACHE DC ROPE_DIM [ROUNDS=3]
set -euo pipefail
usage="usage: search_cost.sh MODEL CACHE DC ROPE_DIM [ROUNDS]"
model=${1:?$usage}
cache=${2:?$usage}
dc=${3:?$usage}
dr=${4:?$usage}
rounds=${5:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
calib=${CALIB:-$root/../shared/data/calibration/heldout.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
CGO_ENABLED=0 go build -C "$root" -o "$work/transmla" ./cmd/transmla

runs=$work/runs.tsv
one() { # name, convert flags...
	local name=$1 start end
	shift
	start=$(date +%s.%N)
	# Progress and notes to a log, shown if the conversion fails.
	if ! "$work/transmla" convert "$model" --calib "$calib" -o "$work/out-$name" --force "$@" >/dev/null 2>"$work/stderr.log"; then
		echo "failed: convert $model --calib $calib $*" >&2
		cat "$work/stderr.log" >&2
		exit 1
	fi
	end=$(date +%s.%N)
	printf '%s\t%s\n' "$name" "$(echo "$end - $start" | bc)" >>"$runs"
}
for r in $(seq "$rounds"); do
	order="plain search"
	((r % 2 == 0)) && order="search plain"
	for w in $order; do
		case $w in
		plain) one plain --dc "$dc" --rope-dim "$dr" ;;
		search) one search --cache "$cache" ;;
		esac
	done
	echo "round $r ($order): $(tail -2 "$runs" | tr '\t\n' ' ')s, load $(cut -d' ' -f1-3 /proc/loadavg)"
done
python3 - "$runs" "$(basename "$model")" "$cache" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
v = {k: [float(s) for n, s in rows if n == k] for k in ("plain", "search")}
mp, ms = statistics.median(v["plain"]), statistics.median(v["search"])
print(f"{sys.argv[2]} --cache {sys.argv[3]}: search {ms:.1f} s, plain {mp:.1f} s (medians), "
      f"search adds {ms - mp:.1f} s ({ms / mp:.1f}x); runs plain {' '.join(f'{x:.1f}' for x in v['plain'])} | "
      f"search {' '.join(f'{x:.1f}' for x in v['search'])}")
PY
