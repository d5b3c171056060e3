package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/transmla/transmla/safetensors"
)

// randMat returns a rows×cols matrix of dtype dt with Gaussian values and
// the float32 values it holds (exact for every dtype).
func randMat(rng *rand.Rand, rows, cols int, dt RowDType) (Mat, []float32) {
	w := randSlice(rng, rows*cols)
	switch dt {
	case RowBF16, RowF16:
		bits := make([]uint16, len(w))
		for i, v := range w {
			if dt == RowBF16 {
				bits[i] = safetensors.Float32ToBF16(v)
				w[i] = safetensors.BF16ToFloat32(bits[i])
			} else {
				bits[i] = safetensors.Float32ToF16(v)
				w[i] = safetensors.F16ToFloat32(bits[i])
			}
		}
		return Mat16(rows, cols, dt, bits), w
	}
	return MatF32(rows, cols, w), w
}

// poisoned returns n values of NaN followed by guard values of NaN that
// a kernel must leave alone; check reports a guard that changed.
func poisoned(n int) (dst []float32, check func(t *testing.T)) {
	const guard = 17
	buf := make([]float32, n+guard)
	for i := range buf {
		buf[i] = float32(math.NaN())
	}
	return buf[:n], func(t *testing.T) {
		t.Helper()
		for i, v := range buf[n:] {
			if !math.IsNaN(float64(v)) {
				t.Fatalf("write past the output at %d: %v", n+i, v)
			}
		}
	}
}

// kernelVariants runs f with each of the CPU's 16-bit vector kernels and
// with the portable code.
func kernelVariants(t *testing.T, f func(t *testing.T)) {
	saved := simd16
	defer func() { simd16 = saved }()
	for _, k := range gemv16Kernels() {
		simd16 = k
		t.Run(k.name, f)
	}
	simd16 = nil
	t.Run("portable", f)
}

// TestProject checks every dtype of weights, with odd sizes and biases,
// single rows (the fused matrix-vector pass) and several (packed
// products), on every backend, against float64 products of the widened
// weights; outputs start as NaN with guards behind them.
func TestProject(t *testing.T) {
	backends := []Backend{NewNative(), &Native{Threads: 1}, Serial(NewNative()), &Native{kernel: goKernel}, Gonum{}}
	kernelVariants(t, func(t *testing.T) {
		rng := rand.New(rand.NewPCG(5, 6))
		for _, dt := range []RowDType{RowBF16, RowF16, RowF32} {
			for _, k := range []int{1, 5, 16, 31, 32, 33, 47, 64, 100, 768} {
				for _, m := range []int{1, 2, 7, 33} {
					rows := []int{1, 3, 4, 5, 9, 67, 260}
					ws := make([]Mat, len(rows))
					vals := make([][]float32, len(rows))
					bias := make([][]float32, len(rows))
					for i, n := range rows {
						ws[i], vals[i] = randMat(rng, n, k, dt)
						if i%2 == 1 {
							bias[i] = randSlice(rng, n)
						}
					}
					x := randSlice(rng, m*k)
					for bi, be := range backends {
						name := fmt.Sprintf("%s/k%d/m%d/%s%d", dt, k, m, be.Name(), bi)
						// Three projections at a time, as q, k and v go.
						for i0 := 0; i0 < len(rows); i0 += 3 {
							var ps []Projection
							var checks []func(*testing.T)
							for i := i0; i < min(i0+3, len(rows)); i++ {
								dst, check := poisoned(m * rows[i])
								ps = append(ps, Projection{W: ws[i], B: bias[i], Dst: dst})
								checks = append(checks, check)
							}
							Project(be, x, m, ps...)
							for j, p := range ps {
								i := i0 + j
								for _, c := range checks {
									c(t)
								}
								want := make([]float64, m*rows[i])
								for r := range m {
									for o := range rows[i] {
										var s float64
										for c := range k {
											s += float64(x[r*k+c]) * float64(vals[i][o*k+c])
										}
										if bias[i] != nil {
											s += float64(bias[i][o])
										}
										want[r*rows[i]+o] = s
									}
								}
								assertClose(t, fmt.Sprintf("%s/rows%d", name, rows[i]), p.Dst, want)
							}
						}
					}
				}
			}
		}
	})
}

// TestMatMul checks the strided products of the absorbed MLA path,
// a·W and a·Wᵀ for slices of a larger 16-bit matrix, against float64.
func TestMatMul(t *testing.T) {
	kernelVariants(t, func(t *testing.T) {
		rng := rand.New(rand.NewPCG(7, 8))
		for _, dt := range []RowDType{RowBF16, RowF16, RowF32} {
			for _, sh := range []struct{ m, rows, cols int }{{1, 5, 3}, {1, 128, 192}, {1, 33, 300}, {3, 17, 40}, {20, 128, 64}} {
				w, vals := randMat(rng, sh.rows+6, sh.cols, dt)
				w, vals = w.Slice(3, 3+sh.rows), vals[3*sh.cols:(3+sh.rows)*sh.cols]
				for _, trans := range []bool{false, true} {
					n, k := sh.cols, sh.rows
					if trans {
						n, k = sh.rows, sh.cols
					}
					lda, ldc := k+5, n+3
					a := randSlice(rng, (sh.m-1)*lda+k)
					c, check := poisoned((sh.m-1)*ldc + n)
					for _, be := range []Backend{NewNative(), Serial(NewNative()), Gonum{}} {
						MatMul(be, sh.m, a, lda, w, trans, c, ldc)
						check(t)
						got := make([]float32, sh.m*n)
						want := make([]float64, sh.m*n)
						for i := range sh.m {
							copy(got[i*n:], c[i*ldc:i*ldc+n])
							for j := range n {
								var s float64
								for p := range k {
									var wv float32
									if trans {
										wv = vals[j*sh.cols+p]
									} else {
										wv = vals[p*sh.cols+j]
									}
									s += float64(a[i*lda+p]) * float64(wv)
								}
								want[i*n+j] = s
							}
						}
						assertClose(t, fmt.Sprintf("%s/%v/trans=%v/%s", dt, sh, trans, be.Name()), got, want)
					}
				}
			}
		}
	})
}

// TestPackedProductIsExact checks that a 16-bit weight matrix gives the
// same bits as its widened float32 copy in packed (prefill) products: the
// widening is exact and the panels are the same, so perplexities do not
// move when weights stay bf16.
func TestPackedProductIsExact(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	for _, dt := range []RowDType{RowBF16, RowF16} {
		for _, sh := range []struct{ m, n, k int }{{64, 96, 300}, {200, 37, 520}, {2, 5, 7}} {
			w, vals := randMat(rng, sh.n, sh.k, dt)
			x := randSlice(rng, sh.m*sh.k)
			got, want := make([]float32, sh.m*sh.n), make([]float32, sh.m*sh.n)
			be := NewNative()
			Linear(be, got, x, w, nil, sh.m)
			Linear(be, want, x, MatF32(sh.n, sh.k, vals), nil, sh.m)
			for i := range got {
				if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
					t.Fatalf("%s %v: element %d is %v, float32 weights give %v", dt, sh, i, got[i], want[i])
				}
			}
		}
	}
}

// TestWidenF16 compares the vector conversion of every half value with the
// exact scalar one.
func TestWidenF16(t *testing.T) {
	src := make([]uint16, 1<<16+7)
	for i := range src {
		src[i] = uint16(i)
	}
	dst := make([]float32, len(src))
	widenF16(dst, src)
	for i, h := range src {
		want := safetensors.F16ToFloat32(h)
		if math.Float32bits(dst[i]) != math.Float32bits(want) && !(math.IsNaN(float64(want)) && math.IsNaN(float64(dst[i]))) {
			t.Fatalf("half %#04x: got %v (%#08x), want %v (%#08x)", h, dst[i], math.Float32bits(dst[i]), want, math.Float32bits(want))
		}
	}
}

// TestDecodeProductAllocatesNothing: the single-row products of a decode
// step reuse their scratch.
func TestDecodeProductAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts under the race detector mean nothing (sync.Pool drops items)")
	}
	rng := rand.New(rand.NewPCG(11, 12))
	be := NewNative()
	for _, dt := range []RowDType{RowBF16, RowF16, RowF32} {
		q, _ := randMat(rng, 768, 768, dt)
		k, _ := randMat(rng, 256, 768, dt)
		x := randSlice(rng, 768)
		dq, dk := make([]float32, 768), make([]float32, 256)
		bias := randSlice(rng, 256)
		allocs := testing.AllocsPerRun(50, func() {
			Project(be, x, 1, Projection{W: q, Dst: dq}, Projection{W: k, B: bias, Dst: dk})
		})
		if allocs != 0 {
			t.Errorf("%s: %v allocations per projection", dt, allocs)
		}
	}
}

// TestMatMulHeads checks the per-head products of the absorbed MLA path
// (every head's rows interleaved in a and c, as q and the latents are)
// against MatMul head by head, which TestMatMul checks against float64.
func TestMatMulHeads(t *testing.T) {
	kernelVariants(t, func(t *testing.T) {
		rng := rand.New(rand.NewPCG(15, 16))
		for _, dt := range []RowDType{RowBF16, RowF16, RowF32} {
			for _, m := range []int{1, 3} {
				for _, trans := range []bool{false, true} {
					const H, rows, cols = 5, 40, 72
					w, _ := randMat(rng, H*rows, cols, dt)
					ws := make([]Mat, H)
					for h := range ws {
						ws[h] = w.Slice(h*rows, (h+1)*rows)
					}
					n, k := cols, rows
					if trans {
						n, k = rows, cols
					}
					aStep, cStep := k+3, n+1
					lda, ldc := H*aStep, H*cStep
					a := randSlice(rng, m*lda)
					got, check := poisoned(m * ldc)
					want := make([]float32, m*ldc)
					copy(want, got)
					MatMulHeads(NewNative(), m, a, lda, aStep, ws, trans, got, ldc, cStep)
					check(t)
					for h := range H {
						MatMul(Gonum{}, m, a[h*aStep:], lda, ws[h], trans, want[h*cStep:], ldc)
					}
					ref := make([]float64, len(want))
					for i, v := range want {
						ref[i] = float64(v)
					}
					// Columns between heads stay poisoned in both.
					for i := range got {
						if math.IsNaN(float64(want[i])) != math.IsNaN(float64(got[i])) {
							t.Fatalf("%s m%d trans %v: element %d is %v, want %v", dt, m, trans, i, got[i], want[i])
						}
						if math.IsNaN(float64(want[i])) {
							got[i], ref[i] = 0, 0
						}
					}
					assertClose(t, fmt.Sprintf("%s m%d trans %v", dt, m, trans), got, ref)
				}
			}
		}
	})
}

// Empty products: a projection of no input columns is its bias (zeros
// without one), in every dtype and for one row and several; a projection
// of no rows writes nothing.
func TestProjectEmpty(t *testing.T) {
	bias := []float32{1, -2, 3}
	for _, w := range []Mat{MatF32(3, 0, nil), Mat16(3, 0, RowBF16, nil), Mat16(3, 0, RowF16, nil)} {
		for _, m := range []int{1, 2} {
			dst := make([]float32, 3*m)
			for i := range dst {
				dst[i] = float32(math.NaN())
			}
			Project(NewNative(), nil, m, Projection{W: w, B: bias, Dst: dst})
			for i, v := range dst {
				if v != bias[i%3] {
					t.Errorf("%v, %d rows: dst %v, want the bias %v per row", w.DType(), m, dst, bias)
					break
				}
			}
		}
	}
	Project(NewNative(), []float32{1, 2}, 1, Projection{W: Mat16(0, 2, RowBF16, nil), Dst: nil})
}
