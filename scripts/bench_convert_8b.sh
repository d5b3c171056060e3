#!/usr/bin/env bash
# Conversion at real scale. Writes a Llama-3-8B-shaped checkpoint (transmla
# synth --shape llama3-8b, LAYERS layers, bf16), then
#  1. times the conversion of one layer (BenchmarkLayer8B: data-free, the
#     calibration forward pass on 32768 tokens, calibrated), and
#  2. times, side by side and alternating, RUNS rounds of the read+write
#     floor (cp -r of the checkpoint, then sha256sum of the copy) and of an
#     end-to-end data-free `transmla convert --dc 512 --rope-dim 64`, and
#     prints the medians and their ratio.
# usage: scripts/bench_convert_8b.sh [LAYERS=4] [RUNS=5]
# env:   WORK (scratch directory, needs 4·LAYERS·0.44+7 GB; default mktemp -d)
#        SKIP_LAYER=1 skips step 1 (about three minutes on two cores)
set -euo pipefail
layers=${1:-4}
runs=${2:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-$(mktemp -d)}
trap 'rm -rf "$work/copy" "$work/out" "$work/src" "$work/transmla" "$work/convert.test"' EXIT
mkdir -p "$work"

go build -C "$root" -o "$work/transmla" ./cmd/transmla
echo "writing a $layers-layer Llama-3-8B-shaped checkpoint to $work/src" >&2
"$work/transmla" synth --shape llama3-8b --layers "$layers" -o "$work/src" --force >&2
du -sh "$work/src" >&2

if [[ -z "${SKIP_LAYER:-}" ]]; then
	go test -C "$root" -c -o "$work/convert.test" ./convert/
	(cd "$root/convert" && TRANSMLA_BENCH_8B="$work/src" "$work/convert.test" \
		-test.run '^$' -test.bench 'BenchmarkLayer8B' -test.benchtime 1x -test.timeout 2h)
fi

floor() {
	rm -rf "$work/copy"
	cp -r "$work/src" "$work/copy"
	sha256sum "$work"/copy/*.safetensors >/dev/null
}
convert() {
	"$work/transmla" convert "$work/src" -o "$work/out" --dc 512 --rope-dim 64 --force >/dev/null
}
seconds() { # runs "$@" and prints its wall time in seconds
	local t0 t1
	t0=$(date +%s.%N)
	"$@"
	t1=$(date +%s.%N)
	echo "$t1 - $t0" | bc -l
}
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# One warm-up of each brings the checkpoint into the page cache, as it is
# for every timed round after.
floor
convert
: >"$work/floor.txt"
: >"$work/convert.txt"
for i in $(seq "$runs"); do
	f=$(seconds floor)
	c=$(seconds convert)
	printf 'round %d/%d: cp+sha256sum %.2f s, convert %.2f s\n' "$i" "$runs" "$f" "$c" >&2
	echo "$f" >>"$work/floor.txt"
	echo "$c" >>"$work/convert.txt"
done
f=$(median <"$work/floor.txt")
c=$(median <"$work/convert.txt")
printf 'median of %d: cp -r + sha256sum %.2f s, convert (data-free, dc 512, rope-dim 64) %.2f s, ratio %.2f\n' \
	"$runs" "$f" "$c" "$(echo "$c / $f" | bc -l)"
