package svd

import (
	"errors"
	"math"
	"math/rand/v2"
	"slices"

	"gonum.org/v1/gonum/lapack/gonum"

	"github.com/transmla/transmla/internal/f64"
)

// Dense symmetric eigenproblems of the latent, solved for the top k
// eigenpairs only: Householder reduction to tridiagonal form in panels
// whose trailing updates are GEMMs (LAPACK's dsytrd scheme), all
// eigenvalues of the tridiagonal matrix by Pal–Walker–Kahan QL/QR
// (gonum's Dsterf), the k eigenvectors wanted by inverse iteration with
// re-orthogonalization inside clusters (LAPACK's dstein scheme), and the
// back-transformation as blocked reflectors, again GEMMs. The full QR
// iteration with vectors, which costs O(n³) rotations, is never run.

// tridiagPanel is the number of columns reduced per GEMM update, and
// trailingBlock the height of the block rows of that update.
const (
	tridiagPanel  = 64
	trailingBlock = 256
)

// tridiagonal is A = Q·T·Qᵀ, T symmetric tridiagonal.
type tridiagonal struct {
	n    int
	d, e []float64 // T's diagonal (n) and off-diagonal (n−1)
	// panels hold the reflectors: panel p covers columns p·nb…; its row c
	// (of n) is the vector v of reflector H_j = I − tau_j·v·vᵀ,
	// j = p·nb+c, zero before position j+1.
	panels [][]float64
	tau    []float64
}

// tridiagonalize reduces the symmetric n×n row-major a to tridiagonal
// form. Only a's upper triangle is read (and destroyed): its rows are
// contiguous, and the symmetric products read half the matrix.
//
// Each panel of nb columns is reduced against the panel's start (the
// earlier reflectors of the panel enter through V and W, LAPACK's dlatrd),
// then the trailing matrix takes them all at once: A −= V·Wᵀ + W·Vᵀ. V and
// W are kept transposed, nb rows of n, so that every product with them
// runs along rows.
func tridiagonalize(a []float64, n int) *tridiagonal {
	nb := tridiagPanel
	t := &tridiagonal{n: n, d: make([]float64, n), e: make([]float64, max(n-1, 0)), tau: make([]float64, n)}
	y := make([]float64, n)
	coef := make([]float64, 2*nb)
	for j0 := 0; j0 < n; j0 += nb {
		w := min(nb, n-j0)
		vt := make([]float64, nb*n)
		wt := make([]float64, nb*n)
		for c := range w {
			j := j0 + c
			row := a[j*n+j : (j+1)*n]
			// Bring row j (= column j) up to date with this panel's
			// earlier reflectors: row −= Σ_c' W[j,c']·V[j:,c'] + V[j,c']·W[j:,c'].
			if c > 0 {
				cw, cv := coef[:c], coef[nb:nb+c]
				for k := range c {
					cw[k], cv[k] = -wt[k*n+j], -vt[k*n+j]
				}
				f64.GemvT(c, n-j, 1, vt[j:], n, cw, row)
				f64.GemvT(c, n-j, 1, wt[j:], n, cv, row)
			}
			t.d[j] = row[0]
			if j == n-1 {
				break
			}
			x := row[1:]
			m := len(x)
			tau, beta := householder(x)
			t.e[j], t.tau[j] = beta, tau
			copy(vt[c*n+j+1:(c+1)*n], x)
			if tau == 0 {
				continue
			}
			// w = tau·(A₂₂·v − V·(Wᵀv) − W·(Vᵀv)), then w −= (tau/2)(wᵀv)·v.
			yv := y[:m]
			f64.SymvUpper(m, a[(j+1)*n+j+1:], n, x, yv)
			if c > 0 {
				wtv, vtv := coef[:c], coef[nb:nb+c]
				f64.Gemv(c, m, -1, wt[j+1:], n, x, 0, wtv)
				f64.Gemv(c, m, -1, vt[j+1:], n, x, 0, vtv)
				f64.GemvT(c, m, 1, vt[j+1:], n, wtv, yv)
				f64.GemvT(c, m, 1, wt[j+1:], n, vtv, yv)
			}
			var dot float64
			for i, xv := range x {
				yv[i] *= tau
				dot += yv[i] * xv
			}
			alpha := -0.5 * tau * dot
			dst := wt[c*n+j+1 : (c+1)*n]
			for i, xv := range x {
				dst[i] = yv[i] + alpha*xv
			}
		}
		t.panels = append(t.panels, vt)
		// Trailing update of the upper triangle past the panel, by block
		// rows from their diagonal on.
		for i0 := j0 + w; i0 < n; i0 += trailingBlock {
			iw, m := min(trailingBlock, n-i0), n-i0
			f64.Gemm(true, false, iw, m, w, -1, vt[i0:], n, wt[i0:], n, 1, a[i0*n+i0:], n)
			f64.Gemm(true, false, iw, m, w, -1, wt[i0:], n, vt[i0:], n, 1, a[i0*n+i0:], n)
		}
	}
	return t
}

// householder overwrites x with v (v[0] = 1) of the reflector
// H = I − tau·v·vᵀ that maps x to beta·e₁, as LAPACK's dlarfg; tau = 0
// (H = I) when x is already a multiple of e₁.
func householder(x []float64) (tau, beta float64) {
	alpha := x[0]
	var scale, ssq float64 = 0, 1
	for _, v := range x[1:] {
		if v == 0 {
			continue
		}
		if a := math.Abs(v); a > scale {
			ssq = 1 + ssq*(scale/a)*(scale/a)
			scale = a
		} else {
			ssq += (a / scale) * (a / scale)
		}
	}
	xnorm := scale * math.Sqrt(ssq)
	if xnorm == 0 {
		x[0] = 1
		return 0, alpha
	}
	beta = -math.Copysign(math.Hypot(alpha, xnorm), alpha)
	tau = (beta - alpha) / beta
	inv := 1 / (alpha - beta)
	for i := 1; i < len(x); i++ {
		x[i] *= inv
	}
	x[0] = 1
	return tau, beta
}

// backTransform overwrites z (n×k row-major, eigenvectors of T) with Q·z,
// applying each panel's reflectors as one block I − V·S·Vᵀ (S upper
// triangular, LAPACK's dlarft), last panel first.
func (t *tridiagonal) backTransform(z []float64, k int) {
	n, nb := t.n, tridiagPanel
	s := make([]float64, nb*nb)
	vtv := make([]float64, nb*nb)
	vtz := make([]float64, nb*k)
	svtz := make([]float64, nb*k)
	for p := len(t.panels) - 1; p >= 0; p-- {
		vt := t.panels[p]
		j0 := p * nb
		w := min(nb, n-j0)
		r0 := j0 + 1 // V is zero before
		if r0 >= n {
			continue
		}
		rows := n - r0
		// S: S[c][c] = tau_c, S[0:c, c] = −tau_c·S[0:c, 0:c]·(V[:, 0:c]ᵀ v_c).
		clear(s)
		f64.Gemm(false, true, w, w, rows, 1, vt[r0:], n, vt[r0:], n, 0, vtv, nb)
		for c := range w {
			tc := t.tau[j0+c]
			s[c*nb+c] = tc
			for i := range c {
				var sum float64
				for l := i; l < c; l++ {
					sum += s[i*nb+l] * vtv[l*nb+c]
				}
				s[i*nb+c] = -tc * sum
			}
		}
		f64.Gemm(false, false, w, k, rows, 1, vt[r0:], n, z[r0*k:], k, 0, vtz, k)
		f64.Gemm(false, false, w, k, w, 1, s, nb, vtz, k, 0, svtz, k)
		f64.Gemm(true, false, rows, k, w, -1, vt[r0:], n, svtz, k, 1, z[r0*k:], k)
	}
}

// symEigTop returns the k largest eigenvalues of the symmetric n×n
// row-major a (its upper triangle is read and destroyed), largest first, their
// eigenvectors as the columns of an n×k row-major matrix, and the sum of
// the positive parts of all n eigenvalues.
func symEigTop(a []float64, n, k int) (vals, vecs []float64, total float64, err error) {
	t := tridiagonalize(a, n)
	all := slices.Clone(t.d)
	if n > 1 {
		var impl gonum.Implementation
		if !impl.Dsterf(n, all, slices.Clone(t.e)) {
			return nil, nil, 0, errors.New("svd: tridiagonal eigenvalues did not converge")
		}
	}
	for _, v := range all {
		total += math.Max(v, 0)
	}
	vals = make([]float64, k)
	for i := range k {
		vals[i] = all[n-1-i]
	}
	zt := t.inverseIteration(vals) // k×n, one vector per row
	vecs = make([]float64, n*k)
	for i := range k {
		for r, x := range zt[i*n : (i+1)*n] {
			vecs[r*k+i] = x
		}
	}
	t.backTransform(vecs, k)
	return vals, vecs, total, nil
}

// inverseIteration returns T's eigenvectors for the eigenvalues vals
// (decreasing), one per row of a len(vals)×n matrix, as LAPACK's dstein:
// eigenvalues closer than clusterTol·‖T‖₁ form a cluster whose vectors
// are kept orthogonal by Gram–Schmidt at every step; vectors of different
// clusters are orthogonal by their separation, to ε·‖T‖/gap ≤ 2e-10.
// (dstein clusters at 1e-3, which makes the decaying spectra of weights
// one cluster of hundreds of vectors, and Gram–Schmidt the whole cost.)
func (t *tridiagonal) inverseIteration(vals []float64) []float64 {
	const (
		maxIter = 5
		extra   = 2 // iterations after the growth criterion is met
	)
	n := t.n
	k := len(vals)
	out := make([]float64, k*n)
	if n == 1 {
		for i := range k {
			out[i] = 1
		}
		return out
	}
	eps := math.Nextafter(1, 2) - 1
	var norm1 float64 // ‖T‖₁
	for i := range n {
		s := math.Abs(t.d[i])
		if i > 0 {
			s += math.Abs(t.e[i-1])
		}
		if i < n-1 {
			s += math.Abs(t.e[i])
		}
		norm1 = max(norm1, s)
	}
	if norm1 == 0 {
		norm1 = 1
	}
	orthTol := clusterTol * norm1
	perturb := 10 * eps * norm1
	growth := math.Sqrt(0.1 / float64(n))
	rng := rand.New(rand.NewPCG(0x5eed, uint64(n)))
	lu := newTridiagLU(n)
	b := make([]float64, n)
	first := 0 // first vector of the current cluster
	shift := 0.0
	for i, lambda := range vals {
		if i > 0 && vals[i-1]-lambda >= orthTol {
			first = i
		}
		// Equal eigenvalues get distinct shifts so that their solves differ.
		if i > 0 && shift-lambda < perturb {
			lambda = shift - perturb
		}
		shift = lambda
		lu.factor(t.d, t.e, lambda, eps*norm1)
		for j := range b {
			b[j] = 2*rng.Float64() - 1
		}
		cluster := out[first*n : i*n]
		converged := 0
		for range maxIter {
			var l1 float64
			for _, x := range b {
				l1 += math.Abs(x)
			}
			scale := float64(n) * norm1 * math.Max(eps, math.Abs(lu.d[n-1])) / l1
			for j := range b {
				b[j] *= scale
			}
			lu.solve(b)
			orthogonalize(b, cluster, n)
			var top float64
			for _, x := range b {
				top = max(top, math.Abs(x))
			}
			if top >= growth {
				if converged++; converged > extra {
					break
				}
			}
		}
		var ss float64
		for _, x := range b {
			ss += x * x
		}
		inv := 1 / math.Sqrt(ss)
		dst := out[i*n : (i+1)*n]
		for j, x := range b {
			dst[j] = x * inv
		}
	}
	return out
}

// orthogonalize removes from b its components along the orthonormal rows
// of q (classical Gram–Schmidt, twice for stability).
func orthogonalize(b, q []float64, n int) {
	rows := len(q) / n
	if rows == 0 {
		return
	}
	c := make([]float64, rows)
	for range 2 {
		f64.Gemv(rows, n, 1, q, n, b, 0, c)
		f64.GemvT(rows, n, -1, q, n, c, b)
	}
}

// clusterTol is the relative gap below which inverse iteration
// orthogonalizes eigenvectors explicitly.
const clusterTol = 1e-6

// tridiagLU is the LU factorization with partial pivoting of T − λI (as
// LAPACK's dgttrf): unit lower bidiagonal L (multipliers dl, row swaps
// swap) and upper U with two superdiagonals (du, du2).
type tridiagLU struct {
	d, dl, du, du2 []float64
	swap           []bool
}

func newTridiagLU(n int) *tridiagLU {
	return &tridiagLU{d: make([]float64, n), dl: make([]float64, n), du: make([]float64, n), du2: make([]float64, n), swap: make([]bool, n)}
}

// factor factors T − λI for T = (d, e); pivots smaller than tiny are
// raised to it, so that a shift at an eigenvalue stays solvable.
func (f *tridiagLU) factor(d, e []float64, lambda, tiny float64) {
	n := len(d)
	for i := range n {
		f.d[i] = d[i] - lambda
	}
	copy(f.dl, e)
	copy(f.du, e)
	clear(f.du2)
	clear(f.swap)
	for i := range n - 1 {
		if math.Abs(f.d[i]) >= math.Abs(f.dl[i]) {
			if f.d[i] != 0 {
				m := f.dl[i] / f.d[i]
				f.dl[i] = m
				f.d[i+1] -= m * f.du[i]
			}
			continue
		}
		// Swap rows i and i+1.
		m := f.d[i] / f.dl[i]
		f.d[i] = f.dl[i]
		f.dl[i] = m
		up := f.du[i]
		f.du[i] = f.d[i+1]
		f.d[i+1] = up - m*f.d[i+1]
		if i < n-2 {
			f.du2[i] = f.du[i+1]
			f.du[i+1] = -m * f.du[i+1]
		}
		f.swap[i] = true
	}
	for i := range n {
		if math.Abs(f.d[i]) < tiny {
			f.d[i] = math.Copysign(tiny, f.d[i])
		}
	}
}

// solve overwrites b with (T − λI)⁻¹·b.
func (f *tridiagLU) solve(b []float64) {
	n := len(f.d)
	for i := range n - 1 {
		if f.swap[i] {
			b[i], b[i+1] = b[i+1], b[i]-f.dl[i]*b[i+1]
		} else {
			b[i+1] -= f.dl[i] * b[i]
		}
	}
	b[n-1] /= f.d[n-1]
	if n > 1 {
		b[n-2] = (b[n-2] - f.du[n-2]*b[n-1]) / f.d[n-2]
	}
	for i := n - 3; i >= 0; i-- {
		b[i] = (b[i] - f.du[i]*b[i+1] - f.du2[i]*b[i+2]) / f.d[i]
	}
}
