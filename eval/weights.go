package eval

import (
	"fmt"

	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/safetensors"
)

// proj is one projection as the kernels take it: weights (float32 or
// 16-bit, as the model holds them) and a bias or nil.
type proj struct {
	w kernels.Mat
	b []float32
}

// newProj views l, which must be out×in, as a proj.
func newProj(l model.Linear, name string, out, in int) (proj, error) {
	w, err := matOf(l.W, l.W16, name, out, in)
	if err != nil {
		return proj{}, err
	}
	if l.B != nil && len(l.B) != out {
		return proj{}, fmt.Errorf("%s: bias of %d values, want %d", name, len(l.B), out)
	}
	return proj{w: w, b: l.B}, nil
}

// matOf views float32 weights w, or else the 16-bit w16, as an out×in Mat.
func matOf(w []float32, w16 model.Bits16, name string, out, in int) (kernels.Mat, error) {
	if w != nil || w16.Bits == nil {
		if len(w) != out*in {
			return kernels.Mat{}, fmt.Errorf("%s: %d weights, want %d×%d", name, len(w), out, in)
		}
		return kernels.MatF32(out, in, w), nil
	}
	if len(w16.Bits) != out*in {
		return kernels.Mat{}, fmt.Errorf("%s: %d weights, want %d×%d", name, len(w16.Bits), out, in)
	}
	switch w16.DType {
	case safetensors.BF16:
		return kernels.Mat16(out, in, kernels.RowBF16, w16.Bits), nil
	case safetensors.F16:
		return kernels.Mat16(out, in, kernels.RowF16, w16.Bits), nil
	}
	return kernels.Mat{}, fmt.Errorf("%s: 16-bit weights of dtype %s", name, w16.DType)
}

// modelWeights is a model's weights as the kernels take them.
type modelWeights struct {
	embed  kernels.Mat
	norm   []float32
	head   proj
	layers []layerWeights
}

// layerWeights is one decoder block's weights: GQA's q, k, v or MLA's.
type layerWeights struct {
	attnNorm, mlpNorm []float32
	q, k, v, o        proj
	mla               *mlaWeights
	gate, up, down    proj
}

// mlaWeights are an MLA layer's projections; uk[h] and uv[h] are head h's
// W_UK (d_nope×d_c) and W_UV (d_v×d_c) inside kv_b_proj, as the absorbed
// path multiplies them.
type mlaWeights struct {
	q, kva, kvb proj
	kvaNorm     []float32
	uk, uv      []kernels.Mat
}

// bytes is the weight bytes of the block's projections.
func (l *layerWeights) bytes() int64 {
	b := l.o.w.Bytes() + l.gate.w.Bytes() + l.up.w.Bytes() + l.down.w.Bytes()
	if l.mla != nil {
		return b + l.mla.q.w.Bytes() + l.mla.kva.w.Bytes() + l.mla.kvb.w.Bytes()
	}
	return b + l.q.w.Bytes() + l.k.w.Bytes() + l.v.w.Bytes()
}

// prepareModel views m's weights for the kernels, checking their sizes.
func prepareModel(m *model.Model) (*modelWeights, error) {
	cfg := m.Config
	D, V := cfg.HiddenSize, cfg.VocabSize
	embed, err := matOf(m.Embed, m.Embed16, "embed_tokens", V, D)
	if err != nil {
		return nil, err
	}
	head, err := newProj(m.LMHead, "lm_head", V, D)
	if err != nil {
		return nil, err
	}
	if len(m.Norm) != D {
		return nil, fmt.Errorf("norm: %d values, want %d", len(m.Norm), D)
	}
	if len(m.Layers) != cfg.NumLayers {
		return nil, fmt.Errorf("model has %d layers, config says %d", len(m.Layers), cfg.NumLayers)
	}
	w := &modelWeights{embed: embed, norm: m.Norm, head: head, layers: make([]layerWeights, len(m.Layers))}
	for i := range m.Layers {
		if w.layers[i], err = prepareLayer(cfg, &m.Layers[i]); err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
	}
	return w, nil
}

// prepareLayer views layer l's weights for the kernels, checking them
// against cfg.
func prepareLayer(cfg model.Config, l *model.Layer) (layerWeights, error) {
	if (l.MLA != nil) != (cfg.MLA != nil) {
		return layerWeights{}, fmt.Errorf("layer has MLA weights %v but the config says MLA %v", l.MLA != nil, cfg.MLA != nil)
	}
	D, I, H := cfg.HiddenSize, cfg.IntermediateSize, cfg.NumHeads
	if len(l.AttnNorm) != D || len(l.MLPNorm) != D {
		return layerWeights{}, fmt.Errorf("norms of %d and %d values, want %d", len(l.AttnNorm), len(l.MLPNorm), D)
	}
	lw := layerWeights{attnNorm: l.AttnNorm, mlpNorm: l.MLPNorm}
	var err error
	set := func(dst *proj, src model.Linear, name string, out, in int) {
		if err == nil {
			*dst, err = newProj(src, name, out, in)
		}
	}
	if m := cfg.MLA; m != nil {
		nope, dr, dc, dv := m.QKNopeHeadDim, m.QKRopeHeadDim, m.KVLoraRank, m.VHeadDim
		ml := &mlaWeights{kvaNorm: l.MLA.KVANorm}
		set(&ml.q, l.MLA.Q, "q_proj", H*(nope+dr), D)
		set(&ml.kva, l.MLA.KVA, "kv_a_proj_with_mqa", dc+dr, D)
		set(&ml.kvb, l.MLA.KVB, "kv_b_proj", H*(nope+dv), dc)
		set(&lw.o, l.O, "o_proj", D, H*dv)
		if err != nil {
			return layerWeights{}, err
		}
		if ml.kvaNorm != nil && len(ml.kvaNorm) != dc {
			return layerWeights{}, fmt.Errorf("kv_a_layernorm: %d values, want %d", len(ml.kvaNorm), dc)
		}
		kvb := nope + dv
		for h := range H {
			ml.uk = append(ml.uk, ml.kvb.w.Slice(h*kvb, h*kvb+nope))
			ml.uv = append(ml.uv, ml.kvb.w.Slice(h*kvb+nope, (h+1)*kvb))
		}
		lw.mla = ml
	} else {
		d, G := cfg.HeadDim, cfg.NumKVHeads
		set(&lw.q, l.Q, "q_proj", H*d, D)
		set(&lw.k, l.K, "k_proj", G*d, D)
		set(&lw.v, l.V, "v_proj", G*d, D)
		set(&lw.o, l.O, "o_proj", D, H*d)
	}
	set(&lw.gate, l.Gate, "gate_proj", I, D)
	set(&lw.up, l.Up, "up_proj", I, D)
	set(&lw.down, l.Down, "down_proj", D, I)
	if err != nil {
		return layerWeights{}, err
	}
	return lw, nil
}

// embedInto writes the embedding rows of tokens into x.
func (w *modelWeights) embedInto(x []float32, tokens []int) error {
	D, V := w.embed.Cols(), w.embed.Rows()
	for i, t := range tokens {
		if t < 0 || t >= V {
			return fmt.Errorf("forward: token id %d out of range [0, %d)", t, V)
		}
		w.embed.Row(x[i*D:(i+1)*D], t)
	}
	return nil
}
