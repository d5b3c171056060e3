package mlafit

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/transmla/transmla/internal/f64"
)

// testShape is a small layer; the options vary what the tests cover.
func testShape(interleave bool, window, nope int) Shape {
	s := Shape{Hidden: 12, Heads: 3, Nope: nope, Rope: 4, Value: 5, Latent: 6, Eps: 1e-5,
		Interleave: interleave, Window: window, InvFreq: []float64{1, 0.1}, AttnFactor: 1.1}
	s.Scale = 1 / math.Sqrt(float64(s.Nope+s.Rope))
	return s
}

func randomParams(s Shape, rng *rand.Rand, biases, norm bool) *Params[float64] {
	var p Params[float64]
	sz := s.sizes()
	for i := range NumTensors {
		switch i {
		case QBias, KVABias, KVBBias, OBias:
			if !biases {
				continue
			}
		case KVANorm:
			if !norm {
				continue
			}
		}
		p[i] = make([]float64, sz[i])
		for j := range p[i] {
			p[i][j] = rng.NormFloat64() * 0.5
			if i == KVANorm {
				p[i][j] = 1 + 0.3*rng.NormFloat64()
			}
		}
	}
	return &p
}

func randomRows(rng *rand.Rand, n int) []float64 {
	x := make([]float64, n)
	for i := range x {
		x[i] = rng.NormFloat64()
	}
	return x
}

// referenceForward is the layer written out position by position, as the
// DeepSeek-V3 attention is defined: an independent check on Forward's
// blocked products.
func referenceForward(s Shape, p *Params[float64], x []float64, n int) []float64 {
	D, H, nope, dr, dv, dc := s.Hidden, s.Heads, s.Nope, s.Rope, s.Value, s.Latent
	lin := func(w, b, in []float64, out, inDim int) []float64 {
		y := make([]float64, out)
		for o := range out {
			for i := range inDim {
				y[o] += w[o*inDim+i] * in[i]
			}
			if b != nil {
				y[o] += b[o]
			}
		}
		return y
	}
	rot := func(v []float64, pos int) {
		h := dr / 2
		for j := range h {
			i0, i1 := j, j+h
			if s.Interleave {
				i0, i1 = 2*j, 2*j+1
			}
			sn, cs := math.Sincos(float64(pos) * s.InvFreq[j])
			cs, sn = cs*s.AttnFactor, sn*s.AttnFactor
			a, b := v[i0], v[i1]
			v[i0], v[i1] = a*cs-b*sn, b*cs+a*sn
		}
	}
	qs := make([][]float64, n)
	keys := make([][]float64, n) // per position: H heads of nope, then k_R
	vals := make([][]float64, n)
	for t := range n {
		xt := x[t*D : (t+1)*D]
		qs[t] = lin(p[Q], p[QBias], xt, H*(nope+dr), D)
		a := lin(p[KVA], p[KVABias], xt, dc+dr, D)
		c := a[:dc]
		if g := p[KVANorm]; g != nil {
			var ss float64
			for _, v := range c {
				ss += v * v
			}
			r := 1 / math.Sqrt(ss/float64(dc)+s.Eps)
			for j := range c {
				c[j] *= r * g[j]
			}
		}
		kv := lin(p[KVB], p[KVBBias], c, H*(nope+dv), dc)
		kr := a[dc:]
		rot(kr, t)
		for h := range H {
			rot(qs[t][h*(nope+dr)+nope:(h+1)*(nope+dr)], t)
		}
		keys[t], vals[t] = append(kv, kr...), kv
	}
	attn := make([]float64, n*H*dv)
	for t := range n {
		first := 0
		if s.Window > 0 {
			first = max(0, t-s.Window+1)
		}
		for h := range H {
			q := qs[t][h*(nope+dr) : (h+1)*(nope+dr)]
			sc := make([]float64, t+1)
			m := math.Inf(-1)
			for u := first; u <= t; u++ {
				var dot float64
				for j := range nope {
					dot += q[j] * keys[u][h*(nope+dv)+j]
				}
				for j := range dr {
					dot += q[nope+j] * keys[u][H*(nope+dv)+j]
				}
				sc[u] = dot * s.Scale
				m = max(m, sc[u])
			}
			var sum float64
			for u := first; u <= t; u++ {
				sc[u] = math.Exp(sc[u] - m)
				sum += sc[u]
			}
			for u := first; u <= t; u++ {
				for j := range dv {
					attn[t*H*dv+h*dv+j] += sc[u] / sum * vals[u][h*(nope+dv)+nope+j]
				}
			}
		}
	}
	y := make([]float64, n*D)
	for t := range n {
		copy(y[t*D:], lin(p[O], p[OBias], attn[t*H*dv:(t+1)*H*dv], D, H*dv))
	}
	return y
}

// The cases cover both RoPE layouts, a sliding window, no position-free
// part, biases and kv_a_layernorm, and sequences longer than one block.
var layerCases = []struct {
	interleave   bool
	window, nope int
	biases, norm bool
	n            int
}{
	{true, 0, 4, false, true, 9},
	{false, 0, 4, true, false, 9},
	{true, 3, 4, true, true, 9},
	{true, 0, 0, false, true, 7},
	{false, 0, 2, true, true, block + 5},
}

func caseName(i int) string {
	c := layerCases[i]
	return fmt.Sprintf("interleave=%v/window=%d/nope=%d/bias=%v/norm=%v/n=%d", c.interleave, c.window, c.nope, c.biases, c.norm, c.n)
}

func TestForwardMatchesReference(t *testing.T) {
	for ci, c := range layerCases {
		t.Run(caseName(ci), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(ci), 1))
			s := testShape(c.interleave, c.window, c.nope)
			p := randomParams(s, rng, c.biases, c.norm)
			x := randomRows(rng, c.n*s.Hidden)
			l, err := NewLayer(s, c.n, Gemm[float64](f64.Gemm))
			if err != nil {
				t.Fatal(err)
			}
			got := l.Forward(p, x, c.n, &Work[float64]{})
			want := referenceForward(s, p, x, c.n)
			for i := range want {
				if d := math.Abs(got[i] - want[i]); d > 1e-10*(1+math.Abs(want[i])) {
					t.Fatalf("output %d: %v, reference %v", i, got[i], want[i])
				}
			}
		})
	}
}

// TestBackwardMatchesFiniteDifferences checks every entry of every
// tensor's gradient against central differences of the loss ½·Σ(w·y)²
// for random weights w.
func TestBackwardMatchesFiniteDifferences(t *testing.T) {
	for ci, c := range layerCases {
		t.Run(caseName(ci), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(ci), 2))
			s := testShape(c.interleave, c.window, c.nope)
			p := randomParams(s, rng, c.biases, c.norm)
			x := randomRows(rng, c.n*s.Hidden)
			wy := randomRows(rng, c.n*s.Hidden)
			l, err := NewLayer(s, c.n, Gemm[float64](f64.Gemm))
			if err != nil {
				t.Fatal(err)
			}
			w := &Work[float64]{}
			loss := func() float64 {
				y := l.Forward(p, x, c.n, w)
				var sum float64
				for i, v := range y {
					sum += 0.5 * wy[i] * v * wy[i] * v
				}
				return sum
			}
			y := l.Forward(p, x, c.n, w)
			dy := make([]float64, len(y))
			for i, v := range y {
				dy[i] = wy[i] * wy[i] * v
			}
			var g Params[float64]
			for i, tn := range p {
				if tn != nil {
					g[i] = make([]float64, len(tn))
				}
			}
			l.Backward(p, x, w, dy, &g)
			const h = 1e-6
			for ti, tn := range p {
				// Entries far below the tensor's largest (the key bias of
				// kv_b_proj, which the softmax cancels) are compared on its
				// scale rather than their own.
				var scale float64
				for _, v := range g[ti] {
					scale = max(scale, math.Abs(v))
				}
				var worst float64
				for j := range tn {
					orig := tn[j]
					tn[j] = orig + h
					up := loss()
					tn[j] = orig - h
					down := loss()
					tn[j] = orig
					fd := (up - down) / (2 * h)
					if e := math.Abs(fd-g[ti][j]) / (1e-9 + 1e-3*scale + math.Abs(fd)); e > worst {
						worst = e
					}
				}
				if worst > 1e-5 {
					t.Errorf("%s: worst relative gradient error %.2e", TensorName(ti), worst)
				}
			}
		})
	}
}

// TestFitReducesLoss fits a layer, started from perturbed weights, to the
// outputs of the original weights: the held-back loss must fall well below
// where it started, and the kept parameters must be those it reports.
func TestFitReducesLoss(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	s := testShape(true, 0, 4)
	truth := randomParams(s, rng, false, true)
	const seqs, n = 12, 16
	l, err := NewLayer(s, n, Gemm[float64](f64.Gemm))
	if err != nil {
		t.Fatal(err)
	}
	d := Data[float64]{Seqs: seqs, Len: n, X: randomRows(rng, seqs*n*s.Hidden)}
	w := &Work[float64]{}
	for i := range seqs {
		d.Y = append(d.Y, l.Forward(truth, d.X[i*n*s.Hidden:(i+1)*n*s.Hidden], n, w)...)
	}
	p := truth.Clone()
	for _, tn := range p {
		for j := range tn {
			tn[j] *= 1 + 0.3*rng.NormFloat64()
		}
	}
	o := FitOptions{Steps: 150, Batch: 4, LR: 0.02, Val: 3, EvalEvery: 10, Seed: 1, Threads: 2}
	for i := range o.Train {
		o.Train[i] = true
	}
	var calls int
	rep, err := Fit(context.Background(), l, p, d, o, func(step, steps int, loss float64) { calls++ })
	if err != nil {
		t.Fatal(err)
	}
	if calls != rep.Steps || rep.Steps == 0 {
		t.Errorf("progress called %d times for %d steps", calls, rep.Steps)
	}
	if !(rep.ValAfter < 0.2*rep.ValBefore) {
		t.Errorf("held-back loss %.4g → %.4g: want a fall of at least 5×", rep.ValBefore, rep.ValAfter)
	}
	// The reported loss is that of the parameters left in p.
	f := newFitter(l, p, d, o)
	got, err := f.loss(context.Background(), []int{9, 10, 11}, false)
	if err != nil {
		t.Fatal(err)
	}
	if math.Abs(got-rep.ValAfter) > 1e-12*rep.ValAfter {
		t.Errorf("kept parameters score %v, report says %v", got, rep.ValAfter)
	}
	// Deterministic: the same fit again gives the same parameters.
	p2 := truth.Clone()
	rng = rand.New(rand.NewPCG(7, 7))
	_ = randomParams(s, rng, false, true)
	_ = randomRows(rng, seqs*n*s.Hidden)
	for _, tn := range p2 {
		for j := range tn {
			tn[j] *= 1 + 0.3*rng.NormFloat64()
		}
	}
	if _, err := Fit(context.Background(), l, p2, d, o, nil); err != nil {
		t.Fatal(err)
	}
	for i := range p {
		for j := range p[i] {
			if p[i][j] != p2[i][j] {
				t.Fatalf("%s[%d]: %v then %v", TensorName(i), j, p[i][j], p2[i][j])
			}
		}
	}
}

func TestFitRejectsBadInput(t *testing.T) {
	s := testShape(true, 0, 4)
	p := randomParams(s, rand.New(rand.NewPCG(1, 1)), false, false)
	l, err := NewLayer(s, 4, Gemm[float64](f64.Gemm))
	if err != nil {
		t.Fatal(err)
	}
	x := make([]float64, 2*4*s.Hidden)
	good := FitOptions{Steps: 1, Batch: 1, LR: 0.01, Val: 1}
	for _, tc := range []struct {
		name string
		d    Data[float64]
		o    FitOptions
	}{
		{"short targets", Data[float64]{X: x, Y: x[:10], Seqs: 2, Len: 4}, good},
		{"too long", Data[float64]{X: x, Y: x, Seqs: 1, Len: 8}, good},
		{"no held-back", Data[float64]{X: x, Y: x, Seqs: 2, Len: 4}, FitOptions{Steps: 1, Batch: 1, LR: 0.01}},
		{"all held back", Data[float64]{X: x, Y: x, Seqs: 2, Len: 4}, FitOptions{Steps: 1, Batch: 1, LR: 0.01, Val: 2}},
		{"zero rate", Data[float64]{X: x, Y: x, Seqs: 2, Len: 4}, FitOptions{Steps: 1, Batch: 1, Val: 1}},
	} {
		if _, err := Fit(context.Background(), l, p, tc.d, tc.o, nil); err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
	bad := p.Clone()
	bad[KVB] = bad[KVB][:3]
	if _, err := Fit(context.Background(), l, bad, Data[float64]{X: x, Y: x, Seqs: 2, Len: 4}, good, nil); err == nil {
		t.Error("short kv_b_proj: no error")
	}
}

// The closed-form W_UV refit reaches the least-squares optimum: the
// training loss's gradient with respect to W_UV vanishes there (relative
// to where it started) and the loss does not rise.
func TestFitValuesIsStationary(t *testing.T) {
	for _, biases := range []bool{false, true} {
		rng := rand.New(rand.NewPCG(5, 5))
		s := testShape(false, 0, 4)
		truth := randomParams(s, rng, biases, true)
		const seqs, n = 6, 10
		l, err := NewLayer(s, n, Gemm[float64](f64.Gemm))
		if err != nil {
			t.Fatal(err)
		}
		d := Data[float64]{Seqs: seqs, Len: n, X: randomRows(rng, seqs*n*s.Hidden), Y: randomRows(rng, seqs*n*s.Hidden)}
		p := truth.Clone()
		o := FitOptions{Steps: 1, Batch: 1, LR: 0.01, Val: 1, Threads: 2}
		o.Train[KVB] = true
		f := newFitter(l, p, d, o)
		train := []int{0, 1, 2, 3, 4}
		valueGrad := func() (loss, norm float64) {
			loss, err := f.loss(context.Background(), train, true)
			if err != nil {
				t.Fatal(err)
			}
			kvw := s.Nope + s.Value
			for h := range s.Heads {
				for _, v := range f.grad[KVB][(h*kvw+s.Nope)*s.Latent : (h+1)*kvw*s.Latent] {
					norm += v * v
				}
			}
			return loss, math.Sqrt(norm)
		}
		before, g0 := valueGrad()
		if err := f.fitValues(context.Background(), train); err != nil {
			t.Fatal(err)
		}
		after, g1 := valueGrad()
		if after > before {
			t.Errorf("biases %v: training loss rose from %v to %v", biases, before, after)
		}
		if g1 > 1e-5*g0 {
			t.Errorf("biases %v: W_UV gradient %.3g after the refit, %.3g before: not at the optimum", biases, g1, g0)
		}
	}
}
