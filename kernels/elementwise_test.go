package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"time"
)

// TestExp checks the float32 exponentials, scalar and vector, against
// math.Exp over the whole range where e^x is a normal float32.
func TestExp(t *testing.T) {
	var xs []float32
	for x := -87.0; x < 88.3; x += 0.0137 {
		xs = append(xs, float32(x))
	}
	xs = append(xs, 0, -0, 1e-8, -1e-8, 0.5*float32(math.Ln2), -0.5*float32(math.Ln2))
	for name, exp := range map[string]func([]float32) []float32{
		"scalar": func(xs []float32) []float32 {
			out := make([]float32, len(xs))
			for i, x := range xs {
				out[i] = expf(x)
			}
			return out
		},
		"vector": func(xs []float32) []float32 {
			out := make([]float32, len(xs))
			for i, x := range xs {
				row := []float32{x, 0}
				if !expRowSIMD(row) {
					out[i] = expf(x)
					continue
				}
				out[i] = row[0]
			}
			return out
		},
	} {
		got := exp(xs)
		var worst float64
		for i, x := range xs {
			want := math.Exp(float64(x))
			worst = math.Max(worst, math.Abs(float64(got[i])-want)/want)
		}
		if worst > 1e-6 {
			t.Errorf("%s exp: max relative error %.3g, want < 1e-6", name, worst)
		}
	}
	for _, x := range []float32{-1000, -104, float32(math.Inf(-1))} {
		if e := expf(x); e != 0 && e > 1e-44 {
			t.Errorf("expf(%g) = %g, want ~0", x, e)
		}
	}
}

func TestSoftmaxAndSwiGLULengths(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	for _, n := range []int{1, 2, 15, 16, 17, 31, 33, 100, 1025} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			x := randSlice(rng, n)
			for i := range x {
				x[i] *= 8
			}
			if n > 3 {
				x[2] = -1e30 // underflows to 0, must not poison the sum
			}
			want := make([]float64, n)
			m := math.Inf(-1)
			for _, v := range x {
				m = math.Max(m, float64(v))
			}
			var z float64
			for i, v := range x {
				want[i] = math.Exp(float64(v) - m)
				z += want[i]
			}
			for i := range want {
				want[i] /= z
			}
			SoftmaxInPlace(x)
			assertClose(t, "softmax", x, want)

			g, u := randSlice(rng, n), randSlice(rng, n+3)
			for i := range g {
				g[i] *= 10
			}
			wantG := make([]float64, n)
			for i := range g {
				gi := float64(g[i])
				wantG[i] = gi / (1 + math.Exp(-gi)) * float64(u[i])
			}
			SwiGLU(g, u)
			assertClose(t, "swiglu", g, wantG)
		})
	}
	SoftmaxInPlace(nil)
	SwiGLU(nil, nil)
}

// TestInterleave checks each kernel's panel-packing copy on its own.
func TestInterleave(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	for _, kern := range append([]*gemmKernel{goKernel}, simdKernels()...) {
		for _, tc := range []struct{ kc, ld, rows, stride int }{
			{1, 1, 1, 1}, {15, 20, 14, 14}, {16, 16, 16, 32}, {37, 40, 16, 16}, {256, 300, 14, 14}, {70, 77, 5, 8},
		} {
			src := randSlice(rng, (tc.rows-1)*tc.ld+tc.kc)
			dst := make([]float32, (tc.kc-1)*tc.stride+tc.rows)
			kern.interleave(tc.kc, src, tc.ld, tc.rows, dst, tc.stride)
			for p := range tc.kc {
				for i := range tc.rows {
					if got, want := dst[p*tc.stride+i], src[i*tc.ld+p]; got != want {
						t.Fatalf("%s %+v: dst[%d·%d+%d] = %g, want %g", kern.name, tc, p, tc.stride, i, got, want)
					}
				}
			}
		}
	}
}

// RMSNorm with no weights has no rows to normalise: it returns, leaving
// dst alone, instead of stepping through x by zero forever.
func TestRMSNormEmptyWeight(t *testing.T) {
	done := make(chan struct{})
	dst := []float32{7, 7}
	go func() {
		RMSNorm(dst, []float32{1, 2}, nil, 1e-5)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("RMSNorm with an empty weight did not return")
	}
	if dst[0] != 7 || dst[1] != 7 {
		t.Errorf("dst %v changed", dst)
	}
}

// SumExp64 against float64 math.Exp term by term, for lengths around the
// vector widths, logits near the maximum and far below it (down to where
// e^x underflows), and a NaN, which must come out as NaN.
func TestSumExp64(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	for _, n := range []int{1, 3, 7, 8, 9, 15, 16, 17, 31, 100, 4096, 4101} {
		for _, spread := range []float64{1, 30, 800} {
			x := make([]float32, n)
			for i := range x {
				x[i] = float32(spread * rng.NormFloat64())
			}
			m := MaxOf(x)
			var want float64
			for _, v := range x {
				want += math.Exp(float64(v) - float64(m))
			}
			got := SumExp64(x, m)
			if e := math.Abs(got-want) / want; !(e < 1e-14) {
				t.Errorf("n %d spread %v: %v, want %v (relative error %.3g)", n, spread, got, want, e)
			}
		}
	}
	x := []float32{1, 2, float32(math.NaN()), 3, 4, 5, 6, 7, 8, 9}
	if s := SumExp64(x, 9); !math.IsNaN(s) {
		t.Errorf("a NaN logit gives %v", s)
	}
}
