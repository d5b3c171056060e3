package eval

import (
	"context"
	"fmt"
	"math"
	"testing"

	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/safetensors"
)

// residentPair rounds m's matrices (projections, embedding, LM head) to dt
// and returns two models holding the same values: one as float32, one as
// the 16-bit values themselves (as model.LoadOptions.KeepDType loads
// them).
func residentPair(m *model.Model, dt safetensors.DType) (f32, half *model.Model) {
	round := func(w []float32) ([]float32, model.Bits16) {
		vals, bits := make([]float32, len(w)), make([]uint16, len(w))
		for i, v := range w {
			if dt == safetensors.BF16 {
				bits[i] = safetensors.Float32ToBF16(v)
				vals[i] = safetensors.BF16ToFloat32(bits[i])
			} else {
				bits[i] = safetensors.Float32ToF16(v)
				vals[i] = safetensors.F16ToFloat32(bits[i])
			}
		}
		return vals, model.Bits16{DType: dt, Bits: bits}
	}
	lin := func(l model.Linear) (model.Linear, model.Linear) {
		vals, bits := round(l.W)
		return model.Linear{W: vals, B: l.B}, model.Linear{W16: bits, B: l.B}
	}
	f, h := *m, *m
	f.Embed, h.Embed16 = round(m.Embed)
	h.Embed = nil
	if m.Config.TieWordEmbeddings {
		f.LMHead, h.LMHead = model.Linear{W: f.Embed}, model.Linear{W16: h.Embed16}
	} else {
		f.LMHead, h.LMHead = lin(m.LMHead)
	}
	f.Layers, h.Layers = make([]model.Layer, len(m.Layers)), make([]model.Layer, len(m.Layers))
	for i, l := range m.Layers {
		fl, hl := l, l
		if l.MLA != nil {
			fm, hm := *l.MLA, *l.MLA
			fm.Q, hm.Q = lin(l.MLA.Q)
			fm.KVA, hm.KVA = lin(l.MLA.KVA)
			fm.KVB, hm.KVB = lin(l.MLA.KVB)
			fl.MLA, hl.MLA = &fm, &hm
		} else {
			fl.Q, hl.Q = lin(l.Q)
			fl.K, hl.K = lin(l.K)
			fl.V, hl.V = lin(l.V)
		}
		fl.O, hl.O = lin(l.O)
		fl.Gate, hl.Gate = lin(l.Gate)
		fl.Up, hl.Up = lin(l.Up)
		fl.Down, hl.Down = lin(l.Down)
		f.Layers[i], h.Layers[i] = fl, hl
	}
	return &f, &h
}

// residentCases are the models of the resident-weight tests: GQA with
// biases and a window, and the MLA variants (exact with biases; stock,
// with kv_a_layernorm and no biases).
func residentCases(t *testing.T) map[string]*model.Model {
	return map[string]*model.Model{
		"gqa":       randomModel(t, gqaConfig(0, true), 21),
		"gqa-swa":   randomModel(t, gqaConfig(5, false), 22),
		"mla-exact": randomModel(t, mlaCases[0].config(), 23),
		"mla-stock": randomModel(t, mlaCases[1].config(), 24),
	}
}

// Weights kept as bf16 or f16 give the logits of the same weights held as
// float32: bit for bit in prefills (the packed products widen exactly
// into the same panels), and up to float32 summation order in decode
// steps (the matrix-vector kernels add in another order), on both MLA
// paths.
func TestResidentWeightsMatchFloat32(t *testing.T) {
	ctx := context.Background()
	for name, m := range residentCases(t) {
		for _, dt := range []safetensors.DType{safetensors.BF16, safetensors.F16} {
			for _, path := range []MLAPath{PathAbsorbed, PathDecompressed} {
				if m.Config.MLA == nil && path == PathDecompressed {
					continue
				}
				t.Run(fmt.Sprintf("%s/%s/%s", name, dt, path), func(t *testing.T) {
					f, h := residentPair(m, dt)
					opts := Options{MaxPositions: 40, CacheDType: kernels.RowBF16, MLAPath: path}
					rf, err := NewRunnerWith(f, kernels.NewNative(), opts)
					if err != nil {
						t.Fatal(err)
					}
					rh, err := NewRunnerWith(h, kernels.NewNative(), opts)
					if err != nil {
						t.Fatal(err)
					}
					ids := edgeTokens(30, m.Config.VocabSize)
					cf, ch := rf.NewCache(), rh.NewCache()
					want, err := rf.Forward(ctx, cf, ids[:20], true)
					if err != nil {
						t.Fatal(err)
					}
					got, err := rh.Forward(ctx, ch, ids[:20], true)
					if err != nil {
						t.Fatal(err)
					}
					for i := range want {
						if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
							t.Fatalf("prefill logit %d: %v with %s weights, %v with float32", i, got[i], dt, want[i])
						}
					}
					for _, id := range ids[20:] {
						want, err := rf.Forward(ctx, cf, []int{id}, false)
						if err != nil {
							t.Fatal(err)
						}
						got, err := rh.Forward(ctx, ch, []int{id}, false)
						if err != nil {
							t.Fatal(err)
						}
						if e := maxRelErr(got, want); e > 1e-5 {
							t.Fatalf("decode step at %d: logits differ by %.3g", cf.Len(), e)
						}
					}
				})
			}
		}
	}
}

// A decode step on a reserved cache allocates nothing: weights of every
// dtype, GQA and absorbed MLA.
func TestDecodeStepAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts under the race detector mean nothing (sync.Pool drops items)")
	}
	ctx := context.Background()
	for name, m := range residentCases(t) {
		f, h := residentPair(m, safetensors.BF16)
		for what, mm := range map[string]*model.Model{"f32": f, "bf16": h} {
			t.Run(name+"/"+what, func(t *testing.T) {
				r, err := NewRunnerWith(mm, kernels.NewNative(), Options{MaxPositions: 300, CacheDType: kernels.RowBF16})
				if err != nil {
					t.Fatal(err)
				}
				c := r.NewCache()
				c.Reserve(300)
				logits, err := r.Forward(ctx, c, edgeTokens(150, m.Config.VocabSize), false)
				if err != nil {
					t.Fatal(err)
				}
				tok := []int{3}
				allocs := testing.AllocsPerRun(50, func() {
					if logits, err = r.ForwardInto(ctx, c, tok, false, logits); err != nil {
						t.Fatal(err)
					}
				})
				if allocs != 0 {
					t.Errorf("%v allocations per decode step", allocs)
				}
			})
		}
	}
}
