#!/usr/bin/env bash
# Quality table of `transmla convert`: perplexity of the converted model for
# a list of --dc values, data-free and calibrated, plus the original.
# usage: scripts/quality_table.sh MODEL EVAL_TEXT CALIB_TEXT [WINDOWS=0 (all)] [DCS="448 320 256 192 128 64 32"] [MODES="free calib"]
# Prints a markdown table; JSON of every run is kept in $OUT_DIR (default: a temp dir).
set -euo pipefail
model=${1:?usage: quality_table.sh MODEL EVAL_TEXT CALIB_TEXT [WINDOWS] [DCS]}
data=${2:?usage: quality_table.sh MODEL EVAL_TEXT CALIB_TEXT [WINDOWS] [DCS]}
calib=${3:?usage: quality_table.sh MODEL EVAL_TEXT CALIB_TEXT [WINDOWS] [DCS]}
windows=${4:-0}
dcs=${5:-448 320 256 192 128 64 32}
modes=${6:-free calib}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$work"
bin="$work/transmla"
CGO_ENABLED=0 go build -C "$root" -o "$bin" ./cmd/transmla

ppl() { "$bin" eval "$1" --data "$data" --max-windows "$windows" --json >"$2" && python3 -c 'import json,sys; print("%.4f" % json.load(open(sys.argv[1]))["ppl"])' "$2"; }

name=$(basename "$model")
# ORIGINAL_PPL skips re-measuring the original (e.g. when a second table reuses it).
orig=${ORIGINAL_PPL:-$(ppl "$model" "$work/$name-original.json")}
echo "| $name ($windows windows; 0 = all) | kv_lora_rank | cache/token/layer | $modes |"
echo "|---|---|---|---|"
echo "| original | — | $(( $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["num_hidden_layers"])' "$model/config.json") )) layers | $orig |"
for dc in $dcs; do
  row=()
  for mode in $modes; do
    out="$work/$name-dc$dc-$mode"
    extra=()
    [ "$mode" = calib ] && extra=(--calib "$calib")
    "$bin" convert "$model" --dc "$dc" -o "$out" --force --json "${extra[@]}" >"$out.convert.json"
    row+=("$(ppl "$out" "$out.eval.json")")
    rm -rf "$out"
  done
  echo "| MLA | $dc | $((dc + 64)) | ${row[*]} |"
done
