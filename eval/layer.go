package eval

import (
	"fmt"

	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
)

// layerEngine runs one decoder block, GQA or MLA, on the rows of one
// sequence: the single per-layer code path behind Runner.Forward and
// LayerRunner.Apply.
type layerEngine struct {
	cfg  model.Config
	be   kernels.Backend
	rope *rope.Table
	attn kernels.Attention
	// kStride and vStride are the key and value values per token and layer
	// that attention reads: G·d each for GQA, H·(nope+rope) and H·v for MLA.
	kStride, vStride int
	// oIn is o_proj's input width: heads × value width.
	oIn int
}

func newLayerEngine(cfg model.Config, be kernels.Backend, maxPos int) (*layerEngine, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("model config: %w", err)
	}
	e := &layerEngine{cfg: cfg, be: be}
	var err error
	if m := cfg.MLA; m != nil {
		if m.RopeInvFreq != nil {
			e.rope, err = rope.NewTableFromInvFreq(m.RopeInvFreq, 1, maxPos)
		} else {
			p := cfg.Rope
			p.Dim = m.QKRopeHeadDim
			e.rope, err = rope.NewTable(p, maxPos)
		}
		qk := m.QKNopeHeadDim + m.QKRopeHeadDim
		e.attn = kernels.Attention{Heads: cfg.NumHeads, KVHeads: cfg.NumHeads, HeadDim: qk, ValueDim: m.VHeadDim}
		e.kStride, e.vStride = cfg.NumHeads*qk, cfg.NumHeads*m.VHeadDim
	} else {
		e.rope, err = rope.NewTable(cfg.Rope, maxPos)
		e.attn = kernels.Attention{Heads: cfg.NumHeads, KVHeads: cfg.NumKVHeads, HeadDim: cfg.HeadDim}
		e.kStride = cfg.NumKVHeads * cfg.HeadDim
		e.vStride = e.kStride
	}
	if err != nil {
		return nil, fmt.Errorf("rope table: %w", err)
	}
	e.oIn = cfg.NumHeads * e.vStride / e.attn.KVHeads
	e.attn.Window = cfg.SlidingWindow
	e.attn.Scale = float32(cfg.AttentionScale())
	return e, nil
}

// scratch holds one call's intermediate rows, sized for n rows.
type scratch struct {
	h, q, attnOut, gate, up []float32
	// a, c and kv are MLA's kv_a output, latent and kv_b output.
	a, c, kv []float32
}

func (e *layerEngine) newScratch(n int) *scratch {
	cfg := e.cfg
	s := &scratch{
		h:       make([]float32, n*cfg.HiddenSize),
		q:       make([]float32, n*cfg.NumHeads*e.attn.HeadDim),
		attnOut: make([]float32, n*e.oIn),
		gate:    make([]float32, n*cfg.IntermediateSize),
		up:      make([]float32, n*cfg.IntermediateSize),
	}
	if m := cfg.MLA; m != nil {
		s.a = make([]float32, n*(m.KVLoraRank+m.QKRopeHeadDim))
		s.c = make([]float32, n*m.KVLoraRank)
		s.kv = make([]float32, n*cfg.NumHeads*(m.QKNopeHeadDim+m.VHeadDim))
	}
	return s
}

// step runs layer l in place on the n rows of x at positions
// past..past+n-1. kAll and vAll hold past+n rows: the first past are the
// cached ones, the new rows' keys and values are written after them.
// observe, when not nil, sees the normed attention input.
func (e *layerEngine) step(l *model.Layer, x []float32, n, past int, kAll, vAll []float32, s *scratch, observe func([]float32, int)) error {
	cfg, be := e.cfg, e.be
	D, I := cfg.HiddenSize, cfg.IntermediateSize
	eps := float32(cfg.RMSNormEps)
	if (l.MLA != nil) != (cfg.MLA != nil) {
		return fmt.Errorf("layer has MLA weights %v but the config says MLA %v", l.MLA != nil, cfg.MLA != nil)
	}
	h := s.h[:n*D]
	kernels.RMSNorm(h, x, l.AttnNorm, eps)
	if observe != nil {
		observe(h, n)
	}
	kNew := kAll[past*e.kStride : (past+n)*e.kStride]
	vNew := vAll[past*e.vStride : (past+n)*e.vStride]
	if l.MLA != nil {
		e.mlaKV(l.MLA, h, n, past, kNew, vNew, s)
	} else {
		e.gqaKV(l, h, n, past, kNew, vNew, s)
	}
	e.attn.Causal(be, s.attnOut, s.q, kAll, vAll, n, past)
	kernels.Linear(be, h, s.attnOut[:n*e.oIn], l.O.W, l.O.B, n, D, e.oIn)
	kernels.Add(x, h)

	kernels.RMSNorm(h, x, l.MLPNorm, eps)
	gate, up := s.gate[:n*I], s.up[:n*I]
	kernels.Linear(be, gate, h, l.Gate.W, l.Gate.B, n, I, D)
	kernels.Linear(be, up, h, l.Up.W, l.Up.B, n, I, D)
	kernels.SwiGLU(gate, up)
	kernels.Linear(be, h, gate, l.Down.W, l.Down.B, n, D, I)
	kernels.Add(x, h)
	return nil
}

// gqaKV projects the normed rows h to rotated queries (s.q) and to the new
// keys and values of standard grouped-query attention.
func (e *layerEngine) gqaKV(l *model.Layer, h []float32, n, past int, kNew, vNew []float32, s *scratch) {
	cfg, be := e.cfg, e.be
	D, hd := cfg.HiddenSize, cfg.HeadDim
	qDim, kvDim := cfg.NumHeads*hd, cfg.NumKVHeads*hd
	q := s.q[:n*qDim]
	kernels.Linear(be, q, h, l.Q.W, l.Q.B, n, qDim, D)
	kernels.Linear(be, kNew, h, l.K.W, l.K.B, n, kvDim, D)
	kernels.Linear(be, vNew, h, l.V.W, l.V.B, n, kvDim, D)
	for i := range n {
		pos := past + i
		for head := range cfg.NumHeads {
			e.rope.Rotate(q[i*qDim+head*hd:i*qDim+(head+1)*hd], pos)
		}
		for head := range cfg.NumKVHeads {
			e.rope.Rotate(kNew[i*kvDim+head*hd:i*kvDim+(head+1)*hd], pos)
		}
	}
}

// mlaKV is MLA's decompressed path: queries [q_nope | q_rope] per head, the
// latent c (RMS-normed when the layer has kv_a_layernorm) expanded by
// kv_b_proj into per-head [k_nope | v], and keys [k_nope_h | k_rope] with
// the one RoPE key shared by all heads.
func (e *layerEngine) mlaKV(ml *model.MLALayer, h []float32, n, past int, kNew, vNew []float32, s *scratch) {
	cfg, be, m := e.cfg, e.be, e.cfg.MLA
	D, H := cfg.HiddenSize, cfg.NumHeads
	nope, dr, dv, dc := m.QKNopeHeadDim, m.QKRopeHeadDim, m.VHeadDim, m.KVLoraRank
	qk, aDim, kvDim := nope+dr, dc+dr, nope+dv
	qDim := H * qk
	q, a, c, kv := s.q[:n*qDim], s.a[:n*aDim], s.c[:n*dc], s.kv[:n*H*kvDim]
	kernels.Linear(be, q, h, ml.Q.W, ml.Q.B, n, qDim, D)
	kernels.Linear(be, a, h, ml.KVA.W, ml.KVA.B, n, aDim, D)
	for i := range n {
		copy(c[i*dc:(i+1)*dc], a[i*aDim:i*aDim+dc])
	}
	if ml.KVANorm != nil {
		kernels.RMSNorm(c, c, ml.KVANorm, float32(cfg.RMSNormEps))
	}
	kernels.Linear(be, kv, c, ml.KVB.W, ml.KVB.B, n, H*kvDim, dc)
	rotate := e.rope.Rotate
	if m.RopeInterleave {
		rotate = e.rope.RotateInterleaved
	}
	for i := range n {
		pos := past + i
		kr := a[i*aDim+dc : (i+1)*aDim]
		rotate(kr, pos)
		for head := range H {
			rotate(q[i*qDim+head*qk+nope:i*qDim+(head+1)*qk], pos)
			src := kv[(i*H+head)*kvDim : (i*H+head+1)*kvDim]
			key := kNew[(i*H+head)*qk : (i*H+head+1)*qk]
			copy(key[:nope], src[:nope])
			copy(key[nope:], kr)
			copy(vNew[(i*H+head)*dv:(i*H+head+1)*dv], src[nope:])
		}
	}
}
