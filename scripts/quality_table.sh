#!/usr/bin/env bash
# Quality table of `transmla convert`: perplexity of the converted model for
# a list of --dc values, data-free and calibrated, plus the original.
# usage: scripts/quality_table.sh MODEL EVAL_TEXT CALIB_TEXT [WINDOWS=0 (all)] [DCS="448 320 256 192 128 64 32"] [MODES="free calib"]
# Prints a markdown table, one ppl column per mode; JSON of every run is kept
# in $OUT_DIR (default: a temp dir). CTX sets eval's window (default 1024).
set -euo pipefail
usage="usage: quality_table.sh MODEL EVAL_TEXT CALIB_TEXT [WINDOWS] [DCS] [MODES]"
model=${1:?$usage}
data=${2:?$usage}
calib=${3:?$usage}
windows=${4:-0}
dcs=${5:-448 320 256 192 128 64 32}
modes=${6:-free calib}
ctx=${CTX:-1024}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$work"
bin="$work/transmla"
CGO_ENABLED=0 go build -C "$root" -o "$bin" ./cmd/transmla

ppl() { "$bin" eval "$1" --data "$data" --ctx "$ctx" --max-windows "$windows" --json >"$2" && json "$2" '"%.4f" % d["ppl"]'; }
json() { python3 -c 'import json,sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }

name=$(basename "$model")
"$bin" inspect "$model" --json >"$work/$name-inspect.json"
layers=$(json "$work/$name-inspect.json" 'd["layers"]')
# ORIGINAL_PPL skips re-measuring the original (e.g. when a second table reuses it).
orig=${ORIGINAL_PPL:-$(ppl "$model" "$work/$name-original.json")}
cells() { local IFS='|'; echo "$*" | sed 's/|/ | /g'; }
read -ra mode_list <<<"$modes"
echo "| $name ($windows windows of $ctx; 0 = all) | kv_lora_rank | cache/token/layer | $(cells "${mode_list[@]}") |"
echo "|---|---|---|$(printf -- '---|%.0s' "${mode_list[@]}")"
orig_cells=()
for _ in "${mode_list[@]}"; do orig_cells+=("$orig"); done
echo "| original | — | $(( $(json "$work/$name-inspect.json" 'd["kv_cache_values_per_token"]') / layers )) | $(cells "${orig_cells[@]}") |"
for dc in $dcs; do
  row=()
  for mode in "${mode_list[@]}"; do
    out="$work/$name-dc$dc-$mode"
    extra=()
    [ "$mode" = calib ] && extra=(--calib "$calib")
    "$bin" convert "$model" --dc "$dc" -o "$out" --force --json "${extra[@]}" >"$out.convert.json"
    row+=("$(ppl "$out" "$out.eval.json")")
    rm -rf "$out"
  done
  rope=$(json "$out.convert.json" 'd["qk_rope_head_dim"]')
  echo "| MLA | $dc | $((dc + rope)) | $(cells "${row[@]}") |"
done
