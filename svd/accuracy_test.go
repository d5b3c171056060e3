package svd

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"gonum.org/v1/gonum/mat"
)

// referenceFactor is the textbook solution, the oracle of the fast path:
// A^{1/2} by gonum's full eigendecomposition (eigenvalues floored at 1e-9
// of the largest), M = A^{1/2}·[W b]·S·[W b]ᵀ·A^{1/2}, its full
// eigendecomposition, Down = Zᵀ·A^{1/2}·[W b], Up = A^{-1/2}·Z.
func referenceFactor(t *testing.T, p Problem, o Options) (up, down *mat.Dense, energy []float64, total float64) {
	t.Helper()
	r, n := p.Rows, p.In
	wt := augmentedOf(p)
	half, invHalf := mat.NewDense(r, r, nil), mat.NewDense(r, r, nil)
	if o.Weight == nil {
		for i := range r {
			half.Set(i, i, 1)
			invHalf.Set(i, i, 1)
		}
	} else {
		var e mat.EigenSym
		if !e.Factorize(mat.NewSymDense(r, symmetrized(o.Weight, r)), true) {
			t.Fatal("weight eigendecomposition failed")
		}
		vals := e.Values(nil)
		var q mat.Dense
		e.VectorsTo(&q)
		top := vals[r-1]
		s, is := make([]float64, r), make([]float64, r)
		for i, v := range vals {
			s[i] = math.Sqrt(math.Max(v, 1e-9*top))
			is[i] = 1 / s[i]
		}
		var qs, qis mat.Dense
		qs.Mul(&q, mat.NewDiagDense(r, s))
		half.Mul(&qs, q.T())
		qis.Mul(&q, mat.NewDiagDense(r, is))
		invHalf.Mul(&qis, q.T())
	}
	var what mat.Dense
	what.Mul(half, wt)
	mom := mat.NewDense(n+1, n+1, nil)
	if o.Moment != nil {
		mom = mat.NewDense(n+1, n+1, o.Moment)
	} else {
		for i := range n + 1 {
			mom.Set(i, i, 1)
		}
	}
	var ws, m mat.Dense
	ws.Mul(&what, mom)
	m.Mul(&ws, what.T())
	var e mat.EigenSym
	if !e.Factorize(mat.NewSymDense(r, symmetrized(m.RawMatrix().Data, r)), true) {
		t.Fatal("eigendecomposition failed")
	}
	vals := e.Values(nil)
	var vecs mat.Dense
	e.VectorsTo(&vecs)
	rank := min(o.Rank, r)
	z := mat.NewDense(r, rank, nil)
	for j := range rank {
		energy = append(energy, math.Max(vals[r-1-j], 0))
		for i := range r {
			z.Set(i, j, vecs.At(i, r-1-j))
		}
	}
	for _, v := range vals {
		total += math.Max(v, 0)
	}
	down, up = &mat.Dense{}, &mat.Dense{}
	down.Mul(z.T(), &what)
	up.Mul(invHalf, z)
	return up, down, energy, total
}

func symmetrized(a []float64, n int) []float64 {
	s := make([]float64, n*n)
	for i := range n {
		for j := range n {
			s[i*n+j] = (a[i*n+j] + a[j*n+i]) / 2
		}
	}
	return s
}

// lowRankPSD is Σ of k random outer products: rank k ≤ n.
func lowRankPSD(rng *rand.Rand, n, k int) []float64 {
	g := mat.NewDense(n, k, nil)
	for i := range n {
		for j := range k {
			g.Set(i, j, rng.NormFloat64())
		}
	}
	var m mat.Dense
	m.Mul(g, g.T())
	return m.RawMatrix().Data
}

// The documented tolerance of the fast factorization against the exact
// one (referenceFactor): per-component energies and the total to 1e-10 of
// the total, the weighted objective E‖A^{1/2}(y−ŷ)‖² to 1e-9 of the total
// energy, and, where the rank-th energy is separated from the next by
// more than 1e-6 of the total (the solution is then unique), the
// reconstruction Up·[Down DownBias] to 1e-7 relative. Cases cover the
// data-free, calibrated and weighted problems, a weight that takes the
// Cholesky path, one below the eigenvalue floor (rank-deficient), more
// rows than inputs, and power-law spectra as in trained weights.
func TestFactorMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	type tc struct {
		rows, in, rank int
		bias, mom      bool
		weight         string // "", "full", "deficient", "blocks"
		decay          float64
	}
	cases := []tc{
		{40, 60, 10, false, false, "", 0},
		{40, 60, 10, true, true, "", 0},
		{40, 60, 10, true, true, "full", 0},
		{40, 60, 40, true, true, "full", 0},
		{40, 60, 15, true, true, "deficient", 0},
		{90, 30, 20, true, true, "full", 0},
		{200, 300, 64, true, true, "full", 1},
		{200, 300, 64, false, false, "", 0.5},
		{300, 257, 150, true, true, "full", 0.7},
		{300, 257, 100, true, true, "blocks", 0.7},
		{300, 257, 64, false, false, "blocks", 0.3},
	}
	for _, c := range cases {
		name := fmt.Sprintf("%dx%d/rank%d/bias%v/mom%v/weight%q/decay%v", c.rows, c.in, c.rank, c.bias, c.mom, c.weight, c.decay)
		t.Run(name, func(t *testing.T) {
			p := randProblem(rng, c.rows, c.in, c.bias)
			for i := range c.rows {
				s := math.Pow(1+float64(i), -c.decay)
				for j := range c.in {
					p.W[i*c.in+j] *= s
				}
			}
			o := Options{Rank: c.rank}
			if c.mom {
				o.Moment = randMoment(rng, c.in, 2*c.in)
			}
			switch c.weight {
			case "full":
				o.Weight = randPSD(rng, c.rows)
			case "deficient":
				o.Weight = lowRankPSD(rng, c.rows, c.rows/2)
			case "blocks":
				o.Weight = blockPSD(rng, c.rows, 140, 220)
			}
			got, err := Factor(p, o)
			if err != nil {
				t.Fatal(err)
			}
			up, down, energy, total := referenceFactor(t, p, o)
			if math.Abs(got.Total-total) > 1e-10*total {
				t.Errorf("total %v, want %v", got.Total, total)
			}
			for i, e := range energy {
				if math.Abs(got.Energy[i]-e) > 1e-10*total {
					t.Errorf("energy %d: %v, want %v", i, got.Energy[i], e)
				}
			}
			moment, weight := o.Moment, o.Weight
			if moment == nil {
				moment = identity(c.in + 1)
			}
			if weight == nil {
				weight = identity(c.rows)
			}
			ref := &Factors{Rank: got.Rank, Up: up.RawMatrix().Data, Down: make([]float64, got.Rank*c.in), DownBias: make([]float64, got.Rank)}
			for i := range got.Rank {
				copy(ref.Down[i*c.in:(i+1)*c.in], down.RawRowView(i)[:c.in])
				ref.DownBias[i] = down.At(i, c.in)
			}
			if c.weight != "deficient" {
				// The floor makes the objective's weight differ from A itself.
				if a, b := weightedError(got, p, moment, weight), weightedError(ref, p, moment, weight); math.Abs(a-b) > 1e-9*total {
					t.Errorf("objective %v, reference %v", a, b)
				}
			}
			if k := got.Rank; k == c.rows || energy[k-1]-nextEnergy(t, p, o, k) > 1e-6*total {
				g, w := reconstruct(got, c.rows, c.in), reconstruct(ref, c.rows, c.in)
				var d mat.Dense
				d.Sub(g, w)
				if e := mat.Norm(&d, 2) / mat.Norm(w, 2); e > 1e-7 {
					t.Errorf("reconstruction differs by %.3g relative", e)
				}
			}
		})
	}
}

// nextEnergy is the (k+1)-th weighted energy, from a rank k+1 reference.
func nextEnergy(t *testing.T, p Problem, o Options, k int) float64 {
	o.Rank = k + 1
	_, _, e, _ := referenceFactor(t, p, o)
	return e[k]
}

// blockPSD is a positive definite matrix with diagonal blocks [0, b₀),
// [b₀, b₁), …, [b_last, n) and zeros elsewhere, like the attention
// weighting's key and value blocks; the bounds cross the Cholesky blocks.
func blockPSD(rng *rand.Rand, n int, bounds ...int) []float64 {
	a := make([]float64, n*n)
	edges := append(append([]int{0}, bounds...), n)
	for b := range len(edges) - 1 {
		lo, hi := edges[b], edges[b+1]
		blk := randPSD(rng, hi-lo)
		for i := range hi - lo {
			for j := range hi - lo {
				a[(lo+i)*n+lo+j] = blk[i*(hi-lo)+j]
			}
			a[(lo+i)*n+lo+i] += float64(hi - lo)
		}
	}
	return a
}

func identity(n int) []float64 {
	m := make([]float64, n*n)
	for i := range n {
		m[i*n+i] = 1
	}
	return m
}

// The weight takes the Cholesky path when well conditioned and the floored
// eigendecomposition otherwise; either way F·Fᵀ is A (floored).
func TestWeightFactorPaths(t *testing.T) {
	rng := rand.New(rand.NewPCG(23, 24))
	n := 50
	wellConditioned := randPSD(rng, n)
	for i := range n {
		wellConditioned[i*n+i] += float64(n)
	}
	for _, c := range []struct {
		name  string
		a     []float64
		lower bool
	}{
		{"well-conditioned", wellConditioned, true},
		{"rank-deficient", lowRankPSD(rng, n, n/2), false},
		{"block-diagonal", blockPSD(rng, 300, 140, 220, 299), true},
	} {
		t.Run(c.name, func(t *testing.T) {
			n := int(math.Sqrt(float64(len(c.a))))
			w, err := newWeightFactor(c.a, n)
			if err != nil {
				t.Fatal(err)
			}
			if w.lower != c.lower {
				t.Fatalf("Cholesky path %v, want %v", w.lower, c.lower)
			}
			var fft mat.Dense
			f := mat.NewDense(n, n, w.f)
			fft.Mul(f, f.T())
			var d mat.Dense
			d.Sub(&fft, mat.NewDense(n, n, c.a))
			if e := mat.Norm(&d, 2) / mat.Norm(mat.NewDense(n, n, c.a), 2); e > 1e-8 {
				t.Errorf("‖F·Fᵀ − A‖/‖A‖ = %.3g", e)
			}
			// F⁻ᵀ·Fᵀ = I through solveT.
			ft := make([]float64, n*n)
			for i := range n {
				for j := range n {
					ft[i*n+j] = w.f[j*n+i]
				}
			}
			id := w.solveT(ft, n)
			for i := range n {
				for j := range n {
					want := 0.0
					if i == j {
						want = 1
					}
					if math.Abs(id[i*n+j]-want) > 1e-8 {
						t.Fatalf("F⁻ᵀ·Fᵀ[%d,%d] = %v", i, j, id[i*n+j])
					}
				}
			}
		})
	}
}
