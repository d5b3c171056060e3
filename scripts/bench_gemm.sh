#!/usr/bin/env bash
# GEMM throughput of the kernels backends side by side: runs BenchmarkGemm
# (x·Wᵀ on the model shapes and an 8B layer) COUNT times with OpenBLAS
# built in, and prints per shape the median GFLOP/s of each backend and the
# ratio go/openblas.
# usage: scripts/bench_gemm.sh [COUNT=5] [BENCH_REGEXP=.]
# env:   BENCHTIME (go test -benchtime, default 1s)
set -euo pipefail
count=${1:-5}
filter=${2:-.}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out=$work/bench.txt

# -tags openblas adds the run-time-loaded OpenBLAS backend; without the
# library its sub-benchmarks are skipped and only "go" is shown.
go test -C "$root" -c -tags openblas -o "$work/kernels.test" ./kernels/
# One pass over all shapes per round, rather than -count (which repeats
# each benchmark back to back), so that a change in machine load hits
# both backends alike.
for i in $(seq "$count"); do
	echo "round $i/$count" >&2
	"$work/kernels.test" -test.run '^$' -test.bench "BenchmarkGemm/$filter" \
		-test.benchtime "${BENCHTIME:-1s}" | tee -a "$out" >&2
done

awk '
/^BenchmarkGemm\// {
	name = $1; sub(/^BenchmarkGemm\//, "", name); sub(/-[0-9]+$/, "", name)
	n = split(name, parts, "/"); shape = parts[1]; be = parts[2]
	for (i = 2; i <= NF; i++) if ($i == "GFLOP/s") v = $(i - 1)
	key = shape SUBSEP be
	vals[key] = vals[key] " " v
	if (!(shape in seen)) { seen[shape] = 1; order[++nshapes] = shape }
	bes[be] = 1
}
function median(s,   a, n, i, j, t) {
	n = split(s, a, " ")
	if (n == 0) return ""
	for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
	return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
END {
	printf "%-22s %12s %12s %8s\n", "shape (x·Wᵀ)", "go GFLOP/s", "openblas", "go/ob"
	for (i = 1; i <= nshapes; i++) {
		s = order[i]
		g = median(vals[s SUBSEP "go"]); o = median(vals[s SUBSEP "openblas"])
		r = (g != "" && o != "" && o > 0) ? sprintf("%.2f", g / o) : "-"
		printf "%-22s %12s %12s %8s\n", s, (g == "" ? "-" : sprintf("%.1f", g)), (o == "" ? "-" : sprintf("%.1f", o)), r
	}
}' "$out"
