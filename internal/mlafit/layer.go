// Package mlafit fits the attention of one Multi-head Latent Attention
// layer (DeepSeek-V3's form, q_lora_rank null) to target outputs: the
// layer's forward pass on whole causal sequences, its analytic backward
// pass to every projection, and an Adam fit with early stopping on
// held-back sequences. The converter refines each converted layer with it
// against the source layer's attention output.
//
// The code is generic over float32 (the fit) and float64 (the tests'
// finite-difference checks); matrix products go through a BLAS-style GEMM
// the caller supplies. Layouts are row-major and weights follow nn.Linear
// (out×in), as in package model.
package mlafit

import (
	"fmt"
	"math"
)

// Float is the element type of a layer's arithmetic.
type Float interface{ ~float32 | ~float64 }

// Gemm computes C = alpha·op(A)·op(B) + beta·C on row-major strided
// matrices, as BLAS gemm: op(A) is m×k, op(B) is k×n, C is m×n. With
// beta 0, C is overwritten.
type Gemm[T Float] func(transA, transB bool, m, n, k int, alpha T, a []T, lda int, b []T, ldb int, beta T, c []T, ldc int)

// The tensors of a layer, indexes into Params.
const (
	Q       = iota // q_proj.weight: heads·(nope+rope) × hidden
	QBias          // q_proj.bias
	KVA            // kv_a_proj_with_mqa.weight: (latent+rope) × hidden
	KVABias        // kv_a_proj_with_mqa.bias
	KVANorm        // kv_a_layernorm.weight: latent
	KVB            // kv_b_proj.weight: heads·(nope+value) × latent
	KVBBias        // kv_b_proj.bias
	O              // o_proj.weight: hidden × heads·value
	OBias          // o_proj.bias
	NumTensors
)

// TensorName is tensor i's name in a checkpoint layer.
func TensorName(i int) string {
	return [NumTensors]string{"q_proj.weight", "q_proj.bias", "kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias",
		"kv_a_layernorm.weight", "kv_b_proj.weight", "kv_b_proj.bias", "o_proj.weight", "o_proj.bias"}[i]
}

// Params are a layer's tensors; a nil entry is a tensor the layer does not
// have (a bias, the norm).
type Params[T Float] [NumTensors][]T

// Clone returns a deep copy of p.
func (p *Params[T]) Clone() *Params[T] {
	var c Params[T]
	for i, t := range p {
		if t != nil {
			c[i] = append([]T(nil), t...)
		}
	}
	return &c
}

// Shape is the geometry of an MLA attention layer.
type Shape struct {
	// Hidden is the model width, Heads the attention heads.
	Hidden, Heads int
	// Nope and Rope are each query/key head's position-free and rotated
	// widths (qk_nope_head_dim, qk_rope_head_dim), Value each value head's.
	Nope, Rope, Value int
	// Latent is kv_lora_rank, the cached latent's width.
	Latent int
	// Eps is kv_a_layernorm's epsilon (used when Params has the norm).
	Eps float64
	// Scale multiplies the attention scores.
	Scale float64
	// Interleave says RoPE rotates adjacent pairs (2j, 2j+1), DeepSeek's
	// layout; otherwise the halves (j, j+rope/2).
	Interleave bool
	// Window limits each query to the last Window positions (0: all).
	Window int
	// InvFreq are the Rope/2 pairs' inverse frequencies, AttnFactor the
	// factor cos and sin are scaled by (1 without scaling).
	InvFreq    []float64
	AttnFactor float64
}

// sizes are the element counts of each tensor.
func (s Shape) sizes() [NumTensors]int {
	H, D := s.Heads, s.Hidden
	qk, kv := s.Nope+s.Rope, s.Nope+s.Value
	return [NumTensors]int{
		Q: H * qk * D, QBias: H * qk,
		KVA: (s.Latent + s.Rope) * D, KVABias: s.Latent + s.Rope, KVANorm: s.Latent,
		KVB: H * kv * s.Latent, KVBBias: H * kv,
		O: D * H * s.Value, OBias: D,
	}
}

// rows are the output rows of each weight (the norm counts as one row).
func (s Shape) rows() [NumTensors]int {
	H := s.Heads
	return [NumTensors]int{Q: H * (s.Nope + s.Rope), KVA: s.Latent + s.Rope, KVANorm: 1, KVB: H * (s.Nope + s.Value), O: s.Hidden}
}

// Check reports whether p fits s: the weights present, every tensor of
// its size.
func (s Shape) Check(p *Params[float32]) error { return check(s, p) }

func check[T Float](s Shape, p *Params[T]) error {
	if s.Hidden <= 0 || s.Heads <= 0 || s.Latent <= 0 || s.Value <= 0 || s.Nope < 0 || s.Rope < 0 || s.Rope%2 != 0 {
		return fmt.Errorf("mlafit: bad shape %+v", s)
	}
	if len(s.InvFreq) != s.Rope/2 {
		return fmt.Errorf("mlafit: %d RoPE frequencies for %d rotated dims", len(s.InvFreq), s.Rope)
	}
	sz := s.sizes()
	for i, t := range p {
		switch {
		case t == nil && (i == Q || i == KVA || i == KVB || i == O):
			return fmt.Errorf("mlafit: %s missing", TensorName(i))
		case t != nil && len(t) != sz[i]:
			return fmt.Errorf("mlafit: %s has %d values, want %d", TensorName(i), len(t), sz[i])
		}
	}
	return nil
}

// Layer computes an MLA attention layer of one shape on sequences of up
// to a fixed length. A Layer is read-only once made and may be shared by
// goroutines, each with its own Work.
type Layer[T Float] struct {
	s        Shape
	gemm     Gemm[T]
	half     int
	cos, sin []T // position × half
}

// NewLayer prepares the layer of shape s for sequences of up to maxLen
// positions, computing with gemm.
func NewLayer[T Float](s Shape, maxLen int, gemm Gemm[T]) (*Layer[T], error) {
	if maxLen <= 0 {
		return nil, fmt.Errorf("mlafit: sequence length %d", maxLen)
	}
	if len(s.InvFreq) != s.Rope/2 {
		return nil, fmt.Errorf("mlafit: %d RoPE frequencies for %d rotated dims", len(s.InvFreq), s.Rope)
	}
	half := s.Rope / 2
	l := &Layer[T]{s: s, gemm: gemm, half: half, cos: make([]T, maxLen*half), sin: make([]T, maxLen*half)}
	attn := s.AttnFactor
	if attn == 0 {
		attn = 1
	}
	// As rope.Table computes them, so a float32 Layer rotates as eval does.
	for pos := range maxLen {
		for j, f := range s.InvFreq {
			sn, cs := math.Sincos(float64(pos) * f)
			l.cos[pos*half+j] = T(cs * attn)
			l.sin[pos*half+j] = T(sn * attn)
		}
	}
	return l, nil
}

// Shape is the layer's shape.
func (l *Layer[T]) Shape() Shape { return l.s }

// MaxLen is the longest sequence the layer takes.
func (l *Layer[T]) MaxLen() int { return len(l.cos) / max(l.half, 1) }

// Work is one sequence's forward state, kept for its backward pass, and
// the backward pass's scratch. Buffers grow on demand and are reused.
type Work[T Float] struct {
	n int
	// q holds the queries and a the kv_a_proj rows [latent | k_R], their
	// RoPE parts rotated; cn is the latent after the norm and rinv each
	// row's inverse RMS; kv holds kv_b_proj's rows [k_nope | v] per head;
	// p the attention probabilities, head × row × column; attn the heads'
	// outputs; y the layer's output.
	q, a, cn, rinv, kv, p, attn, y []T
	// The backward pass's gradients with respect to the same rows.
	dattn, dq, da, dkv, dcn, ds []T
}

func grow[T Float](s []T, n int) []T {
	if cap(s) < n {
		return make([]T, n)
	}
	return s[:n]
}

// block is the query rows whose scores are computed together: each block
// reads only the keys up to its last row, which halves a causal
// sequence's work.
const block = 64

// Forward runs the layer with params p on the n rows of x (the attention
// input, n×Hidden, positions 0…n−1) and returns its output (n×Hidden,
// owned by w). w keeps what Backward needs.
func (l *Layer[T]) Forward(p *Params[T], x []T, n int, w *Work[T]) []T {
	s := l.s
	D, H, nope, dr, dv, dc := s.Hidden, s.Heads, s.Nope, s.Rope, s.Value, s.Latent
	qk, kvw, aw := nope+dr, nope+dv, dc+dr
	w.n = n
	w.q, w.a, w.cn = grow(w.q, n*H*qk), grow(w.a, n*aw), grow(w.cn, n*dc)
	w.rinv, w.kv = grow(w.rinv, n), grow(w.kv, n*H*kvw)
	w.p, w.attn, w.y = grow(w.p, H*n*n), grow(w.attn, n*H*dv), grow(w.y, n*D)
	l.gemm(false, true, n, H*qk, D, 1, x, D, p[Q], D, 0, w.q, H*qk)
	addBias(w.q, p[QBias])
	l.gemm(false, true, n, aw, D, 1, x, D, p[KVA], D, 0, w.a, aw)
	addBias(w.a, p[KVABias])
	for r := range n {
		c, cn := w.a[r*aw:r*aw+dc], w.cn[r*dc:(r+1)*dc]
		if g := p[KVANorm]; g != nil {
			var ss float64
			for _, v := range c {
				ss += float64(v) * float64(v)
			}
			ri := T(1 / math.Sqrt(ss/float64(dc)+s.Eps))
			w.rinv[r] = ri
			for j, v := range c {
				cn[j] = v * ri * g[j]
			}
		} else {
			copy(cn, c)
		}
	}
	l.gemm(false, true, n, H*kvw, dc, 1, w.cn, dc, p[KVB], dc, 0, w.kv, H*kvw)
	addBias(w.kv, p[KVBBias])
	for r := range n {
		l.rotate(w.a[r*aw+dc:(r+1)*aw], r, 1)
		for h := range H {
			l.rotate(w.q[r*H*qk+h*qk+nope:r*H*qk+(h+1)*qk], r, 1)
		}
	}
	scale := T(s.Scale)
	for h := range H {
		ph := w.p[h*n*n : (h+1)*n*n]
		for i0 := 0; i0 < n; i0 += block {
			i1 := min(n, i0+block)
			sb := ph[i0*n:]
			if nope > 0 {
				l.gemm(false, true, i1-i0, i1, nope, scale, w.q[i0*H*qk+h*qk:], H*qk, w.kv[h*kvw:], H*kvw, 0, sb, n)
			}
			if dr > 0 {
				beta := T(1)
				if nope == 0 {
					beta = 0
				}
				l.gemm(false, true, i1-i0, i1, dr, scale, w.q[i0*H*qk+h*qk+nope:], H*qk, w.a[dc:], aw, beta, sb, n)
			}
			for i := i0; i < i1; i++ {
				l.softmax(ph[i*n:(i+1)*n], i)
			}
			l.gemm(false, false, i1-i0, dv, i1, 1, sb, n, w.kv[h*kvw+nope:], H*kvw, 0, w.attn[i0*H*dv+h*dv:], H*dv)
		}
	}
	l.gemm(false, true, n, D, H*dv, 1, w.attn, H*dv, p[O], H*dv, 0, w.y, D)
	addBias(w.y, p[OBias])
	return w.y
}

// softmax turns row i's scores (columns 0…i, within the window) into
// probabilities in place and zeroes the row's other columns.
func (l *Layer[T]) softmax(row []T, i int) {
	first := 0
	if l.s.Window > 0 {
		first = max(0, i-l.s.Window+1)
	}
	clear(row[:first])
	clear(row[i+1:])
	vis := row[first : i+1]
	m := vis[0]
	for _, v := range vis {
		m = max(m, v)
	}
	var sum float64
	for j, v := range vis {
		e := math.Exp(float64(v - m))
		vis[j] = T(e)
		sum += e
	}
	inv := T(1 / sum)
	for j := range vis {
		vis[j] *= inv
	}
}

// rotate applies RoPE at position pos to x (Rope values), forwards (dir 1)
// or backwards (dir −1, the transpose).
func (l *Layer[T]) rotate(x []T, pos int, dir T) {
	h := l.half
	c, s := l.cos[pos*h:pos*h+h], l.sin[pos*h:pos*h+h]
	for j := range h {
		i0, i1 := j, j+h
		if l.s.Interleave {
			i0, i1 = 2*j, 2*j+1
		}
		a, b := x[i0], x[i1]
		x[i0] = a*c[j] - dir*b*s[j]
		x[i1] = b*c[j] + dir*a*s[j]
	}
}

func addBias[T Float](rows, b []T) {
	if b == nil {
		return
	}
	for r := 0; r < len(rows); r += len(b) {
		row := rows[r : r+len(b)]
		for j, v := range b {
			row[j] += v
		}
	}
}

// colSum adds the column sums of rows (of len(dst) columns) to dst.
func colSum[T Float](dst, rows []T) {
	if dst == nil {
		return
	}
	for r := 0; r < len(rows); r += len(dst) {
		row := rows[r : r+len(dst)]
		for j, v := range row {
			dst[j] += v
		}
	}
}

// Backward adds to g the gradient of a loss with respect to each tensor g
// holds (nil entries are skipped), given dy, the loss's gradient with
// respect to the output of the last Forward on w with the same p and x.
func (l *Layer[T]) Backward(p *Params[T], x []T, w *Work[T], dy []T, g *Params[T]) {
	s, n := l.s, w.n
	D, H, nope, dr, dv, dc := s.Hidden, s.Heads, s.Nope, s.Rope, s.Value, s.Latent
	qk, kvw, aw := nope+dr, nope+dv, dc+dr
	w.dattn, w.dq, w.da = grow(w.dattn, n*H*dv), grow(w.dq, n*H*qk), grow(w.da, n*aw)
	w.dkv, w.dcn, w.ds = grow(w.dkv, n*H*kvw), grow(w.dcn, n*dc), grow(w.ds, block*n)
	if g[O] != nil {
		l.gemm(true, false, D, H*dv, n, 1, dy, D, w.attn, H*dv, 1, g[O], H*dv)
	}
	colSum(g[OBias], dy[:n*D])
	l.gemm(false, false, n, H*dv, D, 1, dy, D, p[O], H*dv, 0, w.dattn, H*dv)
	clear(w.dkv)
	clear(w.da)
	scale := T(s.Scale)
	for h := range H {
		ph := w.p[h*n*n : (h+1)*n*n]
		for i0 := 0; i0 < n; i0 += block {
			i1 := min(n, i0+block)
			pb, do := ph[i0*n:], w.dattn[i0*H*dv+h*dv:]
			// dV += Pᵀ·dO; dP = dO·Vᵀ.
			l.gemm(true, false, i1, dv, i1-i0, 1, pb, n, do, H*dv, 1, w.dkv[h*kvw+nope:], H*kvw)
			l.gemm(false, true, i1-i0, i1, dv, 1, do, H*dv, w.kv[h*kvw+nope:], H*kvw, 0, w.ds, n)
			// dS = scale·P⊙(dP − Σ_j P·dP), row by row.
			for i := i0; i < i1; i++ {
				pr, dp := ph[i*n:i*n+i+1], w.ds[(i-i0)*n:(i-i0)*n+i+1]
				var dot T
				for j, v := range pr {
					dot += v * dp[j]
				}
				for j, v := range pr {
					dp[j] = scale * v * (dp[j] - dot)
				}
				clear(w.ds[(i-i0)*n+i+1 : (i-i0+1)*n])
			}
			if nope > 0 {
				l.gemm(false, false, i1-i0, nope, i1, 1, w.ds, n, w.kv[h*kvw:], H*kvw, 0, w.dq[i0*H*qk+h*qk:], H*qk)
				l.gemm(true, false, i1, nope, i1-i0, 1, w.ds, n, w.q[i0*H*qk+h*qk:], H*qk, 1, w.dkv[h*kvw:], H*kvw)
			}
			if dr > 0 {
				l.gemm(false, false, i1-i0, dr, i1, 1, w.ds, n, w.a[dc:], aw, 0, w.dq[i0*H*qk+h*qk+nope:], H*qk)
				l.gemm(true, false, i1, dr, i1-i0, 1, w.ds, n, w.q[i0*H*qk+h*qk+nope:], H*qk, 1, w.da[dc:], aw)
			}
		}
	}
	for r := range n {
		l.rotate(w.da[r*aw+dc:(r+1)*aw], r, -1)
		for h := range H {
			l.rotate(w.dq[r*H*qk+h*qk+nope:r*H*qk+(h+1)*qk], r, -1)
		}
	}
	if g[KVB] != nil {
		l.gemm(true, false, H*kvw, dc, n, 1, w.dkv, H*kvw, w.cn, dc, 1, g[KVB], dc)
	}
	colSum(g[KVBBias], w.dkv)
	l.gemm(false, false, n, dc, H*kvw, 1, w.dkv, H*kvw, p[KVB], dc, 0, w.dcn, dc)
	for r := range n {
		c, dcn, dlat := w.a[r*aw:r*aw+dc], w.dcn[r*dc:(r+1)*dc], w.da[r*aw:r*aw+dc]
		gam := p[KVANorm]
		if gam == nil {
			copy(dlat, dcn)
			continue
		}
		ri := w.rinv[r]
		var dot T
		for j, v := range c {
			dot += dcn[j] * gam[j] * v
		}
		if gg := g[KVANorm]; gg != nil {
			for j, v := range c {
				gg[j] += dcn[j] * v * ri
			}
		}
		k := ri * ri * ri * dot / T(dc)
		for j, v := range c {
			dlat[j] = ri*dcn[j]*gam[j] - k*v
		}
	}
	if g[KVA] != nil {
		l.gemm(true, false, aw, D, n, 1, w.da, aw, x, D, 1, g[KVA], D)
	}
	colSum(g[KVABias], w.da)
	if g[Q] != nil {
		l.gemm(true, false, H*qk, D, n, 1, w.dq, H*qk, x, D, 1, g[Q], D)
	}
	colSum(g[QBias], w.dq)
}
