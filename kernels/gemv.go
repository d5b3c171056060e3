package kernels

import (
	"sync"

	"github.com/transmla/transmla/safetensors"
)

// Projection is one product of a shared input: Dst[m×W.Rows()] =
// x[m×W.Cols()]·Wᵀ + B, B nil or of W.Rows() values.
type Projection struct {
	W   Mat
	B   []float32
	Dst []float32
}

// Linear computes dst[m×w.Rows()] = x[m×w.Cols()]·wᵀ + bias, with bias nil
// or of w.Rows() values.
func Linear(be Backend, dst, x []float32, w Mat, bias []float32, m int) {
	Project(be, x, m, Projection{W: w, B: bias, Dst: dst})
}

// maxProjections is how many projections of one input Project fuses into
// one parallel pass (q, k and v).
const maxProjections = 3

// Project computes every projection of ps on the same input x (m rows).
// Single rows (decoding) run as one parallel matrix-vector pass over all
// the projections' output rows, so that the cores share one pass instead
// of meeting after each product. 16-bit weights are always multiplied by
// this package's own kernels, which widen them as they read them; float32
// ones by be.
func Project(be Backend, x []float32, m int, ps ...Projection) {
	g, threads, native := nativeOf(be)
	if m == 1 && native && len(ps) <= maxProjections {
		g.gemvProjections(threads, x, ps)
		return
	}
	for _, p := range ps {
		out, in := p.W.rows, p.W.cols
		if p.W.dtype == RowF32 {
			be.Gemm(false, true, m, out, in, 1, x, in, p.W.f32, in, 0, p.Dst, out)
		} else {
			if !native {
				g, threads = native16(be)
			}
			g.gemmMat(threads, m, x, in, p.W, true, p.Dst, out)
		}
		addBias(p.Dst, p.B, m, out)
	}
}

// MatMul computes c[m×n] = a[m×k]·op(w), op(w) = wᵀ (n = w.Rows(), k =
// w.Cols()) when transW, else w (k = w.Rows(), n = w.Cols()); a and c are
// row-major with strides lda and ldc.
func MatMul(be Backend, m int, a []float32, lda int, w Mat, transW bool, c []float32, ldc int) {
	n, k := w.cols, w.rows
	if transW {
		n, k = w.rows, w.cols
	}
	if w.dtype == RowF32 {
		be.Gemm(false, transW, m, n, k, 1, a, lda, w.f32, w.cols, 0, c, ldc)
		return
	}
	g, threads := native16(be)
	g.gemmMat(threads, m, a, lda, w, transW, c, ldc)
}

func addBias(dst, bias []float32, m, out int) {
	if bias == nil {
		return
	}
	for r := range m {
		Add(dst[r*out:(r+1)*out], bias)
	}
}

// nativeOf returns the native backend behind be, if any, and the threads
// its products may use.
func nativeOf(be Backend) (*Native, int, bool) {
	switch b := be.(type) {
	case *Native:
		return b, b.threads(), true
	case serialNative:
		return b.g, 1, true
	}
	return nil, 0, false
}

// native16 is the native backend that multiplies be's 16-bit weights,
// and the threads it may use: be's own (Auto's, too), or for other
// backends a new one on every core (whose packing buffers are then not
// reused).
func native16(be Backend) (*Native, int) {
	if g, threads, ok := nativeOf(be); ok {
		return g, threads
	}
	if a, ok := be.(*Auto); ok {
		return a.native, a.native.threads()
	}
	g := &Native{}
	return g, g.threads()
}

// gemv16 is one CPU's vector code for products with 16-bit weights: rows
// of k weights of a dtype against a prepared x (see prepareX16), y[r] =
// Σ_p x[p]·w[r·ldw+p] (gemv16Arch).
type gemv16 struct {
	name string
	simd simdLevel
	// block is the kernels' step: x is prepared in blocks of block values.
	block int
	// full says the kernels cover all of k (masked tails); otherwise they
	// cover k rounded down to block and leave the rest to the caller.
	full bool
}

// simd16 is the fastest 16-bit kernel of this CPU (nil: portable Go only);
// read-only after start-up.
var simd16 = func() *gemv16 {
	if ks := gemv16Kernels(); len(ks) > 0 {
		return ks[0]
	}
	return nil
}()

// prepareX16 writes x in the layout simd16's kernels for dtype dt read:
// for bf16, each block of block values de-interleaved (the even-indexed
// ones, then the odd ones); for f16, in order; zero past len(x), up to a
// multiple of block. dst has room for that. (For AVX-512 f16 the blocks
// are of 32 values, two conversions of 16.)
func prepareX16(dst, x []float32, dt RowDType, block int) []float32 {
	n := (len(x) + block - 1) / block * block
	dst = dst[:n]
	if dt == RowF16 {
		copy(dst, x)
		clear(dst[len(x):])
		return dst
	}
	half := block / 2
	for b := 0; b < n; b += block {
		blk := dst[b : b+block]
		for j := range half {
			blk[j], blk[half+j] = at(x, b+2*j), at(x, b+2*j+1)
		}
	}
	return dst
}

// at is x[i], or 0 past the end.
func at(x []float32, i int) float32 {
	if i < len(x) {
		return x[i]
	}
	return 0
}

// dot16 is Σ x[p]·w[p] over 16-bit weights of dtype dt, widened exactly.
func dot16(x []float32, w []uint16, dt RowDType) float32 {
	w = w[:len(x)]
	var s0, s1, s2, s3 float32
	wf := safetensors.BF16ToFloat32
	if dt == RowF16 {
		wf = safetensors.F16ToFloat32
	}
	i := 0
	for ; i+4 <= len(x); i += 4 {
		s0 += x[i] * wf(w[i])
		s1 += x[i+1] * wf(w[i+1])
		s2 += x[i+2] * wf(w[i+2])
		s3 += x[i+3] * wf(w[i+3])
	}
	for ; i < len(x); i++ {
		s0 += x[i] * wf(w[i])
	}
	return (s0 + s1) + (s2 + s3)
}

// gemvRows writes y[r−r0] = x·w[r] (+ bias[r]) for rows [r0, r1) of w.
// xp is x prepared by prepareX16 for w's dtype (unused for float32).
func gemvRows(kern *gemmKernel, w Mat, x, xp []float32, r0, r1 int, bias, y []float32) {
	k := w.cols
	y = y[:r1-r0]
	switch s := simd16; {
	case k == 0:
		clear(y) // an empty product; the kernels assume k > 0
	case w.dtype == RowF32:
		gemvT(kern, r1-r0, k, 1, x, w.f32[r0*k:], k, true, y)
	case s != nil && k >= s.block:
		gemv16Arch(s.simd, w.dtype, r1-r0, k, xp, w.u16[r0*k:], k, y)
		if kc := k &^ (s.block - 1); !s.full && kc < k {
			for r := r0; r < r1; r++ {
				y[r-r0] += dot16(x[kc:], w.u16[r*k+kc:(r+1)*k], w.dtype)
			}
		}
	default:
		for r := r0; r < r1; r++ {
			y[r-r0] = dot16(x, w.u16[r*k:(r+1)*k], w.dtype)
		}
	}
	if bias != nil {
		Add(y, bias[r0:r1])
	}
}

// gemvItemBytes is about the weight bytes of one parallel item of a
// matrix-vector pass. Each core should read long runs of memory: items of
// 30 KB handed to two cores in turn measured at two thirds of the
// bandwidth of items of 400 KB on this machine (the prefetchers restart
// at every jump); every projection is still cut into a multiple of the
// thread count, so that the cores share each one evenly.
const gemvItemBytes = 256 << 10

// gemvTask is one parallel matrix-vector pass over up to maxProjections
// projections of the same x; reused through gemvTasks, so that a decode
// step allocates nothing.
type gemvTask struct {
	kern   *gemmKernel
	x      []float32
	xBF16  []float32 // x prepared for bf16 kernels
	xF16   []float32 // x prepared for f16 kernels
	ps     [maxProjections]Projection
	np     int
	rows   [maxProjections]int // rows per item
	starts [maxProjections + 1]int
}

var gemvTasks = sync.Pool{New: func() any { return &gemvTask{} }}

// Run implements Task: item i is a chunk of rows of one projection.
func (t *gemvTask) Run(_, i int) {
	j := 0
	for i >= t.starts[j+1] {
		j++
	}
	p := &t.ps[j]
	r0 := (i - t.starts[j]) * t.rows[j]
	r1 := min(r0+t.rows[j], p.W.rows)
	xp := t.xBF16
	if p.W.dtype == RowF16 {
		xp = t.xF16
	}
	gemvRows(t.kern, p.W, t.x, xp, r0, r1, p.B, p.Dst[r0:r1])
}

// gemvProjections computes the single-row projections ps of x with up to
// threads cores.
func (g *Native) gemvProjections(threads int, x []float32, ps []Projection) {
	t := gemvTasks.Get().(*gemvTask)
	t.kern, t.x, t.np = g.kern(), x, len(ps)
	items := 0
	for j, p := range ps {
		k := p.W.cols
		if len(x) < k || len(p.Dst) < p.W.rows {
			panic("kernels: projection operands too short")
		}
		if s := simd16; s != nil && p.W.dtype != RowF32 {
			n := (k + s.block - 1) / s.block * s.block
			if p.W.dtype == RowBF16 && len(t.xBF16) < n {
				t.xBF16 = prepareX16(grow(t.xBF16, n), x[:k], RowBF16, s.block)
			}
			if p.W.dtype == RowF16 && len(t.xF16) < n {
				t.xF16 = prepareX16(grow(t.xF16, n), x[:k], RowF16, s.block)
			}
		}
		n := threads * max(1, int((p.W.Bytes()+int64(threads*gemvItemBytes/2))/int64(threads*gemvItemBytes)))
		rows := (p.W.rows + n - 1) / n
		rows = max(4, (rows+3)&^3)
		t.ps[j], t.rows[j], t.starts[j] = p, rows, items
		items += (p.W.rows + rows - 1) / rows
	}
	t.starts[len(ps)] = items
	Parallel(threads, items, t)
	t.x, t.xBF16, t.xF16 = nil, t.xBF16[:0], t.xF16[:0]
	t.ps = [maxProjections]Projection{}
	gemvTasks.Put(t)
}

// MatMulHeads is MatMul for each head h of ws at once: c_h[m×n] =
// a_h·op(ws[h]) with a_h = a[h·aStep:] and c_h = c[h·cStep:] (row strides
// lda and ldc), as the absorbed MLA path multiplies every head's query by
// its W_UK and every head's latent by its W_UV. Single rows of 16-bit
// weights run as one parallel pass, a head per item; all else head by
// head through MatMul.
func MatMulHeads(be Backend, m int, a []float32, lda, aStep int, ws []Mat, transW bool, c []float32, ldc, cStep int) {
	g, threads, native := nativeOf(be)
	if m != 1 || !native || len(ws) == 0 || ws[0].dtype == RowF32 {
		for h, w := range ws {
			MatMul(be, m, a[h*aStep:], lda, w, transW, c[h*cStep:], ldc)
		}
		return
	}
	t := headTasks.Get().(*headTask)
	*t = headTask{kern: g.kern(), a: a, aStep: aStep, ws: ws, trans: transW, c: c, cStep: cStep, xp: t.xp}
	for len(t.xp) < threads {
		t.xp = append(t.xp, nil)
	}
	Parallel(threads, len(ws), t)
	*t = headTask{xp: t.xp}
	headTasks.Put(t)
}

// headTask is a MatMulHeads pass, one item per head; reused through
// headTasks.
type headTask struct {
	kern         *gemmKernel
	a, c         []float32
	aStep, cStep int
	ws           []Mat
	trans        bool
	// xp holds each worker's prepared input.
	xp [][]float32
}

var headTasks = sync.Pool{New: func() any { return &headTask{} }}

// Run implements Task.
func (t *headTask) Run(w, h int) {
	m := t.ws[h]
	n, k := m.cols, m.rows
	if t.trans {
		n, k = m.rows, m.cols
	}
	x, y := t.a[h*t.aStep:h*t.aStep+k], t.c[h*t.cStep:h*t.cStep+n]
	if !t.trans {
		gemvN16(m, x, y)
		return
	}
	var xp []float32
	if s := simd16; s != nil {
		t.xp[w] = prepareX16(grow(t.xp[w], (k+s.block-1)/s.block*s.block), x, m.dtype, s.block)
		xp = t.xp[w]
	}
	gemvRows(t.kern, m, x, xp, 0, m.rows, nil, y)
}
