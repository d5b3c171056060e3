#!/usr/bin/env bash
# Decode and eval speed of two builds of transmla side by side: the binary of
# a git ref ("before") and the working tree ("after"), in alternating rounds
# on the same machine, with every run printed, then medians and after/before
# ratios. Perplexities of both builds are compared (they must agree to 1e-6).
#
# usage: scripts/bench_decode.sh [BEFORE_REF=e1f9e3c] [ROUNDS=3]
#
# Per round and model (llama-gqa-25m, qwen2-gqa-16m and an MLA conversion of
# llama-gqa-25m at d_c 192), each build runs
#   transmla bench MODEL --ctx 0,1024,4096 --cache-dtype bf16 --decode-tokens N --json
# (decode tokens/s at each depth, batch 1; builds that refuse --ctx 0 are
# measured at depth 2, said so in the output), then the converted model and
# its source side by side at depth 4096 (bench's decode speed-up of MLA over
# GQA), then
#   transmla eval MODEL --data wiki.test.raw --max-windows W --json
# (tokens/s and ppl). The order of the two builds flips every round, so that
# a load change hits both alike; /proc/loadavg is printed before and after
# every round: figures from rounds with a load average well above 0 are not
# the machine's.
#
# Environment: MODELS (space-separated model directories; default the two
# shared GQA models), CONVERTED (an existing conversion to use; default:
# converted once by the after build into the work directory with --dc 192
# --calib heldout.txt --format $FORMAT), FORMAT (exact), CTXS (0,1024,4096),
# DECODE_TOKENS (64), WINDOWS (16), DATA, CALIB, SKIP_EVAL (1: no evals),
# KEEP (a directory to keep the binaries and JSON in; default: a temporary
# one, removed at the end).
set -euo pipefail
ref=${1:-e1f9e3c}
rounds=${2:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
shared=$root/../shared
models=${MODELS:-"$shared/models/llama-gqa-25m $shared/models/qwen2-gqa-16m"}
data=${DATA:-$shared/data/wikitext-2-raw/wiki.test.raw}
calib=${CALIB:-$shared/data/calibration/heldout.txt}
format=${FORMAT:-exact}
ctxs=${CTXS:-0,1024,4096}
steps=${DECODE_TOKENS:-64}
windows=${WINDOWS:-16}
if [[ -n ${KEEP:-} ]]; then
	work=$KEEP
	mkdir -p "$work"
else
	work=$(mktemp -d)
	trap 'rm -rf "$work"' EXIT
fi

# quietly CMD...: CMD with its stderr (progress bars) in a log, shown
# if it fails, since set -e would end the script without a word.
quietly() {
	if ! "$@" 2>"$work/stderr.log"; then
		echo "failed: $*" >&2
		cat "$work/stderr.log" >&2
		exit 1
	fi
}

echo "== building before ($ref) and after (working tree of $root)"
rm -rf "$work/before-src"
mkdir -p "$work/before-src"
git -C "$root" archive "$ref" | tar -x -C "$work/before-src"
CGO_ENABLED=0 go build -C "$work/before-src" -o "$work/before" ./cmd/transmla
CGO_ENABLED=0 go build -C "$root" -o "$work/after" ./cmd/transmla
echo "before: $(git -C "$root" rev-parse --short "$ref"); after: $(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet HEAD -- . || echo ' + uncommitted changes')"

# Depth 0 (an empty cache) is a bench context of builds after e1f9e3c;
# older ones take 2 at least.
ctxs_for() {
	local out code=0
	out=$("$work/$1" bench "$work/no-such-model" --ctx 0 2>&1) || code=$?
	if [[ $code -eq 2 && $out == *--ctx* ]]; then
		echo "$ctxs" | sed -E 's/(^|,)0(,|$)/\12\2/'
	else
		echo "$ctxs"
	fi
}
ctx_before=$(ctxs_for before)
ctx_after=$(ctxs_for after)
[[ $ctx_before == "$ctxs" ]] || echo "note: the before build refuses --ctx 0; it runs --ctx $ctx_before (its depth-2 figure stands for depth 0)"

source_model=$(echo "$models" | awk '{print $1}')
converted=${CONVERTED:-}
if [[ -z $converted ]]; then
	converted=$work/llama-dc192-$format
	if [[ ! -f $converted/config.json ]]; then
		echo "== converting $source_model --dc 192 --format $format (after build)"
		"$work/after" convert "$source_model" --dc 192 --calib "$calib" --format "$format" -o "$converted" --force >/dev/null
	fi
fi
all_models="$models $converted"

runs=$work/runs.tsv
: >"$runs"
load() { cut -d' ' -f1-3 /proc/loadavg; }

for r in $(seq "$rounds"); do
	order="before after"
	((r % 2 == 0)) && order="after before"
	echo "== round $r/$rounds ($order), load average $(load)"
	for m in $all_models; do
		name=$(basename "$m")
		for b in $order; do
			c=$ctx_after
			[[ $b == before ]] && c=$ctx_before
			j=$work/bench-r$r-$name-$b.json
			quietly "$work/$b" bench "$m" --ctx "$c" --cache-dtype bf16 --decode-tokens "$steps" --json >"$j"
			python3 - "$j" "$r" "$name" "$b" >>"$runs" <<'EOF'
import json, sys
j, r, name, b = sys.argv[1:]
for x in json.load(open(j))["results"]:
    ctx = 0 if x["ctx"] == 2 else x["ctx"]
    print(f"decode\t{name}\t{ctx}\t{b}\t{r}\t{x['decode_tokens_per_second']:.2f}")
EOF
			echo "  bench  $name $b: $(awk -F'\t' -v n="$name" -v b="$b" -v r="$r" '$1=="decode" && $2==n && $4==b && $5==r {printf "depth %s %s tok/s  ", $3, $6}' "$runs")"
		done
	done
	for b in $order; do
		j=$work/pair-r$r-$b.json
		quietly "$work/$b" bench "$source_model" "$converted" --ctx 4096 --cache-dtype bf16 --decode-tokens "$steps" --json >"$j"
		s=$(python3 -c 'import json,sys; print("%.3f" % json.load(open(sys.argv[1]))["ratios"][0]["decode_speedup"])' "$j")
		printf 'speedup\t%s\t4096\t%s\t%s\t%s\n' "$(basename "$converted")" "$b" "$r" "$s" >>"$runs"
		echo "  bench  $(basename "$converted") over $(basename "$source_model") at depth 4096, $b: decode ×$s"
	done
	if [[ ${SKIP_EVAL:-0} != 1 ]]; then
		for m in $all_models; do
			name=$(basename "$m")
			for b in $order; do
				j=$work/eval-r$r-$name-$b.json
				quietly "$work/$b" eval "$m" --data "$data" --max-windows "$windows" --json >"$j"
				python3 - "$j" "$r" "$name" "$b" >>"$runs" <<'EOF'
import json, sys
j, r, name, b = sys.argv[1:]
x = json.load(open(j))
print(f"eval\t{name}\t{x['windows']}\t{b}\t{r}\t{x['tokens_per_second']:.1f}\t{x['ppl']!r}")
EOF
				echo "  eval   $name $b: $(awk -F'\t' -v n="$name" -v b="$b" -v r="$r" '$1=="eval" && $2==n && $4==b && $5==r {printf "%s tok/s, ppl %s", $6, $7}' "$runs")"
			done
		done
	fi
	echo "   round $r done, load average $(load)"
done

echo "== medians of $rounds rounds (after/before)"
python3 - "$runs" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
def med(kind, name, ctx, b):
    v = [float(r[5]) for r in rows if r[0] == kind and r[1] == name and r[2] == ctx and r[3] == b]
    return (statistics.median(v), v) if v else (None, v)
keys = []
for r in rows:
    k = (r[0], r[1], r[2])
    if k not in keys:
        keys.append(k)
unit = {"decode": "decode tok/s", "speedup": "MLA/GQA decode", "eval": "eval tok/s"}
print(f"{'what':16} {'model':24} {'depth':>6} {'before':>10} {'after':>10} {'ratio':>7}   runs before | after")
for kind, name, ctx in keys:
    mb, vb = med(kind, name, ctx, "before")
    ma, va = med(kind, name, ctx, "after")
    ratio = f"{ma / mb:.2f}" if mb and ma else "-"
    fmt = (lambda v: f"{v:.3f}") if kind == "speedup" else (lambda v: f"{v:.1f}")
    label = ctx if kind != "eval" else f"{ctx}w"
    print(f"{unit[kind]:16} {name:24} {label:>6} {fmt(mb) if mb else '-':>10} {fmt(ma) if ma else '-':>10} {ratio:>7}   "
          + " ".join(fmt(v) for v in vb) + " | " + " ".join(fmt(v) for v in va))
bad = False
for name in sorted({r[1] for r in rows if r[0] == "eval"}):
    pb = {r[6] for r in rows if r[0] == "eval" and r[1] == name and r[3] == "before"}
    pa = {r[6] for r in rows if r[0] == "eval" and r[1] == name and r[3] == "after"}
    if not pb or not pa:
        continue
    b, a = float(sorted(pb)[0]), float(sorted(pa)[0])
    rel = abs(a - b) / b
    ok = rel <= 1e-6 and len(pa) == 1
    bad |= not ok
    print(f"ppl {name}: before {', '.join(sorted(pb))}; after {', '.join(sorted(pa))}; relative difference {rel:.2e} {'ok' if ok else 'BEYOND 1e-6'}")
sys.exit(1 if bad else 0)
EOF
