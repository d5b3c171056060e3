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
				!slices.Equal(dec.InvFreq, first.InvFreq) {
				t.Fatalf("freqfold %d: run %d differs from the first", fold, run)
			}
		}
	}
}

// Slots at any stride rotate at the frequencies loaders compute from
// SlotTheta, and a slot at a whole source index i·stride at that source
// frequency: packing the slots on the fastest frequencies (stride 1) or
// giving those two or four slots (1/2, 1/4) changes rope_theta only.
func TestStrideSlotFrequencies(t *testing.T) {
	src := Params{Dim: 32, Theta: 10000, Scaling: Scaling{Type: "llama3", Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositionEmbeddings: 64}}
	srcFreq, _, err := src.InvFreq()
	if err != nil {
		t.Fatal(err)
	}
	m := randMoments(rand.New(rand.NewPCG(7, 7)), 32, 2, 4)
	for _, tc := range []struct {
		ropeDim int
		stride  float64
		fold    int
	}{
		{8, 0, 0}, {8, 1, 0}, {16, 1, 2}, {16, 0.5, 1}, {32, 0.5, 2}, {48, 0.5, 1}, {8, 2, 2},
	} {
		dec, err := Decouple(src, 2, Options{RopeDim: tc.ropeDim, Stride: tc.stride, FreqFold: tc.fold}, m)
		if err != nil {
			t.Fatalf("rope dim %d stride %v: %v", tc.ropeDim, tc.stride, err)
		}
		loader := src
		loader.Dim, loader.Theta = tc.ropeDim, SlotTheta(src.Theta, 32, tc.ropeDim, tc.stride)
		want, _, _ := loader.InvFreq()
		s := tc.stride
		if s == 0 {
			s = float64(32 / tc.ropeDim)
		}
		for i, f := range dec.InvFreq {
			if math.Abs(f-want[i]) > 1e-12*want[i] {
				t.Errorf("rope dim %d stride %v pair %d: rotates at %v, loaders compute %v", tc.ropeDim, tc.stride, i, f, want[i])
			}
			if j := float64(i) * s; j == math.Trunc(j) && math.Abs(f-srcFreq[int(j)]) > 1e-9*srcFreq[int(j)] {
				t.Errorf("rope dim %d stride %v pair %d: rotates at %v, source frequency %d is %v", tc.ropeDim, tc.stride, i, f, int(j), srcFreq[int(j)])
			}
		}
		if dec.RopeDim() != tc.ropeDim || dec.NopeDim() != 64-tc.ropeDim {
			t.Errorf("rope dim %d stride %v: %d rope and %d nope rows", tc.ropeDim, tc.stride, dec.RopeDim(), dec.NopeDim())
		}
	}
	for _, bad := range []Options{
		{RopeDim: 18, Stride: 2},   // the last slot at source frequency 16, of 0..15
		{RopeDim: 66, Stride: 0.5}, // the same at 16
		{RopeDim: 16, Stride: 0.5, FreqFold: 3},
		{RopeDim: 32, Stride: 0.25}, // four slots for the two components of a frequency
		{RopeDim: 48},               // wider than head_dim needs a stride
	} {
		if _, err := Decouple(src, 2, bad, m); err == nil {
			t.Errorf("%+v: no error", bad)
		}
	}
}

// With RankScore the key and query rows are dual bases, not orthogonal:
// Σ_c query_c key_cᵀ = I, so every score is kept when all rows rotate at
// their own frequency; and the RoPE rows carry more score variance (the
// key energy seen through the queries) than key-energy RoRoPE's.
func TestScoreRankIsDualAndKeepsMoreScore(t *testing.T) {
	rng := rand.New(rand.NewPCG(8, 8))
	src := Params{Dim: 16, Theta: 10000}
	for trial := range 4 {
		m := randMoments(rng, 16, 2, 6)
		dec, err := Decouple(src, 2, Options{RopeDim: 8, FreqFold: 4, Rank: RankScore}, m)
		if err != nil {
			t.Fatal(err)
		}
		n := dec.KeyDim
		keys := mat.NewDense(n, n, append(append([]float64{}, dec.Rope...), dec.Nope...))
		queries := mat.NewDense(n, n, append(append([]float64{}, dec.QueryRope...), dec.QueryNope...))
		var prod mat.Dense
		prod.Mul(queries.T(), keys)
		for i := range n {
			for j := range n {
				want := 0.0
				if i == j {
					want = 1
				}
				if math.Abs(prod.At(i, j)-want) > 1e-8 {
					t.Fatalf("trial %d: (Qᵀ K)[%d,%d] = %v, want %v", trial, i, j, prod.At(i, j), want)
				}
			}
		}
		key, err := Decouple(src, 2, Options{RopeDim: 8, FreqFold: 4}, m)
		if err != nil {
			t.Fatal(err)
		}
		if a, b := scoreEnergy(dec, m, 16, 2), scoreEnergy(key, m, 16, 2); a < b*(1-1e-9) {
			t.Errorf("trial %d: score ranking keeps %v of the score variance on RoPE rows, key ranking %v", trial, a, b)
		}
	}
}

// scoreEnergy is Σ over RoPE components c of (query energy)·(key energy):
// the score variance the RoPE rows carry for independent queries and keys.
func scoreEnergy(dec *Decoupling, m Moments, d, kvHeads int) float64 {
	n := dec.KeyDim
	// The queries' moment in the key space: block-diagonal by KV head.
	q := mat.NewDense(n, n, nil)
	for g := range kvHeads {
		for i := range d {
			for j := range d {
				q.Set(g*d+i, g*d+j, m.Query[g*d*d+i*d+j])
			}
		}
	}
	k := mat.NewDense(n, n, m.Key)
	var e float64
	for r := range dec.RopeDim() {
		kr := mat.NewVecDense(n, dec.Rope[r*n:(r+1)*n])
		qr := mat.NewVecDense(n, dec.QueryRope[r*n:(r+1)*n])
		e += mat.Inner(kr, k, kr) * mat.Inner(qr, q, qr)
	}
	return e
}

// A position-free component's Fix is the mean rotation over the head's
// attention distances, and it is the best fixed 2×2 scaled rotation: the
// mean squared score error Σ_Δ P(Δ)·|qᵀR(−ωΔ)k − qᵀMk|² over random q, k
// is smallest at M = Fix (checked against the mean of cos/sin computed
// here and against perturbed M).
func TestNopeFixIsTheMeanRotation(t *testing.T) {
	src := Params{Dim: 4, Theta: 10}
	inv, _, _ := src.InvFreq()
	prof := Profile{{0.5, 0.3, 0.1, 0.1}, {0.1, 0.1, 0.1, 0.7}}
	m := Moments{Key: identity(4), Query: identity(4)}
	// One KV head of 4 dims: 2 frequencies; RoPE on one slot (the fastest,
	// stride 1) leaves frequency 1 position-free.
	dec, err := Decouple(src, 1, Options{RopeDim: 2, Stride: 1, Profile: prof}, m)
	if err != nil {
		t.Fatal(err)
	}
	if len(dec.NopeFix) != 2 || len(dec.NopeFix[0]) != 1 {
		t.Fatalf("fixes %v, want 2 heads × 1 component", dec.NopeFix)
	}
	rng := rand.New(rand.NewPCG(9, 9))
	for h, p := range prof {
		var c, s float64
		for dist, w := range p {
			c += w * math.Cos(inv[1]*float64(dist))
			s += w * math.Sin(inv[1]*float64(dist))
		}
		f := dec.NopeFix[h][0]
		if math.Abs(f.C-c) > 1e-12 || math.Abs(f.S-s) > 1e-12 {
			t.Fatalf("head %d: fix %+v, want C %v S %v", h, f, c, s)
		}
		err := func(f Fix) float64 {
			var e float64
			r := rand.New(rand.NewPCG(10, 10))
			for range 2000 {
				q := [2]float64{r.NormFloat64(), r.NormFloat64()}
				k := [2]float64{r.NormFloat64(), r.NormFloat64()}
				fk := [2]float64{f.C*k[0] + f.S*k[1], -f.S*k[0] + f.C*k[1]}
				for dist, w := range p {
					sn, cs := math.Sincos(inv[1] * float64(dist))
					// R(−ωΔ) = [[cos, sin], [−sin, cos]]
					rk := [2]float64{cs*k[0] + sn*k[1], -sn*k[0] + cs*k[1]}
					d := q[0]*(rk[0]-fk[0]) + q[1]*(rk[1]-fk[1])
					e += w * d * d
				}
			}
			return e
		}
		best := err(f)
		for range 20 {
			g := Fix{C: f.C + 0.05*rng.NormFloat64(), S: f.S + 0.05*rng.NormFloat64()}
			if e := err(g); e < best {
				t.Errorf("head %d: M %+v scores error %v, below the fix %+v's %v", h, g, e, f, best)
			}
		}
	}
}

func identity(n int) []float64 {
	m := make([]float64, n*n)
	for i := range n {
		m[i*n+i] = 1
	}
	return m
}
