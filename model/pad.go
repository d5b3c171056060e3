package model

import (
	"fmt"
	"math"
)

// Latent padding. Serving engines accept only some latent widths (vLLM's
// CPU MLA backend only kv_lora_rank 512), so an export may store its d_c
// latent dims padded with zeros to a wider kv_lora_rank N: zero rows in
// kv_a_proj_with_mqa's latent part, zero columns in kv_b_proj. An engine
// then computes the same function with N − d_c wasted cache values per
// token and layer; this package strips the padding on read, so that eval
// caches d_c values only. The config.json key transmla.latent_rank records
// d_c (MLAConfig.LatentPad = N − d_c).
//
// Stored padding changes only one thing: kv_a_layernorm normalizes by the
// mean square over all N dims, which the zeros lower by d_c/N. Reading a
// padded file strips the zeros and compensates exactly, for whatever
// epsilon: the kept latent rows are scaled by t = √(d_c/N) and the norm
// weight by 1/t, so that eval computes what an engine computes on the
// stored file. Writing stores the weights as they are: the stock format
// puts the latent's mean square five orders of magnitude below the norm's
// epsilon, so the lower mean square changes the norm's output by about
// 1e-5·(1−d_c/N)/2 relative, below any stored dtype but f32, while
// rescaling the stored weights would round them a second time (measured:
// 2.8e-4 in perplexity on llama-gqa-25m in bf16).

// storedLatent is the kv_lora_rank that m's tensors are stored with.
func (m *MLAConfig) storedLatent() int { return m.KVLoraRank + m.LatentPad }

// readScale is t, the factor that reading applies to the kept latent rows:
// √(d_c/N) under kv_a_layernorm, 1 without it.
func (m *MLAConfig) readScale() float64 {
	if !m.KVANorm || m.LatentPad == 0 {
		return 1
	}
	return math.Sqrt(float64(m.KVLoraRank) / float64(m.storedLatent()))
}

// padLatent returns a copy of l whose MLA tensors have the stored widths
// of cfg; l is not modified. Layers of unpadded configs are returned as
// they are.
func padLatent(cfg Config, l *Layer) (*Layer, error) {
	m := cfg.MLA
	if m == nil || m.LatentPad == 0 || l.MLA == nil {
		return l, nil
	}
	dc, n, dr, D := m.KVLoraRank, m.storedLatent(), m.QKRopeHeadDim, cfg.HiddenSize
	// Read through a copy: widening a layer that keeps its stored dtype
	// must not change l.
	src := *l.MLA
	ml := &src
	ml.KVA.W, ml.KVA.W16 = ml.KVA.Float32(), Bits16{}
	ml.KVB.W, ml.KVB.W16 = ml.KVB.Float32(), Bits16{}
	if len(ml.KVA.W) != (dc+dr)*D || len(ml.KVB.W)%dc != 0 {
		return nil, fmt.Errorf("pad latent: kv_a_proj_with_mqa has %d values, want (%d+%d)×%d", len(ml.KVA.W), dc, dr, D)
	}
	out := *l
	pm := *ml
	out.MLA = &pm
	pm.KVA.W = make([]float32, (n+dr)*D)
	copy(pm.KVA.W, ml.KVA.W[:dc*D])
	copy(pm.KVA.W[n*D:], ml.KVA.W[dc*D:])
	if ml.KVA.B != nil {
		pm.KVA.B = make([]float32, n+dr)
		copy(pm.KVA.B, ml.KVA.B[:dc])
		copy(pm.KVA.B[n:], ml.KVA.B[dc:])
	}
	if ml.KVANorm != nil {
		pm.KVANorm = make([]float32, n)
		copy(pm.KVANorm, ml.KVANorm)
		for i := dc; i < n; i++ {
			// The padded dims are zero whatever their weight; 1 lets a
			// fine-tuned model grow them as an ordinary latent dim.
			pm.KVANorm[i] = 1
		}
	}
	rows := len(ml.KVB.W) / dc
	pm.KVB.W = make([]float32, rows*n)
	for r := range rows {
		copy(pm.KVB.W[r*n:r*n+dc], ml.KVB.W[r*dc:(r+1)*dc])
	}
	return &out, nil
}

// unpadLatent strips the stored padding from layer li, read with cfg's
// stored widths, in place. The padded latent rows must be zero: a model
// whose padding was trained away is refused, naming the fix.
func unpadLatent(cfg Config, li int, l *Layer) error {
	m := cfg.MLA
	if m == nil || m.LatentPad == 0 || l.MLA == nil {
		return nil
	}
	dc, n, dr, D := m.KVLoraRank, m.storedLatent(), m.QKRopeHeadDim, cfg.HiddenSize
	ml := l.MLA
	// The unpadded latent weights are rescaled (readScale), so a model
	// that keeps its stored dtype holds these two in float32.
	ml.KVA.W, ml.KVA.W16 = ml.KVA.Float32(), Bits16{}
	ml.KVB.W, ml.KVB.W16 = ml.KVB.Float32(), Bits16{}
	nonZero := func(vals []float32) bool {
		for _, v := range vals {
			if v != 0 {
				return true
			}
		}
		return false
	}
	if nonZero(ml.KVA.W[dc*D:n*D]) || (ml.KVA.B != nil && nonZero(ml.KVA.B[dc:n])) {
		return fmt.Errorf("layer %d: kv_a_proj_with_mqa rows %d..%d are not zero, but config.json's transmla.latent_rank %d says they are padding; remove transmla.latent_rank to load all %d latent dims", li, dc, n-1, dc, n)
	}
	s := float32(m.readScale())
	kva := make([]float32, (dc+dr)*D)
	for i, v := range ml.KVA.W[:dc*D] {
		kva[i] = v * s
	}
	copy(kva[dc*D:], ml.KVA.W[n*D:])
	ml.KVA.W = kva
	if ml.KVA.B != nil {
		b := make([]float32, dc+dr)
		for i, v := range ml.KVA.B[:dc] {
			b[i] = v * s
		}
		copy(b[dc:], ml.KVA.B[n:])
		ml.KVA.B = b
	}
	if ml.KVANorm != nil {
		w := make([]float32, dc)
		for i, v := range ml.KVANorm[:dc] {
			w[i] = v / s
		}
		ml.KVANorm = w
	}
	rows := len(ml.KVB.W) / n
	kvb := make([]float32, rows*dc)
	for r := range rows {
		copy(kvb[r*dc:(r+1)*dc], ml.KVB.W[r*n:r*n+dc])
	}
	ml.KVB.W = kvb
	return nil
}
