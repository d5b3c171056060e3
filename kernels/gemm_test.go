package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// refGemm is sgemm in float64, the textbook triple loop.
func refGemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) []float64 {
	out := make([]float64, len(c))
	for i, v := range c {
		out[i] = float64(v)
	}
	for i := range m {
		for j := range n {
			var s float64
			for p := range k {
				ai, bi := i*lda+p, p*ldb+j
				if transA {
					ai = p*lda + i
				}
				if transB {
					bi = j*ldb + p
				}
				av, bv := a[ai], b[bi]
				s += float64(av) * float64(bv)
			}
			o := i*ldc + j
			if beta == 0 {
				out[o] = float64(alpha) * s
			} else {
				out[o] = float64(alpha)*s + float64(beta)*float64(c[o])
			}
		}
	}
	return out
}

// gemmCase is one product; pad is added to every leading dimension.
type gemmCase struct {
	m, n, k     int
	pad         int
	alpha, beta float32
}

var gemmCases = []gemmCase{
	{0, 5, 3, 0, 1, 0},
	{4, 0, 3, 0, 1, 0},
	{3, 4, 0, 1, 1, 0},   // k = 0: C = beta·C, here zeros over NaN
	{3, 4, 0, 0, 2, 0.5}, // k = 0 with beta
	{1, 1, 1, 0, 1, 0},
	{1, 37, 19, 3, 1, 0},     // a row (matrix-vector)
	{1, 130, 200, 0, 0.5, 1}, // a row, accumulating
	{2, 33, 17, 2, 1, 0},
	{5, 7, 3, 0, 1.5, 0},
	{13, 31, 29, 1, 1, 0},
	{14, 32, 64, 0, 1, 0},     // exactly one AVX-512 tile
	{15, 33, 65, 5, -1, 0.25}, // one past it
	{29, 70, 1300, 3, 1, 1},   // k over one cache block: two of 650
	{64, 64, 64, 0, 0.125, 0},
	{200, 48, 33, 7, 1, 0},     // split over rows
	{40, 300, 257, 1, 2, -0.5}, // split over columns
	{171, 2100, 40, 0, 1, 0},   // columns over one nc block
	{350, 90, 520, 9, 1, 1},    // rows over one mc block
	{100, 40, 2100, 0, 1, 0.5}, // rows over one mc block, k in three kc blocks of 700
}

func TestGemm(t *testing.T) {
	kerns := append([]*gemmKernel{goKernel}, simdKernels()...)
	rng := rand.New(rand.NewPCG(7, 8))
	for _, kern := range kerns {
		for _, threads := range []int{1, 2, 3} {
			be := &Native{Threads: threads, kernel: kern}
			for _, tc := range gemmCases {
				for _, tr := range [][2]bool{{false, false}, {false, true}, {true, false}, {true, true}} {
					name := fmt.Sprintf("%s/t%d/%dx%dx%d/pad%d/a%g/b%g/%v", kern.name, threads, tc.m, tc.n, tc.k, tc.pad, tc.alpha, tc.beta, tr)
					t.Run(name, func(t *testing.T) {
						runGemmCase(t, rng, be, tr[0], tr[1], tc)
					})
				}
			}
		}
	}
}

func runGemmCase(t *testing.T, rng *rand.Rand, be Backend, transA, transB bool, tc gemmCase) {
	t.Helper()
	ar, ac := tc.m, tc.k
	if transA {
		ar, ac = tc.k, tc.m
	}
	br, bc := tc.k, tc.n
	if transB {
		br, bc = tc.n, tc.k
	}
	lda, ldb, ldc := ac+tc.pad, bc+tc.pad, tc.n+tc.pad
	a := randSlice(rng, max(0, ar*lda))
	b := randSlice(rng, max(0, br*ldb))
	c := randSlice(rng, max(0, tc.m*ldc))
	if tc.beta == 0 {
		for i := range c {
			c[i] = float32(math.NaN()) // must be overwritten, not scaled
		}
	}
	want := refGemm(transA, transB, tc.m, tc.n, tc.k, tc.alpha, a, lda, b, ldb, tc.beta, c, ldc)
	// Padding between rows must stay untouched.
	for i := range tc.m {
		for j := tc.n; j < ldc; j++ {
			c[i*ldc+j] = 0.5
			want[i*ldc+j] = 0.5
		}
	}
	be.Gemm(transA, transB, tc.m, tc.n, tc.k, tc.alpha, a, lda, b, ldb, tc.beta, c, ldc)
	assertClose(t, "gemm", c, want)
}

// TestBackends runs every available backend over the same cases.
func TestBackends(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	for _, name := range BackendNames() {
		be, err := Select(name)
		if err != nil {
			t.Logf("%s: %v", name, err)
			continue
		}
		for _, tc := range gemmCases {
			for _, tr := range [][2]bool{{false, false}, {false, true}, {true, false}, {true, true}} {
				t.Run(fmt.Sprintf("%s/%dx%dx%d/%v", name, tc.m, tc.n, tc.k, tr), func(t *testing.T) {
					runGemmCase(t, rng, be, tr[0], tr[1], tc)
				})
			}
		}
	}
}

// TestAuto drives Auto's per-shape measurement with two backends that are
// always present, and checks that every call, timed or not, is right.
func TestAuto(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 16))
	a := &Auto{native: NewNative(), other: Gonum{}, choice: map[shapeKey]*shapeStats{}}
	tc := gemmCase{m: 40, n: 50, k: 60, pad: 1, alpha: 1, beta: 0}
	for range 2*trialsPerBackend + 2 {
		runGemmCase(t, rng, a, false, true, tc)
	}
	st := a.choice[shapeKey{false, true, 64, 50, 60}]
	if st == nil || st.winner < 0 {
		t.Fatalf("no backend chosen after %d calls: %+v", 2*trialsPerBackend+2, st)
	}
	if s := serialBackend(a); s.Name() != "go" {
		t.Errorf("serial view of auto is %s, want go", s.Name())
	}
}

// Empty products (m or n zero) are not timed: a time per row of C of an
// empty C is no measurement, and must not decide a shape's backend.
func TestAutoIgnoresEmptyProducts(t *testing.T) {
	a := &Auto{native: NewNative(), other: Gonum{}, choice: map[shapeKey]*shapeStats{}}
	for range 2*trialsPerBackend + 2 {
		a.Gemm(false, true, 0, 8, 8, 1, nil, 8, make([]float32, 64), 8, 0, nil, 8)
	}
	for key, st := range a.choice {
		t.Errorf("shape %+v recorded from empty products: %+v", key, st)
	}
}
