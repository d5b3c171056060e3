package kernels

import (
	"math"
	"runtime"

	"github.com/transmla/transmla/internal/gemm"
)

// RowAttention is causal attention of query rows against the rows of a KV
// cache (Rows), reading each cached row once per call for all the query
// groups that use it. It serves both layouts:
//
//   - GQA: a row is [k_1 … k_G | v_1 … v_G]; group g holds the queries of the
//     heads that share KV head g, KeyOffsets[g] = g·d, ValueOffsets[g] = G·d + g·d.
//   - absorbed MLA: a row is [c_KV | k_R]; one group holds every head's
//     latent query [W_UKᵀ q_nope | q_rope], KeyDim = d_c + d_r, and the values
//     are the latent itself, ValueOffsets[0] = 0, ValueDim = d_c.
//
// Scores and the softmax are float32 with an online (running maximum)
// softmax, so the cache is walked page by page and never materialised.
type RowAttention struct {
	KeyDim, ValueDim int
	// KeyOffsets and ValueOffsets give, per query group, where its key and
	// value start inside a row.
	KeyOffsets, ValueOffsets []int
	// PerPosition is the number of query rows per position in each group
	// (heads per KV head for GQA, all heads for MLA).
	PerPosition int
	// Scale multiplies the scores.
	Scale float32
	// Window limits each query to the last Window positions (0 = unlimited).
	Window int
	// Workers caps the goroutines of one call (0 = GOMAXPROCS); callers
	// that already run one call per core set 1.
	Workers int
}

// AttendScratch holds the partial results and per-worker buffers of
// Attend calls, reused from one call to the next so that a decode step
// allocates nothing. One scratch serves one call at a time.
type AttendScratch struct {
	parts []rowPartial // per task and group
	ws    []rowWorkspace
	task  attendTask
}

// Attend computes, for the n new positions past…past+n−1 whose rows are
// already in rows, out[g] = softmax(Scale·q[g]·Kᵀ)·V for every group g.
// q[g] is (n·PerPosition)×KeyDim and out[g] (n·PerPosition)×ValueDim, rows
// ordered by position, then by head. Query blocks and, for few queries and
// long contexts, chunks of the context run in parallel. s may be nil (a
// new scratch is made).
func (a RowAttention) Attend(be Backend, s *AttendScratch, out, q [][]float32, n, past int, rows *Rows) {
	if n <= 0 {
		return
	}
	if s == nil {
		s = &AttendScratch{}
	}
	total := past + n
	workers := runtime.GOMAXPROCS(0)
	if a.Workers > 0 {
		workers = min(workers, a.Workers)
	}
	blocks := (n + attendPosBlock - 1) / attendPosBlock
	// Split the context of each block when blocks alone cannot keep the
	// cores busy and there is enough context to share.
	pages := (total + rows.pageRows - 1) / rows.pageRows
	splits := 1
	if blocks < workers && pages >= workers {
		splits = max(1, workers/blocks)
	}
	tasks := blocks * splits
	groups := len(q)
	nr := min(n, attendPosBlock) * a.PerPosition
	if len(s.parts) < tasks*groups {
		s.parts = append(s.parts, make([]rowPartial, tasks*groups-len(s.parts))...)
	}
	for i := range s.parts[:tasks*groups] {
		pt := &s.parts[i]
		pt.m, pt.l, pt.o = grow(pt.m, nr), grow(pt.l, nr), grow(pt.o, nr*a.ValueDim)
	}
	if len(s.ws) < workers {
		s.ws = append(s.ws, make([]rowWorkspace, workers-len(s.ws))...)
	}
	inner := be
	if workers > 1 && tasks > 1 {
		inner = serialBackend(be)
	}
	t := &s.task
	*t = attendTask{a: a, be: inner, s: s, q: q, n: n, past: past, rows: rows, blocks: blocks, splits: splits}
	Parallel(workers, tasks, t)
	for b := range blocks {
		p0 := b * attendPosBlock
		p1 := min(n, p0+attendPosBlock)
		for g := range q {
			r0, r1 := p0*a.PerPosition, p1*a.PerPosition
			a.combine(out[g][r0*a.ValueDim:r1*a.ValueDim], s.parts[b*splits*groups:(b+1)*splits*groups], g, groups, splits, r1-r0)
		}
	}
	*t = attendTask{}
}

// attendPosBlock is the number of new positions one task attends for.
const attendPosBlock = 64

// attendTask is one Attend call's parallel work: task i is query block
// blocks−1−i/splits (later blocks see more context: they go first) against
// its share i%splits of the context.
type attendTask struct {
	a              RowAttention
	be             Backend
	s              *AttendScratch
	q              [][]float32
	n, past        int
	rows           *Rows
	blocks, splits int
}

// Run implements Task.
func (t *attendTask) Run(w, i int) {
	a, rows := t.a, t.rows
	block, split := t.blocks-1-i/t.splits, i%t.splits
	p0 := block * attendPosBlock
	p1 := min(t.n, p0+attendPosBlock)
	// Context visible to the block: [lo, past+p1).
	lo, hi := 0, t.past+p1
	if a.Window > 0 {
		lo = max(0, t.past+p0-a.Window+1)
	}
	// This split's share of whole pages.
	pg0, pg1 := lo/rows.pageRows, (hi+rows.pageRows-1)/rows.pageRows
	per := (pg1 - pg0 + t.splits - 1) / t.splits
	s0 := max(lo, (pg0+split*per)*rows.pageRows)
	s1 := min(hi, (pg0+(split+1)*per)*rows.pageRows)
	groups := len(t.q)
	k := (block*t.splits + split) * groups
	a.attendBlock(t.be, &t.s.ws[w], t.q, p0, p1, t.past, s0, s1, rows, t.s.parts[k:k+groups])
}

// rowPartial is one task's unnormalised result for one group: per query
// row the running maximum m, the sum of exponentials l and Σ e^{s−m}·v.
type rowPartial struct {
	m, l, o []float32
}

// rowWorkspace is one worker's scratch.
type rowWorkspace struct {
	page, scores []float32
	// qp holds a block's queries of every group prepared for the bf16 page
	// kernels.
	qp []float32
}

// attendBlock runs positions [p0, p1) of the new rows against context rows
// [s0, s1) into parts, one partial result per group.
func (a RowAttention) attendBlock(be Backend, ws *rowWorkspace, q [][]float32, p0, p1, past, s0, s1 int, rows *Rows, parts []rowPartial) {
	per, dk, dv, w := a.PerPosition, a.KeyDim, a.ValueDim, rows.width
	nr := (p1 - p0) * per
	for g := range parts {
		pt := &parts[g]
		pt.m, pt.l, pt.o = pt.m[:nr], pt.l[:nr], pt.o[:nr*dv]
		for i := range pt.m {
			pt.m[i] = float32(math.Inf(-1))
		}
		clear(pt.l)
		clear(pt.o)
	}
	if s0 >= s1 {
		return
	}
	// A few query rows, or the heads of one position (decoding, however
	// many heads), read 16-bit rows as they are, widening in the kernels;
	// more rows pay for widening a page once. (Decoding 32 MLA heads of
	// 512 + 64 at 4096 positions measured 1.5–1.9× faster direct, with no
	// allocation, than through the widened page and the general product.)
	direct := rows.dtype != RowF32 && (nr <= smallRows || p1-p0 == 1) && smallBlocks16SIMD()
	if !direct {
		ws.page = grow(ws.page, rows.pageRows*w)
	}
	// bf16 rows of whole 32-value blocks go through the page kernels,
	// which want the queries de-interleaved.
	paged := direct && rows.dtype == RowBF16 && dk%32 == 0 && dv%32 == 0 && pageKernelsBF16()
	if paged {
		ws.qp = grow(ws.qp, len(q)*nr*dk)
		for g, qg := range q {
			for i := range nr {
				prepareX16(ws.qp[(g*nr+i)*dk:(g*nr+i+1)*dk], qg[(p0*per+i)*dk:(p0*per+i+1)*dk], RowBF16, 32)
			}
		}
	}
	ws.scores = grow(ws.scores, nr*rows.pageRows)
	var tile []float32
	var tile16, next16 []uint16
	for t0 := s0; t0 < s1; {
		pg, o0 := t0/rows.pageRows, t0%rows.pageRows
		t1 := min(s1, (pg+1)*rows.pageRows)
		if direct {
			tile16 = rows.page16(pg, o0, o0+t1-t0)
			// The page this task reads next, to be prefetched.
			next16 = nil
			if t1 < s1 {
				next16 = rows.page16(pg+1, 0, 1)
			}
		} else {
			tile = rows.page(ws.page, pg, o0, o0+t1-t0)
		}
		nt := t1 - t0
		// Query rows that see part of [t0, t1): positions P with P ≥ t0 and,
		// with a window, P−Window+1 < t1. Positions grow with the row index.
		first := max(p0, t0-past)
		last := p1
		if a.Window > 0 {
			last = min(p1, t1+a.Window-1-past)
		}
		if first >= last {
			t0 = t1
			continue
		}
		r0, r1 := (first-p0)*per, (last-p0)*per
		rn := r1 - r0
		s := ws.scores[:rn*nt]
		for g, qg := range q {
			pt := &parts[g]
			switch {
			case paged:
				for c := 0; c < rn; c += 6 {
					scoresPageBF16(min(6, rn-c), nt, dk, ws.qp[(g*nr+r0+c)*dk:], tile16[a.KeyOffsets[g]:], w, s[c*nt:], nt, offset(next16, a.KeyOffsets[g]))
				}
				scale(s[:rn*nt], a.Scale)
			case direct:
				scoresRows16(rows.dtype, rn, nt, dk, a.Scale, qg[(p0*per+r0)*dk:], tile16[a.KeyOffsets[g]:], w, s)
			default:
				scoresRows(be, rn, nt, dk, a.Scale, qg[(p0*per+r0)*dk:], tile[a.KeyOffsets[g]:], w, s)
			}
			for r := range rn {
				pos := past + p0 + (r0+r)/per
				vis0, vis1 := t0, min(t1, pos+1)
				if a.Window > 0 {
					vis0 = max(t0, pos-a.Window+1)
				}
				row := s[r*nt : (r+1)*nt]
				clear(row[:vis0-t0])
				clear(row[vis1-t0:])
				seen := row[vis0-t0 : vis1-t0]
				i := r0 + r
				mNew := max(pt.m[i], maxOf(seen))
				alpha := expf(pt.m[i] - mNew)
				pt.l[i] = pt.l[i]*alpha + expSub(seen, mNew)
				pt.m[i] = mNew
				if alpha != 1 {
					scale(pt.o[i*dv:(i+1)*dv], alpha)
				}
			}
			switch {
			case paged:
				for c := 0; c < rn; c += 6 {
					wsumPageBF16(min(6, rn-c), nt, dv, s[c*nt:], nt, tile16[a.ValueOffsets[g]:], w, pt.o[(r0+c)*dv:], offset(next16, a.ValueOffsets[g]))
				}
			case direct:
				weightedSumRows16(rows.dtype, rn, nt, dv, s, tile16[a.ValueOffsets[g]:], w, pt.o[r0*dv:])
			default:
				weightedSumRows(be, rn, nt, dv, s, tile[a.ValueOffsets[g]:], w, pt.o[r0*dv:])
			}
		}
		t0 = t1
	}
}

// smallRows is the query-row count up to which scores and weighted sums
// use the small-block vector kernels: for a few rows, packing a cache tile
// for the general product costs more than the arithmetic on it.
const smallRows = 16

// scoresRows writes s[r·nt+j] = alpha·q_r·key_j for rn query rows (stride
// dk) against nt keys (stride w).
func scoresRows(be Backend, rn, nt, dk int, alpha float32, q, keys []float32, w int, s []float32) {
	if rn > smallRows {
		be.Gemm(false, true, rn, nt, dk, alpha, q, dk, keys, w, 0, s, nt)
		return
	}
	if !smallBlocksSIMD() {
		// Portable code: plain dot products, no packing (and nothing
		// allocated per decode step).
		for r := range rn {
			for j := range nt {
				s[r*nt+j] = alpha * gemm.DotGo(q[r*dk:(r+1)*dk], keys[j*w:j*w+dk])
			}
		}
		return
	}
	for r0 := 0; r0 < rn; r0 += 4 {
		rows := min(4, rn-r0)
		j0 := 0
		for ; j0+4 <= nt; j0 += 4 {
			scoresBlockSIMD(rows, dk, q[r0*dk:], dk, keys[j0*w:], w, s[r0*nt+j0:], nt)
		}
		for r := r0; r < r0+rows; r++ {
			qr := q[r*dk : (r+1)*dk]
			for j := j0; j < nt; j++ {
				var d float32
				for p, v := range keys[j*w : j*w+dk] {
					d += qr[p] * v
				}
				s[r*nt+j] = d
			}
		}
	}
	scale(s[:rn*nt], alpha)
}

// weightedSumRows adds s·V to o: rn rows of weights over nt cached values
// (stride w) of dv values each.
func weightedSumRows(be Backend, rn, nt, dv int, s, values []float32, w int, o []float32) {
	if rn > smallRows {
		be.Gemm(false, false, rn, dv, nt, 1, s, nt, values, w, 1, o, dv)
		return
	}
	if !smallBlocksSIMD() {
		for r := range rn {
			for t := range nt {
				axpy(s[r*nt+t], values[t*w:t*w+dv], o[r*dv:(r+1)*dv])
			}
		}
		return
	}
	for r0 := 0; r0 < rn; r0 += 4 {
		rows := min(4, rn-r0)
		t0 := 0
		for ; t0+4 <= nt; t0 += 4 {
			wsumBlockSIMD(rows, dv, s[r0*nt+t0:], nt, values[t0*w:], w, o[r0*dv:], dv)
		}
		for r := r0; r < r0+rows; r++ {
			for t := t0; t < nt; t++ {
				axpy(s[r*nt+t], values[t*w:t*w+dv], o[r*dv:(r+1)*dv])
			}
		}
	}
}

// offset is s[i:], or nil for an empty s.
func offset(s []uint16, i int) []uint16 {
	if len(s) == 0 {
		return nil
	}
	return s[i:]
}

// scoresRows16 is scoresRows for 16-bit keys of dtype dt, read as stored.
func scoresRows16(dt RowDType, rn, nt, dk int, alpha float32, q []float32, keys []uint16, w int, s []float32) {
	for r0 := 0; r0 < rn; r0 += 4 {
		rows := min(4, rn-r0)
		j0 := 0
		for ; j0+4 <= nt; j0 += 4 {
			scoresBlock16SIMD(dt, rows, dk, q[r0*dk:], dk, keys[j0*w:], w, s[r0*nt+j0:], nt)
		}
		for r := r0; r < r0+rows; r++ {
			for j := j0; j < nt; j++ {
				s[r*nt+j] = dot16(q[r*dk:(r+1)*dk], keys[j*w:j*w+dk], dt)
			}
		}
	}
	scale(s[:rn*nt], alpha)
}

// weightedSumRows16 is weightedSumRows for 16-bit values of dtype dt.
func weightedSumRows16(dt RowDType, rn, nt, dv int, s []float32, values []uint16, w int, o []float32) {
	var buf [512]float32
	for r0 := 0; r0 < rn; r0 += 4 {
		rows := min(4, rn-r0)
		t0 := 0
		for ; t0+4 <= nt; t0 += 4 {
			wsumBlock16SIMD(dt, rows, dv, s[r0*nt+t0:], nt, values[t0*w:], w, o[r0*dv:], dv)
		}
		for t := t0; t < nt; t++ {
			for c0 := 0; c0 < dv; c0 += len(buf) {
				c1 := min(dv, c0+len(buf))
				v := buf[:c1-c0]
				if dt == RowBF16 {
					widenBF16(v, values[t*w+c0:t*w+c1])
				} else {
					widenF16(v, values[t*w+c0:t*w+c1])
				}
				for r := r0; r < r0+rows; r++ {
					axpy(s[r*nt+t], v, o[r*dv+c0:r*dv+c1])
				}
			}
		}
	}
}

// combine merges the partial results of group g over the splits of one
// block (parts: splits × groups) and writes the normalised rows to out.
func (a RowAttention) combine(out []float32, parts []rowPartial, g, groups, splits, nr int) {
	dv := a.ValueDim
	for i := range nr {
		m := float32(math.Inf(-1))
		for sp := range splits {
			m = max(m, parts[sp*groups+g].m[i])
		}
		dst := out[i*dv : (i+1)*dv]
		clear(dst)
		var l float32
		for sp := range splits {
			pt := parts[sp*groups+g]
			if pt.l[i] == 0 {
				continue
			}
			f := expf(pt.m[i] - m)
			l += pt.l[i] * f
			for j, v := range pt.o[i*dv : (i+1)*dv] {
				dst[j] += f * v
			}
		}
		if l > 0 {
			scale(dst, 1/l)
		}
	}
}

// maxOf is the largest value of a non-empty x.
func maxOf(x []float32) float32 {
	if m, ok := maxSIMD(x); ok {
		return m
	}
	m := x[0]
	for _, v := range x[1:] {
		m = max(m, v)
	}
	return m
}

// expSub replaces x by e^{x−m} and returns the sum.
func expSub(x []float32, m float32) float32 {
	if s, ok := expSubSIMD(x, m); ok {
		return s
	}
	var s float32
	for i, v := range x {
		x[i] = expf(v - m)
		s += x[i]
	}
	return s
}

// scale multiplies x by s.
func scale(x []float32, s float32) {
	if len(x) == 0 || scaleSIMD(x, s) {
		return
	}
	for i := range x {
		x[i] *= s
	}
}
