package convert

import (
	"context"
	"fmt"
	"math"

	"github.com/transmla/transmla/model"
)

// LayerReport describes one converted layer.
type LayerReport struct {
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
	p := &layerPlan{src: src, dst: dst, opts: opts, moment: moment}
	res, err := p.convertLayer(l)
	if err != nil {
		return nil, LayerReport{}, err
	}
	if err := checkFreqs(dst, res.ropeInvFreq); err != nil {
		return nil, LayerReport{}, err
	}
	out := *l
	out.Q, out.K, out.V = model.Linear{}, model.Linear{}, model.Linear{}
	out.MLA = res.mla
	return &out, LayerReport{Retained: res.retained}, nil
}

// checkFreqs makes sure the decoupling's frequencies are the ones the
// target config makes loaders compute (or, for the exact anchor, the ones
// it carries in memory).
func checkFreqs(dst model.Config, got []float64) error {
	want := dst.MLA.RopeInvFreq
	if want == nil {
		var err error
		want, _, err = dst.Rope.InvFreq()
		if err != nil {
			return err
		}
	}
	if len(want) != len(got) {
		return fmt.Errorf("rope: %d frequencies, want %d", len(got), len(want))
	}
	for i := range want {
		if math.Abs(got[i]-want[i]) > 1e-9*math.Abs(want[i]) {
			return fmt.Errorf("rope: pair %d rotates at %v, loaders would use %v", i, got[i], want[i])
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
			return nil, nil, err
		}
		for range src.Config.NumKVHeads {
			dst.MLA.RopeInvFreq = append(dst.MLA.RopeInvFreq, inv...)
		}
	}
	out := *src
	out.Config = dst
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
