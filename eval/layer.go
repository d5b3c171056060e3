package eval

import (
	"fmt"
	"runtime"

	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
)

// MLAPath selects how MLA layers attend over their latent cache.
type MLAPath int

// MLA attention paths.
const (
	// PathAuto takes the path with fewer operations for each call's shape:
	// absorbed for decoding, decompressed for long prefills when d_c is
	// large (see mlaAbsorbedCheaper).
	PathAuto MLAPath = iota
	// PathAbsorbed folds W_UK into the queries and W_UV into the output, so
	// attention runs directly on the cached rows [c_KV | k_R].
	PathAbsorbed
	// PathDecompressed rebuilds every cached position's per-head k_nope and
	// v with kv_b_proj and runs ordinary multi-head attention.
	PathDecompressed
)

// MLAPaths lists the names ParseMLAPath accepts.
func MLAPaths() []string { return []string{"auto", "absorbed", "decompressed"} }

// ParseMLAPath maps "auto", "absorbed" and "decompressed" to their MLAPath.
func ParseMLAPath(name string) (MLAPath, error) {
	for i, n := range MLAPaths() {
		if n == name {
			return MLAPath(i), nil
		}
	}
	return 0, fmt.Errorf("attention path %q is not one of auto, absorbed, decompressed", name)
}

// String is the path's name, or MLAPath(n) for a value that names none.
func (p MLAPath) String() string {
	if p < PathAuto || p > PathDecompressed {
		return fmt.Sprintf("MLAPath(%d)", int(p))
	}
	return MLAPaths()[p]
}

// layerEngine runs one decoder block, GQA or MLA, on the rows of one or
// more sequences: the single per-layer code path behind Runner.Forward and
// LayerRunner.Apply. Every layer reads and writes its KV cache as rows of
// a kernels.Rows: [k_1…k_G | v_1…v_G] per position for GQA, [c_KV | k_R]
// for MLA.
type layerEngine struct {
	cfg  model.Config
	be   kernels.Backend
	rope *rope.Table
	path MLAPath
	// rowWidth is the cached values per position and layer.
	rowWidth int
	// gqa attends GQA rows; absorbed and decompressed are MLA's two paths.
	gqa          kernels.RowAttention
	absorbed     kernels.RowAttention
	decompressed kernels.Attention
	// oIn is o_proj's input width: heads × value width.
	oIn int
}

func newLayerEngine(cfg model.Config, be kernels.Backend, maxPos int, path MLAPath) (*layerEngine, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("model config: %w", err)
	}
	e := &layerEngine{cfg: cfg, be: be, path: path}
	scale := float32(cfg.AttentionScale())
	H := cfg.NumHeads
	var err error
	if m := cfg.MLA; m != nil {
		if m.RopeInvFreq != nil {
			e.rope, err = rope.NewTableFromInvFreq(m.RopeInvFreq, 1, maxPos)
		} else {
			p := cfg.Rope
			p.Dim = m.QKRopeHeadDim
			e.rope, err = rope.NewTable(p, maxPos)
		}
		dc, dr := m.KVLoraRank, m.QKRopeHeadDim
		e.rowWidth = dc + dr
		e.absorbed = kernels.RowAttention{KeyDim: dc + dr, ValueDim: dc, KeyOffsets: []int{0}, ValueOffsets: []int{0},
			PerPosition: H, Scale: scale, Window: cfg.SlidingWindow}
		e.decompressed = kernels.Attention{Heads: H, KVHeads: H, HeadDim: m.QKNopeHeadDim + dr, ValueDim: m.VHeadDim,
			Window: cfg.SlidingWindow, Scale: scale}
		e.oIn = H * m.VHeadDim
	} else {
		e.rope, err = rope.NewTable(cfg.Rope, maxPos)
		G, d := cfg.NumKVHeads, cfg.HeadDim
		e.rowWidth = 2 * G * d
		e.gqa = kernels.RowAttention{KeyDim: d, ValueDim: d, PerPosition: H / G, Scale: scale, Window: cfg.SlidingWindow}
		for g := range G {
			e.gqa.KeyOffsets = append(e.gqa.KeyOffsets, g*d)
			e.gqa.ValueOffsets = append(e.gqa.ValueOffsets, G*d+g*d)
		}
		e.oIn = H * d
	}
	if err != nil {
		return nil, fmt.Errorf("rope table: %w", err)
	}
	return e, nil
}

// segment is one sequence's share of a step: n consecutive rows of the
// step's input at positions past…past+n−1, cached in rows.
type segment struct {
	rows    *kernels.Rows
	past, n int
}

// scratch holds one call's intermediate rows; buffers grow on demand and
// are reused across layers and, through the Runner's pool, across calls,
// so that a decode step allocates nothing.
type scratch struct {
	h, q, attnOut, gate, up, kv []float32
	// Per segment: gathered queries and outputs of the row attention.
	seg []segScratch
	// The call's segments, their tokens and embedded rows, and the
	// one-sequence batch of ForwardInto.
	segs   []segment
	all    []int
	x      []float32
	caches [1]*KVCache
	tokens [1][]int
	logits [1][]float32
	// seq runs a step's segments in parallel.
	seq segmentTask
}

type segScratch struct {
	q, out [][]float32
	// rows holds the segment's new cache rows (GQA) or all its widened
	// rows (decompressed MLA), which also uses latent, kv, keys and values.
	rows, latent, kv, keys, values []float32
	attend                         kernels.AttendScratch
	rowTask                        rowTask
}

func grow(s []float32, n int) []float32 {
	if cap(s) < n {
		return make([]float32, n)
	}
	return s[:n]
}

// step runs layer l in place on the rows of x, which hold the segments'
// rows one after another. The new keys and values are written to each
// segment's cache rows before attention reads them. observe, when not nil,
// sees the normed attention input of all rows.
func (e *layerEngine) step(l *layerWeights, x []float32, segs []segment, s *scratch, observe func([]float32, int)) {
	cfg, be := e.cfg, e.be
	D, I := cfg.HiddenSize, cfg.IntermediateSize
	eps := float32(cfg.RMSNormEps)
	n := 0
	for _, sg := range segs {
		n += sg.n
	}
	s.h = grow(s.h, n*D)
	h := s.h
	kernels.RMSNorm(h, x, l.attnNorm, eps)
	if observe != nil {
		observe(h, n)
	}
	e.attend(l, h, segs, n, s)
	kernels.Add(x, h)

	kernels.RMSNorm(h, x, l.mlpNorm, eps)
	s.gate, s.up = grow(s.gate, n*I), grow(s.up, n*I)
	kernels.Project(be, h, n,
		kernels.Projection{W: l.gate.w, B: l.gate.b, Dst: s.gate},
		kernels.Projection{W: l.up.w, B: l.up.b, Dst: s.up})
	kernels.SwiGLU(s.gate, s.up)
	kernels.Linear(be, h, s.gate, l.down.w, l.down.b, n)
	kernels.Add(x, h)
}

// attend replaces the normed rows h (n of them, the segments' rows one
// after another) by the layer's attention output after o_proj.
func (e *layerEngine) attend(l *layerWeights, h []float32, segs []segment, n int, s *scratch) {
	s.attnOut = grow(s.attnOut, n*e.oIn)
	if len(s.seg) < len(segs) {
		s.seg = append(s.seg, make([]segScratch, len(segs)-len(s.seg))...)
	}
	if l.mla != nil {
		e.mlaProject(l.mla, h, s)
	} else {
		e.gqaProject(l, h, s)
	}
	e.eachSegment(l, segs, s)
	kernels.Linear(e.be, h, s.attnOut, l.o.w, l.o.b, n)
}

// segmentTask is the attention of one step, one item per segment.
type segmentTask struct {
	e      *layerEngine
	l      *layerWeights
	segs   []segment
	starts []int
	s      *scratch
	be     kernels.Backend
	// workers is the cores each segment's attention may use (0: all).
	workers int
}

// Run implements kernels.Task.
func (t *segmentTask) Run(_, k int) {
	if t.l.mla != nil {
		t.e.mlaAttention(t.l.mla, t.segs, k, t.starts[k], t.be, t.workers, t.s)
	} else {
		t.e.gqaAttention(t.segs, k, t.starts[k], t.be, t.workers, t.s)
	}
}

// eachSegment runs the attention of every segment: one after the other,
// each using every core, or — for batches of short steps (decoding) — in
// parallel, one segment per core.
func (e *layerEngine) eachSegment(l *layerWeights, segs []segment, s *scratch) {
	t := &s.seq
	t.starts = t.starts[:0]
	row := 0
	for _, sg := range segs {
		t.starts = append(t.starts, row)
		row += sg.n
	}
	t.e, t.l, t.segs, t.s, t.be, t.workers = e, l, segs, s, e.be, 0
	cores := runtime.GOMAXPROCS(0)
	if len(segs) < 2 || row > 8*len(segs) || cores < 2 {
		for k := range segs {
			t.Run(0, k)
		}
	} else {
		t.be, t.workers = kernels.Serial(e.be), 1
		kernels.Parallel(cores, len(segs), t)
	}
	t.e, t.l, t.segs, t.s, t.be = nil, nil, nil, nil, nil
}

// gqaProject projects the normed rows h to queries, keys and values.
func (e *layerEngine) gqaProject(l *layerWeights, h []float32, s *scratch) {
	cfg := e.cfg
	D, d, H, G := cfg.HiddenSize, cfg.HeadDim, cfg.NumHeads, cfg.NumKVHeads
	n := len(h) / D
	qDim, kvDim := H*d, G*d
	s.q = grow(s.q, n*qDim)
	s.kv = grow(s.kv, 2*n*kvDim)
	kernels.Project(e.be, h, n,
		kernels.Projection{W: l.q.w, B: l.q.b, Dst: s.q},
		kernels.Projection{W: l.k.w, B: l.k.b, Dst: s.kv[:n*kvDim]},
		kernels.Projection{W: l.v.w, B: l.v.b, Dst: s.kv[n*kvDim:]})
}

// gqaAttention rotates segment sk's queries and keys, appends its keys and
// values to its cache and attends.
func (e *layerEngine) gqaAttention(segs []segment, sk, row0 int, be kernels.Backend, workers int, s *scratch) {
	cfg := e.cfg
	d, H, G := cfg.HeadDim, cfg.NumHeads, cfg.NumKVHeads
	group := H / G
	sg, ss := segs[sk], &s.seg[sk]
	ss.rows = grow(ss.rows, sg.n*e.rowWidth)
	if len(ss.q) != G {
		ss.q, ss.out = make([][]float32, G), make([][]float32, G)
	}
	for g := range G {
		ss.q[g] = grow(ss.q[g], sg.n*group*d)
		ss.out[g] = grow(ss.out[g], sg.n*group*d)
	}
	t := &ss.rowTask
	*t = rowTask{e: e, s: s, ss: ss, sg: sg, row0: row0, kind: gqaIn}
	t.run(workers)
	sg.rows.Write(sg.past, ss.rows)
	a := e.gqa
	a.Workers = workers
	a.Attend(be, &ss.attend, ss.out, ss.q, sg.n, sg.past, sg.rows)
	t.kind = gqaOut
	t.run(workers)
	*t = rowTask{}
}

// rowTask is the per-row work of one segment's attention step around the
// kernels: rotating and gathering the new rows (gqaIn, mlaIn) and
// scattering the outputs (gqaOut), rows split over the cores for a
// prefill. A struct, not a closure, so that a decode step allocates
// nothing.
type rowTask struct {
	e    *layerEngine
	s    *scratch
	ss   *segScratch
	sg   segment
	row0 int
	kind int
}

const (
	gqaIn = iota
	gqaOut
	mlaIn
)

// rowsPerItem is the rows of one parallel item of a rowTask.
const rowsPerItem = 32

// run runs the task's rows: on the cores for a prefill (unless workers is
// 1: one core per segment already), else here.
func (t *rowTask) run(workers int) {
	n := t.sg.n
	if n < 2*rowsPerItem || workers == 1 {
		t.rows(0, n)
		return
	}
	kernels.Parallel(workers, (n+rowsPerItem-1)/rowsPerItem, t)
}

// Run implements kernels.Task.
func (t *rowTask) Run(_, i int) { t.rows(i*rowsPerItem, min(t.sg.n, (i+1)*rowsPerItem)) }

func (t *rowTask) rows(i0, i1 int) {
	e, s, ss, sg := t.e, t.s, t.ss, t.sg
	cfg := e.cfg
	H := cfg.NumHeads
	switch t.kind {
	case gqaIn, gqaOut:
		d, G := cfg.HeadDim, cfg.NumKVHeads
		qDim, kvDim, group := H*d, G*d, H/G
		n := len(s.q) / qDim
		q, k, v := s.q, s.kv[:n*kvDim], s.kv[n*kvDim:]
		for i := i0; i < i1; i++ {
			r, pos := t.row0+i, sg.past+i
			if t.kind == gqaOut {
				out := s.attnOut[r*e.oIn:]
				for head := range H {
					g := head / group
					copy(out[head*d:(head+1)*d], ss.out[g][(i*group+head%group)*d:])
				}
				continue
			}
			for head := range H {
				qh := q[r*qDim+head*d : r*qDim+(head+1)*d]
				e.rope.Rotate(qh, pos)
				g := head / group
				copy(ss.q[g][(i*group+head%group)*d:], qh)
			}
			row := ss.rows[i*e.rowWidth : (i+1)*e.rowWidth]
			copy(row[:kvDim], k[r*kvDim:(r+1)*kvDim])
			copy(row[kvDim:], v[r*kvDim:(r+1)*kvDim])
			for g := range G {
				e.rope.Rotate(row[g*d:(g+1)*d], pos)
			}
		}
	case mlaIn:
		m := cfg.MLA
		nope, dc, w := m.QKNopeHeadDim, m.KVLoraRank, e.rowWidth
		qk := nope + m.QKRopeHeadDim
		qDim := H * qk
		rotate := e.rope.Rotate
		if m.RopeInterleave {
			rotate = e.rope.RotateInterleaved
		}
		for i := i0; i < i1; i++ {
			r, pos := t.row0+i, sg.past+i
			rotate(s.kv[r*w+dc:(r+1)*w], pos)
			for head := range H {
				rotate(s.q[r*qDim+head*qk+nope:r*qDim+(head+1)*qk], pos)
			}
		}
	}
}

// mlaProject projects the normed rows h to queries [q_nope | q_rope] per
// head and to the cached row [c_KV | k_R] (c_KV RMS-normed when the layer
// has kv_a_layernorm; the RoPE parts are rotated per segment).
func (e *layerEngine) mlaProject(ml *mlaWeights, h []float32, s *scratch) {
	cfg, m := e.cfg, e.cfg.MLA
	D, H := cfg.HiddenSize, cfg.NumHeads
	dc, w := m.KVLoraRank, e.rowWidth
	n := len(h) / D
	s.q = grow(s.q, n*H*(m.QKNopeHeadDim+m.QKRopeHeadDim))
	s.kv = grow(s.kv, n*w)
	kernels.Project(e.be, h, n,
		kernels.Projection{W: ml.q.w, B: ml.q.b, Dst: s.q},
		kernels.Projection{W: ml.kva.w, B: ml.kva.b, Dst: s.kv})
	if ml.kvaNorm != nil {
		for i := range n {
			row := s.kv[i*w : i*w+dc]
			kernels.RMSNorm(row, row, ml.kvaNorm, float32(cfg.RMSNormEps))
		}
	}
}

// mlaAttention rotates segment sk's RoPE parts, appends its rows to its
// cache and attends by the absorbed or the decompressed path.
func (e *layerEngine) mlaAttention(ml *mlaWeights, segs []segment, sk, row0 int, be kernels.Backend, workers int, s *scratch) {
	cfg, m := e.cfg, e.cfg.MLA
	H := cfg.NumHeads
	qk, w := m.QKNopeHeadDim+m.QKRopeHeadDim, e.rowWidth
	qDim := H * qk
	q, a := s.q, s.kv
	sg := segs[sk]
	t := &s.seg[sk].rowTask
	*t = rowTask{e: e, s: s, ss: &s.seg[sk], sg: sg, row0: row0, kind: mlaIn}
	t.run(workers)
	*t = rowTask{}
	sg.rows.Write(sg.past, a[row0*w:(row0+sg.n)*w])
	out := s.attnOut[row0*e.oIn : (row0+sg.n)*e.oIn]
	qs := q[row0*qDim : (row0+sg.n)*qDim]
	if e.absorb(sg.n, sg.past) {
		e.mlaAbsorbed(be, workers, ml, qs, sg, &s.seg[sk], out)
	} else {
		e.mlaDecompressed(be, ml, qs, sg, &s.seg[sk], out)
	}
}

// absorb reports whether a step of n new positions after past cached ones
// takes the absorbed path.
func (e *layerEngine) absorb(n, past int) bool {
	switch e.path {
	case PathAbsorbed:
		return true
	case PathDecompressed:
		return false
	}
	return mlaAbsorbedCheaper(e.cfg, n, past)
}

// mlaAbsorbedCheaper compares the multiply-adds of both paths for n new
// positions after past cached ones. Absorbed: W_UK into every query
// (n·H·d_nope·d_c), scores and weighted sums against the latent rows
// (pairs·H·(2·d_c + d_r)) and W_UV (n·H·d_c·d_v). Decompressed: kv_b_proj
// on every visible position ((past+n)·d_c·H·(d_nope+d_v)), then attention
// with heads of d_nope + d_r and d_v (pairs·H·(d_nope + d_r + d_v)). pairs
// counts the causal (query, key) pairs.
func mlaAbsorbedCheaper(cfg model.Config, n, past int) bool {
	m := cfg.MLA
	H, dc, dr, nope, dv := float64(cfg.NumHeads), float64(m.KVLoraRank), float64(m.QKRopeHeadDim), float64(m.QKNopeHeadDim), float64(m.VHeadDim)
	nf, total := float64(n), float64(past+n)
	pairs := nf*float64(past) + nf*(nf+1)/2
	absorbed := nf*H*nope*dc + pairs*H*(2*dc+dr) + nf*H*dc*dv
	decompressed := total*dc*H*(nope+dv) + pairs*H*(nope+dr+dv)
	return absorbed <= decompressed
}

// mlaAbsorbed attends with W_UK folded into the queries: q_lat,h =
// W_UK,hᵀ·q_nope,h, scores q_lat,h·c_KV + q_rope,h·k_R, the softmax-weighted
// sum of c_KV in latent space, then W_UV,h and the value bias. The key bias
// of kv_b_proj adds q_nope,h·b_k,h to every score of a query, which the
// softmax cancels, so it is dropped.
func (e *layerEngine) mlaAbsorbed(be kernels.Backend, workers int, ml *mlaWeights, q []float32, sg segment, ss *segScratch, out []float32) {
	cfg, m := e.cfg, e.cfg.MLA
	H := cfg.NumHeads
	nope, dr, dc, dv := m.QKNopeHeadDim, m.QKRopeHeadDim, m.KVLoraRank, m.VHeadDim
	qk, w, kvb := nope+dr, e.rowWidth, nope+dv
	if len(ss.q) != 1 {
		ss.q, ss.out = make([][]float32, 1), make([][]float32, 1)
	}
	ss.q[0] = grow(ss.q[0], sg.n*H*w)
	ss.out[0] = grow(ss.out[0], sg.n*H*dc)
	qa, lat := ss.q[0], ss.out[0]
	if nope > 0 {
		// qa[i, head, :dc] = q_nope[i, head] · W_UK,head (d_nope×d_c).
		kernels.MatMulHeads(be, sg.n, q, H*qk, qk, ml.uk, false, qa, H*w, w)
	}
	for head := range H {
		for i := range sg.n {
			if nope == 0 {
				clear(qa[(i*H+head)*w : (i*H+head)*w+dc])
			}
			copy(qa[(i*H+head)*w+dc:(i*H+head+1)*w], q[i*H*qk+head*qk+nope:i*H*qk+(head+1)*qk])
		}
	}
	a := e.absorbed
	a.Workers = workers
	a.Attend(be, &ss.attend, ss.out, ss.q, sg.n, sg.past, sg.rows)
	// out[i, head] = lat[i, head] · W_UV,headᵀ (d_v×d_c).
	kernels.MatMulHeads(be, sg.n, lat, H*dc, dc, ml.uv, true, out, H*dv, dv)
	if b := ml.kvb.b; b != nil {
		for i := range sg.n {
			for head := range H {
				kernels.Add(out[i*H*dv+head*dv:i*H*dv+(head+1)*dv], b[head*kvb+nope:(head+1)*kvb])
			}
		}
	}
}

// mlaDecompressed expands every visible position's cached latent with
// kv_b_proj into per-head keys [k_nope,h | k_R] and values, and runs
// multi-head attention on them.
func (e *layerEngine) mlaDecompressed(be kernels.Backend, ml *mlaWeights, q []float32, sg segment, ss *segScratch, out []float32) {
	cfg, m := e.cfg, e.cfg.MLA
	H := cfg.NumHeads
	nope, dr, dc, dv := m.QKNopeHeadDim, m.QKRopeHeadDim, m.KVLoraRank, m.VHeadDim
	qk, w, kvb := nope+dr, e.rowWidth, nope+dv
	total := sg.past + sg.n
	ss.rows = grow(ss.rows, total*w)
	sg.rows.Read(ss.rows, 0, total)
	// The latent of each position, contiguous for kv_b_proj.
	ss.latent = grow(ss.latent, total*dc)
	for t := range total {
		copy(ss.latent[t*dc:(t+1)*dc], ss.rows[t*w:t*w+dc])
	}
	ss.kv = grow(ss.kv, total*H*kvb)
	kv := ss.kv
	kernels.Linear(be, kv, ss.latent, ml.kvb.w, ml.kvb.b, total)
	ss.keys = grow(ss.keys, total*H*qk)
	ss.values = grow(ss.values, total*H*dv)
	keys, values := ss.keys, ss.values
	for t := range total {
		kr := ss.rows[t*w+dc : (t+1)*w]
		for head := range H {
			src := kv[(t*H+head)*kvb : (t*H+head+1)*kvb]
			key := keys[(t*H+head)*qk : (t*H+head+1)*qk]
			copy(key[:nope], src[:nope])
			copy(key[nope:], kr)
			copy(values[(t*H+head)*dv:(t*H+head+1)*dv], src[nope:])
		}
	}
	e.decompressed.Causal(be, out, q, keys, values, sg.n, sg.past)
}
