package convert

import (
	"fmt"
	"math"

	"gonum.org/v1/gonum/mat"

	"github.com/transmla/transmla/internal/f64"
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
	// profile is the calibration's attention share by query–key distance
	// per query head, or nil.
	profile rope.Profile
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

// newLayerPlan checks stats against src and plans one layer's conversion.
func newLayerPlan(src, dst model.Config, opts Options, stats *LayerStats) (*layerPlan, error) {
	p := &layerPlan{src: src, dst: dst, opts: opts}
	if stats == nil {
		return p, nil
	}
	if n := src.HiddenSize + 1; len(stats.Moment) != n*n {
		return nil, fmt.Errorf("attention-input moment has %d values, want %d×%d", len(stats.Moment), n, n)
	}
	if stats.Profile != nil && len(stats.Profile) != src.NumHeads {
		return nil, fmt.Errorf("attention profile of %d heads, want %d", len(stats.Profile), src.NumHeads)
	}
	p.moment, p.profile = stats.Moment, stats.Profile
	return p, nil
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
	return mat.NewDense(r, r, svd.Gram(packedRows(w), r, c, moment))
}

// packedRows returns w's values row after row, without gaps: w's own
// storage when its stride is its width, else a copy.
func packedRows(w *mat.Dense) []float64 {
	raw := w.RawMatrix()
	if raw.Stride == raw.Cols || raw.Rows <= 1 {
		return raw.Data[:raw.Rows*raw.Cols]
	}
	out := make([]float64, raw.Rows*raw.Cols)
	for i := range raw.Rows {
		copy(out[i*raw.Cols:(i+1)*raw.Cols], raw.Data[i*raw.Stride:])
	}
	return out
}

// diagMoment is the diagonal of w·S·wᵀ for the rows×cols w: each row's
// energy, with S the identity when moment is nil.
func diagMoment(w []float64, rows, cols int, moment []float64) []float64 {
	ws := w
	if moment != nil {
		ws = make([]float64, rows*cols)
		f64.Gemm(false, false, rows, cols, cols, 1, w, cols, moment, cols, 0, ws, cols)
	}
	out := make([]float64, rows)
	for i := range rows {
		for j, v := range w[i*cols : (i+1)*cols] {
			out[i] += v * ws[i*cols+j]
		}
	}
	return out
}

// trProduct is tr(A·C) = Σ_ij a_ij·c_ji for n×n blocks of a and c with
// row strides lda and ldc.
func trProduct(a []float64, lda int, c []float64, ldc, n int) float64 {
	var t float64
	for i := range n {
		for j := range n {
			t += a[i*lda+j] * c[j*ldc+i]
		}
	}
	return t
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
		Stride:   p.opts.RopeStride,
		FreqFold: p.opts.FreqFold,
		Rank:     p.ropeRank(),
		Profile:  p.attentionProfile(),
	}, p.moments(wq, wk))
}

// ropeRank is the RoRoPE ranking (Options.RopeRank); the per-head
// selections have none.
func (p *layerPlan) ropeRank() string {
	if p.opts.RopeMethod != rope.MethodRoRoPE {
		return ""
	}
	return p.opts.rank(p.moment != nil)
}

// attentionProfile is the distance profile the RoPE stage's fixes average
// over: the calibration's, else uniform over --nope-span, else none.
func (p *layerPlan) attentionProfile() rope.Profile {
	switch {
	case p.profile != nil:
		return p.profile
	case p.opts.NopeSpan > 0:
		return rope.UniformProfile(p.src.NumHeads, int(math.Round(p.opts.NopeSpan)))
	}
	return nil
}

// layerAnalysis is the rank-independent part of one layer's conversion:
// the RoPE decoupling, the joint latent's problem and error weight, and
// the finished q_proj. Built once, it gives the layer at any latent width
// (a Plan truncates one factorization for every width).
type layerAnalysis struct {
	p *layerPlan
	// attnNorm is the input RMSNorm's weight, which the data-free stock
	// shrink estimates the attention input's scale from.
	attnNorm []float32
	dec      *rope.Decoupling
	// ropeRows (d_r × G·d) and nopeRows (np × G·d, nil when np = 0) split
	// the stacked keys into their RoPE and position-free parts; the query
	// rows are their duals, which read the queries.
	ropeRows, nopeRows           *mat.Dense
	queryRopeRows, queryNopeRows *mat.Dense
	// kRope is the decoupled RoPE key's projection, d_r × (D+1).
	kRope *mat.Dense
	// prob is the joint latent's problem [Nope·K̃; Ṽ] and weight its error
	// weight.
	prob   svd.Problem
	weight []float64
	// q is the finished q_proj: it does not depend on the latent.
	q model.Linear
}

// convertLayer rewrites one GQA layer as MLA.
func (p *layerPlan) convertLayer(l *model.Layer) (*layerResult, error) {
	a, err := p.analyse(l)
	if err != nil {
		return nil, err
	}
	fac, err := a.factor(p.opts.Rank)
	if err != nil {
		return nil, err
	}
	return a.build(fac), nil
}

// analyse computes everything of layer l's conversion that does not
// depend on the latent width.
func (p *layerPlan) analyse(l *model.Layer) (*layerAnalysis, error) {
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
	a := &layerAnalysis{p: p, attnNorm: l.AttnNorm, dec: dec, kRope: &mat.Dense{},
		ropeRows: mat.NewDense(dr, G*d, dec.Rope), queryRopeRows: mat.NewDense(dr, G*d, dec.QueryRope)}
	a.kRope.Mul(a.ropeRows, wk)

	// The joint latent factors [Nope·K̃; Ṽ].
	rows := np + G*d
	stack := mat.NewDense(rows, D+1, nil)
	if np > 0 {
		a.nopeRows = mat.NewDense(np, G*d, dec.Nope)
		a.queryNopeRows = mat.NewDense(np, G*d, dec.QueryNope)
		var kNope mat.Dense
		kNope.Mul(a.nopeRows, wk)
		stack.Slice(0, np, 0, D+1).(*mat.Dense).Copy(&kNope)
	}
	stack.Slice(np, rows, 0, D+1).(*mat.Dense).Copy(wv)
	a.prob = svd.Problem{Rows: rows, In: D, W: make([]float64, rows*D), B: make([]float64, rows)}
	for i := range rows {
		row := stack.RawRowView(i)
		copy(a.prob.W[i*D:(i+1)*D], row[:D])
		a.prob.B[i] = row[D]
	}
	if a.weight, err = p.errorWeight(l, wq, stack, dec, np); err != nil {
		return nil, err
	}

	// q_proj: per head [s·q_h; s·Rope_g·q_h], s compensating DeepSeek's
	// softmax scale.
	s := src.AttentionScale() / p.dst.AttentionScale()
	a.q.W = make([]float32, H*(d+dr)*D)
	if src.QKVBias {
		a.q.B = make([]float32, H*(d+dr))
	}
	for h := range H {
		g := h / group
		qh := wq.Slice(h*d, (h+1)*d, 0, D+1)
		var qr mat.Dense
		qr.Mul(a.queryRopeRows.Slice(0, dr, g*d, (g+1)*d), qh)
		base := h * (d + dr)
		for i := range d + dr {
			var row []float64
			if i < d {
				row = qh.(*mat.Dense).RawRowView(i)[:D+1]
			} else {
				row = qr.RawRowView(i - d)
			}
			dst := a.q.W[(base+i)*D : (base+i+1)*D]
			for j := range D {
				dst[j] = float32(s * row[j])
			}
			if a.q.B != nil {
				a.q.B[base+i] = float32(s * row[D])
			}
		}
	}
	if !p.dst.MLA.QBias {
		foldBias(&a.q, p.moment, D)
	}
	return a, nil
}

// factor computes the joint latent at width rank.
func (a *layerAnalysis) factor(rank int) (*svd.Factors, error) {
	if a.p.opts.ropeOnly {
		return identityLatent(a.prob), nil
	}
	fac, err := svd.Factor(a.prob, svd.Options{Rank: rank, Moment: a.p.moment, Weight: a.weight})
	if err != nil {
		return nil, fmt.Errorf("joint latent: %w", err)
	}
	return fac, nil
}

// build assembles the MLA layer from the latent fac, which it may modify
// (the stock format scales it). The layer's q_proj is a.q itself.
func (a *layerAnalysis) build(fac *svd.Factors) *layerResult {
	p, src := a.p, a.p.src
	D, d, H := src.HiddenSize, src.HeadDim, src.NumHeads
	group := H / src.NumKVHeads
	dr, np, rows := a.dec.RopeDim(), a.dec.NopeDim(), a.prob.Rows
	dc := fac.Rank
	var normWeight []float32
	if p.dst.MLA.KVANorm {
		normWeight = p.shrinkLatent(fac, D, a.attnNorm)
	}

	mla := &model.MLALayer{Q: a.q, KVANorm: normWeight}
	// kv_a_proj_with_mqa: [W_DKV; W_KR].
	mla.KVA.W = make([]float32, (dc+dr)*D)
	for i := range dc {
		toFloat32(mla.KVA.W[i*D:(i+1)*D], fac.Down[i*D:(i+1)*D])
	}
	for i := range dr {
		toFloat32(mla.KVA.W[(dc+i)*D:(dc+i+1)*D], a.kRope.RawRowView(i)[:D])
	}
	// Stock exports have no biases; they are built here and folded below.
	if src.QKVBias {
		mla.KVA.B = make([]float32, dc+dr)
		toFloat32(mla.KVA.B[:dc], fac.DownBias)
		for i := range dr {
			mla.KVA.B[dc+i] = float32(a.kRope.At(i, D))
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
			nopeG := a.queryNopeRows.Slice(0, np, g*d, (g+1)*d)
			var uk mat.Dense
			upN := mat.DenseCopyOf(up.Slice(0, np, 0, dc))
			if a.dec.NopeFix != nil {
				// Each component's key pair (re, im) as head h reads it:
				// (C·re + S·im, −S·re + C·im).
				half := np / 2
				for i, f := range a.dec.NopeFix[h] {
					re, im := upN.RawRowView(i), upN.RawRowView(half+i)
					for j := range re {
						re[j], im[j] = f.C*re[j]+f.S*im[j], f.C*im[j]-f.S*re[j]
					}
				}
			}
			uk.Mul(nopeG.T(), upN)
			for i := range d {
				toFloat32(mla.KVB.W[base+i*dc:base+(i+1)*dc], uk.RawRowView(i))
			}
		}
		for i := range d {
			toFloat32(mla.KVB.W[base+(d+i)*dc:base+(d+i+1)*dc], up.RawRowView(np+g*d+i))
		}
	}
	if !p.dst.MLA.KVABias {
		foldBias(&mla.KVA, p.moment, D)
	}
	return &layerResult{mla: mla, retained: fac.Retained, ropeInvFreq: a.dec.InvFreq}
}

// errorWeight builds the weight A of the joint factorization's error: nil
// (plain PCA/SVD), TransMLA's balanced K/V, or the attention-aware weight
// (key error through the queries, value error through o_proj).
//
// Only the blocks of the stack's moment C = W̃ S W̃ᵀ that the weighting
// reads are computed: its diagonal (balanced) or its key block and the
// value blocks of each KV group (attention), never the whole of it.
func (p *layerPlan) errorWeight(l *model.Layer, wq, stack *mat.Dense, dec *rope.Decoupling, np int) ([]float64, error) {
	src := p.src
	rows, cols := stack.Dims()
	d, G, H := src.HeadDim, src.NumKVHeads, src.NumHeads
	w := packedRows(stack)
	switch p.opts.Weighting {
	case WeightNone:
		return nil, nil
	case WeightBalanced:
		if np == 0 {
			return nil, nil
		}
		// Scale the key rows so keys and values carry equal energy.
		var ek, ev float64
		for i, e := range diagMoment(w, rows, cols, p.moment) {
			if i < np {
				ek += e
			} else {
				ev += e
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
		// blockMoment is the diagonal block of C for stack rows lo..hi.
		blockMoment := func(lo, hi int) []float64 { return svd.Gram(w[lo*cols:hi*cols], hi-lo, cols, p.moment) }
		a := make([]float64, rows*rows)
		group := H / G
		kd := G * d
		// Key block: Σ_g Nope_g (Σ_{h∈g} E[q_h q_hᵀ]) Nope_gᵀ.
		if np > 0 {
			qg := make([]float64, d*d)
			t := make([]float64, np*d)
			for g := range G {
				clear(qg)
				for h := g * group; h < (g+1)*group; h++ {
					for i, v := range p.queryMoment(wq, h).RawMatrix().Data {
						qg[i] += v
					}
				}
				f64.Gemm(false, false, np, d, d, 1, dec.QueryNope[g*d:], kd, qg, d, 0, t, d)
				f64.Gemm(false, true, np, np, d, 1, t, d, dec.QueryNope[g*d:], kd, 1, a, rows)
			}
		}
		// Value block of group g: Σ_{h∈g} O_hᵀ O_h, O_h the head's d
		// columns of o_proj (D × H·d).
		D := src.HiddenSize
		o := make([]float64, D*H*d)
		for i, v := range l.O.W {
			o[i] = float64(v)
		}
		for h := range H {
			at := (np + h/group*d) * (rows + 1)
			f64.Gemm(true, false, d, d, D, 1, o[h*d:], H*d, o[h*d:], H*d, 1, a[at:], rows)
		}
		// Normalise each block so that the weighted key and value energies
		// are equal, then tilt by ValueWeight.
		scaleBlock := func(lo, hi int, f float64) {
			for i := lo; i < hi; i++ {
				row := a[i*rows+lo : i*rows+hi]
				for j := range row {
					row[j] *= f
				}
			}
		}
		if np > 0 {
			if tk := trProduct(a, rows, blockMoment(0, np), np, np); tk > 0 {
				scaleBlock(0, np, 1/tk)
			}
		}
		var tv float64
		for g := range G {
			lo := np + g*d
			tv += trProduct(a[lo*(rows+1):], rows, blockMoment(lo, lo+d), d, d)
		}
		if tv > 0 {
			scaleBlock(np, rows, p.opts.valueWeight()/tv)
		}
		return a, nil
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
	// ms = E[mean_i c_i²], c_i = [Down_i DownBias_i]·x̃.
	var ms float64
	if p.moment != nil {
		n1 := in + 1
		rows := make([]float64, f.Rank*n1)
		for i := range f.Rank {
			copy(rows[i*n1:], f.Down[i*in:(i+1)*in])
			rows[i*n1+in] = f.DownBias[i]
		}
		for _, e := range diagMoment(rows, f.Rank, n1, p.moment) {
			ms += e / float64(f.Rank)
		}
	} else {
		for i := range f.Rank {
			e := f.DownBias[i] * f.DownBias[i]
			for j, v := range f.Down[i*in : (i+1)*in] {
				g := float64(gamma[j])
				e += g * g * v * v
			}
			ms += e / float64(f.Rank)
		}
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
