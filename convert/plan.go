package convert

import (
	"context"
	"fmt"

	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/safetensors"
	"github.com/transmla/transmla/svd"
)

// PlanJob selects the conversions a Plan prepares.
type PlanJob struct {
	// Source is the GQA checkpoint directory; it is only read.
	Source string
	// Methods are the conversions to prepare; each Options.Rank is the
	// largest latent width that method will be built at.
	Methods []Options
	// DType is the stored dtype of the converted models, as in Job.
	DType string
	// Calibration is nil for data-free conversions.
	Calibration *Calibration
	// Backend computes the calibration forward pass.
	Backend kernels.Backend
	// Version is the tool version recorded in written checkpoints.
	Version string
	// Progress, when not nil, is told each layer's stage as it starts
	// (StageCalibrate, then StageConvert for all methods).
	Progress func(Event)
	// NoSpectra skips the per-layer spectra (Spectra is then empty): they
	// factor K_nope and V alone once more, for plots only.
	NoSpectra bool
}

// Plan is a source analysed once for conversions at many latent widths:
// calibration runs once, and per layer and method the RoPE decoupling,
// the error weight, q_proj and the joint factorization at the largest
// width are computed once. Since the factorization's components come in
// order of decreasing weighted energy, the conversion at a smaller width
// is its truncation (svd.Factors.Truncate) and costs only the assembly of
// kv_a_proj and kv_b_proj.
//
// A Plan holds every layer of the source in memory, with the factors, so
// it suits models that Model could evaluate in memory anyway.
type Plan struct {
	job PlanJob
	src model.Config
	dt  safetensors.DType
	// base holds the source's weights that conversion keeps (embedding,
	// norms, o_proj, MLPs, LM head), rounded to dt as a written checkpoint
	// stores them; its layers have no attention projections.
	base              *model.Model
	methods           []*methodPlan
	calibrationSHA256 string
	calibrationTokens int
	// heldOut are the calibration tokens kept out of calibration
	// (Calibration.HoldOut), notes what the user should know of it.
	heldOut []int
	notes   []string
}

// methodPlan is one method's analysis of every layer.
type methodPlan struct {
	opts    Options // Rank is the largest width; Format is set
	layers  []planLayer
	spectra []LayerSpectrum
}

// planLayer is one layer's analysis with its factors at the largest width.
type planLayer struct {
	an  *layerAnalysis
	fac *svd.Factors
}

// LayerSpectrum is the weighted energy that a latent of each width keeps,
// as a cumulative fraction: element r-1 is the fraction kept at rank r.
type LayerSpectrum struct {
	// Layer is the layer's index.
	Layer int `json:"layer"`
	// Joint is the shared latent of [K_nope; V], up to the plan's largest
	// width.
	Joint []float64 `json:"joint"`
	// KeyNope and Value are the position-free keys and the values each
	// factored alone (same moment, the weight restricted to the block), at
	// every rank up to their row count: what separate latents would keep.
	KeyNope []float64 `json:"key_nope"`
	Value   []float64 `json:"value"`
}

// prebuiltLayers hands Run converted layers computed elsewhere (a Plan's),
// with the calibration they came from.
type prebuiltLayers struct {
	layer             func(i int) (*model.Layer, LayerReport, error)
	calibrationSHA256 string
	calibrationTokens int
	notes             []string
}

// NewPlan reads and calibrates job.Source one layer at a time, as Run
// does, and analyses each layer for every method.
func NewPlan(ctx context.Context, job PlanJob) (*Plan, error) {
	if len(job.Methods) == 0 {
		return nil, fmt.Errorf("plan: no conversion methods")
	}
	reader, dt, err := openSource(job.Source, job.DType)
	if err != nil {
		return nil, err
	}
	defer reader.Close()
	src := reader.Config()
	p := &Plan{job: job, src: src, dt: dt}
	for _, o := range job.Methods {
		opts, err := checkOptions(src, o, dt)
		if err != nil {
			return nil, err
		}
		p.methods = append(p.methods, &methodPlan{opts: opts})
	}
	be := job.Backend
	if be == nil {
		be = kernels.Gonum{}
	}
	// The stream reads and calibrates the layers exactly as Run does.
	st := &stream{ctx: ctx, job: Job{Source: job.Source, Progress: job.Progress}, reader: reader, src: src, be: be, cur: -1}
	if c := job.Calibration; c != nil {
		if p.calibrationSHA256, err = st.prepareCalibration(c); err != nil {
			return nil, err
		}
		p.calibrationTokens = len(st.seqs) * c.SeqLen
		p.heldOut, p.notes = st.heldOut, st.notes
	}
	if p.base, err = p.readBase(reader); err != nil {
		return nil, err
	}
	for i := range src.NumLayers {
		l, stats, err := st.source(i)
		if err != nil {
			return nil, err
		}
		st.progress(StageConvert, i, src.NumLayers)
		for _, m := range p.methods {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			if err := m.addLayer(src, dt, l, stats, !job.NoSpectra); err != nil {
				return nil, fmt.Errorf("layer %d: %w", i, err)
			}
		}
		// Rounded only now: the analyses above read the source's values,
		// as ConvertLayer does. AttnNorm is copied, since the data-free
		// stock shrink keeps reading the source's.
		b := &p.base.Layers[i]
		b.AttnNorm = roundTo(dt, append([]float32(nil), l.AttnNorm...))
		b.MLPNorm = roundTo(dt, l.MLPNorm)
		for _, lin := range []*model.Linear{&l.O, &l.Gate, &l.Up, &l.Down} {
			roundTo(dt, lin.W)
			roundTo(dt, lin.B)
		}
		b.O, b.Gate, b.Up, b.Down = l.O, l.Gate, l.Up, l.Down
	}
	return p, nil
}

// readBase reads the weights outside the decoder layers, rounded to dt.
func (p *Plan) readBase(reader *model.Reader) (*model.Model, error) {
	embed, err := reader.Embed()
	if err != nil {
		return nil, err
	}
	norm, err := reader.Norm()
	if err != nil {
		return nil, err
	}
	b := &model.Model{Embed: roundTo(p.dt, embed), Norm: roundTo(p.dt, norm), Layers: make([]model.Layer, p.src.NumLayers), StorageDType: p.dt}
	if p.src.TieWordEmbeddings {
		b.LMHead.W = b.Embed
		return b, nil
	}
	if b.LMHead, err = reader.LMHead(); err != nil {
		return nil, err
	}
	roundTo(p.dt, b.LMHead.W)
	return b, nil
}

// addLayer analyses source layer l for this method and factors its latent
// at the method's largest width.
func (m *methodPlan) addLayer(src model.Config, dt safetensors.DType, l *model.Layer, stats *LayerStats, spectra bool) error {
	dst := TargetConfig(src, m.opts)
	lp, err := newLayerPlan(src, dst, m.opts, stats)
	if err != nil {
		return err
	}
	an, err := lp.analyse(l)
	if err != nil {
		return err
	}
	if err := checkFreqs(src, dst, m.opts.RopeStride, an.dec.InvFreq); err != nil {
		return err
	}
	fac, err := an.factor(m.opts.Rank)
	if err != nil {
		return err
	}
	if spectra {
		spec, err := an.spectrum(fac)
		if err != nil {
			return err
		}
		spec.Layer = len(m.layers)
		m.spectra = append(m.spectra, spec)
	}
	// Only the factors are needed from here on.
	an.prob.W, an.prob.B, an.weight = nil, nil, nil
	// q_proj is the same at every width: rounded once, shared by all.
	roundTo(dt, an.q.W)
	roundTo(dt, an.q.B)
	m.layers = append(m.layers, planLayer{an: an, fac: fac})
	return nil
}

// spectrum measures the energy that latents of each width keep: the joint
// one from fac, and [K_nope] and [V] factored alone at full rank.
func (a *layerAnalysis) spectrum(fac *svd.Factors) (LayerSpectrum, error) {
	np, rows := a.dec.NopeDim(), a.prob.Rows
	s := LayerSpectrum{Joint: keptFractions(fac)}
	block := func(lo, hi int) ([]float64, error) {
		if hi <= lo {
			return nil, nil
		}
		D, n := a.prob.In, hi-lo
		prob := svd.Problem{Rows: n, In: D, W: a.prob.W[lo*D : hi*D], B: a.prob.B[lo:hi]}
		var w []float64
		if a.weight != nil {
			w = make([]float64, n*n)
			for i := range n {
				copy(w[i*n:(i+1)*n], a.weight[(lo+i)*rows+lo:(lo+i)*rows+hi])
			}
		}
		f, err := svd.Factor(prob, svd.Options{Rank: n, Moment: a.p.moment, Weight: w})
		if err != nil {
			return nil, err
		}
		return keptFractions(f), nil
	}
	var err error
	if s.KeyNope, err = block(0, np); err != nil {
		return s, fmt.Errorf("K_nope spectrum: %w", err)
	}
	if s.Value, err = block(np, rows); err != nil {
		return s, fmt.Errorf("V spectrum: %w", err)
	}
	return s, nil
}

// keptFractions is the cumulative fraction of f's total weighted energy
// kept at each rank up to f.Rank.
func keptFractions(f *svd.Factors) []float64 {
	out := make([]float64, len(f.Energy))
	var kept float64
	for i, e := range f.Energy {
		kept += e
		out[i] = 1
		if f.Total > 0 {
			out[i] = kept / f.Total
		}
	}
	return out
}

// Source is the source model's config.
func (p *Plan) Source() model.Config { return p.src }

// DType is the stored dtype of the converted models.
func (p *Plan) DType() safetensors.DType { return p.dt }

// HeldOut are the calibration file's last tokens kept out of calibration
// (Calibration.HoldOut), nil when none were.
func (p *Plan) HeldOut() []int { return p.heldOut }

// Notes are what the user should know of the calibration.
func (p *Plan) Notes() []string { return p.notes }

// CalibrationSHA256 identifies the calibration text ("" when data-free).
func (p *Plan) CalibrationSHA256() string { return p.calibrationSHA256 }

// Spectra is method's per-layer spectrum (method indexes PlanJob.Methods).
func (p *Plan) Spectra(method int) []LayerSpectrum { return p.methods[method].spectra }

// options checks rank for method and returns the method's options at it.
func (p *Plan) options(method, rank int) (Options, error) {
	if method < 0 || method >= len(p.methods) {
		return Options{}, fmt.Errorf("plan: no method %d (of %d)", method, len(p.methods))
	}
	m := p.methods[method]
	opts := m.opts
	opts.Rank = rank
	if err := opts.Validate(p.src); err != nil {
		return opts, err
	}
	if rank > m.opts.Rank {
		return opts, fmt.Errorf("plan: width %d exceeds the %d the plan was factored at", rank, m.opts.Rank)
	}
	return opts, nil
}

// layer builds converted layer i of method at width rank, unrounded
// except for what the plan shares.
func (p *Plan) layer(method, rank, i int) (*model.Layer, LayerReport, error) {
	pl := p.methods[method].layers[i]
	fac, err := pl.fac.Truncate(min(rank, pl.fac.Rank))
	if err != nil {
		return nil, LayerReport{}, fmt.Errorf("layer %d: %w", i, err)
	}
	res := pl.an.build(fac)
	out := p.base.Layers[i]
	out.MLA = res.mla
	return &out, LayerReport{Layer: i, Retained: res.retained}, nil
}

// Model is the converted model of method at latent width rank as Write
// stores it and model.Load reads it back: the config parsed from the
// config.json it would write, every weight rounded to the stored dtype.
// It differs from Run's at the same width only by the truncation, which
// equals the factorization at that width up to float64 rounding. Weights that do not
// depend on the width are shared between the models a Plan returns; treat
// them as read-only.
func (p *Plan) Model(method, rank int) (*model.Model, []LayerReport, error) {
	opts, err := p.options(method, rank)
	if err != nil {
		return nil, nil, err
	}
	dst := TargetConfig(p.src, opts)
	cfgJSON, err := model.DeepSeekV3Config(dst, nil)
	if err != nil {
		return nil, nil, err
	}
	cfg, err := model.ParseConfig("config.json", cfgJSON)
	if err != nil {
		return nil, nil, err
	}
	m := *p.base
	m.Config = cfg
	m.Layers = make([]model.Layer, p.src.NumLayers)
	reports := make([]LayerReport, p.src.NumLayers)
	for i := range m.Layers {
		l, rep, err := p.layer(method, rank, i)
		if err != nil {
			return nil, nil, err
		}
		ml := l.MLA
		for _, x := range [][]float32{ml.KVA.W, ml.KVA.B, ml.KVB.W, ml.KVB.B, ml.KVANorm} {
			roundTo(p.dt, x)
		}
		m.Layers[i], reports[i] = *l, rep
	}
	return &m, reports, nil
}

// Write writes the converted checkpoint of method at latent width rank to
// dir through Run, so it is what convert writes with these options,
// except that the latent is the plan's truncated factorization. progress,
// when not nil, is told of each layer written. refine, when not nil,
// refines each layer as Job.Refine does.
func (p *Plan) Write(ctx context.Context, method, rank int, dir string, force bool, refine *Refine, progress func(Event)) (*Summary, error) {
	opts, err := p.options(method, rank)
	if err != nil {
		return nil, err
	}
	return Run(ctx, Job{
		Source: p.job.Source, Output: dir, Force: force, Options: opts, DType: p.job.DType,
		Calibration: p.job.Calibration, Backend: p.job.Backend, Version: p.job.Version, Progress: progress, Refine: refine,
		prebuilt: &prebuiltLayers{
			layer:             func(i int) (*model.Layer, LayerReport, error) { return p.layer(method, rank, i) },
			calibrationSHA256: p.calibrationSHA256, calibrationTokens: p.calibrationTokens, notes: p.notes,
		},
	})
}

// roundTo rounds x in place to the nearest value of dt (ties to even), as
// writing and reading it back would, and returns it. f32 and f64 hold
// every float32 exactly.
func roundTo(dt safetensors.DType, x []float32) []float32 {
	switch dt {
	case safetensors.BF16:
		for i, v := range x {
			x[i] = safetensors.BF16ToFloat32(safetensors.Float32ToBF16(v))
		}
	case safetensors.F16:
		for i, v := range x {
			x[i] = safetensors.F16ToFloat32(safetensors.Float32ToF16(v))
		}
	}
	return x
}
