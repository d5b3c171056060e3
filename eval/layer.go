package eval

import (
	"fmt"
	"runtime"
	"sync"

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

// scratch holds one step's intermediate rows; buffers grow on demand and
// are reused across layers and calls.
type scratch struct {
	h, q, attnOut, gate, up, kv []float32
	// Per segment: gathered queries and outputs of the row attention.
	seg []segScratch
}

type segScratch struct {
	q, out [][]float32
	// rows holds the segment's new cache rows (GQA) or all its widened
	// rows (decompressed MLA), which also uses latent, kv, keys and values.
	rows, latent, kv, keys, values []float32
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
func (e *layerEngine) step(l *model.Layer, x []float32, segs []segment, s *scratch, observe func([]float32, int)) error {
	cfg, be := e.cfg, e.be
	D, I := cfg.HiddenSize, cfg.IntermediateSize
	eps := float32(cfg.RMSNormEps)
	if (l.MLA != nil) != (cfg.MLA != nil) {
		return fmt.Errorf("layer has MLA weights %v but the config says MLA %v", l.MLA != nil, cfg.MLA != nil)
	}
	n := 0
	for _, sg := range segs {
		n += sg.n
	}
	s.h = grow(s.h, n*D)
	h := s.h
	kernels.RMSNorm(h, x, l.AttnNorm, eps)
	if observe != nil {
		observe(h, n)
	}
	s.attnOut = grow(s.attnOut, n*e.oIn)
	if len(s.seg) < len(segs) {
		s.seg = make([]segScratch, len(segs))
	}
	if l.MLA != nil {
		e.mla(l.MLA, h, segs, s)
	} else {
		e.gqaAttention(l, h, segs, s)
	}
	kernels.Linear(be, h, s.attnOut, l.O.W, l.O.B, n, D, e.oIn)
	kernels.Add(x, h)

	kernels.RMSNorm(h, x, l.MLPNorm, eps)
	s.gate, s.up = grow(s.gate, n*I), grow(s.up, n*I)
	kernels.Linear(be, s.gate, h, l.Gate.W, l.Gate.B, n, I, D)
	kernels.Linear(be, s.up, h, l.Up.W, l.Up.B, n, I, D)
	kernels.SwiGLU(s.gate, s.up)
	kernels.Linear(be, h, s.gate, l.Down.W, l.Down.B, n, D, I)
	kernels.Add(x, h)
	return nil
}

// eachSegment runs f for every segment: one after the other, each using
// every core, or — for batches of short steps (decoding) — in parallel,
// one segment per core.
func (e *layerEngine) eachSegment(segs []segment, f func(k, row0 int, be kernels.Backend, workers int)) {
	starts := make([]int, len(segs))
	row := 0
	for k, sg := range segs {
		starts[k] = row
		row += sg.n
	}
	cores := runtime.GOMAXPROCS(0)
	if len(segs) < 2 || row > 8*len(segs) || cores < 2 {
		for k := range segs {
			f(k, starts[k], e.be, 0)
		}
		return
	}
	serial := kernels.Serial(e.be)
	next := make(chan int, len(segs))
	for k := range segs {
		next <- k
	}
	close(next)
	var wg sync.WaitGroup
	for range min(cores, len(segs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range next {
				f(k, starts[k], serial, 1)
			}
		}()
	}
	wg.Wait()
}

// gqaAttention projects the normed rows h to rotated queries, keys and
// values, appends the keys and values to the caches and attends.
func (e *layerEngine) gqaAttention(l *model.Layer, h []float32, segs []segment, s *scratch) {
	cfg, be := e.cfg, e.be
	D, d, H, G := cfg.HiddenSize, cfg.HeadDim, cfg.NumHeads, cfg.NumKVHeads
	n := len(h) / D
	qDim, kvDim := H*d, G*d
	s.q = grow(s.q, n*qDim)
	s.kv = grow(s.kv, 2*n*kvDim)
	q, k, v := s.q, s.kv[:n*kvDim], s.kv[n*kvDim:]
	kernels.Linear(be, q, h, l.Q.W, l.Q.B, n, qDim, D)
	kernels.Linear(be, k, h, l.K.W, l.K.B, n, kvDim, D)
	kernels.Linear(be, v, h, l.V.W, l.V.B, n, kvDim, D)
	group := H / G
	e.eachSegment(segs, func(sk, row0 int, be kernels.Backend, workers int) {
		sg, ss := segs[sk], &s.seg[sk]
		ss.rows = grow(ss.rows, sg.n*e.rowWidth)
		if len(ss.q) != G {
			ss.q, ss.out = make([][]float32, G), make([][]float32, G)
		}
		for g := range G {
			ss.q[g] = grow(ss.q[g], sg.n*group*d)
			ss.out[g] = grow(ss.out[g], sg.n*group*d)
		}
		for i := range sg.n {
			r, pos := row0+i, sg.past+i
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
		sg.rows.Write(sg.past, ss.rows)
		a := e.gqa
		a.Workers = workers
		a.Attend(be, ss.out, ss.q, sg.n, sg.past, sg.rows)
		for i := range sg.n {
			out := s.attnOut[(row0+i)*e.oIn:]
			for head := range H {
				g := head / group
				copy(out[head*d:(head+1)*d], ss.out[g][(i*group+head%group)*d:])
			}
		}
	})
}

// mla projects the normed rows h to queries [q_nope | q_rope] per head and
// to the cached row [c_KV | k_R] (c_KV RMS-normed when the layer has
// kv_a_layernorm, k_R rotated), appends the rows to the caches and attends
// by the absorbed or the decompressed path.
func (e *layerEngine) mla(ml *model.MLALayer, h []float32, segs []segment, s *scratch) {
	cfg, be, m := e.cfg, e.be, e.cfg.MLA
	D, H := cfg.HiddenSize, cfg.NumHeads
	nope, dr, dc := m.QKNopeHeadDim, m.QKRopeHeadDim, m.KVLoraRank
	qk, w := nope+dr, e.rowWidth
	n := len(h) / D
	qDim := H * qk
	s.q = grow(s.q, n*qDim)
	s.kv = grow(s.kv, n*w)
	q, a := s.q, s.kv
	kernels.Linear(be, q, h, ml.Q.W, ml.Q.B, n, qDim, D)
	kernels.Linear(be, a, h, ml.KVA.W, ml.KVA.B, n, w, D)
	rotate := e.rope.Rotate
	if m.RopeInterleave {
		rotate = e.rope.RotateInterleaved
	}
	for i := range n {
		row := a[i*w : (i+1)*w]
		if ml.KVANorm != nil {
			kernels.RMSNorm(row[:dc], row[:dc], ml.KVANorm, float32(cfg.RMSNormEps))
		}
	}
	e.eachSegment(segs, func(sk, row0 int, be kernels.Backend, workers int) {
		sg := segs[sk]
		for i := range sg.n {
			r, pos := row0+i, sg.past+i
			rotate(a[r*w+dc:(r+1)*w], pos)
			for head := range H {
				rotate(q[r*qDim+head*qk+nope:r*qDim+(head+1)*qk], pos)
			}
		}
		sg.rows.Write(sg.past, a[row0*w:(row0+sg.n)*w])
		out := s.attnOut[row0*e.oIn : (row0+sg.n)*e.oIn]
		qs := q[row0*qDim : (row0+sg.n)*qDim]
		if e.absorb(sg.n, sg.past) {
			e.mlaAbsorbed(be, workers, ml, qs, sg, &s.seg[sk], out)
		} else {
			e.mlaDecompressed(be, ml, qs, sg, &s.seg[sk], out)
		}
	})
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
func (e *layerEngine) mlaAbsorbed(be kernels.Backend, workers int, ml *model.MLALayer, q []float32, sg segment, ss *segScratch, out []float32) {
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
	for head := range H {
		if nope > 0 {
			// qa[i, head, :dc] = q_nope[i, head] · W_UK,head (d_nope×d_c).
			be.Gemm(false, false, sg.n, dc, nope, 1, q[head*qk:], H*qk, ml.KVB.W[head*kvb*dc:], dc, 0, qa[head*w:], H*w)
		} else {
			for i := range sg.n {
				clear(qa[(i*H+head)*w : (i*H+head)*w+dc])
			}
		}
		for i := range sg.n {
			copy(qa[(i*H+head)*w+dc:(i*H+head+1)*w], q[i*H*qk+head*qk+nope:i*H*qk+(head+1)*qk])
		}
	}
	a := e.absorbed
	a.Workers = workers
	a.Attend(be, ss.out, ss.q, sg.n, sg.past, sg.rows)
	for head := range H {
		// out[i, head] = lat[i, head] · W_UV,headᵀ (d_v×d_c).
		be.Gemm(false, true, sg.n, dv, dc, 1, lat[head*dc:], H*dc, ml.KVB.W[(head*kvb+nope)*dc:], dc, 0, out[head*dv:], H*dv)
	}
	if b := ml.KVB.B; b != nil {
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
func (e *layerEngine) mlaDecompressed(be kernels.Backend, ml *model.MLALayer, q []float32, sg segment, ss *segScratch, out []float32) {
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
	kernels.Linear(be, kv, ss.latent, ml.KVB.W, ml.KVB.B, total, H*kvb, dc)
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
