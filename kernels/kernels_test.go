package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// float32 accumulation over a few hundred terms: a relative tolerance of a
// few hundred ulps of float32 (2^-23 ≈ 1.2e-7).
const tol = 1e-5

func randSlice(rng *rand.Rand, n int) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = float32(rng.NormFloat64())
	}
	return s
}

func assertClose(t *testing.T, what string, got []float32, want []float64) {
	t.Helper()
	var maxErr, maxRef float64
	worst := 0
	for i := range want {
		if math.IsNaN(float64(got[i])) {
			t.Fatalf("%s: NaN at %d (a stray or missing write)", what, i)
		}
		if e := math.Abs(float64(got[i]) - want[i]); e > maxErr {
			maxErr, worst = e, i
		}
		maxRef = math.Max(maxRef, math.Abs(want[i]))
	}
	if maxErr > tol*math.Max(maxRef, 1) {
		t.Fatalf("%s: max abs error %.3g at %d (got %v, want %v), reference scale %.3g", what, maxErr, worst, got[worst], want[worst], maxRef)
	}
}

func TestLinear(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, tc := range []struct {
		name      string
		m, out, k int
		bias      bool
	}{
		{"row", 1, 7, 5, false},
		{"square", 16, 16, 16, true},
		{"tall", 33, 9, 70, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x, w := randSlice(rng, tc.m*tc.k), randSlice(rng, tc.out*tc.k)
			var b []float32
			if tc.bias {
				b = randSlice(rng, tc.out)
			}
			dst := make([]float32, tc.m*tc.out)
			for i := range dst {
				dst[i] = float32(math.NaN())
			}
			Linear(Gonum{}, dst, x, MatF32(tc.out, tc.k, w), b, tc.m)
			want := make([]float64, tc.m*tc.out)
			for r := range tc.m {
				for o := range tc.out {
					var s float64
					for i := range tc.k {
						s += float64(x[r*tc.k+i]) * float64(w[o*tc.k+i])
					}
					if b != nil {
						s += float64(b[o])
					}
					want[r*tc.out+o] = s
				}
			}
			assertClose(t, "linear", dst, want)
		})
	}
}

// RMSNorm, SwiGLU and Add against float64, for a few rows, odd widths
// (vector tails) and a prefill's worth of rows (split over the cores),
// with outputs poisoned first.
func TestRMSNormAndSwiGLU(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, sh := range []struct{ rows, dim int }{{3, 8}, {2, 17}, {5, 100}, {120, 768}, {1, 70001}} {
		x, w := randSlice(rng, sh.rows*sh.dim), randSlice(rng, sh.dim)
		dst, check := poisoned(len(x))
		RMSNorm(dst, x, w, 1e-5)
		check(t)
		want := make([]float64, len(x))
		for r := range sh.rows {
			var ss float64
			for i := range sh.dim {
				ss += float64(x[r*sh.dim+i]) * float64(x[r*sh.dim+i])
			}
			inv := 1 / math.Sqrt(ss/float64(sh.dim)+1e-5)
			for i := range sh.dim {
				want[r*sh.dim+i] = float64(w[i]) * float64(x[r*sh.dim+i]) * inv
			}
		}
		assertClose(t, fmt.Sprintf("rmsnorm %v", sh), dst, want)
		// In place, as the forward pass calls it.
		RMSNorm(x, x, w, 1e-5)
		assertClose(t, fmt.Sprintf("rmsnorm in place %v", sh), x, want)
	}
	for _, n := range []int{10, 31, 1000, 3 * 65536, 3*65536 + 7} {
		g, u := randSlice(rng, n), randSlice(rng, n)
		wantG, wantA := make([]float64, n), make([]float64, n)
		for i := range g {
			gi := float64(g[i])
			wantG[i] = gi / (1 + math.Exp(-gi)) * float64(u[i])
			wantA[i] = float64(float32(wantG[i])) + float64(u[i])
		}
		SwiGLU(g, u)
		assertClose(t, fmt.Sprintf("swiglu %d", n), g, wantG)
		for i := range g {
			g[i] = float32(wantG[i])
		}
		Add(g, u)
		assertClose(t, fmt.Sprintf("add %d", n), g, wantA)
	}
}

// referenceAttention is the textbook definition in float64, one query at a time.
func referenceAttention(a Attention, q, k, v []float32, nq, past int) []float64 {
	d, group := a.HeadDim, a.Heads/a.KVHeads
	dv := a.ValueDim
	if dv == 0 {
		dv = d
	}
	qs, kvs := a.Heads*d, a.KVHeads*d
	vs, os := a.KVHeads*dv, a.Heads*dv
	out := make([]float64, nq*os)
	for i := range nq {
		pos := past + i
		for h := range a.Heads {
			g := h / group
			lo := 0
			if a.Window > 0 {
				lo = max(0, pos-a.Window+1)
			}
			scores := make([]float64, pos+1)
			m := math.Inf(-1)
			for j := lo; j <= pos; j++ {
				var s float64
				for c := range d {
					s += float64(q[i*qs+h*d+c]) * float64(k[j*kvs+g*d+c])
				}
				scores[j] = s * float64(a.Scale)
				m = math.Max(m, scores[j])
			}
			var z float64
			for j := lo; j <= pos; j++ {
				scores[j] = math.Exp(scores[j] - m)
				z += scores[j]
			}
			for j := lo; j <= pos; j++ {
				for c := range dv {
					out[i*os+h*dv+c] += scores[j] / z * float64(v[j*vs+g*dv+c])
				}
			}
		}
	}
	return out
}

func TestCausalAttention(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for _, tc := range []struct {
		name                  string
		heads, kvHeads, d, dv int
		nq, past, window      int
	}{
		{"prefill-mha", 4, 4, 8, 0, 17, 0, 0},
		{"prefill-gqa", 6, 2, 16, 0, 33, 0, 0},
		{"decode-gqa", 8, 2, 8, 0, 1, 40, 0},
		{"chunk-after-past", 4, 1, 8, 0, 5, 12, 0},
		{"sliding-window", 4, 2, 8, 0, 20, 3, 7},
		{"several-query-blocks", 4, 2, 8, 0, 300, 0, 0},
		{"blocks-after-past-windowed", 4, 2, 8, 0, 150, 20, 9},
		{"mla-value-narrower", 4, 4, 12, 8, 30, 5, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := Attention{Heads: tc.heads, KVHeads: tc.kvHeads, HeadDim: tc.d, ValueDim: tc.dv, Window: tc.window, Scale: float32(1 / math.Sqrt(float64(tc.d)))}
			dv := tc.dv
			if dv == 0 {
				dv = tc.d
			}
			total := tc.past + tc.nq
			q := randSlice(rng, tc.nq*tc.heads*tc.d)
			k := randSlice(rng, total*tc.kvHeads*tc.d)
			v := randSlice(rng, total*tc.kvHeads*dv)
			out := make([]float32, tc.nq*tc.heads*dv)
			for i := range out {
				out[i] = float32(math.NaN())
			}
			a.Causal(Gonum{}, out, q, k, v, tc.nq, tc.past)
			assertClose(t, "attention", out, referenceAttention(a, q, k, v, tc.nq, tc.past))
		})
	}
}

func BenchmarkLinear1024x768x768(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 1))
	x, w := randSlice(rng, 1024*768), randSlice(rng, 768*768)
	dst := make([]float32, 1024*768)
	b.SetBytes(int64(4 * (len(x) + len(w) + len(dst))))
	for b.Loop() {
		Linear(Gonum{}, dst, x, MatF32(768, 768, w), nil, 1024)
	}
	b.ReportMetric(2*1024*768*768*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
}
