// Package kernels holds the float32 compute primitives of the forward pass:
// matrix products behind a small Backend interface, the element-wise
// kernels (RMSNorm, SwiGLU, softmax) and causal attention built on them.
//
// Select picks a Backend by name. "go" (Native) is this package's own
// cache-blocked GEMM on assembly micro-kernels, AVX-512 or AVX2/FMA as the
// CPU offers (chosen once at start-up), with a portable Go kernel on other
// CPUs and architectures; it needs no cgo, so binaries stay static.
// "openblas" loads the system's OpenBLAS at run time (build tag openblas).
// "auto" is the fastest of those present. Gonum is the reference backend
// on gonum's pure-Go BLAS.
//
// Layouts are row-major. Weights follow nn.Linear: W is out×in, so a
// projection of m rows is dst[m×out] = x[m×in]·Wᵀ.
package kernels

import (
	"math"
	"runtime"

	"github.com/transmla/transmla/internal/gemm"
	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/gonum"
)

// Backend computes matrix products. Implementations must be safe for
// concurrent use.
type Backend interface {
	// Name identifies the implementation in reports.
	Name() string
	// Gemm computes C = alpha·op(A)·op(B) + beta·C on row-major strided
	// matrices, as BLAS sgemm: op(A) is m×k, op(B) is k×n, C is m×n.
	Gemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int)
}

// Gonum is the portable Backend on gonum's pure-Go BLAS: slower than
// Native, kept as an independent reference.
type Gonum struct{}

// Name implements Backend.
func (Gonum) Name() string { return "gonum" }

// Gemm implements Backend.
func (Gonum) Gemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	if m == 0 || n == 0 {
		return
	}
	var impl gonum.Implementation
	impl.Sgemm(trans(transA), trans(transB), m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

func trans(t bool) blas.Transpose {
	if t {
		return blas.Trans
	}
	return blas.NoTrans
}

// RMSNorm writes dst[r] = x[r] / sqrt(mean(x[r]²) + eps) · weight for each of
// the rows of length len(weight). dst may alias x. An empty weight has no
// rows to normalise.
func RMSNorm(dst, x, weight []float32, eps float32) {
	dim := len(weight)
	if dim == 0 {
		return
	}
	if rows := len(x) / dim; rows >= 2 && len(x) >= 2*parallelElems {
		// A prefill's rows are shared by the cores; each row alone is
		// what it would be on one.
		per := max(1, parallelElems/dim)
		Parallel(0, (rows+per-1)/per, TaskFunc(func(_, i int) {
			lo, hi := i*per*dim, min(rows, (i+1)*per)*dim
			rmsNormRows(dst[lo:hi], x[lo:hi], weight, eps)
		}))
		return
	}
	rmsNormRows(dst, x, weight, eps)
}

// rmsNormRows is RMSNorm on the calling goroutine.
func rmsNormRows(dst, x, weight []float32, eps float32) {
	dim := len(weight)
	for r := 0; r+dim <= len(x); r += dim {
		row, out := x[r:r+dim], dst[r:r+dim]
		if rmsNormSIMD(out, row, weight, eps) {
			continue
		}
		inv := rmsInv(gemm.DotGo(row, row), dim, eps)
		for i, v := range row {
			out[i] = weight[i] * (v * inv)
		}
	}
}

// rmsInv is 1/sqrt(ss/dim + eps), RMSNorm's factor from a row's sum of
// squares.
func rmsInv(ss float32, dim int, eps float32) float32 {
	return float32(1 / math.Sqrt(float64(ss/float32(dim)+eps)))
}

// SwiGLU writes gate[i] = silu(gate[i])·up[i].
func SwiGLU(gate, up []float32) {
	if len(gate) == 0 {
		return
	}
	up = up[:len(gate)]
	if n := len(gate); n >= 2*parallelElems {
		Parallel(0, (n+parallelElems-1)/parallelElems, TaskFunc(func(_, i int) {
			lo, hi := i*parallelElems, min(n, (i+1)*parallelElems)
			swiglu(gate[lo:hi], up[lo:hi])
		}))
		return
	}
	swiglu(gate, up)
}

// swiglu is SwiGLU on the calling goroutine; len(up) ≥ len(gate) > 0.
func swiglu(gate, up []float32) {
	if swigluSIMD(gate, up) {
		return
	}
	for i, g := range gate {
		gate[i] = g / (1 + expf(-g)) * up[i]
	}
}

// parallelElems is the element count from which the element-wise kernels
// split a prefill's rows over the cores: below it, a decode step's single
// rows, a call costs more than it saves.
const parallelElems = 1 << 15

// Add writes dst[i] += x[i].
func Add(dst, x []float32) {
	dst = dst[:len(x)]
	if n := len(x); n >= 2*parallelElems {
		Parallel(0, (n+parallelElems-1)/parallelElems, TaskFunc(func(_, i int) {
			lo, hi := i*parallelElems, min(n, (i+1)*parallelElems)
			add(dst[lo:hi], x[lo:hi])
		}))
		return
	}
	add(dst, x)
}

// add is Add on the calling goroutine.
func add(dst, x []float32) {
	dst = dst[:len(x)]
	for i, v := range x {
		dst[i] += v
	}
}

// SoftmaxInPlace normalizes x to a probability vector, in float32 with the
// maximum subtracted first.
func SoftmaxInPlace(x []float32) {
	if len(x) == 0 || softmaxSIMD(x) {
		return
	}
	m := x[0]
	for _, v := range x[1:] {
		m = max(m, v)
	}
	var sum float32
	for i, v := range x {
		e := expf(v - m)
		x[i] = e
		sum += e
	}
	inv := 1 / sum
	for i := range x {
		x[i] *= inv
	}
}

// Attention shape of one call: nq new query rows at positions
// past..past+nq-1 attend to the cached keys/values of positions 0..past+nq-1.
type Attention struct {
	Heads, KVHeads, HeadDim int
	// ValueDim is the width of one value head; 0 means HeadDim. MLA's
	// decompressed heads have keys of d_nope+d_r but values of d_v.
	ValueDim int
	// Window limits each query to the last Window positions (0 = unlimited).
	Window int
	// Scale multiplies the scores, usually 1/sqrt(HeadDim).
	Scale float32
}

// queryBlock is the number of query rows whose scores are computed together.
const queryBlock = 128

// Causal computes grouped-query causal attention. q is nq×(Heads·HeadDim),
// k is (past+nq)×(KVHeads·HeadDim), v is (past+nq)×(KVHeads·ValueDim) and
// out is nq×(Heads·ValueDim).
// Query head h reads KV head h/(Heads/KVHeads). Heads run in parallel.
func (a Attention) Causal(be Backend, out, q, k, v []float32, nq, past int) {
	total := past + nq
	dv := a.ValueDim
	if dv == 0 {
		dv = a.HeadDim
	}
	qStride, kStride := a.Heads*a.HeadDim, a.KVHeads*a.HeadDim
	vStride, outStride := a.KVHeads*dv, a.Heads*dv
	group := a.Heads / a.KVHeads
	d := a.HeadDim
	workers := min(runtime.GOMAXPROCS(0), a.Heads)
	if workers > 1 && a.Heads >= runtime.GOMAXPROCS(0) {
		// Every core already runs a head: products inside stay on one.
		be = serialBackend(be)
	}
	scores := make([][]float32, workers)
	Parallel(workers, a.Heads, TaskFunc(func(w, h int) {
		if scores[w] == nil {
			scores[w] = make([]float32, min(nq, queryBlock)*total)
		}
		g := h / group
		// Query rows go in blocks so that each block multiplies only the
		// keys it can see, which halves the work of a prefill.
		for i0 := 0; i0 < nq; i0 += queryBlock {
			rows := min(queryBlock, nq-i0)
			seen := past + i0 + rows
			// s[rows×seen] = scale · Q_h · K_gᵀ
			s := scores[w][:rows*seen]
			be.Gemm(false, true, rows, seen, d, a.Scale, q[i0*qStride+h*d:], qStride, k[g*d:], kStride, 0, s, seen)
			for i := range rows {
				row := s[i*seen : (i+1)*seen]
				last := past + i0 + i // last visible position
				first := 0
				if a.Window > 0 {
					first = max(0, last-a.Window+1)
				}
				SoftmaxInPlace(row[first : last+1])
				clear(row[:first])
				clear(row[last+1:])
			}
			// out_h[rows×dv] = P · V_g
			be.Gemm(false, false, rows, dv, seen, 1, s, seen, v[g*dv:], vStride, 0, out[i0*outStride+h*dv:], outStride)
		}
	}))
}

// MaxOf is the largest value of a non-empty x.
func MaxOf(x []float32) float32 { return maxOf(x) }

// SumExp64 is Σ e^(x[i]−m) in float64, the normaliser of a log-softmax
// (m is usually the maximum). The vector code agrees with math.Exp to a
// few float64 ulps per term; elsewhere math.Exp itself is used.
func SumExp64(x []float32, m float32) float64 {
	if len(x) == 0 {
		return 0
	}
	if s, ok := sumExp64SIMD(x, m); ok {
		return s
	}
	var s float64
	mf := float64(m)
	for _, v := range x {
		s += math.Exp(float64(v) - mf)
	}
	return s
}
