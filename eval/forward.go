// Package eval runs a loaded model: the float32 forward pass with a KV
// cache, perplexity over a token stream, and greedy generation.
package eval

import (
	"context"
	"fmt"

	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
)

// Runner evaluates one model with one backend. It holds no per-sequence
// state, so one Runner may serve several sequences (one KVCache each).
type Runner struct {
	model *model.Model
	layer *layerEngine
}

// NewRunner prepares a runner for sequences of up to maxPos positions.
func NewRunner(m *model.Model, be kernels.Backend, maxPos int) (*Runner, error) {
	e, err := newLayerEngine(m.Config, be, maxPos)
	if err != nil {
		return nil, err
	}
	return &Runner{model: m, layer: e}, nil
}

// MaxPositions is the longest sequence the runner accepts.
func (r *Runner) MaxPositions() int { return r.layer.rope.Len() }

// KVCache holds the float32 keys and values of one sequence, per layer. MLA
// layers hold their decompressed per-head keys and values.
type KVCache struct {
	k, v             [][]float32
	len              int
	cap              int
	kStride, vStride int
}

// NewCache allocates a cache for up to r.MaxPositions() tokens.
func (r *Runner) NewCache() *KVCache {
	e := r.layer
	c := &KVCache{cap: r.MaxPositions(), kStride: e.kStride, vStride: e.vStride}
	c.k = make([][]float32, e.cfg.NumLayers)
	c.v = make([][]float32, e.cfg.NumLayers)
	for i := range c.k {
		c.k[i] = make([]float32, c.cap*c.kStride)
		c.v[i] = make([]float32, c.cap*c.vStride)
	}
	return c
}

// Len is the number of cached positions.
func (c *KVCache) Len() int { return c.len }

// Reset empties the cache for a new sequence, keeping its memory.
func (c *KVCache) Reset() { c.len = 0 }

// Embed returns the embeddings of tokens (len(tokens)×HiddenSize).
func (r *Runner) Embed(tokens []int) ([]float32, error) {
	return EmbedTokens(r.model.Config, r.model.Embed, tokens)
}

// EmbedTokens looks tokens up in embed (VocabSize×HiddenSize of cfg) and
// returns the len(tokens)×HiddenSize rows, the input of the first layer.
func EmbedTokens(cfg model.Config, embed []float32, tokens []int) ([]float32, error) {
	D := cfg.HiddenSize
	if len(embed) != cfg.VocabSize*D {
		return nil, fmt.Errorf("embed: table has %d values, want %d×%d", len(embed), cfg.VocabSize, D)
	}
	x := make([]float32, len(tokens)*D)
	for i, t := range tokens {
		if t < 0 || t >= cfg.VocabSize {
			return nil, fmt.Errorf("forward: token id %d out of range [0, %d)", t, cfg.VocabSize)
		}
		copy(x[i*D:(i+1)*D], embed[t*D:(t+1)*D])
	}
	return x, nil
}

// Logits applies the final RMSNorm with weight norm to the rows×HiddenSize
// hidden states (in place) and then the LM head, returning rows×VocabSize.
func Logits(be kernels.Backend, cfg model.Config, norm []float32, head model.Linear, hidden []float32, rows int) []float32 {
	D := cfg.HiddenSize
	hidden = hidden[:rows*D]
	kernels.RMSNorm(hidden, hidden, norm, float32(cfg.RMSNormEps))
	logits := make([]float32, rows*cfg.VocabSize)
	kernels.Linear(be, logits, hidden, head.W, head.B, rows, cfg.VocabSize, D)
	return logits
}

// Forward runs tokens at positions cache.Len()… through the model, appends
// their keys and values to the cache and returns the logits: one row of
// VocabSize per token when allLogits, else only the last token's row.
// ctx is checked between layers, so a long prefill can be interrupted.
func (r *Runner) Forward(ctx context.Context, cache *KVCache, tokens []int, allLogits bool) ([]float32, error) {
	m := r.model
	e := r.layer
	n := len(tokens)
	past := cache.len
	if n == 0 {
		return nil, fmt.Errorf("forward: no tokens")
	}
	if past+n > cache.cap {
		return nil, fmt.Errorf("forward: %d positions exceed the cache capacity %d", past+n, cache.cap)
	}
	x, err := r.Embed(tokens)
	if err != nil {
		return nil, err
	}
	s := e.newScratch(n)
	for li := range m.Layers {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		kAll := cache.k[li][:(past+n)*e.kStride]
		vAll := cache.v[li][:(past+n)*e.vStride]
		if err := e.step(&m.Layers[li], x, n, past, kAll, vAll, s, nil); err != nil {
			return nil, fmt.Errorf("layer %d: %w", li, err)
		}
	}
	cache.len = past + n

	D := m.Config.HiddenSize
	if !allLogits {
		x = x[(n-1)*D:]
		n = 1
	}
	return Logits(e.be, m.Config, m.Norm, m.LMHead, x, n), nil
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
	e, err := newLayerEngine(cfg, be, seqLen)
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
	e := lr.layer
	D, T := e.cfg.HiddenSize, lr.seqLen
	if seqs < 0 || len(hidden) != seqs*T*D {
		return fmt.Errorf("layer runner: %d hidden values for %d sequences of %d×%d", len(hidden), seqs, T, D)
	}
	s := e.newScratch(T)
	k := make([]float32, T*e.kStride)
	v := make([]float32, T*e.vStride)
	for i := range seqs {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := e.step(l, hidden[i*T*D:(i+1)*T*D], T, 0, k, v, s, observe); err != nil {
			return err
		}
	}
	return nil
}
