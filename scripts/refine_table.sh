#!/usr/bin/env bash
# The refinement table: for each cache budget, `transmla convert --cache B`
# (the split the search picks on held-out calibration text) written
# without and with --refine, each evaluated on the whole of DATA and on
# the first 16 windows of OOD (a text neither the calibration nor the
# refinement saw).
#
# usage: scripts/refine_table.sh MODEL DATA OOD CALIB [BUDGETS="128 192 256"] [WHICH="plain refined"]
#
# FORMAT (default exact) is the export format, CTX (default 1024) the
# window, WINDOWS (default 0: all) the windows of DATA, REFINE_ARGS extra
# flags for the refined conversion; ORIG_PPL, when set, is the source's
# perplexity on DATA (not measured again). Checkpoints and one JSON line per
# conversion (convert's --json report with the perplexities added) stay
# in $OUT_DIR (default: a temp dir); a markdown table goes to stdout.
set -euo pipefail
usage="usage: refine_table.sh MODEL DATA OOD CALIB [BUDGETS] [WHICH]"
model=${1:?$usage}
data=${2:?$usage}
ood=${3:?$usage}
calib=${4:?$usage}
budgets=${5:-128 192 256}
which=${6:-plain refined}
format=${FORMAT:-exact}
ctx=${CTX:-1024}
windows=${WINDOWS:-0}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$work"
bin="$work/transmla"
CGO_ENABLED=0 go build -C "$root" -o "$bin" ./cmd/transmla
name=$(basename "$model")
read -r -a extra <<<"${REFINE_ARGS:-}"

ppl() { # dir file windows
  "$bin" eval "$1" --data "$2" --ctx "$ctx" --max-windows "$3" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ppl"])'
}

for b in $budgets; do
  for w in $which; do
    out="$work/$name-$b-$w"
    args=()
    [ "$w" = refined ] && args=(--refine "${extra[@]}")
    /usr/bin/time -f '%e %M' -o "$out.time" "$bin" convert "$model" -o "$out" --force --cache "$b" --format "$format" \
      --calib "$calib" --json "${args[@]}" >"$out.json"
    p=$(ppl "$out" "$data" "$windows")
    q=$(ppl "$out" "$ood" 16)
    python3 - "$out.json" "$out.time" "$p" "$q" "$w" "$b" >>"$work/$name.jsonl" <<'EOF'
import json, sys
rep = json.load(open(sys.argv[1]))
wall, rss = open(sys.argv[2]).read().split()
print(json.dumps({"budget": int(sys.argv[6]), "which": sys.argv[5], "ppl": float(sys.argv[3]), "ood_ppl": float(sys.argv[4]),
                  "wall_s": float(wall), "peak_rss_kib": int(rss), "method": rep["method"],
                  "split": f'{rep["latent_rank"]}+{rep["qk_rope_head_dim"]}',
                  "layers": [l.get("refine") for l in rep["layers"]]}))
EOF
  done
done
orig=${ORIG_PPL:-$(ppl "$model" "$data" "$windows")}
origood=$(ppl "$model" "$ood" 16)
python3 - "$work/$name.jsonl" "$orig" "$origood" "$name" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
orig, origood, name = float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
print(f"{name}: original {orig:.4f} (OOD {origood:.4f})\n")
print("| cache | split | plain ppl (Δ) | refined ppl (Δ) | gap closed | OOD plain | OOD refined | convert s plain / refined | peak RSS MiB plain / refined |")
print("|---|---|---|---|---|---|---|---|---|")
by = {}
for r in rows:
    by.setdefault(r["budget"], {})[r["which"]] = r
for b in sorted(by):
    p, f = by[b].get("plain"), by[b].get("refined")
    def d(x): return f"{x['ppl']:.4f} ({100*(x['ppl']/orig-1):+.1f}%)" if x else ""
    closed = f"{100*(p['ppl']-f['ppl'])/(p['ppl']-orig):.0f}%" if p and f else ""
    split = (p or f)["split"]
    def g(x, k, f="{:.2f}"): return f.format(x[k]) if x else ""
    rss = lambda x: str(x["peak_rss_kib"] // 1024) if x else ""
    print(f"| {b} | {split} | {d(p)} | {d(f)} | {closed} | {g(p, 'ood_ppl')} | {g(f, 'ood_ppl')} | "
          f"{g(p, 'wall_s', '{:.0f}')} / {g(f, 'wall_s', '{:.0f}')} | {rss(p)} / {rss(f)} |")
EOF
