package svd

import (
	"math"
	"math/rand/v2"
	"testing"

	"gonum.org/v1/gonum/mat"
)

func randProblem(rng *rand.Rand, rows, in int, bias bool) Problem {
	p := Problem{Rows: rows, In: in, W: make([]float64, rows*in)}
	for i := range p.W {
		p.W[i] = rng.NormFloat64()
	}
	if bias {
		p.B = make([]float64, rows)
		for i := range p.B {
			p.B[i] = rng.NormFloat64()
		}
	}
	return p
}

// reconstruct returns Up·[Down DownBias], rows×(in+1).
func reconstruct(f *Factors, rows, in int) *mat.Dense {
	down := mat.NewDense(f.Rank, in+1, nil)
	for i := range f.Rank {
		copy(down.RawRowView(i)[:in], f.Down[i*in:(i+1)*in])
		down.Set(i, in, f.DownBias[i])
	}
	var out mat.Dense
	out.Mul(mat.NewDense(rows, f.Rank, f.Up), down)
	return &out
}

func augmentedOf(p Problem) *mat.Dense {
	m := mat.NewDense(p.Rows, p.In+1, nil)
	for i := range p.Rows {
		copy(m.RawRowView(i)[:p.In], p.W[i*p.In:(i+1)*p.In])
		if p.B != nil {
			m.Set(i, p.In, p.B[i])
		}
	}
	return m
}

func randMoment(rng *rand.Rand, in, samples int) []float64 {
	x := mat.NewDense(samples, in+1, nil)
	for s := range samples {
		for j := range in {
			x.Set(s, j, rng.NormFloat64()*float64(j+1)/float64(in)+0.3)
		}
		x.Set(s, in, 1)
	}
	var m mat.Dense
	m.Mul(x.T(), x)
	m.Scale(1/float64(samples), &m)
	return m.RawMatrix().Data
}

func randPSD(rng *rand.Rand, n int) []float64 {
	a := mat.NewDense(n, n, nil)
	for i := range n {
		for j := range n {
			a.Set(i, j, rng.NormFloat64())
		}
	}
	var m mat.Dense
	m.Mul(a, a.T())
	return m.RawMatrix().Data
}

// At full rank every variant reproduces W and b.
func TestFullRankIsExact(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, tc := range []struct {
		name           string
		bias, mom, wgt bool
	}{
		{"data-free", false, false, false},
		{"data-free-bias", true, false, false},
		{"calibrated", true, true, false},
		{"weighted", true, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := randProblem(rng, 12, 9, tc.bias)
			o := Options{Rank: 12}
			if tc.mom {
				o.Moment = randMoment(rng, 9, 50)
			}
			if tc.wgt {
				o.Weight = randPSD(rng, 12)
			}
			f, err := Factor(p, o)
			if err != nil {
				t.Fatal(err)
			}
			got, want := reconstruct(f, 12, 9), augmentedOf(p)
			var diff mat.Dense
			diff.Sub(got, want)
			if e := mat.Norm(&diff, 2) / mat.Norm(want, 2); e > 1e-10 {
				t.Fatalf("relative reconstruction error %.3g at full rank", e)
			}
			if math.Abs(f.Retained-1) > 1e-12 {
				t.Fatalf("retained %v at full rank, want 1", f.Retained)
			}
		})
	}
}

// Data-free truncation is the Eckart–Young optimum: its error is the
// energy of the discarded singular values, computed independently by
// gonum's SVD.
func TestDataFreeMatchesTruncatedSVD(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	p := randProblem(rng, 10, 14, true)
	var s mat.SVD
	if !s.Factorize(augmentedOf(p), mat.SVDThin) {
		t.Fatal("svd failed")
	}
	sv := s.Values(nil)
	for _, rank := range []int{1, 4, 7} {
		f, err := Factor(p, Options{Rank: rank})
		if err != nil {
			t.Fatal(err)
		}
		var diff mat.Dense
		diff.Sub(reconstruct(f, 10, 14), augmentedOf(p))
		got := mat.Norm(&diff, 2) // Frobenius
		var want float64
		for _, v := range sv[rank:] {
			want += v * v
		}
		if math.Abs(got*got-want) > 1e-9*want {
			t.Fatalf("rank %d: squared error %v, want the discarded energy %v", rank, got*got, want)
		}
	}
}

// weightedError is E‖A^{1/2}(y − ŷ)‖² = tr(A·E·S·Eᵀ) with E the weight error.
func weightedError(f *Factors, p Problem, moment, weight []float64) float64 {
	var e mat.Dense
	e.Sub(reconstruct(f, p.Rows, p.In), augmentedOf(p))
	var es, ese mat.Dense
	es.Mul(&e, mat.NewDense(p.In+1, p.In+1, moment))
	ese.Mul(&es, e.T())
	var t mat.Dense
	t.Mul(mat.NewDense(p.Rows, p.Rows, weight), &ese)
	return mat.Trace(&t)
}

// With a moment and a weight, the factorization beats the unweighted one
// on the weighted objective, and the calibrated one beats the data-free
// one on the calibrated objective.
func TestWeightsAndMomentsLowerTheirObjective(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	p := randProblem(rng, 16, 12, true)
	mom := randMoment(rng, 12, 40)
	w := randPSD(rng, 16)
	ident := make([]float64, 16*16)
	for i := range 16 {
		ident[i*16+i] = 1
	}
	for _, rank := range []int{3, 8} {
		free, _ := Factor(p, Options{Rank: rank})
		calib, _ := Factor(p, Options{Rank: rank, Moment: mom})
		weighted, _ := Factor(p, Options{Rank: rank, Moment: mom, Weight: w})
		if a, b := weightedError(calib, p, mom, ident), weightedError(free, p, mom, ident); a > b*(1+1e-12) {
			t.Errorf("rank %d: calibrated error %v above data-free %v on calibration data", rank, a, b)
		}
		if a, b := weightedError(weighted, p, mom, w), weightedError(calib, p, mom, w); a > b*(1+1e-12) {
			t.Errorf("rank %d: weighted error %v above unweighted %v on the weighted objective", rank, a, b)
		}
	}
}

func TestFactorRejectsBadInput(t *testing.T) {
	p := Problem{Rows: 2, In: 2, W: []float64{1, 2, 3, 4}}
	for _, tc := range []struct {
		name string
		p    Problem
		o    Options
	}{
		{"zero rank", p, Options{Rank: 0}},
		{"short W", Problem{Rows: 2, In: 2, W: []float64{1}}, Options{Rank: 1}},
		{"bias length", Problem{Rows: 2, In: 2, W: p.W, B: []float64{1}}, Options{Rank: 1}},
		{"moment size", p, Options{Rank: 1, Moment: []float64{1}}},
		{"weight size", p, Options{Rank: 1, Weight: []float64{1}}},
		{"zero weight", p, Options{Rank: 1, Weight: make([]float64, 4)}},
		{"NaN weight", p, Options{Rank: 1, Weight: []float64{1, 0, 0, math.NaN()}}},
		{"NaN W", Problem{Rows: 2, In: 2, W: []float64{1, math.NaN(), 3, 4}}, Options{Rank: 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Factor(tc.p, tc.o); err == nil {
				t.Fatal("no error")
			}
		})
	}
}

// A truncated high-rank factorization must reach the same objective as a
// fresh factorization at the lower rank, and its energies must be sorted.
func TestTruncateMatchesLowerRankFactor(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	p := randProblem(rng, 24, 16, true)
	moment := randMoment(rng, 16, 200)
	weight := randPSD(rng, 24)
	high, err := Factor(p, Options{Rank: 20, Moment: moment, Weight: weight})
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i < len(high.Energy); i++ {
		if high.Energy[i] > high.Energy[i-1] {
			t.Fatalf("energy not decreasing at %d: %v", i, high.Energy)
		}
	}
	for _, k := range []int{1, 5, 12, 20} {
		cut, err := high.Truncate(k)
		if err != nil {
			t.Fatal(err)
		}
		fresh, err := Factor(p, Options{Rank: k, Moment: moment, Weight: weight})
		if err != nil {
			t.Fatal(err)
		}
		got, want := weightedError(cut, p, moment, weight), weightedError(fresh, p, moment, weight)
		if math.Abs(got-want) > 1e-9*(1+want) {
			t.Errorf("rank %d: truncated error %v, fresh %v", k, got, want)
		}
		if math.Abs(cut.Retained-fresh.Retained) > 1e-12 {
			t.Errorf("rank %d: retained %v vs %v", k, cut.Retained, fresh.Retained)
		}
	}
	if _, err := high.Truncate(21); err == nil {
		t.Error("truncating above the rank succeeded")
	}
}
