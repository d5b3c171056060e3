package svd

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"

	"github.com/transmla/transmla/internal/f64"
)

// weightFloor is the relative eigenvalue floor of the error weight A.
const weightFloor = 1e-9

// weightFactor is F with A = F·Fᵀ for the error weight A (nil F: the
// identity). The factorization only needs A through F: with M = Fᵀ·C·F
// and its top eigenvectors Z, Down = (F·Z)ᵀ·[W b] and Up = F⁻ᵀ·Z — the
// same factors as with A^{1/2} (F = A^{1/2}·R for an orthogonal R, which
// only rotates Z).
//
// F is A's Cholesky factor L (lower triangular, n³/3 operations) when A is
// safely above the eigenvalue floor; otherwise it is Q·Λ^{1/2} of A's
// eigendecomposition with the eigenvalues floored.
type weightFactor struct {
	n int
	// f is F, n×n row-major; lower reports that it is lower triangular.
	f     []float64
	lower bool
	// env is L's envelope: row i is zero before column env[i]. Error
	// weights are block-diagonal (keys, then each KV group's values), and
	// so is L: the products skip its zero blocks.
	env envelope
	// invT is F⁻ᵀ = Q·Λ^{-1/2} when F is not triangular.
	invT []float64
}

// newWeightFactor factors the Rows×Rows weight a, or returns nil for a
// nil (identity) weight.
func newWeightFactor(a []float64, n int) (*weightFactor, error) {
	if a == nil {
		return nil, nil
	}
	if len(a) != n*n {
		return nil, fmt.Errorf("svd: weight has %d values, want %d×%d", len(a), n, n)
	}
	sym := make([]float64, n*n)
	var bound float64 // Gershgorin bound on the largest |eigenvalue|
	for i := range n {
		var row float64
		for j := range n {
			v := (a[i*n+j] + a[j*n+i]) / 2
			sym[i*n+j] = v
			row += math.Abs(v)
		}
		bound = max(bound, row)
	}
	if !(bound > 0) {
		return nil, errors.New("svd: the error weight is zero")
	}
	l := append([]float64(nil), sym...)
	env := newEnvelope(l, n)
	if cholesky(l, n, env) && smallestEigenvalue(l, n, env) > 1e3*weightFloor*bound {
		return &weightFactor{n: n, f: l, lower: true, env: env}, nil
	}
	// Near-singular or indefinite: floor the eigenvalues.
	vals, vecs, _, err := symEigTop(sym, n, n)
	if err != nil {
		return nil, fmt.Errorf("svd: eigendecomposition of the weight: %w", err)
	}
	top := vals[0]
	if !(top > 0) {
		return nil, errors.New("svd: the error weight is zero")
	}
	w := &weightFactor{n: n, f: vecs, invT: append([]float64(nil), vecs...)}
	for j, v := range vals {
		s := math.Sqrt(math.Max(v, weightFloor*top))
		for i := range n {
			w.f[i*n+j] *= s
			w.invT[i*n+j] /= s
		}
	}
	return w, nil
}

// smallestEigenvalue estimates λ_min of A = L·Lᵀ from above by inverse
// iteration: every eigenvalue far below the estimate would have grown by
// orders of magnitude in the iterate, so an estimate a thousand times above
// the floor certifies that the floor does not bind.
func smallestEigenvalue(l []float64, n int, env envelope) float64 {
	rng := rand.New(rand.NewPCG(0x1a3b, uint64(n)))
	x := make([]float64, n)
	for i := range x {
		x[i] = rng.NormFloat64()
	}
	var rq float64
	for range 8 {
		normalize(x)
		y := append([]float64(nil), x...)
		solveLower(l, n, env, y)  // y = L⁻¹x
		solveUpperT(l, n, env, y) // y = L⁻ᵀL⁻¹x = A⁻¹x
		var xy float64
		for i, v := range y {
			xy += x[i] * v
		}
		rq = 1 / xy // Rayleigh quotient of A at A^{-1/2}x, ≥ λ_min
		x = y
	}
	return rq
}

func normalize(x []float64) {
	var ss float64
	for _, v := range x {
		ss += v * v
	}
	inv := 1 / math.Sqrt(ss)
	for i := range x {
		x[i] *= inv
	}
}

// solveLower overwrites x with L⁻¹x.
func solveLower(l []float64, n int, env envelope, x []float64) {
	for i := range n {
		s := x[i]
		lo := env[i]
		for p, v := range l[i*n+lo : i*n+i] {
			s -= v * x[lo+p]
		}
		x[i] = s / l[i*n+i]
	}
}

// solveUpperT overwrites x with L⁻ᵀx.
func solveUpperT(l []float64, n int, env envelope, x []float64) {
	for i := n - 1; i >= 0; i-- {
		x[i] /= l[i*n+i]
		xi := x[i]
		lo := env[i]
		for p, v := range l[i*n+lo : i*n+i] {
			x[lo+p] -= v * xi
		}
	}
}

// envelope holds, for each row of a symmetric matrix, its first nonzero
// column in the lower triangle. The Cholesky factor has the same envelope:
// no fill-in happens before a row's first nonzero.
type envelope []int

func newEnvelope(a []float64, n int) envelope {
	env := make(envelope, n)
	for i := range n {
		env[i] = i
		for j, v := range a[i*n : i*n+i] {
			if v != 0 {
				env[i] = j
				break
			}
		}
	}
	return env
}

// first is the first nonzero column of rows lo..hi−1.
func (e envelope) first(lo, hi int) int {
	return slices.Min(e[lo:hi])
}

// end is one past the last row whose envelope reaches before column col:
// rows from end on are zero in columns < col.
func (e envelope) end(col int) int {
	for i := len(e) - 1; i >= 0; i-- {
		if e[i] < col {
			return i + 1
		}
	}
	return 0
}

// cholBlock is the block size of the triangular algorithms.
const cholBlock = 128

// cholesky overwrites the symmetric n×n row-major a with its lower
// Cholesky factor L, upper triangle zeroed; false if a is not positive
// definite. Left-looking by blocks of columns, the updates GEMMs over the
// envelope env of a only.
func cholesky(a []float64, n int, env envelope) bool {
	for k0 := 0; k0 < n; k0 += cholBlock {
		w := min(cholBlock, n-k0)
		// Rows past end are zero in this block column, and columns before
		// lo are zero in its rows.
		end, lo := max(env.end(k0+w), k0+w), env.first(k0, k0+w)
		if lo < k0 {
			f64.Gemm(false, true, end-k0, w, k0-lo, -1, a[k0*n+lo:], n, a[k0*n+lo:], n, 1, a[k0*n+k0:], n)
		}
		for j := k0; j < k0+w; j++ {
			s := a[j*n+j]
			for _, v := range a[j*n+k0 : j*n+j] {
				s -= v * v
			}
			if !(s > 0) {
				return false
			}
			d := math.Sqrt(s)
			a[j*n+j] = d
			for i := j + 1; i < k0+w; i++ {
				s := a[i*n+j]
				for p := k0; p < j; p++ {
					s -= a[i*n+p] * a[j*n+p]
				}
				a[i*n+j] = s / d
			}
		}
		// Rows below the block: solve x·L_kkᵀ = a_i.
		for i := k0 + w; i < end; i++ {
			row := a[i*n+k0 : i*n+k0+w]
			for j := range w {
				s := row[j]
				for p := range j {
					s -= row[p] * a[(k0+j)*n+k0+p]
				}
				row[j] = s / a[(k0+j)*n+k0+j]
			}
		}
	}
	for i := range n {
		clear(a[i*n+i+1 : (i+1)*n])
	}
	return true
}

// congruence returns Fᵀ·C·F for the symmetric n×n C, symmetrized.
func (w *weightFactor) congruence(c []float64) []float64 {
	n := w.n
	x := make([]float64, n*n)
	out := make([]float64, n*n)
	if !w.lower {
		f64.Gemm(false, false, n, n, n, 1, c, n, w.f, n, 0, x, n)
		f64.Gemm(true, false, n, n, n, 1, w.f, n, x, n, 0, out, n)
	} else {
		// X = C·L: block column J of X needs only rows K ≥ J of L, up to
		// the envelope's end.
		for j0 := 0; j0 < n; j0 += cholBlock {
			jw := min(cholBlock, n-j0)
			end := max(w.env.end(j0+jw), j0+jw)
			f64.Gemm(false, false, n, jw, end-j0, 1, c[j0:], n, w.f[j0*n+j0:], n, 0, x[j0:], n)
		}
		// Fᵀ·X: block row I needs only the same rows K of L and X, and, the
		// result being symmetric, only its columns from the diagonal on.
		for i0 := 0; i0 < n; i0 += cholBlock {
			iw := min(cholBlock, n-i0)
			end := max(w.env.end(i0+iw), i0+iw)
			f64.Gemm(true, false, iw, n-i0, end-i0, 1, w.f[i0*n+i0:], n, x[i0*n+i0:], n, 0, out[i0*n+i0:], n)
		}
		// Mirror the upper triangle, below each diagonal block.
		for i := range n {
			for j := i/cholBlock*cholBlock + cholBlock; j < n; j++ {
				out[j*n+i] = out[i*n+j]
			}
		}
	}
	symmetrize(out, n)
	return out
}

// mul returns F·Z for the n×k Z.
func (w *weightFactor) mul(z []float64, k int) []float64 {
	n := w.n
	out := make([]float64, n*k)
	if !w.lower {
		f64.Gemm(false, false, n, k, n, 1, w.f, n, z, k, 0, out, k)
		return out
	}
	for i0 := 0; i0 < n; i0 += cholBlock {
		iw := min(cholBlock, n-i0)
		lo := w.env.first(i0, i0+iw)
		f64.Gemm(false, false, iw, k, i0+iw-lo, 1, w.f[i0*n+lo:], n, z[lo*k:], k, 0, out[i0*k:], k)
	}
	return out
}

// solveT returns F⁻ᵀ·Z for the n×k Z: blocked back substitution with Lᵀ.
func (w *weightFactor) solveT(z []float64, k int) []float64 {
	n := w.n
	out := make([]float64, n*k)
	if !w.lower {
		f64.Gemm(false, false, n, k, n, 1, w.invT, n, z, k, 0, out, k)
		return out
	}
	copy(out, z)
	l := w.f
	last := (n - 1) / cholBlock * cholBlock
	for i0 := last; i0 >= 0; i0 -= cholBlock {
		iw := min(cholBlock, n-i0)
		// X_I = L_IIᵀ⁻¹·(Z_I − Σ_{K>I} L_KIᵀ·X_K).
		if rest := w.env.end(i0+iw) - i0 - iw; rest > 0 {
			f64.Gemm(true, false, iw, k, rest, -1, l[(i0+iw)*n+i0:], n, out[(i0+iw)*k:], k, 1, out[i0*k:], k)
		}
		for i := i0 + iw - 1; i >= i0; i-- {
			row := out[i*k : (i+1)*k]
			d := 1 / l[i*n+i]
			for c := range row {
				row[c] *= d
			}
			for p := i0; p < i; p++ {
				lip := l[i*n+p]
				if lip == 0 {
					continue
				}
				dst := out[p*k : (p+1)*k]
				for c, v := range row {
					dst[c] -= lip * v
				}
			}
		}
	}
	return out
}

// symmetrize replaces the n×n a by (a + aᵀ)/2.
func symmetrize(a []float64, n int) {
	for i := range n {
		for j := range i {
			s := (a[i*n+j] + a[j*n+i]) / 2
			a[i*n+j], a[j*n+i] = s, s
		}
	}
}
