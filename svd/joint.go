// Package svd factors the stacked key/value projections of a layer into one
// shared low-rank latent: y = W·x + b ≈ Up·(Down·x + DownBias), in float64.
//
// The rank-r factors minimise the expected weighted error
// E‖A^{1/2}(y − ŷ)‖² over inputs with second moment S = E[x̃ x̃ᵀ],
// x̃ = [x; 1]. With S = I and A = I this is the truncated SVD of [W b]
// (data-free); with S from calibration activations it is activation PCA;
// A weights the output dims by what attention does with them.
package svd

import (
	"errors"
	"fmt"
	"math"

	"gonum.org/v1/gonum/mat"
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
}

// Factor computes the rank-opts.Rank factors of p.
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
	rank := min(opts.Rank, r)
	// Wt = [W b], Rows×(In+1).
	wt := mat.NewDense(r, n+1, nil)
	for i := range r {
		row := wt.RawRowView(i)
		copy(row, p.W[i*n:(i+1)*n])
		if p.B != nil {
			row[n] = p.B[i]
		}
	}
	half, invHalf, err := weightRoots(opts.Weight, r)
	if err != nil {
		return nil, err
	}
	wHat := wt
	if half != nil {
		wHat = mat.NewDense(r, n+1, nil)
		wHat.Mul(half, wt)
	}
	// M = Ŵ S Ŵᵀ.
	var ws mat.Dense
	if opts.Moment != nil {
		if len(opts.Moment) != (n+1)*(n+1) {
			return nil, fmt.Errorf("svd: moment has %d values, want %d×%d", len(opts.Moment), n+1, n+1)
		}
		ws.Mul(wHat, mat.NewDense(n+1, n+1, opts.Moment))
	} else {
		ws.CloneFrom(wHat)
	}
	var m mat.Dense
	m.Mul(&ws, wHat.T())
	sym := mat.NewSymDense(r, nil)
	for i := range r {
		for j := i; j < r; j++ {
			sym.SetSym(i, j, (m.At(i, j)+m.At(j, i))/2)
		}
	}
	var eig mat.EigenSym
	if !eig.Factorize(sym, true) {
		return nil, errors.New("svd: eigendecomposition did not converge")
	}
	vals := eig.Values(nil)
	var vecs mat.Dense
	eig.VectorsTo(&vecs)
	var total, kept float64
	for i, v := range vals {
		total += math.Max(v, 0)
		if i >= r-rank {
			kept += math.Max(v, 0)
		}
	}
	// Z: the top rank eigenvectors (EigenSym sorts ascending).
	z := mat.DenseCopyOf(vecs.Slice(0, r, r-rank, r))
	// Down = Zᵀ Ŵ, Up = A^{-1/2} Z.
	var down mat.Dense
	down.Mul(z.T(), wHat)
	up := z
	if invHalf != nil {
		up = mat.NewDense(r, rank, nil)
		up.Mul(invHalf, z)
	}
	f := &Factors{Rank: rank, Down: make([]float64, rank*n), DownBias: make([]float64, rank), Up: make([]float64, r*rank), Retained: 1}
	if total > 0 {
		f.Retained = kept / total
	}
	for i := range rank {
		row := down.RawRowView(i)
		copy(f.Down[i*n:(i+1)*n], row[:n])
		f.DownBias[i] = row[n]
	}
	for i := range r {
		for j := range rank {
			f.Up[i*rank+j] = up.At(i, j)
		}
	}
	return f, nil
}

// weightRoots returns A^{1/2} and A^{-1/2}, or nils for the identity.
func weightRoots(a []float64, r int) (half, invHalf *mat.Dense, err error) {
	if a == nil {
		return nil, nil, nil
	}
	if len(a) != r*r {
		return nil, nil, fmt.Errorf("svd: weight has %d values, want %d×%d", len(a), r, r)
	}
	sym := mat.NewSymDense(r, nil)
	for i := range r {
		for j := i; j < r; j++ {
			sym.SetSym(i, j, (a[i*r+j]+a[j*r+i])/2)
		}
	}
	var eig mat.EigenSym
	if !eig.Factorize(sym, true) {
		return nil, nil, errors.New("svd: eigendecomposition of the weight did not converge")
	}
	vals := eig.Values(nil)
	var vecs mat.Dense
	eig.VectorsTo(&vecs)
	top := vals[len(vals)-1]
	if !(top > 0) {
		return nil, nil, errors.New("svd: the error weight is zero")
	}
	floor := 1e-9 * top
	s := make([]float64, r)
	is := make([]float64, r)
	for i, v := range vals {
		v = math.Max(v, floor)
		s[i] = math.Sqrt(v)
		is[i] = 1 / s[i]
	}
	build := func(d []float64) *mat.Dense {
		var vd mat.Dense
		vd.Mul(&vecs, mat.NewDiagDense(r, d))
		out := mat.NewDense(r, r, nil)
		out.Mul(&vd, vecs.T())
		return out
	}
	return build(s), build(is), nil
}
