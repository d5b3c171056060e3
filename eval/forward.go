// Package eval runs a loaded model: the float32 forward pass with a KV
// cache, perplexity over a token stream, and greedy generation.
package eval

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
)

// Runner evaluates one model with one backend. It holds no per-sequence
// state, so one Runner may serve several sequences (one KVCache each).
type Runner struct {
	model *model.Model
	w     *modelWeights
	layer *layerEngine
	opts  Options
	// scratch holds *scratch buffers of finished calls, so that a decode
	// step reuses the last one's instead of allocating.
	scratch sync.Pool
}

// Options configures a Runner.
type Options struct {
	// MaxPositions is the longest sequence the runner accepts.
	MaxPositions int
	// CacheDType stores the KV cache rows; the zero value is float32, which
	// the reference perplexities were computed with. Serving engines keep
	// the model's dtype (bf16).
	CacheDType kernels.RowDType
	// MLAPath selects the attention of MLA layers (PathAuto by default).
	MLAPath MLAPath
}

// NewRunner prepares a runner for sequences of up to maxPos positions with
// a float32 cache.
func NewRunner(m *model.Model, be kernels.Backend, maxPos int) (*Runner, error) {
	return NewRunnerWith(m, be, Options{MaxPositions: maxPos})
}

// NewRunnerWith prepares a runner with explicit options. The model's
// weights are used where they are, float32 or 16-bit (a model loaded with
// model.LoadOptions.KeepDType): nothing is copied.
func NewRunnerWith(m *model.Model, be kernels.Backend, opts Options) (*Runner, error) {
	if opts.MaxPositions <= 0 {
		return nil, fmt.Errorf("runner: max positions %d must be positive", opts.MaxPositions)
	}
	switch opts.CacheDType {
	case kernels.RowF32, kernels.RowBF16, kernels.RowF16:
	default:
		return nil, fmt.Errorf("runner: cache dtype %d is not one of f32, bf16, f16", opts.CacheDType)
	}
	if opts.MLAPath < PathAuto || opts.MLAPath > PathDecompressed {
		return nil, fmt.Errorf("runner: attention path %d is not one of %s", opts.MLAPath, strings.Join(MLAPaths(), ", "))
	}
	e, err := newLayerEngine(m.Config, be, opts.MaxPositions, opts.MLAPath)
	if err != nil {
		return nil, err
	}
	w, err := prepareModel(m)
	if err != nil {
		return nil, err
	}
	return &Runner{model: m, w: w, layer: e, opts: opts}, nil
}

// MaxPositions is the longest sequence the runner accepts.
func (r *Runner) MaxPositions() int { return r.layer.rope.Len() }

// WeightBytesPerToken is the weight bytes one decode step reads: every
// layer's projections and the LM head, in their resident dtypes (the
// embedding row and the norms are negligible).
func (r *Runner) WeightBytesPerToken() int64 {
	b := r.w.head.w.Bytes()
	for i := range r.w.layers {
		b += r.w.layers[i].bytes()
	}
	return b
}

// KVCache holds one sequence's cached rows, one kernels.Rows per layer:
// keys and values for GQA layers, [c_KV | k_R] for MLA layers. Pages are
// allocated as positions are written.
type KVCache struct {
	layers []*kernels.Rows
	len    int
	cap    int
}

// NewCache returns an empty cache for up to r.MaxPositions() tokens.
func (r *Runner) NewCache() *KVCache {
	c := &KVCache{cap: r.MaxPositions(), layers: make([]*kernels.Rows, r.model.Config.NumLayers)}
	for i := range c.layers {
		c.layers[i] = kernels.NewRows(r.layer.rowWidth, kernels.DefaultPageRows, r.opts.CacheDType)
	}
	return c
}

// Len is the number of cached positions.
func (c *KVCache) Len() int { return c.len }

// Reset empties the cache for a new sequence, keeping its memory.
func (c *KVCache) Reset() { c.Truncate(0) }

// Reserve allocates the pages for n positions in every layer.
func (c *KVCache) Reserve(n int) {
	for _, l := range c.layers {
		l.Reserve(min(n, c.cap))
	}
}

// BytesAllocated is the memory the cache's pages hold.
func (c *KVCache) BytesAllocated() int64 {
	var b int64
	for _, l := range c.layers {
		b += l.BytesAllocated()
	}
	return b
}

// RowBytes is the cache per position over all layers, in bytes.
func (c *KVCache) RowBytes() int64 {
	var b int64
	for _, l := range c.layers {
		b += int64(l.Width() * l.DType().Bytes())
	}
	return b
}

// Embed returns the embeddings of tokens (len(tokens)×HiddenSize).
func (r *Runner) Embed(tokens []int) ([]float32, error) {
	x := make([]float32, len(tokens)*r.model.Config.HiddenSize)
	return x, r.w.embedInto(x, tokens)
}

// EmbedTokens looks tokens up in embed (VocabSize×HiddenSize of cfg) and
// returns the len(tokens)×HiddenSize rows, the input of the first layer.
func EmbedTokens(cfg model.Config, embed []float32, tokens []int) ([]float32, error) {
	D := cfg.HiddenSize
	if len(embed) != cfg.VocabSize*D {
		return nil, fmt.Errorf("embed: table has %d values, want %d×%d", len(embed), cfg.VocabSize, D)
	}
	w := modelWeights{embed: kernels.MatF32(cfg.VocabSize, D, embed)}
	x := make([]float32, len(tokens)*D)
	return x, w.embedInto(x, tokens)
}

// Logits applies the final RMSNorm with weight norm to the rows×HiddenSize
// hidden states (in place) and then the LM head, returning rows×VocabSize.
func Logits(be kernels.Backend, cfg model.Config, norm []float32, head model.Linear, hidden []float32, rows int) []float32 {
	h, err := newProj(head, "lm_head", cfg.VocabSize, cfg.HiddenSize)
	if err != nil {
		panic(err)
	}
	return logitsInto(be, cfg, norm, h, hidden, rows, nil)
}

// logitsInto is Logits into dst (grown when short), which it returns.
func logitsInto(be kernels.Backend, cfg model.Config, norm []float32, head proj, hidden []float32, rows int, dst []float32) []float32 {
	D := cfg.HiddenSize
	hidden = hidden[:rows*D]
	kernels.RMSNorm(hidden, hidden, norm, float32(cfg.RMSNormEps))
	dst = grow(dst, rows*cfg.VocabSize)
	kernels.Linear(be, dst, hidden, head.w, head.b, rows)
	return dst
}

// Forward runs tokens at positions cache.Len()… through the model, appends
// their keys and values to the cache and returns the logits: one row of
// VocabSize per token when allLogits, else only the last token's row.
// ctx is checked between layers, so a long prefill can be interrupted.
func (r *Runner) Forward(ctx context.Context, cache *KVCache, tokens []int, allLogits bool) ([]float32, error) {
	return r.ForwardInto(ctx, cache, tokens, allLogits, nil)
}

// ForwardInto is Forward writing the logits into dst, grown when too
// short, and returning it: with a dst of the right size and a cache whose
// pages are reserved, a decode step allocates nothing.
func (r *Runner) ForwardInto(ctx context.Context, cache *KVCache, tokens []int, allLogits bool, dst []float32) ([]float32, error) {
	s := r.getScratch()
	defer r.scratch.Put(s)
	s.caches[0], s.tokens[0], s.logits[0] = cache, tokens, dst
	if err := r.forward(ctx, s, s.caches[:1], s.tokens[:1], allLogits, s.logits[:1]); err != nil {
		s.caches[0], s.tokens[0], s.logits[0] = nil, nil, nil
		return nil, err
	}
	out := s.logits[0]
	s.caches[0], s.tokens[0], s.logits[0] = nil, nil, nil
	return out, nil
}

// ForwardBatch is Forward for several sequences at once, each with its own
// cache: the projections run on all their rows together (one GEMM per
// weight for the batch, which is what makes batched decoding pay), the
// attention per sequence.
func (r *Runner) ForwardBatch(ctx context.Context, caches []*KVCache, tokens [][]int, allLogits bool) ([][]float32, error) {
	return r.ForwardBatchInto(ctx, caches, tokens, allLogits, nil)
}

// ForwardBatchInto is ForwardBatch writing sequence i's logits into dst[i]
// (grown when too short; dst itself grown to the batch) and returning dst.
func (r *Runner) ForwardBatchInto(ctx context.Context, caches []*KVCache, tokens [][]int, allLogits bool, dst [][]float32) ([][]float32, error) {
	if len(caches) != len(tokens) || len(caches) == 0 {
		return nil, fmt.Errorf("forward: %d caches for %d sequences", len(caches), len(tokens))
	}
	if len(dst) < len(tokens) {
		dst = append(dst, make([][]float32, len(tokens)-len(dst))...)
	}
	s := r.getScratch()
	defer r.scratch.Put(s)
	if err := r.forward(ctx, s, caches, tokens, allLogits, dst[:len(tokens)]); err != nil {
		return nil, err
	}
	return dst[:len(tokens)], nil
}

func (r *Runner) getScratch() *scratch {
	if s, ok := r.scratch.Get().(*scratch); ok {
		return s
	}
	return &scratch{}
}

// forward runs the batch through the model and writes each sequence's
// logits into out[i] (grown when short).
func (r *Runner) forward(ctx context.Context, s *scratch, caches []*KVCache, tokens [][]int, allLogits bool, out [][]float32) error {
	m, e := r.model, r.layer
	if len(s.segs) < len(tokens) {
		s.segs = make([]segment, len(tokens))
	}
	segs := s.segs[:len(tokens)]
	// The pooled scratch must not keep the caches alive after the call,
	// whether it ends in an error or not.
	defer func() {
		for i := range segs {
			segs[i].rows = nil
		}
	}()
	all := s.all[:0]
	for i, t := range tokens {
		c := caches[i]
		if len(t) == 0 {
			return fmt.Errorf("forward: sequence %d has no tokens", i)
		}
		if c == nil {
			return fmt.Errorf("forward: the cache of sequence %d is nil; make one with NewCache", i)
		}
		// Two sequences writing the same rows would corrupt each other.
		for j, o := range caches[:i] {
			if o == c {
				return fmt.Errorf("forward: sequences %d and %d share one cache; give each its own", j, i)
			}
		}
		if len(c.layers) != len(m.Layers) {
			return fmt.Errorf("forward: cache of sequence %d has %d layers, the model %d", i, len(c.layers), len(m.Layers))
		}
		if w := c.layers[0].Width(); w != e.rowWidth {
			return fmt.Errorf("forward: cache of sequence %d holds rows of %d values, this model's layers write %d (a cache of another model?)", i, w, e.rowWidth)
		}
		if c.len+len(t) > c.cap {
			return fmt.Errorf("forward: %d positions exceed the cache capacity %d", c.len+len(t), c.cap)
		}
		if c.len+len(t) > r.MaxPositions() {
			return fmt.Errorf("forward: %d positions exceed the runner's %d", c.len+len(t), r.MaxPositions())
		}
		segs[i] = segment{past: c.len, n: len(t)}
		all = append(all, t...)
	}
	s.all = all
	D := m.Config.HiddenSize
	s.x = grow(s.x, len(all)*D)
	x := s.x
	if err := r.w.embedInto(x, all); err != nil {
		return err
	}
	for li := range r.w.layers {
		if err := ctx.Err(); err != nil {
			return err
		}
		for i := range segs {
			segs[i].rows = caches[i].layers[li]
		}
		e.step(&r.w.layers[li], x, segs, s, nil)
	}
	row := 0
	for i, sg := range segs {
		caches[i].len = sg.past + sg.n
		hidden, rows := x[row*D:(row+sg.n)*D], sg.n
		if !allLogits {
			hidden, rows = hidden[(sg.n-1)*D:], 1
		}
		out[i] = logitsInto(e.be, m.Config, r.w.norm, r.w.head, hidden, rows, out[i])
		row += sg.n
	}
	return nil
}

// LayerRunner runs single decoder layers on batches of independent
// sequences of a fixed length, each from position 0 and without a cache:
// the converter's streaming calibration pushes its hidden states through
// one layer at a time with it.
type LayerRunner struct {
	layer  *layerEngine
	seqLen int
}

// NewLayerRunner prepares a LayerRunner for layers of cfg and sequences of
// seqLen positions.
func NewLayerRunner(cfg model.Config, be kernels.Backend, seqLen int) (*LayerRunner, error) {
	if seqLen <= 0 {
		return nil, fmt.Errorf("layer runner: sequence length %d must be positive", seqLen)
	}
	e, err := newLayerEngine(cfg, be, seqLen, PathAuto)
	if err != nil {
		return nil, err
	}
	return &LayerRunner{layer: e, seqLen: seqLen}, nil
}

// SeqLen is the length of every sequence Apply takes.
func (lr *LayerRunner) SeqLen() int { return lr.seqLen }

// Apply runs decoder layer l (GQA or MLA) in place on hidden, which holds
// seqs independent sequences of SeqLen rows of HiddenSize each, at
// positions 0..SeqLen-1. observe, when not nil, is called once per sequence
// with the RMS-normed attention input (rows×HiddenSize, rows = SeqLen)
// before attention; the slice is reused after observe returns. ctx is
// checked between sequences.
func (lr *LayerRunner) Apply(ctx context.Context, l *model.Layer, hidden []float32, seqs int, observe func(normed []float32, rows int)) error {
	return lr.eachSequence(ctx, l, hidden, seqs, "hidden values", func(e *layerEngine, lw *layerWeights, x []float32, s *scratch) {
		e.step(lw, x, s.segs, s, observe)
	})
}

// Attention replaces normed, which holds seqs independent sequences of
// SeqLen attention inputs (rows already RMS-normed by the layer's
// attn_norm), by layer l's attention output after o_proj: the sublayer
// alone, without the residual or the MLP. The converter's refinement fits
// a converted layer to the source's output with it.
func (lr *LayerRunner) Attention(ctx context.Context, l *model.Layer, normed []float32, seqs int) error {
	return lr.eachSequence(ctx, l, normed, seqs, "attention inputs", func(e *layerEngine, lw *layerWeights, x []float32, s *scratch) {
		e.attend(lw, x, s.segs, lr.seqLen, s)
	})
}

// eachSequence runs run on each of the seqs sequences of x in turn, each
// from position 0 with an empty cache; ctx is checked between them.
func (lr *LayerRunner) eachSequence(ctx context.Context, l *model.Layer, x []float32, seqs int, what string, run func(*layerEngine, *layerWeights, []float32, *scratch)) error {
	e := lr.layer
	D, T := e.cfg.HiddenSize, lr.seqLen
	if seqs < 0 || len(x) != seqs*T*D {
		return fmt.Errorf("layer runner: %d %s for %d sequences of %d×%d", len(x), what, seqs, T, D)
	}
	lw, err := prepareLayer(e.cfg, l)
	if err != nil {
		return err
	}
	s := &scratch{}
	rows := kernels.NewRows(e.rowWidth, kernels.DefaultPageRows, kernels.RowF32)
	for i := range seqs {
		if err := ctx.Err(); err != nil {
			return err
		}
		rows.Truncate(0)
		s.segs = append(s.segs[:0], segment{rows: rows, n: T})
		run(e, &lw, x[i*T*D:(i+1)*T*D], s)
	}
	return nil
}

// CopyFrom makes c a copy of src, a cache of the same runner.
func (c *KVCache) CopyFrom(src *KVCache) error {
	if len(c.layers) != len(src.layers) || c.cap < src.len {
		return fmt.Errorf("kv cache: copying %d layers × %d positions into %d layers × %d", len(src.layers), src.len, len(c.layers), c.cap)
	}
	for i, l := range c.layers {
		if err := l.CopyFrom(src.layers[i]); err != nil {
			return err
		}
	}
	c.len = src.len
	return nil
}

// AttentionProbe returns a function that runs layer li's decoding attention
// kernel alone, once per call — one new query (random values) at the last
// cached position against all of c's rows of that layer, as a decode step
// does (absorbed for MLA) but without writing to the cache — and the bytes
// of cache each call reads. Benchmarks time it against a memory copy.
func (r *Runner) AttentionProbe(c *KVCache, li int) (run func(), bytes int64, err error) {
	if li < 0 || li >= len(c.layers) || c.len == 0 {
		return nil, 0, fmt.Errorf("attention probe: layer %d of %d, %d cached positions", li, len(c.layers), c.len)
	}
	e := r.layer
	rows := c.layers[li]
	a := e.gqa
	if e.cfg.MLA != nil {
		a = e.absorbed
	}
	q := make([][]float32, len(a.KeyOffsets))
	out := make([][]float32, len(q))
	for g := range q {
		q[g] = make([]float32, a.PerPosition*a.KeyDim)
		for j := range q[g] {
			q[g][j] = float32(j%7) * 0.01
		}
		out[g] = make([]float32, a.PerPosition*a.ValueDim)
	}
	bytes = int64(c.len) * int64(rows.Width()*rows.DType().Bytes())
	scratch := &kernels.AttendScratch{}
	return func() { a.Attend(e.be, scratch, out, q, 1, c.len-1, rows) }, bytes, nil
}

// Truncate forgets the positions from n on, so that a benchmark or a
// speculative step can run again from position n.
func (c *KVCache) Truncate(n int) {
	c.len = min(c.len, max(n, 0))
	for _, l := range c.layers {
		l.Truncate(c.len)
	}
}
