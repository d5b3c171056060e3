// Package f64 is the float64 matrix arithmetic of the conversion: a
// cache-blocked, panel-packing GEMM on assembly micro-kernels (AVX-512 or
// AVX2/FMA, chosen once from the CPU; a portable Go kernel elsewhere),
// split across goroutines, and the products built on it.
//
// Matrices are row-major slices with a row stride, as in BLAS.
package f64

import (
	"math"
	"runtime"
	"sync"

	"github.com/transmla/transmla/internal/gemm"
)

// kernel is one register-tile micro-kernel.
type kernel struct {
	name   string
	mr, nr int // the tile: mr rows by nr columns of C
	// tile accumulates the mr×nr product of packed panels (kc steps of mr
	// values of A, kc steps of nr values of B) and stores C = alpha·acc
	// when overwrite ≠ 0, else C += alpha·acc, at c[0] with row stride ldc.
	// Callers guarantee len(a) ≥ kc·mr, len(b) ≥ kc·nr and
	// len(c) ≥ (mr-1)·ldc+nr; the assembly does not check.
	tile func(kc int, a, b, c []float64, ldc int, alpha float64, overwrite int)
	// dot4 writes out[r] = Σ_{p<k} x[p]·a[r·lda+p] for r < 4 and returns
	// the prefix of k it covered; callers finish the rest.
	dot4 func(k int, x, a []float64, lda int, out *[4]float64) int
	// axpy4 adds Σ_{r<4} c[r]·a[r·lda+p] to y[p] for p < n and returns the
	// prefix of n it covered; callers finish the rest.
	axpy4 func(n int, c *[4]float64, a []float64, lda int, y []float64) int
	// dotAxpy returns Σ_{p<q} a[p]·x[p] and adds alpha·a[p] to y[p] for
	// p < q, with q the prefix of n it covered; callers guarantee n > 0.
	dotAxpy func(n int, a, x, y []float64, alpha float64) (float64, int)
}

// goKernel is the portable micro-kernel.
var goKernel = &kernel{name: "generic", mr: 4, nr: 4, tile: tileGo, dot4: gemm.Dot4Go[float64], axpy4: axpy4Go, dotAxpy: dotAxpyGo}

// best is the fastest kernel this CPU runs, chosen once; read-only after.
var best = func() *kernel {
	if k := simdKernel(); k != nil {
		return k
	}
	return goKernel
}()

// Kernel names the micro-kernel in use: "avx512", "avx2" or "generic".
func Kernel() string { return best.name }

func tileGo(kc int, a, b, c []float64, ldc int, alpha float64, overwrite int) {
	var c00, c01, c02, c03, c10, c11, c12, c13 float64
	var c20, c21, c22, c23, c30, c31, c32, c33 float64
	a, b = a[:kc*4], b[:kc*4]
	for p := 0; p < kc; p++ {
		ap, bp := a[p*4:p*4+4], b[p*4:p*4+4]
		a0, a1, a2, a3 := ap[0], ap[1], ap[2], ap[3]
		b0, b1, b2, b3 := bp[0], bp[1], bp[2], bp[3]
		c00 += a0 * b0
		c01 += a0 * b1
		c02 += a0 * b2
		c03 += a0 * b3
		c10 += a1 * b0
		c11 += a1 * b1
		c12 += a1 * b2
		c13 += a1 * b3
		c20 += a2 * b0
		c21 += a2 * b1
		c22 += a2 * b2
		c23 += a2 * b3
		c30 += a3 * b0
		c31 += a3 * b1
		c32 += a3 * b2
		c33 += a3 * b3
	}
	acc := [4][4]float64{{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}}
	for i := range 4 {
		row := c[i*ldc : i*ldc+4]
		for j, v := range acc[i] {
			if overwrite != 0 {
				row[j] = alpha * v
			} else {
				row[j] += alpha * v
			}
		}
	}
}

func axpy4Go(n int, c *[4]float64, a []float64, lda int, y []float64) int {
	r0, r1, r2, r3 := a[:n], a[lda:lda+n], a[2*lda:2*lda+n], a[3*lda:3*lda+n]
	for p := range y[:n] {
		y[p] += c[0]*r0[p] + c[1]*r1[p] + c[2]*r2[p] + c[3]*r3[p]
	}
	return n
}

func dotAxpyGo(n int, a, x, y []float64, alpha float64) (float64, int) {
	var dot float64
	x, y = x[:n], y[:n]
	for p, v := range a[:n] {
		dot += v * x[p]
		y[p] += alpha * v
	}
	return dot, n
}

// Cache blocking: a kcBlock×nr micro-panel of B stays in L1 while the
// mcBlock rows of packed A stream from L2; the kcBlock×ncBlock block of
// packed B (8 MiB) is shared by all of them from L3.
const (
	kcBlock = 256
	mcBlock = 112
	ncBlock = 4096
	// minWork (multiply-adds) is the least work worth a goroutine of its own.
	minWork = 1 << 18
)

// Gemm computes C = alpha·op(A)·op(B) + beta·C as BLAS dgemm does, on
// row-major matrices: op(A) is m×k (A, or Aᵀ when transA), op(B) is k×n,
// C is m×n; lda, ldb, ldc are row strides. With beta = 0, C is only
// written. It uses up to GOMAXPROCS goroutines and panics on slices too
// short for their shapes, like an index out of range.
func Gemm(transA, transB bool, m, n, k int, alpha float64, a []float64, lda int, b []float64, ldb int, beta float64, c []float64, ldc int) {
	gemmThreads(runtime.GOMAXPROCS(0), transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

func gemmThreads(threads int, transA, transB bool, m, n, k int, alpha float64, a []float64, lda int, b []float64, ldb int, beta float64, c []float64, ldc int) {
	gemm.CheckShapes("f64", transA, transB, m, n, k, a, lda, b, ldb, c, ldc)
	if m == 0 || n == 0 {
		return
	}
	if k == 0 || alpha == 0 || (beta != 0 && beta != 1) {
		gemm.Scale(m, n, beta, c, ldc)
		if k == 0 || alpha == 0 {
			return
		}
		beta = 1
	}
	kern := best
	work := int64(m) * int64(n) * int64(k)
	threads = int(max(1, min(int64(threads), work/minWork)))
	// Each goroutine computes its own rows (or columns, for a wide C) of C
	// with buffers of its own; the operand they share is packed by each,
	// which costs little next to the product once the share has rows
	// enough.
	rowUnits, colUnits := (m+kern.mr-1)/kern.mr, (n+kern.nr-1)/kern.nr
	byRows := rowUnits >= colUnits
	units, step := colUnits, kern.nr
	if byRows {
		units, step = rowUnits, kern.mr
	}
	threads = min(threads, units)
	run := func(lo, hi int) {
		if byRows {
			ao := lo * lda
			if transA {
				ao = lo
			}
			blocked(kern, transA, transB, hi-lo, n, k, alpha, a[ao:], lda, b, ldb, beta == 0, c[lo*ldc:], ldc)
			return
		}
		bo := lo
		if transB {
			bo = lo * ldb
		}
		blocked(kern, transA, transB, m, hi-lo, k, alpha, a, lda, b[bo:], ldb, beta == 0, c[lo:], ldc)
	}
	total := m
	if !byRows {
		total = n
	}
	if threads <= 1 {
		run(0, total)
		return
	}
	var wg sync.WaitGroup
	for t := range threads {
		lo := min(total, units*t/threads*step)
		hi := min(total, units*(t+1)/threads*step)
		if t == threads-1 {
			hi = total
		}
		if lo >= hi {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			run(lo, hi)
		}()
	}
	wg.Wait()
}

// blocked is the single-goroutine cache-blocked product; it writes C
// (overwrite) or adds to it.
func blocked(kern *kernel, transA, transB bool, m, n, k int, alpha float64, a []float64, lda int, b []float64, ldb int, overwrite bool, c []float64, ldc int) {
	mr, nr := kern.mr, kern.nr
	kcMax := min(kcBlock, k)
	ncMax := min(ncBlock, (n+nr-1)/nr*nr)
	mcMax := min(mcBlock/mr*mr, (m+mr-1)/mr*mr)
	ap := make([]float64, mcMax*kcMax)
	bp := make([]float64, ncMax*kcMax)
	edge := make([]float64, mr*nr)
	for jc := 0; jc < n; jc += ncBlock {
		nc := min(ncBlock, n-jc)
		for pc := 0; pc < k; pc += kcBlock {
			kc := min(kcBlock, k-pc)
			ow := 0
			if overwrite && pc == 0 {
				ow = 1
			}
			gemm.PackB(gemm.InterleaveGo[float64], bp, transB, b, ldb, pc, jc, kc, nc, nr, 0, nc)
			for ic := 0; ic < m; ic += mcMax {
				mc := min(mcMax, m-ic)
				gemm.PackA(gemm.InterleaveGo[float64], ap, transA, a, lda, ic, pc, mc, kc, mr, 0, mc)
				gemm.Macro(kern.tile, mr, nr, kc, mc, nc, 0, nc, alpha, ap, bp, c[ic*ldc+jc:], ldc, ow, edge)
			}
		}
	}
}

// Gemv computes y = alpha·A·x + beta·y for the m×n row-major A, with y
// only written when beta is 0. Rows are split across goroutines.
func Gemv(m, n int, alpha float64, a []float64, lda int, x []float64, beta float64, y []float64) {
	gemm.CheckShapes("f64", false, false, m, 1, n, a, lda, x, 1, y, 1)
	kern := best
	threads := int(max(1, min(int64(runtime.GOMAXPROCS(0)), int64(m)*int64(n)/minWork)))
	rows := func(lo, hi int) {
		var out [4]float64
		i := lo
		for ; i+4 <= hi && n > 0; i += 4 {
			q := kern.dot4(n, x, a[i*lda:], lda, &out)
			for r := range 4 {
				s := out[r]
				row := a[(i+r)*lda : (i+r)*lda+n]
				for p := q; p < n; p++ {
					s += x[p] * row[p]
				}
				y[i+r] = combine(alpha*s, beta, y[i+r])
			}
		}
		for ; i < hi; i++ {
			var s float64
			for p, v := range a[i*lda : i*lda+n] {
				s += x[p] * v
			}
			y[i] = combine(alpha*s, beta, y[i])
		}
	}
	if threads <= 1 {
		rows(0, m)
		return
	}
	var wg sync.WaitGroup
	for t := range threads {
		lo, hi := m*t/threads/4*4, m*(t+1)/threads/4*4
		if t == threads-1 {
			hi = m
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			rows(lo, hi)
		}()
	}
	wg.Wait()
}

// GemvT computes y = alpha·Aᵀ·x + y for the m×n row-major A: the rows of
// A scaled by x, summed into y (n), four rows per pass over y.
func GemvT(m, n int, alpha float64, a []float64, lda int, x []float64, y []float64) {
	gemm.CheckShapes("f64", true, false, n, 1, m, a, lda, x, 1, y, 1)
	kern := best
	var c [4]float64
	i := 0
	for ; i+4 <= m && n > 0; i += 4 {
		for r := range 4 {
			c[r] = alpha * x[i+r]
		}
		q := kern.axpy4(n, &c, a[i*lda:], lda, y)
		for r := range 4 {
			row := a[(i+r)*lda : (i+r)*lda+n]
			for p := q; p < n; p++ {
				y[p] += c[r] * row[p]
			}
		}
	}
	for ; i < m; i++ {
		s := alpha * x[i]
		for p, v := range a[i*lda : i*lda+n] {
			y[p] += s * v
		}
	}
}

// combine is v + beta·y, without reading y when beta is 0.
func combine(v, beta, y float64) float64 {
	if beta == 0 {
		return v
	}
	return v + beta*y
}

// syrkBlock is the tile of Syrk's block rows.
const syrkBlock = 192

// Syrk computes the symmetric n×n C = alpha·A·Aᵀ for the row-major n×k A,
// both triangles written: each block row of the lower triangle is one
// GEMM, then the upper triangle is mirrored, for half the work of Gemm.
func Syrk(n, k int, alpha float64, a []float64, lda int, c []float64, ldc int) {
	gemm.CheckShapes("f64", false, true, n, n, k, a, lda, a, lda, c, ldc)
	for i0 := 0; i0 < n; i0 += syrkBlock {
		w := min(syrkBlock, n-i0)
		Gemm(false, true, w, i0+w, k, alpha, a[i0*lda:], lda, a, lda, 0, c[i0*ldc:], ldc)
	}
	for i := range n {
		for j := i + 1; j < n; j++ {
			c[i*ldc+j] = c[j*ldc+i]
		}
	}
}

// SymvUpper computes y = S·x for the symmetric m×m S of which only the
// upper triangle (row i from column i on, row stride lds) is read: each
// row serves its own dot product and its column's update in one pass, so
// the matrix is read once, half of it. Goroutines take shares of rows of
// equal area, each summing into a y of its own.
func SymvUpper(m int, s []float64, lds int, x, y []float64) {
	gemm.CheckShapes("f64", false, false, m, 1, m, s, lds, x, 1, y, 1)
	kern := best
	threads := int(max(1, min(int64(runtime.GOMAXPROCS(0)), int64(m)*int64(m)/2/minWork)))
	rows := func(lo, hi int, acc []float64) {
		for i := lo; i < hi; i++ {
			row := s[i*lds+i : i*lds+m]
			xi := x[i]
			acc[i] += row[0] * xi
			n := m - i - 1
			if n == 0 {
				continue
			}
			a, xs, ys := row[1:], x[i+1:m], acc[i+1:m]
			dot, q := kern.dotAxpy(n, a, xs, ys, xi)
			for p := q; p < n; p++ {
				dot += a[p] * xs[p]
				ys[p] += xi * a[p]
			}
			acc[i] += dot
		}
	}
	clear(y[:m])
	if threads <= 1 {
		rows(0, m, y)
		return
	}
	// Rows [0, r) hold a share t/threads of the triangle when
	// m·r − r²/2 = (t/threads)·m²/2.
	bound := func(t int) int {
		return min(m, int(float64(m)*(1-math.Sqrt(1-float64(t)/float64(threads)))))
	}
	parts := make([][]float64, threads)
	var wg sync.WaitGroup
	for t := range threads {
		lo, hi := bound(t), bound(t+1)
		if t == threads-1 {
			hi = m
		}
		parts[t] = y
		if t > 0 {
			parts[t] = make([]float64, m)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			rows(lo, hi, parts[t])
		}()
	}
	wg.Wait()
	for _, part := range parts[1:] {
		for i, v := range part[:m] {
			y[i] += v
		}
	}
}
