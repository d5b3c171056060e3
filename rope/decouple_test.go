package rope

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"gonum.org/v1/gonum/mat"
)

// randMoments draws key and query moments of random projections with
// uneven per-dim scales, as trained heads have.
func randMoments(rng *rand.Rand, d, kvHeads, heads int) Moments {
	in := 3 * d
	proj := func(rows int) *mat.Dense {
		w := mat.NewDense(rows, in, nil)
		for i := range rows {
			s := math.Exp(rng.NormFloat64())
			for j := range in {
				w.Set(i, j, s*rng.NormFloat64())
			}
		}
		return w
	}
	moment := func(w *mat.Dense) []float64 {
		var m mat.Dense
		m.Mul(w, w.T())
		return m.RawMatrix().Data
	}
	keyDim := kvHeads * d
	q := make([]float64, kvHeads*d*d)
	for h := range heads {
		g := h / (heads / kvHeads)
		qm := moment(proj(d))
		for i := range qm {
			q[g*d*d+i] += qm[i]
		}
	}
	_ = keyDim
	return Moments{Key: moment(proj(keyDim)), Query: q}
}

func keptEnergy(dec *Decoupling, key []float64) float64 {
	r := mat.NewDense(dec.RopeDim(), dec.KeyDim, dec.Rope)
	var t, u mat.Dense
	t.Mul(r, mat.NewDense(dec.KeyDim, dec.KeyDim, key))
	u.Mul(&t, r.T())
	return mat.Trace(&u)
}

func TestDecouplingIsOrthogonalWithStandardFrequencies(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	src := Params{Dim: 16, Theta: 10000}
	for _, tc := range []struct {
		name                   string
		kvHeads, ropeDim, fold int
		method                 string
	}{
		{"rorope-c1", 2, 16, 0, MethodRoRoPE},
		{"rorope-c2", 3, 8, 0, MethodRoRoPE},
		{"rorope-fold4", 2, 8, 4, MethodRoRoPE},
		{"rorope-fold8", 2, 4, 8, MethodRoRoPE},
		{"2norm", 2, 8, 0, Method2Norm},
		{"high", 4, 8, 0, MethodHigh},
		{"uniform", 2, 4, 0, MethodUniform},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := randMoments(rng, 16, tc.kvHeads, 2*tc.kvHeads)
			dec, err := Decouple(src, tc.kvHeads, Options{Method: tc.method, RopeDim: tc.ropeDim, FreqFold: tc.fold}, m)
			if err != nil {
				t.Fatal(err)
			}
			n := dec.KeyDim
			if dec.RopeDim() != tc.ropeDim || dec.NopeDim() != n-tc.ropeDim {
				t.Fatalf("rope %d / nope %d rows, want %d / %d", dec.RopeDim(), dec.NopeDim(), tc.ropeDim, n-tc.ropeDim)
			}
			all := mat.NewDense(n, n, append(append([]float64{}, dec.Rope...), dec.Nope...))
			var g mat.Dense
			g.Mul(all, all.T())
			for i := range n {
				for j := range n {
					want := 0.0
					if i == j {
						want = 1
					}
					if math.Abs(g.At(i, j)-want) > 1e-10 {
						t.Fatalf("rows %d and %d: inner product %v, want %v", i, j, g.At(i, j), want)
					}
				}
			}
			std, _, _ := Params{Dim: tc.ropeDim, Theta: src.Theta}.InvFreq()
			for i, f := range dec.InvFreq {
				if math.Abs(f-std[i]) > 1e-15 {
					t.Fatalf("pair %d rotates at %v, DeepSeek's loaders use %v", i, f, std[i])
				}
			}
		})
	}
}

// Within one frequency (head_dim = rope_dim, no folding) RoRoPE is exact
// for keys in its span: a common rotation of all heads' pairs commutes
// with the change of basis. Check the score identity
// q̃ᵀ R k̃ = (P q̃)ᵀ R (P k̃) for P = [Rope; Nope] with every row rotated at
// its own frequency.
func TestRoRoPECommutesWithRotation(t *testing.T) {
	rng := rand.New(rand.NewPCG(2, 2))
	const d, G = 8, 3
	src := Params{Dim: d, Theta: 100}
	m := randMoments(rng, d, G, G)
	dec, err := Decouple(src, G, Options{RopeDim: d}, m)
	if err != nil {
		t.Fatal(err)
	}
	inv, _, _ := src.InvFreq()
	q, k := make([]float64, G*d), make([]float64, G*d)
	for i := range q {
		q[i], k[i] = rng.NormFloat64(), rng.NormFloat64()
	}
	const delta = 5
	// Original: per head pair (j, j+d/2) rotated by delta·ω_j.
	rot := func(x []float64, freqOf func(i int) (re, im int, w float64), n int) []float64 {
		out := append([]float64{}, x...)
		for p := range n {
			re, im, w := freqOf(p)
			s, c := math.Sincos(delta * w)
			out[re], out[im] = x[re]*c-x[im]*s, x[im]*c+x[re]*s
		}
		return out
	}
	srcPairs := func(p int) (int, int, float64) {
		g, j := p/(d/2), p%(d/2)
		return g*d + j, g*d + j + d/2, inv[j]
	}
	want := dot(q, rot(k, srcPairs, G*d/2))
	// Transformed: RoPE rows interleaved; the Nope rows rotate too here, at
	// the one frequency of their (single-frequency) band, which the
	// position of each row identifies through its support.
	tq, tk := apply(dec, q), apply(dec, k)
	np := dec.NopeDim() / 2
	freqOfRow := func(row []float64) float64 {
		for i, v := range row {
			if math.Abs(v) > 1e-12 {
				return inv[(i%d)%(d/2)]
			}
		}
		return 0
	}
	pairs := func(p int) (int, int, float64) {
		if p < dec.RopeDim()/2 {
			return 2 * p, 2*p + 1, dec.InvFreq[p]
		}
		i := p - dec.RopeDim()/2
		base := dec.RopeDim()
		return base + i, base + np + i, freqOfRow(dec.Nope[i*dec.KeyDim : (i+1)*dec.KeyDim])
	}
	got := dot(tq, rot(tk, pairs, G*d/2))
	if math.Abs(got-want) > 1e-9*math.Abs(want) {
		t.Fatalf("score %v after the change of basis, %v before", got, want)
	}
}

func apply(dec *Decoupling, x []float64) []float64 {
	all := append(append([]float64{}, dec.Rope...), dec.Nope...)
	out := make([]float64, dec.KeyDim)
	for i := range out {
		out[i] = dot(all[i*dec.KeyDim:(i+1)*dec.KeyDim], x)
	}
	return out
}

func dot(a, b []float64) float64 {
	var s float64
	for i := range a {
		s += a[i] * b[i]
	}
	return s
}

// RoRoPE's components are principal: they keep at least as much key energy
// in the RoPE rows as any per-head selection from the same bands.
func TestRoRoPEKeepsMoreKeyEnergyThanSelection(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	src := Params{Dim: 16, Theta: 10000}
	for trial := range 5 {
		m := randMoments(rng, 16, 4, 8)
		ro, err := Decouple(src, 4, Options{RopeDim: 8}, m)
		if err != nil {
			t.Fatal(err)
		}
		for _, method := range []string{Method2Norm, MethodHigh, MethodUniform} {
			sel, err := Decouple(src, 4, Options{Method: method, RopeDim: 8}, m)
			if err != nil {
				t.Fatal(err)
			}
			if a, b := keptEnergy(ro, m.Key), keptEnergy(sel, m.Key); a < b*(1-1e-12) {
				t.Errorf("trial %d: rorope keeps %v, %s keeps %v", trial, a, method, b)
			}
		}
	}
}

func TestExactKeepsEveryDim(t *testing.T) {
	src := Params{Dim: 8, Theta: 500}
	dec, err := Exact(src, 2)
	if err != nil {
		t.Fatal(err)
	}
	inv, _, _ := src.InvFreq()
	if dec.NopeDim() != 0 || dec.RopeDim() != 16 {
		t.Fatalf("rope %d, nope %d rows; want 16, 0", dec.RopeDim(), dec.NopeDim())
	}
	for p, f := range dec.InvFreq {
		g, j := p/4, p%4
		re := dec.Rope[2*p*16 : (2*p+1)*16]
		im := dec.Rope[(2*p+1)*16 : (2*p+2)*16]
		if re[g*8+j] != 1 || im[g*8+j+4] != 1 || f != inv[j] {
			t.Fatalf("pair %d is not head %d's pair %d at its frequency", p, g, j)
		}
	}
}

func TestDecoupleRejectsBadOptions(t *testing.T) {
	src := Params{Dim: 16, Theta: 10000}
	m := randMoments(rand.New(rand.NewPCG(4, 4)), 16, 2, 2)
	for _, tc := range []struct {
		name string
		o    Options
	}{
		{"odd", Options{RopeDim: 7}},
		{"too wide", Options{RopeDim: 32}},
		{"not a divisor", Options{RopeDim: 6}},
		{"zero", Options{RopeDim: 0}},
		{"fold not multiple", Options{RopeDim: 8, FreqFold: 3}},
		{"fold for partial", Options{Method: Method2Norm, RopeDim: 8, FreqFold: 2}},
		{"unknown method", Options{Method: "magic", RopeDim: 8}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Decouple(src, 2, tc.o, m); err == nil {
				t.Fatal("no error")
			}
		})
	}
}

// The same moments give the same decoupling to the bit, run after run:
// converted checkpoints are reproducible files. (Sums over a component's
// terms once followed map order, which Go randomises on every iteration.)
func TestDecoupleIsReproducible(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	src := Params{Dim: 32, Theta: 10000}
	m := randMoments(rng, 32, 4, 8)
	for _, fold := range []int{2, 4, 8} {
		var first *Decoupling
		for run := range 20 {
			dec, err := Decouple(src, 4, Options{RopeDim: 16, FreqFold: fold}, m)
			if err != nil {
				t.Fatal(err)
			}
			if first == nil {
				first = dec
				continue
			}
			if !slices.Equal(dec.Rope, first.Rope) || !slices.Equal(dec.Nope, first.Nope) ||
				!slices.Equal(dec.InvFreq, first.InvFreq) || !slices.Equal(dec.NopeInvFreq, first.NopeInvFreq) {
				t.Fatalf("freqfold %d: run %d differs from the first", fold, run)
			}
		}
	}
}
