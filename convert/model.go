package convert

import (
	"context"
	"fmt"
	"math"

	"github.com/transmla/transmla/model"
)

// LayerReport describes one converted layer.
type LayerReport struct {
	// Layer is the layer's index.
	Layer int `json:"layer"`
	// Retained is the fraction of the (weighted) K_nope/V energy that the
	// latent keeps.
	Retained float64 `json:"retained"`
}

// ConvertLayer rewrites layer index li of a GQA model as MLA. moment is the
// layer's attention-input second moment E[x̃ x̃ᵀ], x̃ = [x; 1], of size
// (D+1)², or nil for a data-free conversion. The returned layer shares the
// MLP and norms of l.
func ConvertLayer(src, dst model.Config, opts Options, l *model.Layer, moment []float64) (*model.Layer, LayerReport, error) {
	if n := src.HiddenSize + 1; moment != nil && len(moment) != n*n {
		return nil, LayerReport{}, fmt.Errorf("attention-input moment has %d values, want %d×%d", len(moment), n, n)
	}
	p := &layerPlan{src: src, dst: dst, opts: opts, moment: moment}
	res, err := p.convertLayer(l)
	if err != nil {
		return nil, LayerReport{}, err
	}
	if err := checkFreqs(src, dst, res.ropeInvFreq); err != nil {
		return nil, LayerReport{}, err
	}
	out := *l
	out.Q, out.K, out.V = model.Linear{}, model.Linear{}, model.Linear{}
	out.MLA = res.mla
	return &out, LayerReport{Retained: res.retained}, nil
}

// checkFreqs makes sure that the frequencies loaders compute from the
// target config (or, for the exact anchor, the ones it carries in memory)
// are the decoupling's, and that each is the source frequency its slot
// stands for: pair i of a rope-dim RoPE must rotate like source pair i·c.
func checkFreqs(src, dst model.Config, got []float64) error {
	want := dst.MLA.RopeInvFreq
	srcFreq, _, err := src.Rope.InvFreq()
	if err != nil {
		return fmt.Errorf("source rope: %w", err)
	}
	if want == nil {
		if want, _, err = dst.Rope.InvFreq(); err != nil {
			return fmt.Errorf("target rope: %w", err)
		}
	}
	if len(want) != len(got) {
		return fmt.Errorf("rope: %d frequencies, want %d", len(got), len(want))
	}
	c := max(1, len(srcFreq)/len(want))
	for i := range want {
		near := func(a, b float64) bool { return math.Abs(a-b) <= 1e-9*math.Abs(b) }
		if !near(got[i], want[i]) {
			return fmt.Errorf("rope: pair %d rotates at %v, loaders would use %v", i, got[i], want[i])
		}
		if dst.MLA.RopeInvFreq == nil && !near(want[i], srcFreq[i*c]) {
			return fmt.Errorf("rope: the converted pair %d would rotate at %v, its source frequency is %v (rope_scaling %q)", i, want[i], srcFreq[i*c], src.Rope.Scaling.Type)
		}
	}
	return nil
}

// ConvertModel converts a whole in-memory model; moments holds one
// per-layer moment or is nil for a data-free conversion. It is the
// in-memory form of Run, for small models and tests.
func ConvertModel(ctx context.Context, src *model.Model, opts Options, moments [][]float64) (*model.Model, []LayerReport, error) {
	if err := opts.Validate(src.Config); err != nil {
		return nil, nil, err
	}
	dst := TargetConfig(src.Config, opts)
	if opts.ExactRoPE {
		inv, _, err := src.Config.Rope.InvFreq()
		if err != nil {
			return nil, nil, fmt.Errorf("source rope: %w", err)
		}
		for range src.Config.NumKVHeads {
			dst.MLA.RopeInvFreq = append(dst.MLA.RopeInvFreq, inv...)
		}
	}
	out := *src
	out.Config = dst
	if moments != nil && len(moments) != len(src.Layers) {
		return nil, nil, fmt.Errorf("%d layer moments for %d layers", len(moments), len(src.Layers))
	}
	out.Layers = make([]model.Layer, len(src.Layers))
	reports := make([]LayerReport, len(src.Layers))
	for i := range src.Layers {
		if err := ctx.Err(); err != nil {
			return nil, nil, err
		}
		var m []float64
		if moments != nil {
			m = moments[i]
		}
		l, rep, err := ConvertLayer(src.Config, dst, opts, &src.Layers[i], m)
		if err != nil {
			return nil, nil, fmt.Errorf("layer %d: %w", i, err)
		}
		rep.Layer = i
		out.Layers[i], reports[i] = *l, rep
	}
	return &out, reports, nil
}
