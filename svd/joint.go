// Package svd factors the stacked key/value projections of a layer into one
// shared low-rank latent: y = W·x + b ≈ Up·(Down·x + DownBias), in float64.
//
// The rank-r factors minimise the expected weighted error
// E‖A^{1/2}(y − ŷ)‖² over inputs with second moment S = E[x̃ x̃ᵀ],
// x̃ = [x; 1]. With S = I and A = I this is the truncated SVD of [W b]
// (data-free); with S from calibration activations it is activation PCA;
// A weights the output dims by what attention does with them.
//
// Everything runs on blocked float64 GEMMs (internal/f64), and only what
// the solution needs is computed: the Rows×Rows Gram matrix of the
// problem, A through its Cholesky factor rather than its square roots, and
// the top Rank eigenpairs rather than the full eigendecomposition (see
// eigen.go). The result equals the textbook computation (full
// eigendecompositions, A^{1/2}) to the tolerance TestFactorMatchesReference
// documents; a Llama-3-8B-shaped layer (1984 rows, 4096 inputs, rank 512)
// factors in seconds instead of minutes.
package svd

import (
	"fmt"
	"math"
	"slices"

	"github.com/transmla/transmla/internal/f64"
)

// Problem is the projection to factor.
type Problem struct {
	// Rows and In are W's shape.
	Rows, In int
	// W is Rows×In, row-major.
	W []float64
	// B is the bias (Rows) or nil.
	B []float64
}

// Options controls Factor.
type Options struct {
	// Rank is the latent width; at Rows or above the factorization is exact.
	Rank int
	// Moment is E[x̃ x̃ᵀ] for x̃ = [x; 1], (In+1)×(In+1); nil means the
	// data-free identity.
	Moment []float64
	// Weight is the Rows×Rows positive semi-definite error weight A; nil
	// means the identity. Eigenvalues below 1e-9 of the largest are raised
	// to that floor so that A stays invertible.
	Weight []float64
}

// Factors is the result: Up·(Down·x + DownBias) ≈ W·x + B.
//
// Latent components are ordered by decreasing weighted energy, so the
// first k of them are the rank-k solution of the same problem (Truncate).
type Factors struct {
	// Rank is the latent width (Options.Rank capped at Rows).
	Rank int
	// Down is Rank×In, row-major.
	Down []float64
	// DownBias is Rank entries, zero when the problem has no bias.
	DownBias []float64
	// Up is Rows×Rank, row-major.
	Up []float64
	// Retained is the fraction of the weighted output energy the latent
	// keeps (1 at full rank).
	Retained float64
	// Energy is the weighted output energy of each latent component,
	// decreasing; Total is that of the whole output (Rows components).
	Energy []float64
	Total  float64
}

// Truncate returns the rank-k factors (k ≤ f.Rank) as new slices; f is
// unchanged.
func (f *Factors) Truncate(k int) (*Factors, error) {
	if k <= 0 || k > f.Rank {
		return nil, fmt.Errorf("svd: cannot truncate rank %d factors to %d", f.Rank, k)
	}
	in := len(f.Down) / f.Rank
	rows := len(f.Up) / f.Rank
	t := &Factors{Rank: k, Down: slices.Clone(f.Down[:k*in]), DownBias: slices.Clone(f.DownBias[:k]),
		Up: make([]float64, rows*k), Energy: slices.Clone(f.Energy[:k]), Total: f.Total, Retained: 1}
	for i := range rows {
		copy(t.Up[i*k:(i+1)*k], f.Up[i*f.Rank:i*f.Rank+k])
	}
	if f.Total > 0 {
		var kept float64
		for _, e := range t.Energy {
			kept += e
		}
		t.Retained = kept / f.Total
	}
	return t, nil
}

// Factor computes the rank-opts.Rank factors of p.
//
// With C = [W b]·S·[W b]ᵀ and A = F·Fᵀ (weightFactor), the solution takes
// the top eigenvectors Z of M = Fᵀ·C·F: Down = (F·Z)ᵀ·[W b], Up = F⁻ᵀ·Z.
// Only the Rank eigenvectors used are computed (symEigTop); every product
// is a blocked float64 GEMM (internal/f64).
func Factor(p Problem, opts Options) (*Factors, error) {
	r, n := p.Rows, p.In
	if r <= 0 || n <= 0 || len(p.W) != r*n {
		return nil, fmt.Errorf("svd: W has %d values, want %d×%d", len(p.W), r, n)
	}
	if p.B != nil && len(p.B) != r {
		return nil, fmt.Errorf("svd: bias has %d values, want %d", len(p.B), r)
	}
	if opts.Rank <= 0 {
		return nil, fmt.Errorf("svd: rank %d must be positive", opts.Rank)
	}
	if opts.Moment != nil && len(opts.Moment) != (n+1)*(n+1) {
		return nil, fmt.Errorf("svd: moment has %d values, want %d×%d", len(opts.Moment), n+1, n+1)
	}
	for _, in := range []struct {
		name string
		v    []float64
	}{{"W", p.W}, {"bias", p.B}, {"moment", opts.Moment}, {"weight", opts.Weight}} {
		for i, v := range in.v {
			if math.IsNaN(v) || math.IsInf(v, 0) {
				return nil, fmt.Errorf("svd: %s value %d is %v", in.name, i, v)
			}
		}
	}
	rank := min(opts.Rank, r)
	// Wt = [W b], Rows×(In+1).
	n1 := n + 1
	wt := make([]float64, r*n1)
	for i := range r {
		row := wt[i*n1 : (i+1)*n1]
		copy(row, p.W[i*n:(i+1)*n])
		if p.B != nil {
			row[n] = p.B[i]
		}
	}
	wf, err := newWeightFactor(opts.Weight, r)
	if err != nil {
		return nil, err
	}
	m := Gram(wt, r, n1, opts.Moment)
	if wf != nil {
		m = wf.congruence(m)
	}
	energy, z, total, err := symEigTop(m, r, rank)
	if err != nil {
		return nil, err
	}
	var kept float64
	for i, v := range energy {
		energy[i] = math.Max(v, 0)
		kept += energy[i]
	}
	canonicalSigns(z, r, rank)
	// Down = (F·Z)ᵀ·Wt, Up = F⁻ᵀ·Z.
	fz, up := z, z
	if wf != nil {
		fz, up = wf.mul(z, rank), wf.solveT(z, rank)
	}
	down := make([]float64, rank*n1)
	f64.Gemm(true, false, rank, n1, r, 1, fz, rank, wt, n1, 0, down, n1)
	f := &Factors{Rank: rank, Down: make([]float64, rank*n), DownBias: make([]float64, rank), Up: up, Retained: 1,
		Energy: energy, Total: total}
	if total > 0 {
		f.Retained = kept / total
	}
	for i := range rank {
		row := down[i*n1 : (i+1)*n1]
		copy(f.Down[i*n:(i+1)*n], row[:n])
		f.DownBias[i] = row[n]
	}
	return f, nil
}

// Gram returns the symmetric rows×rows w·S·wᵀ for the row-major rows×cols
// w, with S the cols×cols moment, or the identity when moment is nil.
func Gram(w []float64, rows, cols int, moment []float64) []float64 {
	out := make([]float64, rows*rows)
	if moment == nil {
		f64.Syrk(rows, cols, 1, w, cols, out, rows)
		return out
	}
	ws := make([]float64, rows*cols)
	f64.Gemm(false, false, rows, cols, cols, 1, w, cols, moment, cols, 0, ws, cols)
	f64.Gemm(false, true, rows, rows, cols, 1, ws, cols, w, cols, 0, out, rows)
	symmetrize(out, rows)
	return out
}

// canonicalSigns flips each of the k columns of the row-major r×k z so that
// its entry of largest magnitude (the first, on ties) is positive. An
// eigenvector's sign is arbitrary; fixing it makes the written latent
// independent of rounding noise in the solver.
func canonicalSigns(z []float64, r, k int) {
	for j := range k {
		best, at := -1.0, 0
		for i := range r {
			if a := math.Abs(z[i*k+j]); a > best {
				best, at = a, i
			}
		}
		if z[at*k+j] < 0 {
			for i := range r {
				z[i*k+j] = -z[i*k+j]
			}
		}
	}
}
