package eval

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/transmla/transmla/model"
)

// randomModel fills every tensor of a GQA or MLA model of cfg with
// Gaussian values: projections scaled by 1/√in, norms near 1.
func randomModel(t testing.TB, cfg model.Config, seed uint64) *model.Model {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 2))
	vec := func(n int, std float64) []float32 {
		v := make([]float32, n)
		for i := range v {
			v[i] = float32(rng.NormFloat64() * std)
		}
		return v
	}
	lin := func(out, in int, bias bool) model.Linear {
		l := model.Linear{W: vec(out*in, 1/math.Sqrt(float64(in)))}
		if bias {
			l.B = vec(out, 0.3)
		}
		return l
	}
	norm := func(n int) []float32 {
		v := vec(n, 0.2)
		for j := range v {
			v[j]++
		}
		return v
	}
	D, I, H := cfg.HiddenSize, cfg.IntermediateSize, cfg.NumHeads
	m := &model.Model{Config: cfg, Embed: vec(cfg.VocabSize*D, 1), Norm: vec(D, 0.3), Layers: make([]model.Layer, cfg.NumLayers)}
	for i := range m.Layers {
		l := &m.Layers[i]
		l.AttnNorm, l.MLPNorm = norm(D), norm(D)
		if mc := cfg.MLA; mc != nil {
			l.MLA = &model.MLALayer{
				Q:   lin(H*(mc.QKNopeHeadDim+mc.QKRopeHeadDim), D, mc.QBias),
				KVA: lin(mc.KVLoraRank+mc.QKRopeHeadDim, D, mc.KVABias),
				KVB: lin(H*(mc.QKNopeHeadDim+mc.VHeadDim), mc.KVLoraRank, false),
			}
			if mc.KVANorm {
				l.MLA.KVANorm = norm(mc.KVLoraRank)
			}
			l.O = lin(D, H*mc.VHeadDim, cfg.OBias)
		} else {
			G, d := cfg.NumKVHeads, cfg.HeadDim
			l.Q, l.K, l.V = lin(H*d, D, cfg.QKVBias), lin(G*d, D, cfg.QKVBias), lin(G*d, D, cfg.QKVBias)
			l.O = lin(D, H*d, cfg.OBias)
		}
		l.Gate, l.Up, l.Down = lin(I, D, false), lin(I, D, false), lin(D, I, false)
	}
	if cfg.TieWordEmbeddings {
		m.LMHead.W = m.Embed
	} else {
		m.LMHead.W = vec(cfg.VocabSize*D, 1/math.Sqrt(float64(D)))
	}
	return m
}

// The float64 reference forward pass, written from the formulas and
// shared by the GQA and MLA references: only attention differs.

// refLinear is y = W·x + b in float64.
func refLinear(l model.Linear, x []float64, out int) []float64 {
	y := make([]float64, out)
	for o := range out {
		var s float64
		for i, v := range x {
			s += float64(l.W[o*len(x)+i]) * v
		}
		if l.B != nil {
			s += float64(l.B[o])
		}
		y[o] = s
	}
	return y
}

// refRMS is RMSNorm with weight w.
func refRMS(x []float64, w []float32, eps float64) []float64 {
	var ss float64
	for _, v := range x {
		ss += v * v
	}
	inv := 1 / math.Sqrt(ss/float64(len(x))+eps)
	y := make([]float64, len(x))
	for i, v := range x {
		y[i] = v * inv * float64(w[i])
	}
	return y
}

// refEmbed returns the residual stream of tokens, one row per position.
func refEmbed(m *model.Model, tokens []int) [][]float64 {
	D := m.Config.HiddenSize
	x := make([][]float64, len(tokens))
	for t, tok := range tokens {
		x[t] = make([]float64, D)
		for i := range D {
			x[t][i] = float64(m.Embed[tok*D+i])
		}
	}
	return x
}

// refWindowStart is the first position that position t attends to.
func refWindowStart(cfg model.Config, t int) int {
	if cfg.SlidingWindow > 0 {
		return max(0, t-cfg.SlidingWindow+1)
	}
	return 0
}

// refAttend adds to out (len(v(s))) the softmax-weighted values of
// positions [lo, t] for the query q: scores q·k(s)·scale.
func refAttend(q []float64, k, v func(s int) []float64, lo, t int, scale float64, out []float64) {
	w := make([]float64, t+1-lo)
	mx := math.Inf(-1)
	for s := lo; s <= t; s++ {
		var dot float64
		for i, kv := range k(s) {
			dot += q[i] * kv
		}
		w[s-lo] = dot * scale
		mx = math.Max(mx, w[s-lo])
	}
	var sum float64
	for i := range w {
		w[i] = math.Exp(w[i] - mx)
		sum += w[i]
	}
	for s := lo; s <= t; s++ {
		for i, vv := range v(s) {
			out[i] += w[s-lo] / sum * vv
		}
	}
}

// refBlockTail finishes a decoder block at one position: o_proj of the
// attention output and the SwiGLU MLP, each added to the residual x.
func refBlockTail(cfg model.Config, l model.Layer, attn, x []float64) {
	D, I := cfg.HiddenSize, cfg.IntermediateSize
	for i, v := range refLinear(l.O, attn, D) {
		x[i] += v
	}
	h := refRMS(x, l.MLPNorm, cfg.RMSNormEps)
	gate, up := refLinear(l.Gate, h, I), refLinear(l.Up, h, I)
	for i := range gate {
		gate[i] = gate[i] / (1 + math.Exp(-gate[i])) * up[i]
	}
	for i, v := range refLinear(l.Down, gate, D) {
		x[i] += v
	}
}

// refLogits applies the final norm and the head to every position.
func refLogits(m *model.Model, x [][]float64) []float64 {
	var logits []float64
	for _, row := range x {
		logits = append(logits, refLinear(m.LMHead, refRMS(row, m.Norm, m.Config.RMSNormEps), m.Config.VocabSize)...)
	}
	return logits
}

// referenceGQA computes the logits of every token in float64 from the
// formulas: rotate-half RoPE, grouped heads, causal softmax limited to the
// last SlidingWindow positions.
func referenceGQA(m *model.Model, tokens []int) []float64 {
	cfg := m.Config
	H, G, d, T := cfg.NumHeads, cfg.NumKVHeads, cfg.HeadDim, len(tokens)
	inv, attnFactor, err := cfg.Rope.InvFreq()
	if err != nil {
		panic(err)
	}
	rot := func(x []float64, pos int) {
		half := len(inv)
		for j, f := range inv {
			s, c := math.Sincos(float64(pos) * f)
			s, c = s*attnFactor, c*attnFactor
			x[j], x[j+half] = x[j]*c-x[j+half]*s, x[j+half]*c+x[j]*s
		}
	}
	x := refEmbed(m, tokens)
	scale := 1 / math.Sqrt(float64(d))
	for _, l := range m.Layers {
		q, k, v := make([][]float64, T), make([][]float64, T), make([][]float64, T)
		for t := range T {
			h := refRMS(x[t], l.AttnNorm, cfg.RMSNormEps)
			q[t], k[t], v[t] = refLinear(l.Q, h, H*d), refLinear(l.K, h, G*d), refLinear(l.V, h, G*d)
			for head := range H {
				rot(q[t][head*d:(head+1)*d], t)
			}
			for g := range G {
				rot(k[t][g*d:(g+1)*d], t)
			}
		}
		for t := range T {
			out := make([]float64, H*d)
			for head := range H {
				g := head / (H / G)
				refAttend(q[t][head*d:(head+1)*d],
					func(s int) []float64 { return k[s][g*d : (g+1)*d] },
					func(s int) []float64 { return v[s][g*d : (g+1)*d] },
					refWindowStart(cfg, t), t, scale, out[head*d:(head+1)*d])
			}
			refBlockTail(cfg, l, out, x[t])
		}
	}
	return refLogits(m, x)
}

// referenceMLA computes the logits of every token in float64, straight
// from the formulas of MLA's decompressed form, each position attending to
// the last SlidingWindow positions when the config has a window.
func referenceMLA(m *model.Model, tokens []int) []float64 {
	cfg := m.Config
	mc := cfg.MLA
	H, T := cfg.NumHeads, len(tokens)
	nope, dr, dv, dc := mc.QKNopeHeadDim, mc.QKRopeHeadDim, mc.VHeadDim, mc.KVLoraRank
	inv, attnFactor := mc.RopeInvFreq, 1.0
	if inv == nil {
		p := cfg.Rope
		p.Dim = dr
		var err error
		if inv, attnFactor, err = p.InvFreq(); err != nil {
			panic(err)
		}
	}
	scale := cfg.AttentionScale()
	// rot rotates the RoPE vector x (length dr) at position pos.
	rot := func(x []float64, pos int) {
		for j, f := range inv {
			s, c := math.Sincos(float64(pos) * f)
			s, c = s*attnFactor, c*attnFactor
			a, b := j, j+dr/2
			if mc.RopeInterleave {
				a, b = 2*j, 2*j+1
			}
			x[a], x[b] = x[a]*c-x[b]*s, x[b]*c+x[a]*s
		}
	}
	x := refEmbed(m, tokens)
	for _, l := range m.Layers {
		ml := l.MLA
		q := make([][]float64, T)
		k := make([][][]float64, T) // [t][head] = k_nope_h | k_rope
		v := make([][][]float64, T)
		for t := range T {
			h := refRMS(x[t], l.AttnNorm, cfg.RMSNormEps)
			q[t] = refLinear(ml.Q, h, H*(nope+dr))
			a := refLinear(ml.KVA, h, dc+dr)
			c, kr := a[:dc], a[dc:]
			if ml.KVANorm != nil {
				c = refRMS(c, ml.KVANorm, cfg.RMSNormEps)
			}
			kv := refLinear(ml.KVB, c, H*(nope+dv))
			rot(kr, t)
			k[t], v[t] = make([][]float64, H), make([][]float64, H)
			for head := range H {
				rot(q[t][head*(nope+dr)+nope:(head+1)*(nope+dr)], t)
				k[t][head] = append(append([]float64{}, kv[head*(nope+dv):head*(nope+dv)+nope]...), kr...)
				v[t][head] = kv[head*(nope+dv)+nope : (head+1)*(nope+dv)]
			}
		}
		for t := range T {
			out := make([]float64, H*dv)
			for head := range H {
				refAttend(q[t][head*(nope+dr):(head+1)*(nope+dr)],
					func(s int) []float64 { return k[s][head] },
					func(s int) []float64 { return v[s][head] },
					refWindowStart(cfg, t), t, scale, out[head*dv:(head+1)*dv])
			}
			refBlockTail(cfg, l, out, x[t])
		}
	}
	return refLogits(m, x)
}
