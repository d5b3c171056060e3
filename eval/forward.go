// Package eval runs a loaded model: the float32 forward pass with a KV
// cache, perplexity over a token stream, and greedy generation.
package eval

import (
	"context"
	"fmt"
	"math"

	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
)

// Runner evaluates one model with one backend. It holds no per-sequence
// state, so one Runner may serve several sequences (one KVCache each).
type Runner struct {
	model   *model.Model
	backend kernels.Backend
	rope    *rope.Table
	attn    kernels.Attention
}

// NewRunner prepares a runner for sequences of up to maxPos positions.
func NewRunner(m *model.Model, be kernels.Backend, maxPos int) (*Runner, error) {
	cfg := m.Config
	table, err := rope.NewTable(cfg.Rope, maxPos)
	if err != nil {
		return nil, fmt.Errorf("rope table: %w", err)
	}
	return &Runner{
		model:   m,
		backend: be,
		rope:    table,
		attn: kernels.Attention{
			Heads:   cfg.NumHeads,
			KVHeads: cfg.NumKVHeads,
			HeadDim: cfg.HeadDim,
			Window:  cfg.SlidingWindow,
			Scale:   float32(1 / math.Sqrt(float64(cfg.HeadDim))),
		},
	}, nil
}

// MaxPositions is the longest sequence the runner accepts.
func (r *Runner) MaxPositions() int { return r.rope.Len() }

// KVCache holds the float32 keys and values of one sequence, per layer.
type KVCache struct {
	k, v   [][]float32
	len    int
	cap    int
	stride int
}

// NewCache allocates a cache for up to r.MaxPositions() tokens.
func (r *Runner) NewCache() *KVCache {
	cfg := r.model.Config
	c := &KVCache{cap: r.rope.Len(), stride: cfg.NumKVHeads * cfg.HeadDim}
	c.k = make([][]float32, cfg.NumLayers)
	c.v = make([][]float32, cfg.NumLayers)
	for i := range c.k {
		c.k[i] = make([]float32, c.cap*c.stride)
		c.v[i] = make([]float32, c.cap*c.stride)
	}
	return c
}

// Len is the number of cached positions.
func (c *KVCache) Len() int { return c.len }

// Reset empties the cache for a new sequence, keeping its memory.
func (c *KVCache) Reset() { c.len = 0 }

// Forward runs tokens at positions cache.Len()… through the model, appends
// their keys and values to the cache and returns the logits: one row of
// VocabSize per token when allLogits, else only the last token's row.
// ctx is checked between layers, so a long prefill can be interrupted.
func (r *Runner) Forward(ctx context.Context, cache *KVCache, tokens []int, allLogits bool) ([]float32, error) {
	m := r.model
	cfg := m.Config
	n := len(tokens)
	past := cache.len
	if n == 0 {
		return nil, fmt.Errorf("forward: no tokens")
	}
	if past+n > cache.cap {
		return nil, fmt.Errorf("forward: %d positions exceed the cache capacity %d", past+n, cache.cap)
	}
	D, hd := cfg.HiddenSize, cfg.HeadDim
	qDim, kvDim := cfg.NumHeads*hd, cfg.NumKVHeads*hd
	be := r.backend
	eps := float32(cfg.RMSNormEps)

	x := make([]float32, n*D)
	for i, t := range tokens {
		if t < 0 || t >= cfg.VocabSize {
			return nil, fmt.Errorf("forward: token id %d out of range [0, %d)", t, cfg.VocabSize)
		}
		copy(x[i*D:(i+1)*D], m.Embed[t*D:(t+1)*D])
	}
	h := make([]float32, n*D)
	q := make([]float32, n*qDim)
	attnOut := make([]float32, n*qDim)
	gate := make([]float32, n*cfg.IntermediateSize)
	up := make([]float32, n*cfg.IntermediateSize)
	for li := range m.Layers {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		l := &m.Layers[li]
		kAll := cache.k[li][:(past+n)*kvDim]
		vAll := cache.v[li][:(past+n)*kvDim]
		kNew, vNew := kAll[past*kvDim:], vAll[past*kvDim:]

		kernels.RMSNorm(h, x, l.AttnNorm, eps)
		kernels.Linear(be, q, h, l.Q.W, l.Q.B, n, qDim, D)
		kernels.Linear(be, kNew, h, l.K.W, l.K.B, n, kvDim, D)
		kernels.Linear(be, vNew, h, l.V.W, l.V.B, n, kvDim, D)
		for i := range n {
			pos := past + i
			for head := range cfg.NumHeads {
				r.rope.Rotate(q[i*qDim+head*hd:i*qDim+(head+1)*hd], pos)
			}
			for head := range cfg.NumKVHeads {
				r.rope.Rotate(kNew[i*kvDim+head*hd:i*kvDim+(head+1)*hd], pos)
			}
		}
		r.attn.Causal(be, attnOut, q, kAll, vAll, n, past)
		kernels.Linear(be, h, attnOut, l.O.W, l.O.B, n, D, qDim)
		kernels.Add(x, h)

		kernels.RMSNorm(h, x, l.MLPNorm, eps)
		kernels.Linear(be, gate, h, l.Gate.W, l.Gate.B, n, cfg.IntermediateSize, D)
		kernels.Linear(be, up, h, l.Up.W, l.Up.B, n, cfg.IntermediateSize, D)
		kernels.SwiGLU(gate, up)
		kernels.Linear(be, h, gate, l.Down.W, l.Down.B, n, D, cfg.IntermediateSize)
		kernels.Add(x, h)
	}
	cache.len = past + n

	rows := x
	if !allLogits {
		rows = x[(n-1)*D:]
		n = 1
	}
	kernels.RMSNorm(rows, rows, m.Norm, eps)
	logits := make([]float32, n*cfg.VocabSize)
	kernels.Linear(be, logits, rows, m.LMHead.W, m.LMHead.B, n, cfg.VocabSize, D)
	return logits, nil
}
