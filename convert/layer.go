package convert

import (
	"fmt"
	"math"
	"slices"

	"gonum.org/v1/gonum/mat"

	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/svd"
)

// layerPlan is everything one layer's conversion needs besides its weights.
type layerPlan struct {
	src  model.Config // the GQA source
	dst  model.Config // the MLA result
	opts Options
	// moment is E[x̃ x̃ᵀ] of the attention input x̃ = [x; 1], (D+1)², or nil
	// for the data-free identity.
	moment []float64
	// queryMoments caches E[q_h q_hᵀ] per query head, used by both the
	// RoPE decoupling and the attention weighting.
	queryMoments []*mat.Dense
}

// layerResult is one converted layer with its diagnostics.
type layerResult struct {
	mla *model.MLALayer
	// retained is the fraction of the (weighted) K_nope/V energy the
	// latent keeps.
	retained float64
	// ropeInvFreq are the RoPE pair frequencies the decoupling assigned.
	ropeInvFreq []float64
}

// augmented returns [W b] as an out×(in+1) matrix in float64.
func augmented(l model.Linear, out, in int) *mat.Dense {
	m := mat.NewDense(out, in+1, nil)
	for i := range out {
		row := m.RawRowView(i)
		for j, v := range l.W[i*in : (i+1)*in] {
			row[j] = float64(v)
		}
		if l.B != nil {
			row[in] = float64(l.B[i])
		}
	}
	return m
}

// secondMoment returns W̃ S W̃ᵀ, with S the identity when moment is nil.
func secondMoment(w *mat.Dense, moment []float64) *mat.Dense {
	r, c := w.Dims()
	var ws mat.Dense
	if moment != nil {
		ws.Mul(w, mat.NewDense(c, c, moment))
	} else {
		ws.CloneFrom(w)
	}
	out := mat.NewDense(r, r, nil)
	out.Mul(&ws, w.T())
	return out
}

// queryMoment is E[q_h q_hᵀ] (d×d) of query head h.
func (p *layerPlan) queryMoment(wq *mat.Dense, h int) *mat.Dense {
	d := p.src.HeadDim
	if p.queryMoments == nil {
		p.queryMoments = make([]*mat.Dense, p.src.NumHeads)
	}
	if p.queryMoments[h] == nil {
		p.queryMoments[h] = secondMoment(wq.Slice(h*d, (h+1)*d, 0, p.src.HiddenSize+1).(*mat.Dense), p.moment)
	}
	return p.queryMoments[h]
}

// moments collects the key moment and the per-KV-head query moments that
// the RoPE decoupling ranks components by.
func (p *layerPlan) moments(wq, wk *mat.Dense) rope.Moments {
	cfg := p.src
	d, group := cfg.HeadDim, cfg.NumHeads/cfg.NumKVHeads
	mk := secondMoment(wk, p.moment)
	q := make([]float64, cfg.NumKVHeads*d*d)
	for h := range cfg.NumHeads {
		g := h / group
		qh := p.queryMoment(wq, h)
		blk := q[g*d*d : (g+1)*d*d]
		for i := range d {
			for j := range d {
				blk[i*d+j] += qh.At(i, j)
			}
		}
	}
	return rope.Moments{Key: mk.RawMatrix().Data, Query: q}
}

// decouple chooses the layer's RoPE rows.
func (p *layerPlan) decouple(wq, wk *mat.Dense) (*rope.Decoupling, error) {
	if p.opts.ExactRoPE {
		return rope.Exact(p.src.Rope, p.src.NumKVHeads)
	}
	return rope.Decouple(p.src.Rope, p.src.NumKVHeads, rope.Options{
		Method:   p.opts.RopeMethod,
		RopeDim:  p.opts.RopeDim,
		FreqFold: p.opts.FreqFold,
	}, p.moments(wq, wk))
}

// convertLayer rewrites one GQA layer as MLA.
func (p *layerPlan) convertLayer(l *model.Layer) (*layerResult, error) {
	src := p.src
	D, d, G, H := src.HiddenSize, src.HeadDim, src.NumKVHeads, src.NumHeads
	group := H / G
	wq := augmented(l.Q, H*d, D)
	wk := augmented(l.K, G*d, D)
	wv := augmented(l.V, G*d, D)
	dec, err := p.decouple(wq, wk)
	if err != nil {
		return nil, err
	}
	dr, np := dec.RopeDim(), dec.NopeDim()
	ropeRows := mat.NewDense(dr, G*d, dec.Rope)
	var kRope mat.Dense // d_r × (D+1)
	kRope.Mul(ropeRows, wk)

	// The joint latent factors [Nope·K̃; Ṽ].
	rows := np + G*d
	stack := mat.NewDense(rows, D+1, nil)
	var nopeRows *mat.Dense
	if np > 0 {
		nopeRows = mat.NewDense(np, G*d, dec.Nope)
		var kNope mat.Dense
		kNope.Mul(nopeRows, wk)
		if L := p.opts.NopeSpan; L > 0 {
			for i, w := range dec.NopeInvFreq {
				x := w * L
				g := 1.0
				if x > 1e-12 {
					g = math.Sin(x) / x
				}
				row := kNope.RawRowView(i)
				for j := range row {
					row[j] *= g
				}
			}
		}
		stack.Slice(0, np, 0, D+1).(*mat.Dense).Copy(&kNope)
	}
	stack.Slice(np, rows, 0, D+1).(*mat.Dense).Copy(wv)
	prob := svd.Problem{Rows: rows, In: D, W: make([]float64, rows*D), B: make([]float64, rows)}
	for i := range rows {
		row := stack.RawRowView(i)
		copy(prob.W[i*D:(i+1)*D], row[:D])
		prob.B[i] = row[D]
	}
	weight, err := p.errorWeight(l, wq, stack, dec, np)
	if err != nil {
		return nil, err
	}
	var fac *svd.Factors
	if p.opts.ropeOnly {
		fac = identityLatent(prob)
	} else if fac, err = svd.Factor(prob, svd.Options{Rank: p.opts.Rank, Moment: p.moment, Weight: weight}); err != nil {
		return nil, fmt.Errorf("joint latent: %w", err)
	}
	dc := fac.Rank
	var normWeight []float32
	if p.dst.MLA.KVANorm {
		normWeight = p.shrinkLatent(fac, D, l.AttnNorm)
	}

	mla := &model.MLALayer{}
	// kv_a_proj_with_mqa: [W_DKV; W_KR].
	mla.KVA.W = make([]float32, (dc+dr)*D)
	for i := range dc {
		toFloat32(mla.KVA.W[i*D:(i+1)*D], fac.Down[i*D:(i+1)*D])
	}
	for i := range dr {
		toFloat32(mla.KVA.W[(dc+i)*D:(dc+i+1)*D], kRope.RawRowView(i)[:D])
	}
	// Stock exports have no biases; they are built here and folded below.
	if src.QKVBias {
		mla.KVA.B = make([]float32, dc+dr)
		toFloat32(mla.KVA.B[:dc], fac.DownBias)
		for i := range dr {
			mla.KVA.B[dc+i] = float32(kRope.At(i, D))
		}
	}

	// kv_b_proj: per head [W_UK^h; W_UV^h]; heads of one KV group share it.
	mla.KVB.W = make([]float32, H*2*d*dc)
	up := mat.NewDense(rows, dc, fac.Up)
	for h := range H {
		g := h / group
		base := h * 2 * d * dc
		if np > 0 {
			// k_nope_h = Nope_gᵀ·k_nope: the group's key with its RoPE part
			// projected out.
			nopeG := nopeRows.Slice(0, np, g*d, (g+1)*d)
			var uk mat.Dense
			uk.Mul(nopeG.T(), up.Slice(0, np, 0, dc))
			for i := range d {
				toFloat32(mla.KVB.W[base+i*dc:base+(i+1)*dc], uk.RawRowView(i))
			}
		}
		for i := range d {
			toFloat32(mla.KVB.W[base+(d+i)*dc:base+(d+i+1)*dc], up.RawRowView(np+g*d+i))
		}
	}

	// q_proj: per head [s·q_h; s·Rope_g·q_h], s compensating DeepSeek's
	// softmax scale.
	s := src.AttentionScale() / p.dst.AttentionScale()
	mla.Q.W = make([]float32, H*(d+dr)*D)
	if src.QKVBias {
		mla.Q.B = make([]float32, H*(d+dr))
	}
	for h := range H {
		g := h / group
		qh := wq.Slice(h*d, (h+1)*d, 0, D+1)
		var qr mat.Dense
		qr.Mul(ropeRows.Slice(0, dr, g*d, (g+1)*d), qh)
		base := h * (d + dr)
		for i := range d + dr {
			var row []float64
			if i < d {
				row = qh.(*mat.Dense).RawRowView(i)[:D+1]
			} else {
				row = qr.RawRowView(i - d)
			}
			dst := mla.Q.W[(base+i)*D : (base+i+1)*D]
			for j := range D {
				dst[j] = float32(s * row[j])
			}
			if mla.Q.B != nil {
				mla.Q.B[base+i] = float32(s * row[D])
			}
		}
	}
	mla.KVANorm = normWeight
	if !p.dst.MLA.QBias {
		foldBias(&mla.Q, p.moment, D)
	}
	if !p.dst.MLA.KVABias {
		foldBias(&mla.KVA, p.moment, D)
	}
	return &layerResult{mla: mla, retained: fac.Retained, ropeInvFreq: dec.InvFreq}, nil
}

// errorWeight builds the weight A of the joint factorization's error: nil
// (plain PCA/SVD), TransMLA's balanced K/V, or the attention-aware weight
// (key error through the queries, value error through o_proj).
func (p *layerPlan) errorWeight(l *model.Layer, wq, stack *mat.Dense, dec *rope.Decoupling, np int) ([]float64, error) {
	src := p.src
	rows, _ := stack.Dims()
	d, G, H := src.HeadDim, src.NumKVHeads, src.NumHeads
	switch p.opts.Weighting {
	case WeightNone:
		return nil, nil
	case WeightBalanced:
		if np == 0 {
			return nil, nil
		}
		// Scale the key rows so keys and values carry equal energy.
		c := secondMoment(stack, p.moment)
		var ek, ev float64
		for i := range rows {
			if i < np {
				ek += c.At(i, i)
			} else {
				ev += c.At(i, i)
			}
		}
		if !(ek > 0) {
			return nil, nil
		}
		alpha2 := ev / ek * float64(np) / float64(rows-np)
		a := make([]float64, rows*rows)
		for i := range rows {
			a[i*rows+i] = 1
			if i < np {
				a[i*rows+i] = alpha2
			}
		}
		return a, nil
	case WeightAttention:
		a := mat.NewDense(rows, rows, nil)
		c := secondMoment(stack, p.moment)
		group := H / G
		var nope *mat.Dense
		if np > 0 {
			nope = mat.NewDense(np, G*d, dec.Nope)
		}
		// Key block: Σ_h Nope_g E[q_h q_hᵀ] Nope_gᵀ; value block of group g:
		// Σ_{h∈g} O_hᵀ O_h.
		D := src.HiddenSize
		o := make([]float64, D*H*d)
		for i, v := range l.O.W {
			o[i] = float64(v)
		}
		om := mat.NewDense(D, H*d, o)
		for h := range H {
			g := h / group
			if np > 0 {
				qh := p.queryMoment(wq, h)
				ng := nope.Slice(0, np, g*d, (g+1)*d)
				var t, u mat.Dense
				t.Mul(ng, qh)
				u.Mul(&t, ng.T())
				kb := a.Slice(0, np, 0, np).(*mat.Dense)
				kb.Add(kb, &u)
			}
			oh := om.Slice(0, D, h*d, (h+1)*d)
			var ohTo mat.Dense
			ohTo.Mul(oh.T(), oh)
			blk := a.Slice(np+g*d, np+(g+1)*d, np+g*d, np+(g+1)*d).(*mat.Dense)
			blk.Add(blk, &ohTo)
		}
		// Normalise each block so that the weighted key and value energies
		// are equal, then tilt by ValueWeight.
		trProd := func(lo, hi int) float64 {
			var t float64
			for i := lo; i < hi; i++ {
				for j := lo; j < hi; j++ {
					t += a.At(i, j) * c.At(j, i)
				}
			}
			return t
		}
		scaleBlock := func(lo, hi int, f float64) {
			for i := lo; i < hi; i++ {
				row := a.RawRowView(i)[lo:hi]
				for j := range row {
					row[j] *= f
				}
			}
		}
		if tk := trProd(0, np); tk > 0 {
			scaleBlock(0, np, 1/tk)
		}
		if tv := trProd(np, rows); tv > 0 {
			scaleBlock(np, rows, p.opts.valueWeight()/tv)
		}
		return a.RawMatrix().Data, nil
	default:
		return nil, fmt.Errorf("unknown latent weighting %q (known: %v)", p.opts.Weighting, Weightings())
	}
}

// normHeadroom is how far below kv_a_layernorm's epsilon the stock
// export puts the latent's mean square: RMSNorm(c) = c/sqrt(mean(c²)+eps)·w
// is then c/sqrt(eps)·w to a relative 1e-5/2 for a typical token.
const normHeadroom = 1e-5

// shrinkLatent scales the latent down until the epsilon of the RMSNorm
// that stock loaders apply to it (kv_a_layernorm) dominates the token's own
// mean square, so the norm becomes a constant factor that the norm weight
// undoes: the stock export computes the exact function up to that residue.
// It returns the norm weight.
//
// Without calibration data the attention input's second moment is taken
// as diag(γ²), γ the input RMSNorm's weight: the normed residual has unit
// mean square per dim before γ scales it.
func (p *layerPlan) shrinkLatent(f *svd.Factors, in int, gamma []float32) []float32 {
	moment := p.moment
	if moment == nil {
		moment = make([]float64, (in+1)*(in+1))
		for i, g := range gamma {
			moment[i*(in+1)+i] = float64(g) * float64(g)
		}
		moment[in*(in+1)+in] = 1
	}
	var ms float64 // E[mean_i c_i²]
	for i := range f.Rank {
		row := append(slices.Clone(f.Down[i*in:(i+1)*in]), f.DownBias[i])
		ms += quadForm(row, moment) / float64(f.Rank)
	}
	if !(ms > 0) {
		ms = 1 // a zero latent: any scale is exact
	}
	eps := p.dst.RMSNormEps
	alpha := math.Sqrt(normHeadroom * eps / ms)
	for i := range f.Down {
		f.Down[i] *= alpha
	}
	for i := range f.DownBias {
		f.DownBias[i] *= alpha
	}
	w := make([]float32, f.Rank)
	for i := range w {
		w[i] = float32(math.Sqrt(eps*(1+normHeadroom)) / alpha)
	}
	return w
}

// quadForm is xᵀ S x.
func quadForm(x, s []float64) float64 {
	var e float64
	n := len(x)
	for a, va := range x {
		if va == 0 {
			continue
		}
		row := s[a*n : (a+1)*n]
		for b, vb := range x {
			e += va * row[b] * vb
		}
	}
	return e
}

// foldBias removes l's bias, which stock loaders lack, by folding it into
// the weight through the best linear stand-in for the constant 1 on the
// calibration inputs (1 ≈ βᵀx, β = E[xxᵀ]⁻¹E[x]). Without calibration data
// there is no stand-in and the bias is dropped.
func foldBias(l *model.Linear, moment []float64, in int) {
	if l.B == nil {
		return
	}
	var beta []float64
	if moment != nil {
		sxx := mat.NewSymDense(in, nil)
		mu := mat.NewVecDense(in, nil)
		var tr float64
		for i := range in {
			for j := i; j < in; j++ {
				sxx.SetSym(i, j, moment[i*(in+1)+j])
			}
			mu.SetVec(i, moment[i*(in+1)+in])
			tr += moment[i*(in+1)+i]
		}
		for i := range in {
			sxx.SetSym(i, i, sxx.At(i, i)+1e-6*tr/float64(in))
		}
		var chol mat.Cholesky
		if chol.Factorize(sxx) {
			var b mat.VecDense
			if err := chol.SolveVecTo(&b, mu); err == nil {
				beta = b.RawVector().Data
			}
		}
	}
	if beta != nil {
		for i, b := range l.B {
			row := l.W[i*in : (i+1)*in]
			for j := range row {
				row[j] += float32(float64(b) * beta[j])
			}
		}
	}
	l.B = nil
}

// identityLatent is the unfactored latent: Down = [W b], Up = I.
func identityLatent(p svd.Problem) *svd.Factors {
	f := &svd.Factors{Rank: p.Rows, Down: p.W, DownBias: p.B, Up: make([]float64, p.Rows*p.Rows), Retained: 1}
	for i := range p.Rows {
		f.Up[i*p.Rows+i] = 1
	}
	return f
}

func toFloat32(dst []float32, src []float64) {
	for i, v := range src {
		dst[i] = float32(v)
	}
}
