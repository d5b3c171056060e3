package convert

import (
	"context"
	"math"
	"path/filepath"
	"testing"

	"gonum.org/v1/gonum/mat"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/internal/synthtest"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/safetensors"
	"github.com/transmla/transmla/svd"
)

// logitsOf runs a few fixed tokens through m.
func logitsOf(t *testing.T, m *model.Model) []float32 {
	t.Helper()
	r, err := eval.NewRunner(m, kernels.NewNative(), 32)
	if err != nil {
		t.Fatal(err)
	}
	l, err := r.Forward(context.Background(), r.NewCache(), []int{1, 50, 60, 70, 80, 90, 100, 110, 3, 200}, true)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// A plan's model at every width is the model that Run writes at that
// width with a fresh factorization, read back: same logits, same retained
// energy, for the exact and stock formats, biased and unbiased sources,
// bf16 and f32 storage. Plan.Write's checkpoint is the plan's model too.
func TestPlanModelMatchesRun(t *testing.T) {
	calib := calibText(t)
	cal := &Calibration{File: calib, Tokens: 512, SeqLen: 64, Seed: 1}
	base := Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, FreqFold: 2, NopeSpan: DefaultNopeSpan, Weighting: WeightAttention, ValueWeight: 1}
	llama := model.DefaultSynthetic()
	qwen := llama
	qwen.QKVBias = true
	for _, tc := range []struct {
		name    string
		spec    model.SyntheticSpec
		dtype   string
		cal     *Calibration
		methods []Options
	}{
		{"llama bf16 calibrated", llama, "", cal, []Options{base, with(base, func(o *Options) { o.RopeMethod, o.FreqFold, o.Weighting = rope.Method2Norm, 0, WeightBalanced })}},
		{"qwen2 stock calibrated", qwen, "f32", cal, []Options{with(base, func(o *Options) { o.Format = FormatStock })}},
		{"qwen2 stock data-free bf16", qwen, "bf16", nil, []Options{with(base, func(o *Options) { o.Format, o.Weighting = FormatStock, WeightNone })}},
		// RoPE on the fastest frequencies, two slots each, score-ranked:
		// rope_theta changes, which the written config must carry.
		{"llama stride 1/2", llama, "", cal, []Options{with(base, func(o *Options) { o.RopeDim, o.RopeStride, o.FreqFold, o.RopeRank = 32, 0.5, 1, rope.RankScore })}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := synthtest.Checkpoint(t, tc.spec)
			const maxRank = 96 // 2·2·32 − 16 = 112 is the lossless bound
			methods := make([]Options, len(tc.methods))
			for i, o := range tc.methods {
				o.Rank = maxRank
				methods[i] = o
			}
			plan, err := NewPlan(context.Background(), PlanJob{Source: src, Methods: methods, DType: tc.dtype, Calibration: tc.cal, Backend: kernels.NewNative(), Version: "test"})
			if err != nil {
				t.Fatal(err)
			}
			for mi, o := range methods {
				for _, rank := range []int{8, 40, maxRank} {
					got, reps, err := plan.Model(mi, rank)
					if err != nil {
						t.Fatal(err)
					}
					o.Rank = rank
					out := filepath.Join(t.TempDir(), "mla")
					sum, err := Run(context.Background(), Job{Source: src, Output: out, Options: o, DType: tc.dtype, Calibration: tc.cal, Backend: kernels.NewNative()})
					if err != nil {
						t.Fatal(err)
					}
					want, err := model.Load(context.Background(), out, nil)
					if err != nil {
						t.Fatal(err)
					}
					if got.Config.MLA.KVLoraRank != rank || got.StorageDType != want.StorageDType {
						t.Errorf("method %d rank %d: plan model has kv_lora_rank %d, dtype %v; Run wrote %v", mi, rank, got.Config.MLA.KVLoraRank, got.StorageDType, want.StorageDType)
					}
					assertSameLogits(t, logitsOf(t, got), logitsOf(t, want))
					for i, r := range reps {
						if math.Abs(r.Retained-sum.Layers[i].Retained) > 1e-9 {
							t.Errorf("method %d rank %d layer %d: retained %v, Run %v", mi, rank, i, r.Retained, sum.Layers[i].Retained)
						}
					}
				}
			}
			// Write goes through Run with the plan's layers.
			out := filepath.Join(t.TempDir(), "written")
			sum, err := plan.Write(context.Background(), 0, 40, out, false, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			written, err := model.Load(context.Background(), out, nil)
			if err != nil {
				t.Fatal(err)
			}
			inMemory, _, err := plan.Model(0, 40)
			if err != nil {
				t.Fatal(err)
			}
			assertSameLogits(t, logitsOf(t, written), logitsOf(t, inMemory))
			if sum.Rank != 40 || (tc.cal != nil) != (sum.CalibrationSHA256 != "") || sum.CalibrationSHA256 != plan.CalibrationSHA256() {
				t.Errorf("Write summary: rank %d, calibration %q (plan %q)", sum.Rank, sum.CalibrationSHA256, plan.CalibrationSHA256())
			}
		})
	}
}

func assertSameLogits(t *testing.T, got, want []float32) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d logits, want %d", len(got), len(want))
	}
	for i := range want {
		if math.Abs(float64(got[i]-want[i])) > 1e-4*(1+math.Abs(float64(want[i]))) {
			t.Fatalf("logit %d: %v, want %v", i, got[i], want[i])
		}
	}
}

// Widths the plan was not factored for are refused, as are widths above
// the lossless bound.
func TestPlanRejectsWidths(t *testing.T) {
	src := synthtest.Checkpoint(t, model.DefaultSynthetic())
	o := Options{Rank: 32, RopeDim: 16, RopeMethod: rope.MethodRoRoPE, Weighting: WeightNone}
	plan, err := NewPlan(context.Background(), PlanJob{Source: src, Methods: []Options{o}})
	if err != nil {
		t.Fatal(err)
	}
	for _, rank := range []int{0, 33, 200} {
		if _, _, err := plan.Model(0, rank); err == nil {
			t.Errorf("width %d: no error", rank)
		}
	}
	if _, _, err := plan.Model(1, 8); err == nil {
		t.Error("method 1 of 1: no error")
	}
	if _, err := NewPlan(context.Background(), PlanJob{Source: src, Methods: []Options{with(o, func(o *Options) { o.Rank = 113 })}}); err == nil {
		t.Error("a plan above the lossless bound 112: no error")
	}
}

// Data-free with no weighting, the spectra are those of the singular
// values of the stacked [W b] blocks, which gonum's SVD computes here
// independently of the eigendecomposition svd.Factor uses.
func TestPlanSpectraAreSingularValues(t *testing.T) {
	src := synthtest.Checkpoint(t, model.DefaultSynthetic())
	m, err := model.Load(context.Background(), src, nil)
	if err != nil {
		t.Fatal(err)
	}
	o := Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, FreqFold: 2, NopeSpan: DefaultNopeSpan, Weighting: WeightNone, Format: FormatExact}
	o.Rank = LosslessRank(m.Config, o.RopeDim)
	plan, err := NewPlan(context.Background(), PlanJob{Source: src, Methods: []Options{o}})
	if err != nil {
		t.Fatal(err)
	}
	spectra := plan.Spectra(0)
	if len(spectra) != m.Config.NumLayers {
		t.Fatalf("%d layer spectra, want %d", len(spectra), m.Config.NumLayers)
	}
	for li, s := range spectra {
		lp := &layerPlan{src: m.Config, dst: TargetConfig(m.Config, o), opts: o}
		a, err := lp.analyse(&m.Layers[li])
		if err != nil {
			t.Fatal(err)
		}
		np, rows := a.dec.NopeDim(), a.prob.Rows
		for _, c := range []struct {
			name   string
			got    []float64
			lo, hi int
		}{{"joint", s.Joint, 0, rows}, {"K_nope", s.KeyNope, 0, np}, {"V", s.Value, np, rows}} {
			want := svdKept(t, a.prob, c.lo, c.hi)
			if len(c.got) != len(want) {
				t.Fatalf("layer %d %s: %d ranks, want %d", li, c.name, len(c.got), len(want))
			}
			for r := range want {
				if math.Abs(c.got[r]-want[r]) > 1e-9 {
					t.Fatalf("layer %d %s rank %d: kept %v, singular values give %v", li, c.name, r+1, c.got[r], want[r])
				}
			}
		}
	}
}

// svdKept is the cumulative fraction of the squared singular values of
// rows lo..hi of [W b].
func svdKept(t *testing.T, p svd.Problem, lo, hi int) []float64 {
	t.Helper()
	n := hi - lo
	w := mat.NewDense(n, p.In+1, nil)
	for i := range n {
		copy(w.RawRowView(i), p.W[(lo+i)*p.In:(lo+i+1)*p.In])
		w.Set(i, p.In, p.B[lo+i])
	}
	var dec mat.SVD
	if !dec.Factorize(w, mat.SVDNone) {
		t.Fatal("SVD did not converge")
	}
	vals := dec.Values(nil)
	var total float64
	for _, v := range vals {
		total += v * v
	}
	out := make([]float64, n)
	var kept float64
	for i := range n {
		kept += vals[i] * vals[i]
		out[i] = kept / total
	}
	return out
}

// The plan rounds the weights it keeps as a written checkpoint stores
// them: round to nearest even.
func TestRoundTo(t *testing.T) {
	x := []float32{1 + 1.0/256, 1 + 3.0/256, 65519, 1e-8, -2.5}
	bf := roundTo(safetensors.BF16, append([]float32(nil), x...))
	// 1+2⁻⁸ is a tie between 1 and 1+2⁻⁷: even is 1; 1+3·2⁻⁸ rounds up to 1+2⁻⁶.
	if bf[0] != 1 || bf[1] != 1+1.0/64 || bf[4] != -2.5 {
		t.Errorf("bf16: %v", bf)
	}
	f16 := roundTo(safetensors.F16, append([]float32(nil), x...))
	if f16[2] != 65504 || f16[3] != 0 || f16[0] != 1+1.0/256 {
		t.Errorf("f16: %v", f16)
	}
	if f32 := roundTo(safetensors.F32, append([]float32(nil), x...)); f32[3] != 1e-8 {
		t.Errorf("f32 changed a value: %v", f32)
	}
}
