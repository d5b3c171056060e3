package convert

import (
	"bytes"
	"context"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
)

// firstLayerError measures, with eval's attention (not the fit's), how far
// layer 0 of the checkpoint in dir is from the source's on the source's
// layer-0 inputs of the calibration sequences seqs[lo:hi]: the squared
// error relative to the target's mean energy over all of seqs, as the
// fit reports its losses.
func firstLayerError(t *testing.T, src, dir string, cal *Calibration, lo, hi int) float64 {
	t.Helper()
	ctx := context.Background()
	be := kernels.NewNative()
	reader, _, err := openSource(src, "")
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	cfg := reader.Config()
	st := &stream{ctx: ctx, job: Job{Source: src}, reader: reader, src: cfg, be: be, cur: -1}
	if _, err := st.prepareCalibration(cal); err != nil {
		t.Fatal(err)
	}
	hidden, err := st.embedCalibration()
	if err != nil {
		t.Fatal(err)
	}
	l0, err := reader.Layer(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	x := make([]float32, len(hidden))
	kernels.RMSNorm(x, hidden, l0.AttnNorm, float32(cfg.RMSNormEps))
	want := append([]float32(nil), x...)
	if err := st.runner.Attention(ctx, l0, want, len(st.seqs)); err != nil {
		t.Fatal(err)
	}
	m, err := model.Load(ctx, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	lr, err := eval.NewLayerRunner(m.Config, be, cal.SeqLen)
	if err != nil {
		t.Fatal(err)
	}
	got := append([]float32(nil), x...)
	if err := lr.Attention(ctx, &m.Layers[0], got, len(st.seqs)); err != nil {
		t.Fatal(err)
	}
	var energy, errSum float64
	rows := len(x) / cfg.HiddenSize
	for _, v := range want {
		energy += float64(v) * float64(v)
	}
	per := cal.SeqLen * cfg.HiddenSize
	for i := lo * per; i < hi*per; i++ {
		d := float64(got[i] - want[i])
		errSum += d * d
	}
	return errSum / float64((hi-lo)*cal.SeqLen) / (energy / float64(rows))
}

// Refinement lowers each layer's error on the held-back calibration
// sequences, and what it reports is what the written checkpoint computes:
// eval's attention on the exported layer 0 scores the same held-back loss
// (teacher inputs, f32), before (the closed-form export) and after.
func TestRefineLowersHeldBackErrorOfTheExport(t *testing.T) {
	if testing.Short() {
		t.Skip("refines a synthetic model (-short)")
	}
	src := writeSynthetic(t)
	cal := &Calibration{File: calibText(t), Tokens: 12 * 64, SeqLen: 64, Seed: 1}
	for _, tc := range []struct {
		format     string
		output     bool
		values     bool
		methodPart string
	}{
		{FormatExact, false, false, "+refine(teacher,steps=30,tokens=768)"},
		{FormatStock, false, true, "+refine(teacher,steps=30,tokens=768,values)"},
		{FormatExact, true, true, "+refine(teacher,steps=30,tokens=768,values,o_proj)"},
	} {
		t.Run(tc.methodPart, func(t *testing.T) {
			opts := Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, NopeSpan: DefaultNopeSpan, Weighting: WeightAttention, Rank: 12, Format: tc.format}
			dir := t.TempDir()
			plain, refined := filepath.Join(dir, "plain"), filepath.Join(dir, "refined")
			job := Job{Source: src, Output: plain, Options: opts, DType: "f32", Calibration: cal, Backend: kernels.NewNative()}
			if _, err := Run(context.Background(), job); err != nil {
				t.Fatal(err)
			}
			r := Refine{Steps: 30, Batch: 4, LR: 0.02, Val: 3, Inputs: InputsTeacher, Values: tc.values, Output: tc.output, Seed: 1}
			job.Output, job.Refine = refined, &r
			var steps int
			job.Progress = func(ev Event) {
				if ev.Stage == StageRefine {
					steps++
				}
			}
			sum, err := Run(context.Background(), job)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasSuffix(sum.Method, tc.methodPart) {
				t.Errorf("method %q does not record the refinement", sum.Method)
			}
			total := 0
			for _, l := range sum.Layers {
				rr := l.Refine
				if rr == nil {
					t.Fatalf("layer %d: no refinement report", l.Layer)
				}
				total += rr.Steps
				if !(rr.ValAfter < 0.9*rr.ValBefore) {
					t.Errorf("layer %d: held-back loss %.4g → %.4g, want a fall of 10%% or more", l.Layer, rr.ValBefore, rr.ValAfter)
				}
			}
			if steps != total {
				t.Errorf("%d refine progress events for %d steps", steps, total)
			}
			rep := sum.Layers[0].Refine
			for _, c := range []struct {
				name string
				dir  string
				want float64
			}{{"closed form", plain, rep.ValBefore}, {"refined", refined, rep.ValAfter}} {
				got := firstLayerError(t, src, c.dir, cal, 12-r.Val, 12)
				if math.Abs(got-c.want) > 1e-3*c.want {
					t.Errorf("%s export: eval's held-back loss %.6g, the fit reported %.6g", c.name, got, c.want)
				}
			}
		})
	}
}

// A refined conversion is deterministic, and sequential inputs work
// through a search's prebuilt layers as through Run's own.
func TestRefineDeterministicThroughPlan(t *testing.T) {
	if testing.Short() {
		t.Skip("refines a synthetic model (-short)")
	}
	src := writeSynthetic(t)
	cal := &Calibration{File: calibText(t), Tokens: 8 * 64, SeqLen: 64, Seed: 1}
	opts := Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, NopeSpan: DefaultNopeSpan, Weighting: WeightAttention, Rank: 24, Format: FormatStock}
	plan, err := NewPlan(context.Background(), PlanJob{Source: src, Methods: []Options{opts}, DType: "f32", Calibration: cal, Backend: kernels.NewNative(), NoSpectra: true})
	if err != nil {
		t.Fatal(err)
	}
	r := Refine{Steps: 8, Batch: 2, LR: 0.03, Val: 2, Inputs: InputsSequential, Seed: 3}
	dir := t.TempDir()
	var files [2][]byte
	for i := range files {
		out := filepath.Join(dir, string(rune('a'+i)))
		sum, err := plan.Write(context.Background(), 0, 16, out, false, &r, nil)
		if err != nil {
			t.Fatal(err)
		}
		if sum.Layers[len(sum.Layers)-1].Refine == nil {
			t.Fatal("no refinement report")
		}
		if files[i], err = os.ReadFile(filepath.Join(out, "model.safetensors")); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(files[0], files[1]) {
		t.Error("two refinements of the same plan wrote different weights")
	}
	out := filepath.Join(dir, "closed")
	if _, err := plan.Write(context.Background(), 0, 16, out, false, nil, nil); err != nil {
		t.Fatal(err)
	}
	closed, err := os.ReadFile(filepath.Join(out, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(closed, files[0]) {
		t.Error("the refined export equals the closed-form one")
	}
}

func TestRefineCheck(t *testing.T) {
	good := DefaultRefine()
	for _, tc := range []struct {
		name string
		edit func(*Refine)
		seqs int
		ok   bool
	}{
		{"default", func(*Refine) {}, 64, true},
		{"too few sequences", func(*Refine) {}, 8, false},
		{"subset too small", func(r *Refine) { r.Seqs = 8 }, 64, false},
		{"bad inputs", func(r *Refine) { r.Inputs = "both" }, 64, false},
		{"no steps", func(r *Refine) { r.Steps = 0 }, 64, false},
		{"zero rate", func(r *Refine) { r.LR = 0 }, 64, false},
		{"NaN rate", func(r *Refine) { r.LR = math.NaN() }, 64, false},
		{"corrective teacher", func(r *Refine) { r.Inputs = InputsTeacher }, 64, false},
		{"teacher", func(r *Refine) { r.Inputs, r.Correct = InputsTeacher, false }, 64, true},
	} {
		r := good
		tc.edit(&r)
		if err := r.Check(tc.seqs); (err == nil) != tc.ok {
			t.Errorf("%s: error %v, want ok %v", tc.name, err, tc.ok)
		}
	}
}

func TestRunRefuseRefineWithoutCalibration(t *testing.T) {
	src := writeSynthetic(t)
	r := DefaultRefine()
	_, err := Run(context.Background(), Job{Source: src, Output: filepath.Join(t.TempDir(), "out"),
		Options: Options{RopeDim: 16, RopeMethod: rope.MethodRoRoPE, Weighting: WeightAttention, Rank: 40}, Refine: &r})
	if err == nil || !strings.Contains(err.Error(), "calibration") {
		t.Fatalf("error %v, want one asking for calibration data", err)
	}
}
