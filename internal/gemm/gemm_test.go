package gemm

import (
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
)

// naiveTile is a plain-loop Tile of mr×nr, the micro-kernel for tests.
func naiveTile[T Float](mr, nr int) Tile[T] {
	return func(kc int, a, b, c []T, ldc int, alpha T, overwrite int) {
		for i := range mr {
			for j := range nr {
				var s T
				for p := range kc {
					s += a[p*mr+i] * b[p*nr+j]
				}
				if overwrite != 0 {
					c[i*ldc+j] = alpha * s
				} else {
					c[i*ldc+j] += alpha * s
				}
			}
		}
	}
}

// product packs op(A) and op(B) whole and runs Macro over C, as a
// single-block driver would.
func product[T Float](mr, nr int, transA, transB bool, m, n, k int, alpha T, a, b, c []T, overwrite bool) {
	lda, ldb := k, n
	if transA {
		lda = m
	}
	if transB {
		ldb = k
	}
	mp, np := (m+mr-1)/mr*mr, (n+nr-1)/nr*nr
	// Stale values in the buffers, as reused ones hold: padding must
	// overwrite them.
	ap, bp, edge := filled[T](mp*k), filled[T](np*k), filled[T](mr*nr)
	PackA(InterleaveGo[T], ap, transA, a, lda, 0, 0, m, k, mr, 0, m)
	PackB(InterleaveGo[T], bp, transB, b, ldb, 0, 0, k, n, nr, 0, n)
	ow := 0
	if overwrite {
		ow = 1
	}
	Macro(naiveTile[T](mr, nr), mr, nr, k, m, n, 0, n, alpha, ap, bp, c, n, ow, edge)
}

// filled returns n NaNs.
func filled[T Float](n int) []T {
	s := make([]T, n)
	for i := range s {
		s[i] = T(math.NaN())
	}
	return s
}

// TestPackAndMacro checks packing (both transposes, edge panels, rows of
// more than 16) and the macro loop (full and edge tiles, overwrite and
// accumulate) against a float64 triple loop, for both element types.
func TestPackAndMacro(t *testing.T) {
	for _, tc := range []struct{ mr, nr, m, n, k int }{
		{4, 8, 1, 1, 1}, {4, 8, 4, 8, 3}, {4, 8, 9, 17, 5}, {14, 32, 30, 70, 20}, {6, 16, 5, 40, 33}, {4, 4, 13, 7, 2},
	} {
		for _, tr := range [][2]bool{{false, false}, {true, false}, {false, true}, {true, true}} {
			for _, overwrite := range []bool{true, false} {
				name := fmt.Sprintf("%dx%d/%dx%dx%d/tA=%v,tB=%v/ow=%v", tc.mr, tc.nr, tc.m, tc.n, tc.k, tr[0], tr[1], overwrite)
				t.Run(name+"/f32", func(t *testing.T) {
					checkProduct[float32](t, tc.mr, tc.nr, tr[0], tr[1], tc.m, tc.n, tc.k, overwrite, 1e-5)
				})
				t.Run(name+"/f64", func(t *testing.T) {
					checkProduct[float64](t, tc.mr, tc.nr, tr[0], tr[1], tc.m, tc.n, tc.k, overwrite, 1e-13)
				})
			}
		}
	}
}

func checkProduct[T Float](t *testing.T, mr, nr int, transA, transB bool, m, n, k int, overwrite bool, tol float64) {
	rng := rand.New(rand.NewPCG(uint64(m*1000+n), uint64(k)))
	rnd := func(n int) []T {
		s := make([]T, n)
		for i := range s {
			s[i] = T(rng.NormFloat64())
		}
		return s
	}
	a, b, c := rnd(m*k), rnd(k*n), rnd(m*n)
	at := func(i, p int) float64 {
		if transA {
			return float64(a[p*m+i])
		}
		return float64(a[i*k+p])
	}
	bt := func(p, j int) float64 {
		if transB {
			return float64(b[j*k+p])
		}
		return float64(b[p*n+j])
	}
	const alpha = 0.75
	want := make([]float64, m*n)
	for i := range m {
		for j := range n {
			var s float64
			for p := range k {
				s += at(i, p) * bt(p, j)
			}
			want[i*n+j] = alpha * s
			if !overwrite {
				want[i*n+j] += float64(c[i*n+j])
			}
		}
	}
	product(mr, nr, transA, transB, m, n, k, T(alpha), a, b, c, overwrite)
	for i, w := range want {
		if d := math.Abs(float64(c[i]) - w); d > tol*(1+math.Abs(w))*float64(k) {
			t.Fatalf("C[%d,%d] = %v, want %v", i/n, i%n, c[i], w)
		}
	}
}

func TestScale(t *testing.T) {
	nan := math.NaN()
	c := []float64{nan, 2, 9, 4, 5, 9}
	Scale(2, 2, 0, c, 3)
	if c[0] != 0 || c[1] != 0 || c[3] != 0 || c[4] != 0 || c[2] != 9 || c[5] != 9 {
		t.Errorf("Scale by 0 gave %v, want zeros in the 2×2 corner (not 0·NaN) and the rest kept", c)
	}
	d := []float32{1, 2, 7, 3, 4, 7}
	Scale(2, 2, 2, d, 3)
	if want := []float32{2, 4, 7, 6, 8, 7}; fmt.Sprint(d) != fmt.Sprint(want) {
		t.Errorf("Scale by 2 gave %v, want %v", d, want)
	}
}

func TestCheckShapes(t *testing.T) {
	for _, tc := range []struct {
		name           string
		transA, transB bool
		m, n, k        int
		la, lda        int
		lb, ldb        int
		lc, ldc        int
		want           string // "" = no panic
	}{
		{"fits", false, false, 2, 3, 4, 8, 4, 12, 3, 6, 3, ""},
		{"fits transposed", true, true, 2, 3, 4, 8, 2, 12, 4, 6, 3, ""},
		{"one row, short stride", false, false, 1, 3, 4, 4, 1, 12, 3, 3, 1, ""},
		{"negative", false, false, -1, 3, 4, 8, 4, 12, 3, 6, 3, "t: negative gemm size -1×3×4"},
		{"A short", false, false, 2, 3, 4, 7, 4, 12, 3, 6, 3, "t: gemm A of 2×4 with stride 4 needs 8 values, has 7"},
		{"B stride", false, false, 2, 3, 4, 8, 4, 12, 2, 6, 3, "t: gemm B of 4×3 with stride 2"},
		{"C short", false, false, 2, 3, 4, 8, 4, 12, 3, 5, 3, "t: gemm C of 2×3 with stride 3 needs 6 values, has 5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := func() (msg string) {
				defer func() {
					if r := recover(); r != nil {
						msg = fmt.Sprint(r)
					}
				}()
				CheckShapes("t", tc.transA, tc.transB, tc.m, tc.n, tc.k, make([]float32, tc.la), tc.lda, make([]float32, tc.lb), tc.ldb, make([]float32, tc.lc), tc.ldc)
				return ""
			}()
			if (tc.want == "") != (got == "") || !strings.HasPrefix(got, tc.want) {
				t.Errorf("panic %q, want %q", got, tc.want)
			}
		})
	}
}
