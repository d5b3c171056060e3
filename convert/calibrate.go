package convert

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
)

// MaxCalibrationTokens bounds --calib-tokens at 512 times the default:
// the hidden states of that many tokens alone take 256 GiB at 4096 model
// dims, and a larger count would size allocations past any machine.
const MaxCalibrationTokens = 1 << 24

// CalibrationSequences cuts count sequences of seqLen tokens from ids at
// offsets drawn with a fixed seed, so the same file always gives the same
// calibration set.
func CalibrationSequences(ids []int, tokens, seqLen int, seed uint64) ([][]int, error) {
	if seqLen <= 1 {
		return nil, fmt.Errorf("--calib-seq %d must be at least 2", seqLen)
	}
	if tokens < seqLen {
		return nil, fmt.Errorf("--calib-tokens %d is less than one sequence of %d", tokens, seqLen)
	}
	if tokens > MaxCalibrationTokens {
		return nil, fmt.Errorf("--calib-tokens %d exceeds the limit of %d", tokens, MaxCalibrationTokens)
	}
	if len(ids) < seqLen {
		return nil, fmt.Errorf("the calibration text has %d tokens, fewer than one sequence of %d", len(ids), seqLen)
	}
	count := tokens / seqLen
	// Draw from disjoint slots when the text is long enough, so sequences
	// do not repeat text.
	slots := len(ids) / seqLen
	rng := rand.New(rand.NewPCG(seed, 0x7a11b4a7))
	seqs := make([][]int, count)
	if slots >= count {
		for i, s := range rng.Perm(slots)[:count] {
			seqs[i] = ids[s*seqLen : (s+1)*seqLen]
		}
		return seqs, nil
	}
	for i := range seqs {
		start := rng.IntN(len(ids) - seqLen + 1)
		seqs[i] = ids[start : start+seqLen]
	}
	return seqs, nil
}

// momentAccumulator sums x̃ x̃ᵀ over attention-input rows, x̃ = [x; 1], in
// float64; the products of each batch are computed in float32 by the
// backend, only for the lower triangle (the moment is symmetric).
type momentAccumulator struct {
	be    kernels.Backend
	dim   int
	gram  []float64 // Σ x xᵀ, lower triangle of dim×dim
	sum   []float64 // Σ x
	count float64
	buf   []float32
}

func newMomentAccumulator(be kernels.Backend, dim int) *momentAccumulator {
	return &momentAccumulator{be: be, dim: dim, gram: make([]float64, dim*dim), sum: make([]float64, dim)}
}

// gramBlock is the height of the block rows in which add computes the
// lower triangle of a batch's Gram matrix.
const gramBlock = 512

// add accumulates rows×dim activations.
func (a *momentAccumulator) add(x []float32, rows int) {
	n := a.dim
	if cap(a.buf) < n*n {
		a.buf = make([]float32, n*n)
	}
	g := a.buf[:n*n]
	for i0 := 0; i0 < n; i0 += gramBlock {
		w := min(gramBlock, n-i0)
		// Rows i0..i0+w of XᵀX, columns up to the diagonal block's end.
		a.be.Gemm(true, false, w, i0+w, rows, 1, x[i0:], n, x, n, 0, g[i0*n:], n)
	}
	for i := range n {
		dst := a.gram[i*n : i*n+i+1]
		for j, v := range g[i*n : i*n+i+1] {
			dst[j] += float64(v)
		}
	}
	for r := range rows {
		for j, v := range x[r*n : (r+1)*n] {
			a.sum[j] += float64(v)
		}
	}
	a.count += float64(rows)
}

// moment is the mean E[x̃ x̃ᵀ], (dim+1)².
func (a *momentAccumulator) moment() []float64 {
	n := a.dim
	n1 := n + 1
	out := make([]float64, n1*n1)
	for i := range n {
		for j, v := range a.gram[i*n : i*n+i+1] {
			m := v / a.count
			out[i*n1+j], out[j*n1+i] = m, m
		}
		m := a.sum[i] / a.count
		out[i*n1+n], out[n*n1+i] = m, m
	}
	out[n*n1+n] = 1
	return out
}

// LayerStats are one source layer's calibration statistics.
type LayerStats struct {
	// Moment is E[x̃ x̃ᵀ] of the attention input x̃ = [x; 1], (D+1)².
	Moment []float64
	// Profile is each query head's attention share by query–key distance.
	Profile rope.Profile
}

// layerStats runs source layer l on the calibration states hidden (seqs
// sequences of the runner's length) in place, collecting its statistics.
func layerStats(ctx context.Context, lr *eval.LayerRunner, be kernels.Backend, cfg model.Config, l *model.Layer, hidden []float32, seqs int) (*LayerStats, error) {
	acc := newMomentAccumulator(be, cfg.HiddenSize)
	prof, err := newProfileAccumulator(be, cfg, l, lr.SeqLen())
	if err != nil {
		return nil, err
	}
	observe := func(x []float32, rows int) {
		acc.add(x, rows)
		prof.add(x, rows)
	}
	if err := lr.Apply(ctx, l, hidden, seqs, observe); err != nil {
		return nil, err
	}
	return &LayerStats{Moment: acc.moment(), Profile: prof.profile()}, nil
}

// CollectStats runs the calibration sequences (all of one length) through
// the in-memory model m, layer by layer, and returns each layer's
// statistics.
func CollectStats(ctx context.Context, m *model.Model, be kernels.Backend, seqs [][]int) ([]LayerStats, error) {
	if len(seqs) == 0 {
		return nil, fmt.Errorf("no calibration sequences")
	}
	seqLen := len(seqs[0])
	var flat []int
	for _, s := range seqs {
		if len(s) != seqLen {
			return nil, fmt.Errorf("calibration sequences of lengths %d and %d", seqLen, len(s))
		}
		flat = append(flat, s...)
	}
	hidden, err := eval.EmbedTokens(m.Config, m.Embed, flat)
	if err != nil {
		return nil, err
	}
	lr, err := eval.NewLayerRunner(m.Config, be, seqLen)
	if err != nil {
		return nil, err
	}
	out := make([]LayerStats, len(m.Layers))
	for i := range m.Layers {
		st, err := layerStats(ctx, lr, be, m.Config, &m.Layers[i], hidden, len(seqs))
		if err != nil {
			return nil, fmt.Errorf("calibration forward, layer %d: %w", i, err)
		}
		out[i] = *st
	}
	return out, nil
}

// profileSequences bounds how many calibration sequences the attention
// profile is measured on: its shares settle long before the moments do,
// and each sequence costs the layer's query and key projections again.
const profileSequences = 16

// profileAccumulator measures, per query head, the share of the source
// layer's attention at each query–key distance (rope.Profile), from the
// same attention inputs the moments are collected from: the queries and
// keys are projected and rotated as the source does, and every causal
// softmax row adds its weights by distance.
type profileAccumulator struct {
	be       kernels.Backend
	cfg      model.Config
	l        *model.Layer
	table    *rope.Table
	sums     [][]float64
	rows     float64 // softmax rows added per head
	seqs     int
	xq, q, k []float32
	s        []float32
	e        []float64
}

func newProfileAccumulator(be kernels.Backend, cfg model.Config, l *model.Layer, seqLen int) (*profileAccumulator, error) {
	t, err := rope.NewTable(cfg.Rope, seqLen)
	if err != nil {
		return nil, fmt.Errorf("attention profile: %w", err)
	}
	p := &profileAccumulator{be: be, cfg: cfg, l: l, table: t, sums: make([][]float64, cfg.NumHeads)}
	for h := range p.sums {
		p.sums[h] = make([]float64, seqLen)
	}
	return p, nil
}

// profileQueryStride samples the query positions the profile averages
// over: every fourth, a quarter of the cost for shares that barely move.
const profileQueryStride = 4

// add takes one sequence's attention inputs (rows×HiddenSize).
func (p *profileAccumulator) add(x []float32, rows int) {
	if p.seqs >= profileSequences {
		return
	}
	p.seqs++
	cfg := p.cfg
	D, d, H, G := cfg.HiddenSize, cfg.HeadDim, cfg.NumHeads, cfg.NumKVHeads
	nq := (rows + profileQueryStride - 1) / profileQueryStride
	p.xq = grow(p.xq, nq*D)
	for i := range nq {
		t := i * profileQueryStride
		copy(p.xq[i*D:(i+1)*D], x[t*D:(t+1)*D])
	}
	p.q = grow(p.q, nq*H*d)
	p.k = grow(p.k, rows*G*d)
	p.s = grow(p.s, nq*rows)
	if len(p.e) < rows {
		p.e = make([]float64, rows)
	}
	kernels.Linear(p.be, p.q, p.xq, kernels.MatF32(H*d, D, p.l.Q.W), p.l.Q.B, nq)
	kernels.Linear(p.be, p.k, x, kernels.MatF32(G*d, D, p.l.K.W), p.l.K.B, rows)
	for i := range nq {
		for h := range H {
			p.table.Rotate(p.q[(i*H+h)*d:(i*H+h+1)*d], i*profileQueryStride)
		}
	}
	for t := range rows {
		for g := range G {
			p.table.Rotate(p.k[(t*G+g)*d:(t*G+g+1)*d], t)
		}
	}
	scale := float32(cfg.AttentionScale())
	for h := range H {
		g := h / (H / G)
		// Scores of the sampled queries against every key of the sequence;
		// only the causal part of each row is read.
		p.be.Gemm(false, true, nq, rows, d, scale, p.q[h*d:], H*d, p.k[g*d:], G*d, 0, p.s, rows)
		sum := p.sums[h]
		for i := range nq {
			t := i * profileQueryStride
			row := p.s[i*rows : i*rows+t+1]
			m := row[0]
			for _, v := range row {
				m = max(m, v)
			}
			var z float64
			for s, v := range row {
				e := math.Exp(float64(v - m))
				p.e[s] = e
				z += e
			}
			for s := range row {
				sum[t-s] += p.e[s] / z
			}
		}
	}
	p.rows += float64(nq)
}

// profile is the mean share per distance of each head.
func (p *profileAccumulator) profile() rope.Profile {
	out := make(rope.Profile, len(p.sums))
	for h, s := range p.sums {
		out[h] = make([]float64, len(s))
		for i, v := range s {
			out[h][i] = v / p.rows
		}
	}
	return out
}

func grow(s []float32, n int) []float32 {
	if cap(s) < n {
		return make([]float32, n)
	}
	return s[:n]
}
