package convert

import (
	"context"
	"fmt"
	"runtime"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/internal/mlafit"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
)

// Refinement inputs: what each converted layer is fed while it is fitted.
const (
	// InputsTeacher feeds every layer the source model's hidden states.
	InputsTeacher = "teacher"
	// InputsSequential feeds every layer the hidden states of the model
	// converted and refined so far, so that it also corrects the error
	// arriving from the layers below.
	InputsSequential = "sequential"
)

// Refine selects the layer-wise refinement of a calibrated conversion:
// after its closed-form conversion, each layer's MLA projections are
// fitted by Adam so that its attention output (after o_proj) matches the
// source layer's on calibration sequences. The targets are always the
// source model's.
type Refine struct {
	// Seqs is how many of the calibration sequences are used (0: all);
	// the last Val of them are held back to keep the best parameters and
	// stop early.
	Seqs, Val int
	// Steps is the most optimizer steps per layer, Batch the sequences
	// per step, LR Adam's peak step relative to each weight row's RMS.
	Steps, Batch int
	LR           float64
	// Inputs is InputsSequential or InputsTeacher.
	Inputs string
	// Output also fits o_proj.
	Output bool
	// Correct, with sequential inputs, adds to each target the difference
	// between the source's and the refined model's hidden states at the
	// layer's input: the layer is fitted to restore the source's state
	// after it, not only to reproduce its attention.
	Correct bool
	// Values first refits kv_b_proj's value half in closed form.
	Values bool
	// Seed fixes the order of the mini-batches.
	Seed uint64
}

// DefaultRefine is the refinement --refine runs; its choices were measured
// on held-back calibration sequences (README, "Refinement").
func DefaultRefine() Refine {
	return Refine{Steps: 60, Batch: 4, LR: 0.02, Val: 8, Inputs: InputsSequential, Correct: true, Values: true, Seed: 1}
}

// Check reports whether r is usable with seqs calibration sequences.
func (r Refine) Check(seqs int) error {
	n := seqs
	if r.Seqs > 0 {
		n = min(n, r.Seqs)
	}
	switch {
	case r.Inputs != InputsTeacher && r.Inputs != InputsSequential:
		return fmt.Errorf("refine inputs %q: want %s or %s", r.Inputs, InputsSequential, InputsTeacher)
	case r.Steps < 1 || r.Batch < 1 || !(r.LR > 0):
		return fmt.Errorf("refine: steps %d, batch %d and learning rate %v must be positive", r.Steps, r.Batch, r.LR)
	case r.Correct && r.Inputs != InputsSequential:
		return fmt.Errorf("refine: corrective targets need sequential inputs")
	case r.Val < 1 || r.Val >= n:
		return fmt.Errorf("refine: %d calibration sequences, %d of them held back: want at least one to fit and one held back (more --calib-tokens)", n, r.Val)
	}
	return nil
}

// Method is r in the metadata's method line.
func (r Refine) Method(seqs, seqLen int) string {
	o := ""
	if r.Correct {
		o += ",correct"
	}
	if r.Values {
		o += ",values"
	}
	if r.Output {
		o += ",o_proj"
	}
	return fmt.Sprintf("+refine(%s,steps=%d,tokens=%d%s)", r.Inputs, r.Steps, seqs*seqLen, o)
}

// RefineReport is one layer's refinement.
type RefineReport struct {
	mlafit.Report
	// Inputs are the inputs the layer was fitted on.
	Inputs string `json:"inputs"`
}

// refiner holds a refining conversion's activations: the current layer's
// inputs and targets and, for sequential inputs, the refined model's
// hidden states.
type refiner struct {
	opts   Refine
	seqs   int
	seqLen int
	// x are the source layer's normed attention inputs on the source
	// model's hidden states and y its attention outputs on them.
	x, y []float32
	// hidden are the converted-so-far model's hidden states (sequential).
	hidden []float32
	runner *eval.LayerRunner // the target config's, for hidden
	layer  *mlafit.Layer[float32]
}

// newRefiner prepares refinement on the first seqs calibration sequences.
func newRefiner(r Refine, dst model.Config, be kernels.Backend, seqs, seqLen int) (*refiner, error) {
	if err := r.Check(seqs); err != nil {
		return nil, err
	}
	if r.Seqs > 0 {
		seqs = min(seqs, r.Seqs)
	}
	f := &refiner{opts: r, seqs: seqs, seqLen: seqLen}
	shape, err := fitShape(dst)
	if err != nil {
		return nil, err
	}
	if f.layer, err = mlafit.NewLayer(shape, seqLen, mlafit.Gemm[float32](kernels.Serial(be).Gemm)); err != nil {
		return nil, err
	}
	if r.Inputs == InputsSequential {
		if f.runner, err = eval.NewLayerRunner(dst, be, seqLen); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// fitShape is the mlafit shape of cfg's MLA layers.
func fitShape(cfg model.Config) (mlafit.Shape, error) {
	m := cfg.MLA
	s := mlafit.Shape{Hidden: cfg.HiddenSize, Heads: cfg.NumHeads, Nope: m.QKNopeHeadDim, Rope: m.QKRopeHeadDim, Value: m.VHeadDim,
		Latent: m.KVLoraRank, Eps: cfg.RMSNormEps, Scale: cfg.AttentionScale(), Interleave: m.RopeInterleave, Window: cfg.SlidingWindow,
		InvFreq: m.RopeInvFreq, AttnFactor: 1}
	if s.InvFreq == nil {
		p := cfg.Rope
		p.Dim = m.QKRopeHeadDim
		inv, attn, err := p.InvFreq()
		if err != nil {
			return s, fmt.Errorf("target rope: %w", err)
		}
		s.InvFreq, s.AttnFactor = inv, attn
	}
	return s, nil
}

// capture records source layer l's attention inputs and outputs on the
// source model's hidden states (the first f.seqs sequences of hidden),
// before the layer moves them on; with sequential inputs, the first
// layer's refined-model states start as the embeddings.
func (f *refiner) capture(ctx context.Context, runner *eval.LayerRunner, cfg model.Config, l *model.Layer, hidden []float32) error {
	n := f.seqs * f.seqLen * cfg.HiddenSize
	if f.opts.Inputs == InputsSequential && f.hidden == nil {
		f.hidden = append([]float32(nil), hidden[:n]...)
	}
	f.x = grow(f.x, n)
	kernels.RMSNorm(f.x, hidden[:n], l.AttnNorm, float32(cfg.RMSNormEps))
	f.y = append(f.y[:0], f.x...)
	if err := runner.Attention(ctx, l, f.y, f.seqs); err != nil {
		return err
	}
	if f.opts.Correct && f.opts.Inputs == InputsSequential {
		for i, h := range hidden[:n] {
			f.y[i] += h - f.hidden[i]
		}
	}
	return nil
}

// refine fits converted layer out (its MLA projections, and o_proj with
// Output) to the captured targets, in place, and with sequential inputs
// moves the refined model's hidden states on through it. src is the
// source layer (norms, o_proj, MLP).
func (f *refiner) refine(ctx context.Context, cfg model.Config, src, out *model.Layer, progress mlafit.Progress) (*RefineReport, error) {
	ml := out.MLA
	// Copies: a Plan's layers share q_proj between widths.
	p := mlafit.Params[float32]{
		mlafit.Q: ml.Q.W, mlafit.QBias: ml.Q.B, mlafit.KVA: ml.KVA.W, mlafit.KVABias: ml.KVA.B, mlafit.KVANorm: ml.KVANorm,
		mlafit.KVB: ml.KVB.W, mlafit.KVBBias: ml.KVB.B, mlafit.O: src.O.W, mlafit.OBias: src.O.B,
	}
	fit := p.Clone()
	x := f.x
	if f.opts.Inputs == InputsSequential {
		x = make([]float32, len(f.x))
		kernels.RMSNorm(x, f.hidden, src.AttnNorm, float32(cfg.RMSNormEps))
	}
	o := mlafit.FitOptions{Steps: f.opts.Steps, Batch: f.opts.Batch, LR: f.opts.LR, Val: f.opts.Val, EvalEvery: 10, Patience: 4,
		Values: f.opts.Values, Seed: f.opts.Seed, Threads: runtime.GOMAXPROCS(0)}
	for i := range o.Train {
		o.Train[i] = i != mlafit.O && i != mlafit.OBias || f.opts.Output
	}
	rep, err := mlafit.Fit(ctx, f.layer, fit, mlafit.Data[float32]{X: x, Y: f.y, Seqs: f.seqs, Len: f.seqLen}, o, progress)
	if err != nil {
		return nil, err
	}
	nl := &model.MLALayer{
		Q:   model.Linear{W: fit[mlafit.Q], B: fit[mlafit.QBias]},
		KVA: model.Linear{W: fit[mlafit.KVA], B: fit[mlafit.KVABias]}, KVANorm: fit[mlafit.KVANorm],
		KVB: model.Linear{W: fit[mlafit.KVB], B: fit[mlafit.KVBBias]},
	}
	out.MLA = nl
	if f.opts.Output {
		out.O = model.Linear{W: fit[mlafit.O], B: fit[mlafit.OBias]}
	}
	if f.runner != nil {
		next := *src
		next.Q, next.K, next.V, next.MLA = model.Linear{}, model.Linear{}, model.Linear{}, nl
		next.O = out.O
		if err := f.runner.Apply(ctx, &next, f.hidden, f.seqs, nil); err != nil {
			return nil, fmt.Errorf("refined model's forward: %w", err)
		}
	}
	return &RefineReport{Report: rep, Inputs: f.opts.Inputs}, nil
}
