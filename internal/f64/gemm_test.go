package f64

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// naiveGemm is the textbook triple loop, the oracle.
func naiveGemm(transA, transB bool, m, n, k int, alpha float64, a []float64, lda int, b []float64, ldb int, beta float64, c []float64, ldc int) {
	for i := range m {
		for j := range n {
			var s float64
			for p := range k {
				var av, bv float64
				if transA {
					av = a[p*lda+i]
				} else {
					av = a[i*lda+p]
				}
				if transB {
					bv = b[j*ldb+p]
				} else {
					bv = b[p*ldb+j]
				}
				s += av * bv
			}
			if beta == 0 {
				c[i*ldc+j] = alpha * s
			} else {
				c[i*ldc+j] = alpha*s + beta*c[i*ldc+j]
			}
		}
	}
}

func randSlice(rng *rand.Rand, n int) []float64 {
	s := make([]float64, n)
	for i := range s {
		s[i] = rng.NormFloat64()
	}
	return s
}

// maxRelErr is max |got−want| over the largest |want|.
func maxRelErr(got, want []float64) float64 {
	var e, top float64
	for i := range want {
		e = max(e, math.Abs(got[i]-want[i]))
		top = max(top, math.Abs(want[i]))
	}
	return e / max(top, 1e-300)
}

// Every kernel, on shapes around its tile and block edges, with
// transposes, strides, alpha and beta, against the triple loop.
func TestGemmMatchesNaive(t *testing.T) {
	kernels := []*kernel{goKernel}
	if k := simdKernel(); k != nil {
		kernels = append(kernels, k)
	}
	shapes := [][3]int{{1, 1, 1}, {3, 5, 2}, {14, 16, 9}, {15, 17, 257}, {29, 33, 300}, {113, 40, 31}, {7, 200, 513}, {1, 37, 70}, {37, 1, 70}, {5, 4, 0}}
	rng := rand.New(rand.NewPCG(1, 2))
	for _, kern := range kernels {
		for _, sh := range shapes {
			for _, tr := range [][2]bool{{false, false}, {true, false}, {false, true}, {true, true}} {
				for _, ab := range [][2]float64{{1, 0}, {-0.5, 1}, {2, 0.25}} {
					m, n, k := sh[0], sh[1], sh[2]
					name := fmt.Sprintf("%s/%dx%dx%d/t%v/ab%v", kern.name, m, n, k, tr, ab)
					lda, ldb, ldc := k+3, n+1, n+2
					if tr[0] {
						lda = m + 3
					}
					if tr[1] {
						ldb = k + 1
					}
					ar, br := m, k
					if tr[0] {
						ar = k
					}
					if tr[1] {
						br = n
					}
					a, b := randSlice(rng, max(ar, 1)*lda), randSlice(rng, max(br, 1)*ldb)
					c := randSlice(rng, m*ldc)
					want := append([]float64(nil), c...)
					naiveGemm(tr[0], tr[1], m, n, k, ab[0], a, lda, b, ldb, ab[1], want, ldc)
					for _, threads := range []int{1, 3} {
						got := append([]float64(nil), c...)
						withKernel(kern, func() {
							gemmThreads(threads, tr[0], tr[1], m, n, k, ab[0], a, lda, b, ldb, ab[1], got, ldc)
						})
						if e := maxRelErr(got, want); e > 1e-13 {
							t.Fatalf("%s threads %d: relative error %.3g", name, threads, e)
						}
					}
				}
			}
		}
	}
}

// withKernel runs f with kern as the kernel of every product; tests only.
func withKernel(kern *kernel, f func()) {
	saved := best
	best = kern
	defer func() { best = saved }()
	f()
}

func TestGemmBetaZeroIgnoresNaN(t *testing.T) {
	a, b := []float64{1, 2}, []float64{3, 4}
	c := []float64{math.NaN()}
	Gemm(false, false, 1, 1, 2, 1, a, 2, b, 1, 0, c, 1)
	if c[0] != 11 {
		t.Fatalf("got %v, want 11", c[0])
	}
}

func TestGemmPanicsOnShortSlices(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("no panic")
		}
	}()
	Gemm(false, false, 2, 2, 2, 1, make([]float64, 3), 2, make([]float64, 4), 2, 0, make([]float64, 4), 2)
}

func TestGemvMatchesNaive(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	kernels := []*kernel{goKernel}
	if k := simdKernel(); k != nil {
		kernels = append(kernels, k)
	}
	for _, kern := range kernels {
		for _, sh := range [][2]int{{1, 1}, {5, 3}, {9, 17}, {130, 257}, {1000, 300}} {
			m, n := sh[0], sh[1]
			a, x, y := randSlice(rng, m*(n+2)), randSlice(rng, n), randSlice(rng, m)
			for _, beta := range []float64{0, 0.5} {
				want := append([]float64(nil), y...)
				naiveGemm(false, false, m, 1, n, 1.5, a, n+2, x, 1, beta, want, 1)
				got := append([]float64(nil), y...)
				withKernel(kern, func() { Gemv(m, n, 1.5, a, n+2, x, beta, got) })
				if e := maxRelErr(got, want); e > 1e-13 {
					t.Fatalf("%s %dx%d beta %v: relative error %.3g", kern.name, m, n, beta, e)
				}
			}
		}
	}
}

func BenchmarkGemm(b *testing.B) {
	for _, sh := range [][3]int{{1984, 1984, 4097}, {512, 4097, 1984}, {4096, 4097, 4097}} {
		m, n, k := sh[0], sh[1], sh[2]
		rng := rand.New(rand.NewPCG(5, 6))
		x, y, c := randSlice(rng, m*k), randSlice(rng, n*k), make([]float64, m*n)
		b.Run(fmt.Sprintf("%s/%dx%dx%d", Kernel(), m, n, k), func(b *testing.B) {
			for b.Loop() {
				Gemm(false, true, m, n, k, 1, x, k, y, k, 0, c, n)
			}
			b.ReportMetric(2*float64(m)*float64(n)*float64(k)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
	}
}

func TestSyrkMatchesNaive(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	for _, sh := range [][2]int{{1, 1}, {5, 3}, {syrkBlock + 7, 40}, {2*syrkBlock + 1, 9}} {
		n, k := sh[0], sh[1]
		a := randSlice(rng, n*(k+1))
		want := make([]float64, n*(n+2))
		naiveGemm(false, true, n, n, k, 0.5, a, k+1, a, k+1, 0, want, n+2)
		got := randSlice(rng, n*(n+2)) // overwritten
		Syrk(n, k, 0.5, a, k+1, got, n+2)
		for i := range n {
			for j := range n {
				if e := math.Abs(got[i*(n+2)+j] - want[i*(n+2)+j]); e > 1e-12*(1+math.Abs(want[i*(n+2)+j])) {
					t.Fatalf("%dx%d: entry (%d,%d) = %v, want %v", n, k, i, j, got[i*(n+2)+j], want[i*(n+2)+j])
				}
			}
		}
	}
}

func TestGemvTMatchesNaive(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	kernels := []*kernel{goKernel}
	if k := simdKernel(); k != nil {
		kernels = append(kernels, k)
	}
	for _, kern := range kernels {
		for _, sh := range [][2]int{{1, 1}, {5, 3}, {9, 17}, {130, 257}} {
			m, n := sh[0], sh[1]
			a, x, y := randSlice(rng, m*(n+2)), randSlice(rng, m), randSlice(rng, n)
			want := append([]float64(nil), y...)
			naiveGemm(true, false, n, 1, m, -1.5, a, n+2, x, 1, 1, want, 1)
			got := append([]float64(nil), y...)
			withKernel(kern, func() { GemvT(m, n, -1.5, a, n+2, x, got) })
			if e := maxRelErr(got, want); e > 1e-13 {
				t.Fatalf("%s %dx%d: relative error %.3g", kern.name, m, n, e)
			}
		}
	}
}

func TestSymvUpperMatchesNaive(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	kernels := []*kernel{goKernel}
	if k := simdKernel(); k != nil {
		kernels = append(kernels, k)
	}
	for _, kern := range kernels {
		for _, m := range []int{1, 2, 9, 31, 300, 1100} {
			lds := m + 3
			s := randSlice(rng, m*lds)
			full := make([]float64, m*m) // the symmetric matrix the upper triangle stands for
			for i := range m {
				for j := i; j < m; j++ {
					full[i*m+j], full[j*m+i] = s[i*lds+j], s[i*lds+j]
				}
				for j := range i {
					s[i*lds+j] = math.NaN() // never read
				}
			}
			x := randSlice(rng, m)
			want := make([]float64, m)
			naiveGemm(false, false, m, 1, m, 1, full, m, x, 1, 0, want, 1)
			got := randSlice(rng, m)
			withKernel(kern, func() { SymvUpper(m, s, lds, x, got) })
			if e := maxRelErr(got, want); e > 1e-13 {
				t.Fatalf("%s m %d: relative error %.3g", kern.name, m, e)
			}
		}
	}
}
