package convert

import (
	"context"
	"fmt"
	"math/rand/v2"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
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

// CollectMoments runs the calibration sequences (all of one length) through
// the in-memory model m, layer by layer, and returns each layer's
// attention-input moment E[x̃ x̃ᵀ].
func CollectMoments(ctx context.Context, m *model.Model, be kernels.Backend, seqs [][]int) ([][]float64, error) {
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
	out := make([][]float64, len(m.Layers))
	for i := range m.Layers {
		acc := newMomentAccumulator(be, m.Config.HiddenSize)
		if err := lr.Apply(ctx, &m.Layers[i], hidden, len(seqs), acc.add); err != nil {
			return nil, fmt.Errorf("calibration forward, layer %d: %w", i, err)
		}
		out[i] = acc.moment()
	}
	return out, nil
}
