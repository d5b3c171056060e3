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
	// Refine reports the layer's refinement, if any.
	Refine *RefineReport `json:"refine,omitempty"`
}

// ConvertLayer rewrites a GQA layer as MLA. stats are the layer's
// calibration statistics, or nil for a data-free conversion. The returned
// layer shares the MLP and norms of l.
func ConvertLayer(src, dst model.Config, opts Options, l *model.Layer, stats *LayerStats) (*model.Layer, LayerReport, error) {
	p, err := newLayerPlan(src, dst, opts, stats)
	if err != nil {
		return nil, LayerReport{}, err
	}
	res, err := p.convertLayer(l)
	if err != nil {
		return nil, LayerReport{}, err
	}
	if err := checkFreqs(src, dst, opts.RopeStride, res.ropeInvFreq); err != nil {
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
// stands for: pair i must rotate like source pair i·c, c the stride.
func checkFreqs(src, dst model.Config, stride float64, got []float64) error {
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
	c := float64(max(1, len(srcFreq)/len(want)))
	if stride > 0 {
		c = stride
	}
	for i := range want {
		near := func(a, b float64) bool { return math.Abs(a-b) <= 1e-9*math.Abs(b) }
		if !near(got[i], want[i]) {
			return fmt.Errorf("rope: pair %d rotates at %v, loaders would use %v", i, got[i], want[i])
		}
		j := float64(i) * c
		if dst.MLA.RopeInvFreq == nil && j == math.Trunc(j) && !near(want[i], srcFreq[int(j)]) {
			return fmt.Errorf("rope: the converted pair %d would rotate at %v, its source frequency is %v (rope_scaling %q)", i, want[i], srcFreq[int(j)], src.Rope.Scaling.Type)
		}
	}
	return nil
}

// ConvertModel converts a whole in-memory model; stats holds each layer's
// calibration statistics or is nil for a data-free conversion. It is the
// in-memory form of Run, for small models and tests.
func ConvertModel(ctx context.Context, src *model.Model, opts Options, stats []LayerStats) (*model.Model, []LayerReport, error) {
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
	if stats != nil && len(stats) != len(src.Layers) {
		return nil, nil, fmt.Errorf("calibration statistics of %d layers for %d layers", len(stats), len(src.Layers))
	}
	out.Layers = make([]model.Layer, len(src.Layers))
	reports := make([]LayerReport, len(src.Layers))
	for i := range src.Layers {
		if err := ctx.Err(); err != nil {
			return nil, nil, err
		}
		var st *LayerStats
		if stats != nil {
			st = &stats[i]
		}
		l, rep, err := ConvertLayer(src.Config, dst, opts, &src.Layers[i], st)
		if err != nil {
			return nil, nil, fmt.Errorf("layer %d: %w", i, err)
		}
		rep.Layer = i
		out.Layers[i], reports[i] = *l, rep
	}
	return &out, reports, nil
}
