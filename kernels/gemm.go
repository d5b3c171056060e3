package kernels

import (
	"runtime"
	"sync"

	"github.com/transmla/transmla/internal/gemm"
)

// gemmKernel is one register-tile micro-kernel and its matrix-vector helper.
type gemmKernel struct {
	name   string
	mr, nr int // tile: mr rows of C by nr columns
	// tile computes acc = Ap·Bp for packed panels (kc steps of mr values of
	// A, kc steps of nr values of B) and stores C = alpha·acc when
	// overwrite != 0, else C += alpha·acc, for the mr×nr tile at c[0].
	// Callers guarantee len(a) ≥ kc·mr, len(b) ≥ kc·nr and
	// len(c) ≥ (mr-1)·ldc+nr: the assembly does not check.
	tile func(kc int, a, b, c []float32, ldc int, alpha float32, overwrite int)
	// simd names the vector code of dot4 (see dot4Arch); none for the
	// portable kernel.
	simd simdLevel
	// interleave writes dst[p·dstStride+i] = src[i·ld+p] for p < kc and
	// i < rows: the transposing copy of panel packing.
	interleave func(kc int, src []float32, ld, rows int, dst []float32, dstStride int)
}

// goKernel is the portable micro-kernel, for CPUs without AVX2.
var goKernel = &gemmKernel{name: "generic", mr: 4, nr: 8, tile: tileGo, interleave: gemm.InterleaveGo[float32]}

// simdLevel names a family of vector kernels.
type simdLevel int

const (
	simdNone simdLevel = iota
	simdAVX2
	simdAVX512
)

// dot4 writes out[r] = Σ_{p<q} x[p]·b[r·ldb+p] for r < 4 and returns q,
// the prefix of k it covered (k itself, or less for tails it leaves to
// the caller). Callers guarantee k > 0 and len(b) ≥ 3·ldb+k. It is a
// direct call, not a function value, so that out can stay on the
// caller's stack.
func (kern *gemmKernel) dot4(k int, x, b []float32, ldb int, out *[4]float32) int {
	if q, ok := dot4Arch(kern.simd, k, x, b, ldb, out); ok {
		return q
	}
	return gemm.Dot4Go(k, x, b, ldb, out)
}

// simd is the fastest kernel of this CPU, chosen once; read-only after.
var simd = func() *gemmKernel {
	if ks := simdKernels(); len(ks) > 0 {
		return ks[0]
	}
	return goKernel
}()

func tileGo(kc int, a, b, c []float32, ldc int, alpha float32, overwrite int) {
	var acc [4][8]float32
	a, b = a[:kc*4], b[:kc*8]
	for p := range kc {
		ap, bp := a[p*4:p*4+4], b[p*8:p*8+8]
		for i, av := range ap {
			row := &acc[i]
			for j, bv := range bp {
				row[j] += av * bv
			}
		}
	}
	for i := range 4 {
		row := c[i*ldc : i*ldc+8]
		for j, v := range acc[i] {
			if overwrite != 0 {
				row[j] = alpha * v
			} else {
				row[j] += alpha * v
			}
		}
	}
}

// Cache blocking. The k dimension is cut into equal blocks of at most
// kcBlock steps; a block's B micro-panel (kc·nr floats, 128 KB at most)
// and the mcBlock rows of packed A (344 KB) stay in L2 while C's tiles are
// read and written once per block; ncBlock columns of packed B are reused
// by all rows of A. Measured on this project's Zen 4 machine (alternating
// rounds, medians, the llama-gqa-25m and 8B layer products): kc 1024 /
// mc 84 against the L1-sized kc 256 / mc 168, +16% and +15%.
const (
	kcBlock = 1024
	mcBlock = 84
	ncBlock = 4096
	// minWorkPerThread (multiply-adds) keeps small products on one
	// goroutine, where starting others costs more than it saves.
	minWorkPerThread = 1 << 17
)

// Native is the Backend of this package's own kernels: assembly
// micro-kernels (AVX-512 or AVX2/FMA, chosen once from the CPU's features)
// or a portable Go kernel elsewhere, inside a cache-blocked, panel-packing
// GEMM that splits C over goroutines. The zero value is ready to use;
// a Native must not be copied after first use.
type Native struct {
	// Threads bounds the goroutines of one product; 0 means GOMAXPROCS.
	Threads int
	kernel  *gemmKernel // nil: the CPU's fastest
	bufs    sync.Pool   // *gemmBuf, reused packing space
}

// NewNative returns the native backend with the CPU's fastest kernel.
func NewNative() *Native { return &Native{} }

// Name implements Backend.
func (g *Native) Name() string { return "go" }

// Kernel names the micro-kernel in use: "avx512", "avx2" or "generic".
func (g *Native) Kernel() string { return g.kern().name }

func (g *Native) kern() *gemmKernel {
	if g.kernel != nil {
		return g.kernel
	}
	return simd
}

// serial returns a single-goroutine view of g sharing its buffers, for
// callers that already run one product per core.
func (g *Native) serial() Backend { return serialNative{g} }

type serialNative struct{ g *Native }

func (s serialNative) Name() string { return s.g.Name() }

func (s serialNative) Gemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	s.g.gemm(1, transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

type gemmBuf struct {
	a, b []float32
	edge []float32
	x    []float32
	// wide holds rows of a 16-bit B widened for packing.
	wide []float32
}

func (g *Native) getBuf() *gemmBuf {
	if v, ok := g.bufs.Get().(*gemmBuf); ok {
		return v
	}
	return &gemmBuf{}
}

func grow(s []float32, n int) []float32 {
	if cap(s) < n {
		return make([]float32, n)
	}
	return s[:n]
}

// Gemm implements Backend.
func (g *Native) Gemm(transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	g.gemm(g.threads(), transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

// threads is the goroutines one product may use.
func (g *Native) threads() int {
	if g.Threads > 0 {
		return g.Threads
	}
	return runtime.GOMAXPROCS(0)
}

// bOperand is the B of a product: a float32 matrix with stride ld, or a
// Mat, whose values are widened as they are packed; trans says op(B) is
// its transpose.
type bOperand struct {
	trans bool
	f32   []float32
	ld    int
	mat   Mat
	isMat bool
}

func (g *Native) gemm(threads int, transA, transB bool, m, n, k int, alpha float32, a []float32, lda int, b []float32, ldb int, beta float32, c []float32, ldc int) {
	gemm.CheckShapes("kernels", transA, transB, m, n, k, a, lda, b, ldb, c, ldc)
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
	overwrite := beta == 0
	kern := g.kern()
	threads = workThreads(threads, m, n, k)

	// One row of op(A) against B: matrix-vector products, no packing.
	if m == 1 {
		x := a[:k]
		var xbuf *gemmBuf
		if transA && k > 1 {
			xbuf = g.getBuf()
			xbuf.x = grow(xbuf.x, k)
			for p := range k {
				xbuf.x[p] = a[p*lda]
			}
			x = xbuf.x
		}
		t := gemvF32Tasks.Get().(*gemvF32Task)
		*t = gemvF32Task{kern: kern, trans: transB, n: n, k: k, alpha: alpha, x: x, b: b, ldb: ldb, overwrite: overwrite, c: c[:n], align: 64}
		if transB {
			t.align = 4
		}
		t.items = min(threads, (n+t.align-1)/t.align)
		Parallel(threads, t.items, t)
		*t = gemvF32Task{}
		gemvF32Tasks.Put(t)
		if xbuf != nil {
			g.bufs.Put(xbuf)
		}
		return
	}

	g.blocked(threads, kern, transA, m, n, k, alpha, a, lda, bOperand{trans: transB, f32: b, ld: ldb}, overwrite, c, ldc)
}

// workThreads bounds threads so that each has minWorkPerThread
// multiply-adds of an m×n×k product.
func workThreads(threads, m, n, k int) int {
	work := int64(m) * int64(n) * int64(k) // overflows int on 32-bit targets
	return int(max(1, min(int64(threads), work/minWorkPerThread)))
}

// gemvF32Task is a float32 matrix-vector product split into items of
// contiguous output ranges (multiples of align); reused through
// gemvF32Tasks, so that it allocates nothing.
type gemvF32Task struct {
	kern         *gemmKernel
	trans        bool
	n, k         int
	alpha        float32
	x, b, c      []float32
	ldb          int
	overwrite    bool
	align, items int
}

var gemvF32Tasks = sync.Pool{New: func() any { return &gemvF32Task{} }}

// Run implements Task.
func (t *gemvF32Task) Run(_, i int) {
	units := (t.n + t.align - 1) / t.align
	j0 := units * i / t.items * t.align
	j1 := min(t.n, units*(i+1)/t.items*t.align)
	if j0 >= j1 {
		return
	}
	if t.trans {
		gemvT(t.kern, j1-j0, t.k, t.alpha, t.x, t.b[j0*t.ldb:], t.ldb, t.overwrite, t.c[j0:j1])
	} else {
		gemvN(j1-j0, t.k, t.alpha, t.x, t.b[j0:], t.ldb, t.overwrite, t.c[j0:j1])
	}
}

// gemmMat computes c[m×n] = a[m×k]·op(w) with up to threads goroutines
// (see MatMul).
func (g *Native) gemmMat(threads, m int, a []float32, lda int, w Mat, transW bool, c []float32, ldc int) {
	n, k := w.cols, w.rows
	if transW {
		n, k = w.rows, w.cols
	}
	gemm.CheckShapes("kernels", false, transW, m, n, k, a, lda, nil, 0, c, ldc)
	if m == 0 || n == 0 {
		return
	}
	if k == 0 {
		gemm.Scale(m, n, 0, c, ldc)
		return
	}
	if m == 1 {
		if transW {
			g.gemvProjections(threads, a[:k], []Projection{{W: w, Dst: c[:n]}})
		} else {
			gemvN16(w, a[:k], c[:n])
		}
		return
	}
	g.blocked(workThreads(threads, m, n, k), g.kern(), false, m, n, k, 1, a, lda, bOperand{trans: transW, mat: w, isMat: true}, true, c, ldc)
}

// gemvN16 writes y = Σ_p x[p]·w[p] over the rows of a 16-bit w (len(x)
// rows of len(y) values): each row is widened in pieces and added in.
func gemvN16(w Mat, x, y []float32) {
	var buf [256]float32
	for j0 := 0; j0 < len(y); j0 += len(buf) {
		j1 := min(len(y), j0+len(buf))
		out, tmp := y[j0:j1], buf[:j1-j0]
		clear(out)
		for p, xv := range x {
			w.widen(tmp, p, j0, j1)
			axpy(xv, tmp, out)
		}
	}
}

// parallel runs f over [0,n) cut into at most threads contiguous ranges
// whose bounds are multiples of align, on the worker pool.
func parallel(threads, n, align int, f func(lo, hi int)) {
	units := (n + align - 1) / align
	threads = min(threads, units)
	if threads <= 1 {
		f(0, n)
		return
	}
	Parallel(threads, threads, TaskFunc(func(_, t int) {
		lo, hi := units*t/threads*align, min(n, units*(t+1)/threads*align)
		if lo < hi {
			f(lo, hi)
		}
	}))
}

// gemvT computes y[j] = alpha·Σ_p x[p]·b[j·ldb+p] (+ y[j] unless
// overwrite) for j < n.
func gemvT(kern *gemmKernel, n, k int, alpha float32, x, b []float32, ldb int, overwrite bool, y []float32) {
	var out [4]float32
	j := 0
	for ; j+4 <= n; j += 4 {
		q := kern.dot4(k, x, b[j*ldb:j*ldb+3*ldb+k], ldb, &out)
		for r := range 4 {
			s := out[r]
			row := b[(j+r)*ldb : (j+r)*ldb+k]
			for p := q; p < k; p++ {
				s += x[p] * row[p]
			}
			if overwrite {
				y[j+r] = alpha * s
			} else {
				y[j+r] += alpha * s
			}
		}
	}
	for ; j < n; j++ {
		row := b[j*ldb : j*ldb+k]
		var s float32
		for p, v := range row {
			s += x[p] * v
		}
		if overwrite {
			y[j] = alpha * s
		} else {
			y[j] += alpha * s
		}
	}
}

// gemvN computes y[j] = alpha·Σ_p x[p]·b[p·ldb+j] (+ y[j] unless
// overwrite) for j < n.
func gemvN(n, k int, alpha float32, x, b []float32, ldb int, overwrite bool, y []float32) {
	y = y[:n]
	if overwrite {
		clear(y)
	}
	for p := range k {
		axpy(alpha*x[p], b[p*ldb:p*ldb+n], y)
	}
}

// axpy computes y += a·x.
func axpy(a float32, x, y []float32) {
	y = y[:len(x)]
	if len(x) > 0 && axpySIMD(a, x, y) {
		return
	}
	for i, v := range x {
		y[i] += a * v
	}
}

// blocked is the cache-blocked product. For each block of B (kc×nc) the
// goroutines pack a share of its panels each, then each computes a share
// of C: its own rows (packing its own A) when there are rows enough, else
// its own columns of B against an A packed together beforehand.
func (g *Native) blocked(threads int, kern *gemmKernel, transA bool, m, n, k int, alpha float32, a []float32, lda int, b bOperand, overwrite bool, c []float32, ldc int) {
	mr, nr := kern.mr, kern.nr
	kcMax := (k + (k+kcBlock-1)/kcBlock - 1) / ((k + kcBlock - 1) / kcBlock) // k in equal blocks
	ncMax := min(ncBlock, (n+nr-1)/nr*nr)
	rowPanels := (m + mr - 1) / mr
	splitRows := threads == 1 || rowPanels >= 4*threads
	mcMax := min((mcBlock+mr-1)/mr*mr, rowPanels*mr)
	if !splitRows {
		mcMax = rowPanels * mr // one shared block of A
	}
	bufs := make([]*gemmBuf, threads)
	for t := range bufs {
		bufs[t] = g.getBuf()
		bufs[t].edge = grow(bufs[t].edge, mr*nr)
		if splitRows || t == 0 {
			bufs[t].a = grow(bufs[t].a, mcMax*kcMax)
		}
	}
	bufs[0].b = grow(bufs[0].b, ncMax*kcMax)
	bp, sharedA := bufs[0].b, bufs[0].a
	for jc := 0; jc < n; jc += ncBlock {
		nc := min(ncBlock, n-jc)
		bPanels := (nc + nr - 1) / nr
		for pc := 0; pc < k; pc += kcMax {
			kc := min(kcMax, k-pc)
			ow := 0
			if overwrite && pc == 0 {
				ow = 1
			}
			parallelT(threads, bPanels, func(t, p0, p1 int) {
				if b.isMat {
					bufs[t].wide = grow(bufs[t].wide, 16*kc)
				}
				packB(kern, bp, b, pc, jc, kc, nc, nr, p0*nr, min(nc, p1*nr), bufs[t].wide)
			})
			if splitRows {
				parallelT(threads, rowPanels, func(t, r0, r1 int) {
					ap := bufs[t].a
					for ic := r0 * mr; ic < min(m, r1*mr); ic += mcMax {
						mc := min(mcMax, min(m, r1*mr)-ic)
						gemm.PackA(kern.interleave, ap, transA, a, lda, ic, pc, mc, kc, mr, 0, mc)
						gemm.Macro(kern.tile, mr, nr, kc, mc, nc, 0, nc, alpha, ap, bp, c[ic*ldc+jc:], ldc, ow, bufs[t].edge)
					}
				})
				continue
			}
			parallel(threads, rowPanels, 1, func(r0, r1 int) {
				gemm.PackA(kern.interleave, sharedA, transA, a, lda, 0, pc, m, kc, mr, r0*mr, min(m, r1*mr))
			})
			parallelT(threads, bPanels, func(t, p0, p1 int) {
				gemm.Macro(kern.tile, mr, nr, kc, m, nc, p0*nr, min(nc, p1*nr), alpha, sharedA, bp, c[jc:], ldc, ow, bufs[t].edge)
			})
		}
	}
	for _, buf := range bufs {
		g.bufs.Put(buf)
	}
}

// parallelT runs f over [0,n) cut into at most threads contiguous ranges,
// passing each range's index t for per-range buffers.
func parallelT(threads, n int, f func(t, lo, hi int)) {
	threads = min(threads, n)
	if threads <= 1 {
		f(0, 0, n)
		return
	}
	Parallel(threads, threads, TaskFunc(func(_, t int) {
		f(t, n*t/threads, n*(t+1)/threads)
	}))
}

// packB writes op(B)[pc:pc+kc, jc:jc+nc] as panels of nr columns, as
// gemm.PackB does; a 16-bit Mat's values are widened on the way, exactly,
// so the panels are those of the float32 matrix; wide (16·kc values) holds
// the rows of a 16-bit Bᵀ widened.
func packB(kern *gemmKernel, dst []float32, b bOperand, pc, jc, kc, nc, nr, j0, j1 int, wide []float32) {
	if !b.isMat {
		gemm.PackB(kern.interleave, dst, b.trans, b.f32, b.ld, pc, jc, kc, nc, nr, j0, j1)
		return
	}
	for jr := j0; jr < j1; jr += nr {
		w := min(nr, nc-jr)
		pan := dst[jr*kc : jr*kc+kc*nr]
		if b.trans {
			for j := 0; j < w; j += 16 {
				rows := min(16, w-j)
				for i := range rows {
					b.mat.widen(wide[i*kc:(i+1)*kc], jc+jr+j+i, pc, pc+kc)
				}
				kern.interleave(kc, wide, kc, rows, pan[j:], nr)
			}
		} else {
			for p := range kc {
				b.mat.widen(pan[p*nr:p*nr+w], pc+p, jc+jr, jc+jr+w)
			}
		}
		gemm.PadPanel(pan, kc, w, nr)
	}
}
